"""Regenerate tests/fixtures/finetune_adamw/: PyTorch's AdamW finetune of a tiny Llama, as golden.

The case is tests/helpers/finetune_case.py's (the live test tests/training/test_finetune_parity.py
runs it against torch directly): 20 noisy steps, then 20 safety steps from their result with a
fresh optimizer, through the reference's torch loop on the batches ff_jax's TrainIterator draws.
The model is smaller than the live test's so that its weights stay under 200 KB. The folder holds

  config.json, generation_config.json, model.safetensors
                the initial weights (ff_jax's init, seed 0, as ff_jax exports them; transformers
                loads them for the torch run and the golden test loads the same file)
  expected.npz  the data (`noisy_*`, `safe_*`: tokens and loss masks padded with -1, prompt
                lengths), the batches each step drew (`*_example_id` [steps, batch] and
                `*_width` [steps]), and torch's results: per-step `loss` and pre-clip `grad_norm`
                over the 40 steps, and after them each noisy example's response NLL per token
                (`nll`) and response tokens (`tokens`)

so that tests/training/test_finetune_golden.py holds ff_jax's finetune to PyTorch's without torch.
Needs torch (CPU) and transformers. Deterministic: a rerun writes the same files.

  python scripts/make_finetune_fixture.py [--out tests/fixtures/finetune_adamw]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ff_jax.data.batching import make_batch  # noqa: E402
from ff_jax.models import hf, init_params, tiny_llama  # noqa: E402
from tests.helpers import finetune_case as case  # noqa: E402

SEED = 0
CONFIG = tiny_llama(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, bos_token_id=case.BOS, eos_token_id=case.EOS,
                    pad_token_id=case.PAD)


def batch_record(spec, examples) -> dict[str, np.ndarray]:
  """Which examples each step of `spec` draws, and the bucket width it pads them to."""
  it = case.phase_batches(spec, examples)
  batches = [it.next_batch()[0] for _ in range(spec.steps)]
  return {"example_id": np.stack([b["example_id"] for b in batches]),
          "width": np.array([b["tokens"].shape[1] for b in batches], np.int32)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "finetune_adamw"
  parser.add_argument("--out", type=Path, default=default)
  args = parser.parse_args()
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)  # one summation order whatever the machine

  shutil.rmtree(args.out, ignore_errors=True)
  folder = hf.save_hf(args.out, CONFIG, init_params(CONFIG, SEED), "llama")
  noisy, safe = case.synthetic(22, 1), case.synthetic(12, 2)  # 22 % 4: filler rows at the end
  model = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                        dtype=torch.float32)
  noisy_loss, noisy_norm = case.torch_phase(model, case.NOISY, noisy)
  safety_loss, safety_norm = case.torch_phase(model, case.SAFETY, safe)
  model.eval()
  with torch.no_grad():
    batch = make_batch(noisy, range(len(noisy)), case.BUCKETS, case.PAD)
    nll_sum, tokens = case.nll_per_example(model, *case.torch_batch(batch))

  record = {}
  for prefix, examples, spec in (("noisy", noisy, case.NOISY), ("safe", safe, case.SAFETY)):
    record |= {f"{prefix}_{k}": v for k, v in case.to_arrays(examples).items()}
    record |= {f"{prefix}_{k}": v for k, v in batch_record(spec, examples).items()}
  loss = np.concatenate([noisy_loss, safety_loss])
  np.savez(folder / "expected.npz", **record, loss=loss,
           grad_norm=np.concatenate([noisy_norm, safety_norm]),
           nll=(nll_sum / tokens).numpy(), tokens=tokens.numpy())
  size = sum(p.stat().st_size for p in folder.iterdir())
  print(f"{folder}: {size / 1024:.0f} KiB; loss {loss[0]:.3f} -> {loss[19]:.3f} (noisy), "
        f"{loss[20]:.3f} -> {loss[-1]:.3f} (safety)")


if __name__ == "__main__":
  main()
