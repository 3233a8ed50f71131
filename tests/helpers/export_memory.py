"""Peak host memory of an HF export: `python -m tests.helpers.export_memory FOLDER MODE`.

Builds a random Llama of ~360 MB (float32, 24 layers; its largest tensor, the embedding, is
16 MB), resets the kernel's peak-RSS mark (`/proc/self/clear_refs`), exports it and prints one
JSON line: the model's bytes, the shard size, the resident set before, and the peak during the
export (VmHWM) and its rise above the start. MODE `streamed` is `save_hf` with 32 MB shards;
`whole` gathers the whole model first (`export_tensors`) and writes one file, for comparison.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import resource
import sys
from pathlib import Path

import jax
from safetensors.numpy import save_file

from ff_jax.models import hf, init_params
from ff_jax.models.config import ModelConfig

SHARD_BYTES = 32 * 2**20
CONFIG = ModelConfig(vocab_size=8000, hidden_size=512, num_layers=24, num_heads=8, num_kv_heads=8,
                     intermediate_size=1536, max_position_embeddings=128, tie_embeddings=True)


def _status_kb(field: str) -> int:
  text = Path("/proc/self/status").read_text()
  return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def main(folder: str, mode: str) -> None:
  params = init_params(CONFIG, 0)
  jax.block_until_ready(params)
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed init buffers, or the export reuses them
  Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
  start_kb = _status_kb("VmRSS")
  maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  if mode == "streamed":
    hf.save_hf(folder, CONFIG, params, "llama", max_shard_size=SHARD_BYTES)
  else:
    Path(folder).mkdir(parents=True)
    save_file(hf.export_tensors(CONFIG, params, "llama"), str(Path(folder) / "model.safetensors"))
  peak_kb = _status_kb("VmHWM")
  print(json.dumps({
      "mode": mode, "model_mb": model_bytes / 2**20, "shard_mb": SHARD_BYTES / 2**20,
      "files": len(list(Path(folder).glob("*.safetensors"))), "rss_start_mb": start_kb / 1024,
      "peak_mb": peak_kb / 1024, "peak_rise_mb": (peak_kb - start_kb) / 1024,
      "ru_maxrss_rise_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                            - maxrss_before_kb) / 1024}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
