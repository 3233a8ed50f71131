"""`ff-jax plan`: per-device memory from shardings and XLA's analysis, refusal with the largest
batch that fits, the stacked replica passes sized to what fits, and the Llama-2-7B preset planned
on 8 fake CPU devices without its weights."""

from __future__ import annotations

import json
import subprocess

import jax
import pytest

from ff_jax import parallel
from ff_jax.config import load_config
from ff_jax.errors import ConfigError
from ff_jax.models import tiny_llama
from ff_jax.perf.plan import plan_passes, plan_run, refusal, table, topology_devices
from ff_jax.pipeline.inputs import planned_model_config
from ff_jax.training.memory import GIB, Planner, largest_stack, pass_size, shard_bytes
from ff_jax.training.steps import ModelRuntime, OptimConfig, Trainer
from tests.helpers.local_pod import process_env
from tests.helpers.pipeline_helpers import REPO, TINY_DEMO, ff_jax_cmd, make_tiny_hf_model


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


# Two more safety replicas (a pass of at most 2), no noisy replica; small batches.
REPLICAS = [*TINY_DEMO, "scoring.replicas=3", "scoring.noisy_replicas=1", "filter.signal=nll_ens",
            "scoring.gradient_blocks=0", "noisy.batch_size=8", "safety.batch_size=8",
            "scoring.batch_size=8", "scoring.replicas_per_pass=auto"]


@pytest.mark.slow
def test_a_stacked_pass_is_planned_from_its_own_compiled_step_and_lowered_to_what_fits(tmp_path):
  cfg = load_config(None, [*REPLICAS, f"run_dir={tmp_path}"])
  one_device = parallel.make_mesh(parallel.MeshConfig(1, 1, 1), jax.devices()[:1])
  runtime = ModelRuntime.create(planned_model_config(cfg), one_device)
  planner = Planner(runtime)
  # CPU, device memory unknown: both stacks are reported, and the pass trains one at a time.
  (entry,) = plan_passes(cfg, planner, "cpu", None)
  assert entry["phase"] == "safety_replicas" and entry["replicas"] == 2
  assert entry["per_pass"] == 1 and "cpu" in entry["why"] and entry["fits"] is None
  two, one = entry["stacks"]
  assert (two["k"], one["k"]) == (2, 1) and two["peak"] > one["peak"]
  train2, score2 = two["steps"]
  train1, _ = one["steps"]
  assert train2["name"] == "train (safety) x2 stacked" and score2["name"] == "score x2 stacked"
  assert train2["optimizer"] == 2 * train1["optimizer"] and train2["params"] == 2 * train1["params"]
  # The stacked step's temporaries are those of its own compiled program, not a multiple.
  trainer = Trainer(runtime, cfg.safety.optim, total_steps=1, replicas=2)
  state = trainer.abstract_state()
  batch = {key: jax.ShapeDtypeStruct((2, 8, cfg.data.max_len)[:rank + 1], "int32",
                                     sharding=trainer.runtime.batch_sharding(stacked=True))
           for key, rank in parallel.BATCH_RANKS.items()}
  analysis = trainer.step.lower(state, batch).compile().memory_analysis()
  assert train2["temp"] == analysis.temp_size_in_bytes > train1["temp"]
  # Beside each program a pass keeps M1 (and, while it scores, the replicas' moments).
  assert train2["resident"] == planner.param_bytes
  assert score2["resident"] == planner.param_bytes + train2["optimizer"]

  # On an accelerator `auto` stacks as many as fit; less memory than two need lowers the stack.
  between = (one["peak"] + two["peak"]) / 2 / GIB
  for platform, limit, setting, per_pass in (("gpu", two["peak"] / GIB, "auto", 2),
                                             ("gpu", between, "auto", 1),
                                             ("cpu", between, 2, 1),
                                             ("gpu", one["peak"] / 2 / GIB, "auto", 0)):
    run_cfg = load_config(None, [*REPLICAS, f"run_dir={tmp_path}",
                                 f"scoring.replicas_per_pass={setting}"])
    (entry,) = plan_passes(run_cfg, planner, platform, limit)
    assert entry["per_pass"] == per_pass, (platform, limit, setting, entry)
    assert entry["fits"] == min(per_pass if setting == "auto" else 1, 2) or per_pass == 0
    result = {"device_memory_gib": limit, "steps": [], "replica_passes": [entry]}
    if per_pass == 0:
      assert "safety_replicas: even one replica per pass needs" in refusal(result)
    else:
      assert refusal(result) is None
  assert "2 stacked need" in plan_passes(cfg, planner, "gpu", between)[0]["why"]
  explicit = load_config(None, [*REPLICAS, f"run_dir={tmp_path}", "scoring.replicas_per_pass=2"])
  assert "set scoring.replicas_per_pass=1" in plan_passes(explicit, planner, "cpu",
                                                          between)[0]["why"]


def test_the_stack_size_rule():
  assert largest_stack(8, lambda k: k <= 5) == 5 and largest_stack(8, lambda k: True) == 8
  assert largest_stack(8, lambda k: False) == 0 and largest_stack(1, lambda k: k <= 1) == 1
  assert pass_size("auto", 1, "gpu", None, None) == (1, "one replica to train")
  assert pass_size(0, 4, "cpu", None, None)[0] == 4  # explicit: honoured (0: all at once)
  assert pass_size(3, 2, "cpu", None, None)[0] == 2
  assert pass_size("auto", 4, "cpu", 1e12, None)[0] == 1  # one replica saturates a CPU
  assert pass_size("auto", 4, "tpu", None, None) == (1, "device memory unknown: one at a time")
  with pytest.raises(ConfigError, match="scoring.replicas_per_pass='some'"):
    load_config(None, ["scoring.replicas_per_pass=some"])
  with pytest.raises(ConfigError, match="scoring.replicas_per_pass=-1"):
    load_config(None, ["scoring.replicas_per_pass=-1"])


@pytest.mark.slow
def test_a_small_hbm_lowers_the_stack_in_the_table_and_json(tmp_path):
  """`ff-jax plan` with less memory than two stacked replicas need: the pass stacks one."""
  overrides = [*REPLICAS, f"run_dir={tmp_path}", "scoring.replicas_per_pass=2"]
  free = plan_run(load_config(None, overrides))
  two, one = free["replica_passes"][0]["stacks"]
  assert free["replica_passes"][0]["per_pass"] == 2  # explicit, and nothing to check it against
  assert max(step["total"] for step in free["steps"]) < one["peak"]
  limit = (one["peak"] + two["peak"]) / 2 / GIB
  out = tmp_path / "plan.json"
  env = process_env(len(jax.devices()))  # as here
  proc = subprocess.run(ff_jax_cmd("plan", *overrides, "--hbm-gib", f"{limit:.6f}", "--json",
                                   str(out)),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (entry,) = json.loads(out.read_text())["replica_passes"]
  assert (entry["per_pass"], entry["fits"]) == (1, 1)
  assert [s["k"] for s in entry["stacks"]] == [2, 1]
  assert "safety_replicas: 2 more replicas, 1 per pass (2 per pass needs" in proc.stdout
  assert "safety_replicas: train (safety) x2 stacked" in proc.stdout
  assert table(free).count("x2 stacked") == 2


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
  env = process_env(8)
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
