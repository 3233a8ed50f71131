"""The finetune case ff_jax is held to PyTorch's AdamW on, shared by the live test
(tests/training/test_finetune_parity.py), the golden test (tests/training/test_finetune_golden.py)
and the script that writes the golden file (scripts/make_finetune_fixture.py).

ForgetFilter's two finetunes (noisy, then safety from the noisy result with a fresh optimizer)
run through ff_jax's real phase code (`loop.train_phase`, per-step loss read back from its log)
and, on the same batches, through the reference's torch loop (shared/reference/
ref_forgetfilter_torch.py: AdamW with weight_decay=0 and default betas/eps,
`clip_grad_norm_(1.0)` every step, constant LR, loss = response-token NLL sum / response tokens in
the batch, fp32). The torch functions import torch when called, so the rest of this module serves
the torch-free golden test too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ff_jax.data.batching import Batching, TrainIterator
from ff_jax.data.templates import EncodedExample
from ff_jax.progress import TrainingLog
from ff_jax.training.loop import PhaseSpec, train_phase
from ff_jax.training.steps import OptimConfig, Trainer

PAD, EOS, BOS = 0, 1, 2
BUCKETS = (16, 32)
RTOL = 1e-4
# Big enough that the weights really move (each phase's loss falls by ~1 nat) and the clip binds.
OPTIM = OptimConfig(learning_rate=1e-3, b2=0.999, schedule="constant", warmup_steps=0,
                    max_grad_norm=1.0, weight_decay=0.0)
NOISY = PhaseSpec("noisy", steps=20, batching=Batching(4, BUCKETS, PAD), optim=OPTIM, seed=11)
SAFETY = dataclasses.replace(NOISY, name="safety", seed=12)
# ff_jax's old default Adam b2: the negative control, which the comparison must catch.
WRONG_B2 = dataclasses.replace(NOISY, name="noisy_b2", optim=dataclasses.replace(OPTIM, b2=0.95))


def synthetic(n: int, seed: int) -> list[EncodedExample]:
  """BOS + prompt (loss_mask 0) + response + EOS (loss_mask 1), of varied lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    prompt = [BOS, *rng.integers(3, 128, int(rng.integers(2, 10)))]
    response = [*rng.integers(3, 128, int(rng.integers(2, 13))), EOS]
    loss_mask = np.array([0] * len(prompt) + [1] * len(response), np.int32)
    out.append(EncodedExample(tokens=np.array(prompt + response, np.int32), loss_mask=loss_mask,
                              prompt_len=len(prompt), truncated=False, id=f"ex{i}"))
  return out


def to_arrays(examples: list[EncodedExample]) -> dict[str, np.ndarray]:
  """`examples` as arrays a .npz holds: tokens and loss masks right-padded with -1."""
  width = max(len(e) for e in examples)
  tokens = np.full((len(examples), width), -1, np.int32)
  loss_mask = np.full((len(examples), width), -1, np.int32)
  for i, e in enumerate(examples):
    tokens[i, :len(e)], loss_mask[i, :len(e)] = e.tokens, e.loss_mask
  return {"tokens": tokens, "loss_mask": loss_mask,
          "prompt_len": np.array([e.prompt_len for e in examples], np.int32)}


def from_arrays(tokens: np.ndarray, loss_mask: np.ndarray,
                prompt_len: np.ndarray) -> list[EncodedExample]:
  """The inverse of `to_arrays`."""
  out = []
  for i, (row, mask) in enumerate(zip(tokens, loss_mask)):
    real = row >= 0
    out.append(EncodedExample(tokens=row[real], loss_mask=mask[real],
                              prompt_len=int(prompt_len[i]), truncated=False, id=f"ex{i}"))
  return out


def phase_batches(spec: PhaseSpec, examples) -> TrainIterator:
  """The batches `train_phase` draws for `spec` on one process (a pure function of the seed and
  the step), which the torch loop replays."""
  return TrainIterator(examples, spec.batching.batch_size, spec.seed, BUCKETS, pad_id=PAD)


def torch_batch(batch):
  """(input_ids, attention_mask, target weights) as the reference feeds its model; filler rows
  (example_id -1, every mask 0) contribute nothing to ff_jax's loss or gradient, so they go."""
  import torch

  real = batch["example_id"] >= 0
  ids = torch.from_numpy(batch["tokens"][real]).long()
  am = torch.from_numpy(batch["mask"][real]).long()
  # ff_jax's `_target_weights`: loss_mask[:, t] weighs the prediction of tokens[:, t] from t-1.
  return ids, am, torch.from_numpy(batch["loss_mask"][real][:, 1:]).float()


def nll_per_example(model, ids, am, w):
  """The reference's `nll_per_example`: (summed response NLL, response tokens) per row."""
  import torch

  logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          ids[:, 1:].reshape(-1), reduction="none")
  return (nll.view(w.shape) * w).sum(1), w.sum(1)


def torch_phase(model, spec: PhaseSpec, examples, betas=(0.9, 0.999)):
  """The reference's `train` over the batches ff_jax's TrainIterator yields for `spec`:
  per-step (loss, pre-clip grad norm)."""
  import torch

  opt = torch.optim.AdamW(model.parameters(), lr=spec.optim.learning_rate, betas=betas,
                          weight_decay=0.0)
  it = phase_batches(spec, examples)
  model.train()
  losses, norms = [], []
  for _ in range(spec.steps):
    s, c = nll_per_example(model, *torch_batch(it.next_batch()[0]))
    loss = s.sum() / c.sum()
    loss.backward()
    norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
  return np.array(losses), np.array(norms)


def ff_phase(runtime, spec: PhaseSpec, params, examples, tmp: Path):
  """`loop.train_phase` as the pipeline runs it; (params, per-step losses, grad norms)."""
  log = tmp / f"{spec.name}.jsonl"
  copy = jax.tree.map(jnp.copy, params)  # the train step donates its state
  trainer = Trainer(runtime, spec.optim, spec.steps)
  out = train_phase(spec, trainer, lambda: copy, examples, tmp / f"ckpt_{spec.name}",
                    TrainingLog(log, every=1))  # every step's loss
  rows = [json.loads(line) for line in log.read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, spec.steps + 1))
  return out, np.array([r["loss"] for r in rows]), np.array([r["grad_norm"] for r in rows])


def rel(a, b) -> float:
  return float(np.max(np.abs(a - b) / np.abs(b)))
