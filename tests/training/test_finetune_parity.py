"""ff_jax's finetuning equals the paper's PyTorch AdamW finetune of the same weights.

ForgetFilter's two finetunes (noisy, then safety from the noisy result with a fresh optimizer) run
through ff_jax's real phase code (`loop.train_phase`, per-step loss read back from its log)
and, on the same batches, through the reference's torch loop (shared/reference/
ref_forgetfilter_torch.py: AdamW with weight_decay=0 and default betas/eps, `clip_grad_norm_(1.0)`
every step, constant LR, loss = response-token NLL sum / response tokens in the batch, fp32).
The per-step losses and the final per-example NLLs must agree to 1e-4 relative. A negative control
shows the comparison is sharp enough to catch a wrong Adam b2 (ff_jax's old default 0.95).
The case lives in tests/helpers/finetune_case.py; test_finetune_golden.py runs it without torch,
on a smaller model, against committed PyTorch results.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from ff_jax import parallel
from ff_jax.data.batching import Batching, make_batch
from ff_jax.models import forward, hf, positions_from_mask, tiny_llama
from ff_jax.training.scoring import score_examples
from ff_jax.training.steps import ModelRuntime, Scorer
from tests.helpers.finetune_case import (
  BOS,
  BUCKETS,
  EOS,
  NOISY,
  OPTIM,
  PAD,
  RTOL,
  SAFETY,
  ff_phase,
  nll_per_example,
  rel,
  synthetic,
  torch_batch,
  torch_phase,
)

torch = pytest.importorskip("torch")
LlamaForCausalLM = pytest.importorskip("transformers").LlamaForCausalLM
# ~50 s on a busy 2-core machine: three ff_jax phases, each compiling two bucket shapes, and the
# torch reference.
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  torch.set_num_threads(1)  # with more threads, fighting XLA for 2 cores, torch ran ~50x slower
  tmp = tmp_path_factory.mktemp("finetune_parity")
  cfg = tiny_llama(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, bos_token_id=BOS, eos_token_id=EOS,
                   pad_token_id=PAD, attention="einsum")
  mesh = parallel.make_mesh(parallel.MeshConfig(1, 1, 1), jax.devices()[:1])
  runtime = ModelRuntime.create(cfg, mesh)
  params0 = runtime.init_params(seed=0)
  model = LlamaForCausalLM.from_pretrained(hf.save_hf(tmp / "m0", cfg, params0, "llama"),
                                           attn_implementation="eager", dtype=torch.float32)
  noisy, safe = synthetic(22, 1), synthetic(12, 2)  # 22 % 4: the last batch has filler rows

  # Step 0: the same weights give the same logits on real tokens.
  b0 = make_batch(noisy, list(range(8)), BUCKETS, PAD)
  ff0, _ = forward(runtime.graphdef, params0, b0["tokens"], positions_from_mask(b0["mask"]),
                   b0["mask"])
  with torch.no_grad():
    th0 = model(**dict(zip(("input_ids", "attention_mask"), torch_batch(b0)[:2]))).logits
  real = b0["mask"].astype(bool)
  logit_diff = float(np.abs(np.asarray(ff0) - th0.numpy())[real].max())

  m1, ff_noisy, ff_noisy_norm = ff_phase(runtime, NOISY, params0, noisy, tmp)
  m2, ff_safety, ff_safety_norm = ff_phase(runtime, SAFETY, m1, safe, tmp)
  th_noisy, th_noisy_norm = torch_phase(model, NOISY, noisy)
  th_safety, th_safety_norm = torch_phase(model, SAFETY, safe)

  stats = score_examples(Scorer(runtime), m2, noisy, Batching(8, BUCKETS, PAD))
  model.eval()
  with torch.no_grad():
    s, c = nll_per_example(model, *torch_batch(make_batch(noisy, range(22), BUCKETS, PAD)))
  # Negative control: the noisy phase with ff_jax's old default b2 against torch's 0.999.
  wrong_b2 = dataclasses.replace(NOISY, name="noisy_b2", optim=dataclasses.replace(OPTIM, b2=0.95))
  _, ff_wrong, _ = ff_phase(runtime, wrong_b2, params0, noisy, tmp)
  return dict(
      logit_diff=logit_diff,
      ff_loss=np.concatenate([ff_noisy, ff_safety]), th_loss=np.concatenate([th_noisy, th_safety]),
      ff_norm=np.concatenate([ff_noisy_norm, ff_safety_norm]),
      th_norm=np.concatenate([th_noisy_norm, th_safety_norm]),
      ff_nll=stats["nll_sum"] / stats["tokens"], th_nll=(s / c).numpy(),
      ff_tokens=stats["tokens"], th_tokens=c.numpy(), ff_wrong=ff_wrong, th_noisy=th_noisy)


def test_same_weights_at_step_zero(runs):
  assert runs["logit_diff"] <= 1e-4


def test_per_step_loss_matches_torch(runs):
  ff, th = runs["ff_loss"], runs["th_loss"]
  print(f"\nmax relative loss difference over {len(ff)} steps: {rel(ff, th):.2e}")
  print("loss ff_jax:", np.array2string(ff, precision=4, max_line_width=100))
  print("loss torch:", np.array2string(th, precision=4, max_line_width=100))
  assert ff.shape == th.shape == (40,)
  assert rel(ff, th) <= RTOL
  assert th[:5].mean() - th[15:20].mean() > 0.3  # the noisy finetune really moved the weights


def test_clip_binds_and_grad_norms_match(runs):
  print("\npre-clip grad norms:", np.array2string(runs["th_norm"], precision=3,
                                                  max_line_width=100))
  assert (runs["th_norm"] > OPTIM.max_grad_norm).any()  # clipping is exercised
  print(f"max relative grad norm difference: {rel(runs['ff_norm'], runs['th_norm']):.2e}")
  # Looser than the loss: a norm of the gradient sums many tiny components, and their rounding
  # noise grows over Adam steps (torch fp32 is itself ~1e-5 off an fp64 torch run here).
  assert rel(runs["ff_norm"], runs["th_norm"]) <= 1e-3


def test_final_per_example_nll_matches_torch(runs):
  np.testing.assert_array_equal(runs["ff_tokens"], runs["th_tokens"])
  print(f"\nmax relative final NLL difference: {rel(runs['ff_nll'], runs['th_nll']):.2e}")
  assert rel(runs["ff_nll"], runs["th_nll"]) <= RTOL


def test_wrong_b2_is_caught(runs):
  gap = rel(runs["ff_wrong"], runs["th_noisy"])
  print(f"\nb2=0.95 vs torch's 0.999: max relative loss difference {gap:.2e}")
  assert gap > 5 * RTOL
