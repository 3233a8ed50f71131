"""`ff-jax plan`: per-device memory from shardings and XLA's analysis, refusal with the largest
batch that fits, and the Llama-2-7B preset planned on 8 fake CPU devices without its weights."""

from __future__ import annotations

import json
import subprocess

import jax
import pytest

from ff_jax import parallel
from ff_jax.config import load_config
from ff_jax.errors import ConfigError
from ff_jax.models import tiny_llama
from ff_jax.perf.plan import GIB, Planner, plan_run, refusal, shard_bytes, topology_devices
from ff_jax.training.steps import ModelRuntime, OptimConfig, Trainer
from tests.helpers.pipeline_helpers import REPO, TINY_DEMO, cli_env, ff_jax_cmd, make_tiny_hf_model


def test_per_device_bytes_match_the_placed_shards():
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4, tensor=1))
  runtime = ModelRuntime.create(tiny_llama(hidden_size=64, intermediate_size=128), mesh)
  planner = Planner(runtime)
  trainer = Trainer(runtime, OptimConfig(), total_steps=1)
  state = trainer.init_state(runtime.init_params(0))

  def placed(tree):  # bytes that device 0 really holds
    device = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
               if s.device == device)

  assert planner.param_bytes == placed(state["params"])
  assert shard_bytes(trainer.abstract_state()["opt_state"]) == placed(state["opt_state"])
  # FSDP over 4 devices: each holds about a quarter of the parameters.
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(state["params"]))
  assert total / 4 <= planner.param_bytes < total / 2


@pytest.mark.slow
def test_refuses_a_batch_that_does_not_fit_and_names_one_that_does(tmp_path):
  cfg = load_config(None, [*TINY_DEMO, f"run_dir={tmp_path}", "noisy.batch_size=512",
                           "safety.batch_size=8", "scoring.batch_size=8", "mesh.fsdp=8"])
  fits = plan_run(cfg)  # no limit known on CPU: measured, nothing refused
  assert refusal(fits) is None
  big = fits["steps"][0]
  assert big["batch"] == 512 and big["temp"] > 0 and big["arguments"] >= big["params"]
  limit_gib = big["total"] / 3 / GIB
  result = plan_run(cfg, hbm_gib=limit_gib)
  message = refusal(result)
  assert message and "train (noisy, clean) at batch 512" in message
  largest = result["steps"][0]["largest_batch"]
  assert 8 <= largest < 512 and largest % 8 == 0
  # The batch it names does fit when planned.
  again = plan_run(load_config(None, [*TINY_DEMO, f"run_dir={tmp_path}", "mesh.fsdp=8",
                                      f"noisy.batch_size={largest}", "safety.batch_size=8",
                                      "scoring.batch_size=8"]), hbm_gib=limit_gib)
  assert refusal(again) is None


def test_topology_needs_libtpu_or_names_the_slice():
  with pytest.raises(ConfigError, match="unknown slice"):
    topology_devices("v9-1")
  try:
    import libtpu  # noqa: F401
  except ImportError:
    with pytest.raises(ConfigError, match="needs libtpu"):
      topology_devices("v4-32")


@pytest.mark.slow
def test_llama2_7b_preset_on_8_fake_devices(tmp_path):
  """No weights here: the preset's architecture is planned. On 8 devices of 8 GiB, fp32 params
  and AdamW state alone (9.4 GiB per device) do not fit: refused whatever the batch."""
  env = cli_env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  out = tmp_path / "plan.json"
  proc = subprocess.run(
      ff_jax_cmd("plan", "configs/llama2-7b.yaml", "mesh.fsdp=8", "data.max_len=128",
                 "scoring.batch_size=8", "--hbm-gib", "8", "--json", str(out)),
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "6.74B parameters" in proc.stdout and "on 8 cpu devices" in proc.stdout
  result = json.loads(out.read_text())
  train, score = result["steps"][0], result["steps"][2]
  # fp32 parameters FSDP-sharded 8 ways, AdamW's two moments twice that.
  assert abs(train["params"] / GIB - 6.738e9 * 4 / 8 / GIB) < 0.01
  assert abs(train["optimizer"] / train["params"] - 2.0) < 0.01
  assert train["batch"] == 32 and train["temp"] > 0 and score["total"] < 8 * GIB
  assert proc.stderr.count("ff-jax: error: plan does not fit 8 GiB per device") == 1
  assert "train (noisy, clean) at batch 32 needs" in proc.stderr
  assert "alone need 9.4" in proc.stderr and "no batch fits" in proc.stderr


def test_preset_architecture_is_checked_against_the_files(tmp_path):
  from ff_jax.pipeline.inputs import planned_model_config

  folder = make_tiny_hf_model(tmp_path / "hf", ["a small model", "for a test"])
  cfg = load_config(None, [f"model.source={folder}", "model.config={hidden_size: 32}"])
  assert planned_model_config(cfg).hidden_size == 32  # the files decide; they agree
  tuned = load_config(None, [f"model.source={folder}", "model.config={hidden_size: 32}",
                             "model.dtype=bfloat16", "model.remat=true", "model.attention=cudnn"])
  got = planned_model_config(tuned)
  assert (got.dtype, got.remat, got.attention) == ("bfloat16", True, "cudnn")
  fp32_cudnn = load_config(None, [f"model.source={folder}", "model.config=null",
                                  "model.attention=cudnn"])
  with pytest.raises(ConfigError, match="model.attention: cuDNN's fused attention needs"):
    planned_model_config(fp32_cudnn)
  wrong = load_config(None, [f"model.source={folder}", "model.config={hidden_size: 4096}"])
  with pytest.raises(ConfigError, match=r"model.config.hidden_size: the preset says 4096 but"):
    planned_model_config(wrong)
  partial = load_config(None, [f"model.source={tmp_path / 'absent'}"])  # the demo's shape only
  with pytest.raises(ConfigError, match="from its architecture needs every shape field"):
    planned_model_config(partial)
  absent = load_config(None, [f"model.source={tmp_path / 'absent'}", "model.config=null"])
  with pytest.raises(ConfigError, match="not on this machine"):
    planned_model_config(absent)
