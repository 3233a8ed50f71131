"""ff_jax's finetuning equals PyTorch's AdamW finetune, against committed golden results (no torch).

tests/fixtures/finetune_adamw/ (scripts/make_finetune_fixture.py) holds a tiny Llama's initial
weights, the data, the batches each step drew, and what the reference's torch loop computed on
them: per-step loss and pre-clip gradient norm over ForgetFilter's two finetunes, and the final
per-example NLL. Here ff_jax's real phase code (`loop.train_phase`) trains the same weights on the
same batches and must agree to 1e-4 relative, as the live test (test_finetune_parity.py, needs
torch) checks against torch directly; a wrong Adam b2 must not.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ff_jax import parallel
from ff_jax.data.batching import Batching
from ff_jax.models import hf
from ff_jax.training.scoring import score_examples
from ff_jax.training.steps import ModelRuntime, Scorer
from tests.helpers.finetune_case import (
  BUCKETS,
  NOISY,
  OPTIM,
  PAD,
  RTOL,
  SAFETY,
  WRONG_B2,
  ff_phase,
  from_arrays,
  phase_batches,
  rel,
)
from tests.helpers.paths import FIXTURES

# Three ff_jax phases, each compiling two bucket shapes: ~40 s of CPU time.
pytestmark = pytest.mark.slow

FIXTURE = FIXTURES / "finetune_adamw"
REGENERATE = "regenerate it with scripts/make_finetune_fixture.py (needs torch)"


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(FIXTURE / "expected.npz"))


def examples(golden, prefix: str):
  return from_arrays(*(golden[f"{prefix}_{k}"] for k in ("tokens", "loss_mask", "prompt_len")))


@pytest.fixture(scope="module")
def runs(golden, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("finetune_golden")
  mesh = parallel.make_mesh(parallel.MeshConfig(1, 1, 1), jax.devices()[:1])
  cfg, _ = hf.load_hf(FIXTURE)
  runtime = ModelRuntime.create(cfg.replace(attention="einsum"), mesh)  # as the live test's
  _, params0 = hf.load_hf(FIXTURE, mesh=mesh)
  noisy, safe = examples(golden, "noisy"), examples(golden, "safe")
  m1, noisy_loss, noisy_norm = ff_phase(runtime, NOISY, params0, noisy, tmp)
  m2, safety_loss, safety_norm = ff_phase(runtime, SAFETY, m1, safe, tmp)
  stats = score_examples(Scorer(runtime), m2, noisy, Batching(8, BUCKETS, PAD))
  _, wrong_b2_loss, _ = ff_phase(runtime, WRONG_B2, params0, noisy, tmp)
  return dict(loss=np.concatenate([noisy_loss, safety_loss]),
              grad_norm=np.concatenate([noisy_norm, safety_norm]),
              nll=stats["nll_sum"] / stats["tokens"], tokens=stats["tokens"],
              wrong_b2_loss=wrong_b2_loss)


@pytest.mark.parametrize("prefix, spec", [("noisy", NOISY), ("safe", SAFETY)])
def test_batches_are_the_ones_torch_trained_on(golden, prefix, spec):
  """Otherwise the comparison below is of different runs: ff_jax's batching changed, and the
  fixture must be regenerated."""
  it = phase_batches(spec, examples(golden, prefix))
  for step in range(spec.steps):
    batch = it.next_batch()[0]
    assert (batch["example_id"].tolist(), batch["tokens"].shape[1]) == (
        golden[f"{prefix}_example_id"][step].tolist(), golden[f"{prefix}_width"][step]), (
        f"step {step + 1} of {spec.name}: {REGENERATE}")


def test_the_fixture_moves_the_weights_and_clips(golden):
  loss = golden["loss"]
  assert loss.shape == golden["grad_norm"].shape == (NOISY.steps + SAFETY.steps,)
  assert loss[:5].mean() - loss[15:20].mean() > 0.3  # the noisy finetune
  assert loss[20:25].mean() - loss[35:].mean() > 0.3  # the safety finetune
  assert (golden["grad_norm"] > OPTIM.max_grad_norm).any()


def test_per_step_loss_matches_torch(golden, runs):
  print(f"\nmax relative loss difference: {rel(runs['loss'], golden['loss']):.2e}")
  assert rel(runs["loss"], golden["loss"]) <= RTOL


def test_grad_norms_match_torch(golden, runs):
  print(f"\nmax relative grad norm difference: {rel(runs['grad_norm'], golden['grad_norm']):.2e}")
  # Looser than the loss, as in the live test: a norm sums many tiny components, whose rounding
  # noise grows over Adam steps.
  assert rel(runs["grad_norm"], golden["grad_norm"]) <= 1e-3


def test_final_per_example_nll_matches_torch(golden, runs):
  np.testing.assert_array_equal(runs["tokens"], golden["tokens"])
  print(f"\nmax relative final NLL difference: {rel(runs['nll'], golden['nll']):.2e}")
  assert rel(runs["nll"], golden["nll"]) <= RTOL


def test_wrong_b2_is_caught(golden, runs):
  gap = rel(runs["wrong_b2_loss"], golden["loss"][:NOISY.steps])
  print(f"\nb2=0.95 vs torch's 0.999: max relative loss difference {gap:.2e}")
  assert gap > 5 * RTOL
