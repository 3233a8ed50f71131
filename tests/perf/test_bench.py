"""`ff-jax bench` on a tiny model: every figure is present, finite and consistent."""

import json

import pytest

from ff_jax import cli
from ff_jax.models import tiny_llama
from ff_jax.perf.bench import BenchConfig, decode_flops, flops_per_token, matmul_params, run_bench

TINY = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128}


def test_flop_accounting_matches_hand_count():
  cfg = tiny_llama(**{k: v for k, v in TINY.items()})
  per_layer = 64 * 16 * (4 + 4 + 2 + 2) + 3 * 64 * 128
  assert matmul_params(cfg) == 2 * per_layer + 64 * 256
  attn = 2 * 4 * 16 * 32
  assert flops_per_token(cfg, 32, train=True) == 6 * matmul_params(cfg) + 12 * attn
  assert flops_per_token(cfg, 32, train=False) == 2 * matmul_params(cfg) + 4 * attn
  # 3 prompts of 5 tokens, 4 new: 8 passes through the blocks against 9 cache slots, 4 LM heads.
  body = 2 * (2 * per_layer) + 4 * 2 * 4 * 16 * 9
  assert decode_flops(cfg, 3, 5, 4) == 3 * (8 * body + 4 * 2 * 64 * 256)


@pytest.mark.slow
def test_bench_reports_every_path(tmp_path, capsys):
  result = run_bench(BenchConfig(model=TINY, batch_size=8, seq_len=32, repeats=2,
                                 decode_batch=4, decode_prompt_len=8, decode_new_tokens=4,
                                 peak_matmul_size=128))
  assert result["train"]["traces"] == 1  # no recompiles across repeated steps
  for path in ("train", "score"):
    assert 0 < result[path]["mfu"] < 5 and result[path]["min_s"] <= result[path]["median_s"]
  decode = result["decode"]
  assert decode["batched"]["tokens_per_s"] > 0 and decode["speedup"] > 0
  # Same FLOPs on both sides: the MFU ratio is the speed-up, and the peak bounds both.
  assert abs(decode["batched"]["mfu"] / decode["one_at_a_time"]["mfu"] - decode["speedup"]) < 1e-6
  assert abs(decode["speedup_at_peak"] * decode["batched"]["mfu"] / decode["speedup"] - 1) < 1e-9
  out = tmp_path / "bench.json"
  assert cli.main(["bench", "model.hidden_size=32", "model.intermediate_size=64",
                   "model.vocab_size=128", "model.num_layers=1", "seq_len=16", "batch_size=8",
                   "repeats=1", "decode_batch=2", "decode_new_tokens=2",
                   "peak_matmul_size=64", "--json", str(out)]) == 0
  assert "train step" in capsys.readouterr().out
  assert json.loads(out.read_text())["seq_len"] == 16


def test_accelerator_preset_loads():
  from ff_jax.config import load_dataclass
  from ff_jax.models import ModelConfig

  bench = load_dataclass(BenchConfig, "configs/bench-gpu.yaml", ["model.attention=cudnn"])
  cfg = ModelConfig.from_dict(bench.model)
  assert (cfg.dtype, cfg.attention, bench.seq_len) == ("bfloat16", "cudnn", 1024)
  assert round(matmul_params(cfg) / 1e6) == 1034  # the figure the README's GPU table quotes
