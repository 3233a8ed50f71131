"""The TPU path, compiled ahead of time for Cloud TPU slices on this CPU (libtpu, no TPU): a small
model's train, score and stacked steps with splash attention and the LM head at targets only;
`ff-jax plan --topology` reports the memory of those very programs; and a batch the TPU compiler
refuses for want of HBM is answered with a batch that fits, not a traceback.

Everything that loads libtpu runs in a child process (`tests.helpers.tpu_programs`, or the
`ff-jax plan` command): this test process never does.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from ff_jax.perf.plan import TPU_SLICES
from ff_jax.training.memory import GIB
from tests.helpers.local_pod import process_env
from tests.helpers.pipeline_helpers import REPO, ff_jax_cmd
from tests.helpers.tpu_programs import TINY

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="compiling for a TPU without one needs libtpu ('.[tpu]')")


def _worker(*args: str) -> dict:
  proc = subprocess.run([sys.executable, "-m", "tests.helpers.tpu_programs", *args], cwd=REPO,
                        env=process_env(1), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("slice_name", ["v5e-8", "v4-8"])
def test_steps_compile_for_a_tpu_slice_with_splash_and_no_logits_array(slice_name):
  result = _worker("steps", slice_name)
  assert result["devices"] == TPU_SLICES[slice_name].chips  # v4: one device per megacore chip
  assert result["platform"] == result["layout_platform"] == "tpu"
  assert result["groups"] == result["devices"]
  assert set(result["programs"]) == {"train", "stacked train", "score", "stacked score"}
  for name, program in result["programs"].items():
    assert program["splash"], f"{name}: no splash kernel in the TPU program"
    # The old steps held every position's logits, [rows, T - 1, V] per device.
    assert program["largest_f32"] < result["logits_per_device"], name
    assert program["temp"] < result["hbm_gib"] * GIB, name


def _plan(tmp_path, *args):
  out = tmp_path / "plan.json"
  proc = subprocess.run(ff_jax_cmd("plan", *TINY, *args, "--topology", "v5e-8", "--json",
                                   str(out)),
                        cwd=REPO, env=process_env(1), capture_output=True, text=True, timeout=900)
  return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_plan_reports_the_memory_of_the_programs_a_run_compiles(tmp_path):
  proc, result = _plan(tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert result["platform"] == "tpu" and result["devices"] == 8
  assert result["device_memory_gib"] == TPU_SLICES["v5e-8"].hbm_gib
  built = _worker("programs")  # the same programs, built from the config as a run builds them
  by_name = {step["name"]: step for step in result["steps"]}
  for name, analysis in built.items():
    assert by_name[name]["temp"] == analysis["temp"], name
    assert by_name[name]["arguments"] == analysis["arguments"], name
    assert not by_name[name].get("out_of_memory")


def test_a_batch_the_tpu_compiler_refuses_is_answered_with_one_that_fits(tmp_path):
  """A noisy batch past the slice's HBM: XLA:TPU refuses to compile it (RESOURCE_EXHAUSTED). The
  plan catches that and looks for a batch that fits; `--hbm-gib` keeps the batches it compiles
  small (a TPU compile of a 64k-row step takes ~30 s here, of a hundred rows ~5 s)."""
  limit = 0.012
  proc, result = _plan(tmp_path, "noisy.batch_size=65536", "--hbm-gib", str(limit))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  message = proc.stderr.strip().splitlines()[-1]
  assert "train (noisy, clean) at batch 65536 needs" in message
  assert "RESOURCE_EXHAUSTED" in message and "exceeds available HBM" in message
  found = re.search(r"the largest batch found to fit \(compiled and checked\) is (\d+), or keep "
                    r"the batch and raise optim.grad_accum_steps", message)
  assert found, message  # over 64 micro-batches would be needed: none is named
  largest = int(found.group(1))
  assert 8 < largest < 65536 and largest % 8 == 0
  noisy = next(s for s in result["steps"] if s["name"] == "train (noisy, clean)")
  assert noisy["out_of_memory"] and noisy["largest_batch"] == largest
  assert "* train (noisy, clean) at batch 65536: RESOURCE_EXHAUSTED" in proc.stdout
  assert _worker("fits", str(largest), str(limit))["fits"]  # what it names does fit


def test_gradient_accumulation_that_keeps_the_batch_is_compiled_and_named():
  found = _worker("accumulation")
  assert found["small_fits"] and not found["big_fits"]
  assert found["accum"] in (2, 4) and found["accum_fits"]
  assert found["accum"] == 2 or not found["two_fits"]  # the fewest micro-batches that fit
