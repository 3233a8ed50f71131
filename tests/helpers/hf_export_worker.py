"""One process of `test_hf_export_multihost`: load parity fixtures onto a mesh that spans both
processes (fsdp across them, tensor within each) and export each with `save_hf`.

Usage: `python -m tests.helpers.hf_export_worker FOLDER MAX_SHARD_SIZE NAME...`. FOLDER is taken
relative to the process's working directory, so the test can run each process in a directory of
its own and see which of them wrote anything. A NAME may carry a variant: `NAME:bfloat16` (or
another export dtype) exports in that dtype, `NAME:adapter` writes the PEFT folder of LoRA
adapters (`lora_variant`) with `save_peft_adapter`; each goes to FOLDER/NAME_VARIANT. Prints
`exported NAME FOLDER` or `failed NAME ERROR` for each export.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from ff_jax import parallel
from ff_jax.models import abstract_model, hf, lora
from ff_jax.models.config import LoraConfig
from ff_jax.models.loading import flatten, unflatten
from ff_jax.parallel import MeshConfig, make_mesh
from ff_jax.training.steps import ModelRuntime
from tests.helpers.paths import FIXTURES

LORA = LoraConfig(rank=2, alpha=4.0, targets=("q", "o", "down"))


def lora_variant(cfg, params, mesh=None):
  """(config with adapters, params with them): A seeded, B = 0.01 · its element index (not the
  identity), each factor on the runtime's sharding over `mesh` (None: one device)."""
  cfg = cfg.replace(lora=LORA)
  runtime = ModelRuntime.create(cfg, mesh) if mesh is not None else None
  _, abstract, _ = abstract_model(cfg)
  shardings = runtime.param_shardings if runtime is not None else None
  adapted = flatten(lora.add_adapters(params, abstract, shardings, seed=1))
  for path, value in adapted.items():
    if str(path[-1]).endswith("_lora_b"):
      ramp = lambda b: b + 0.01 * jnp.arange(b.size, dtype=b.dtype).reshape(b.shape)  # noqa: E731
      adapted[path] = jax.jit(ramp, out_shardings=value.sharding)(value)
  return cfg, unflatten(adapted)


def main(folder: str, max_shard_size: int, names: list[str]) -> None:
  assert parallel.initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
  for spec in names:
    name, _, variant = spec.partition(":")
    cfg, params = hf.load_hf(FIXTURES / "parity" / name, mesh=mesh)
    if variant == "adapter":
      cfg, params = lora_variant(cfg, params, mesh)
    leaves = jax.tree.leaves(params)
    # The export must gather: some parameters have no complete copy on this process.
    split = [x for x in leaves if not x.is_fully_addressable and not x.is_fully_replicated]
    assert split and any("fsdp" in x.sharding.spec for x in split), name
    dest = Path(folder) / spec.replace(":", "_")
    try:
      if variant == "adapter":
        factors = [x for x in jax.tree.leaves(lora.split(params)[0]) if not x.is_fully_addressable]
        assert factors, "the adapters must be gathered too"
        out = hf.save_peft_adapter(dest, cfg, params, hf.hf_model_type(cfg), base_model=name)
      else:
        out = hf.save_hf(dest, cfg, params, hf.hf_model_type(cfg), max_shard_size=max_shard_size,
                         dtype=variant or None)
    except Exception as e:  # the test checks which error each process saw
      print("failed", spec, f"{type(e).__name__}: {e}", flush=True)
    else:
      print("exported", spec, out, flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
