"""HF export from a mesh spread over two processes: two CPU processes on localhost
(`jax.distributed`, gloo collectives), two fake devices each, parameters sharded fsdp-wise across
the processes. The export gathers tensor by tensor, process 0 alone writes, and the files are the
bytes a one-process export of the same checkpoint writes. When process 0 cannot write, both
processes fail with an error instead of waiting for each other.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ff_jax.models import hf
from tests.helpers.hf_export_worker import lora_variant
from tests.helpers.local_pod import process_env
from tests.helpers.paths import FIXTURES, REPO

NAMES = ["llama", "gpt2", "gemma3"]  # plain, fused q/k/v (several params -> one tensor), norms
# ... and a bf16 export and a LoRA adapter folder of llama (tests.helpers.hf_export_worker)
VARIANTS = ["llama:bfloat16", "llama:adapter"]
MAX_SHARD_SIZE = 100_000  # bytes: 4-5 shards for each of these fixtures
TIMEOUT = 300


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _run_pair(root: Path, folder: str, names: list[str]) -> list[list[str]]:
  """Both processes, each in its own working directory root/p{i} (made before), exporting
  `names` under `folder`; returns each process's `exported` / `failed` lines."""
  port = _free_port()
  procs = []
  for pid in (0, 1):
    env = process_env(2, {"PYTHONPATH": str(REPO), "FF_JAX_COORDINATOR": f"127.0.0.1:{port}",
                          "FF_JAX_NUM_PROCESSES": "2", "FF_JAX_PROCESS_ID": str(pid)})
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.hf_export_worker", folder, str(MAX_SHARD_SIZE),
         *names], cwd=root / f"p{pid}", env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True))
  try:
    outputs = [proc.communicate(timeout=TIMEOUT)[0] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  codes = [proc.returncode for proc in procs]
  assert codes == [0, 0], "\n".join(f"-- process {i}:\n{o[-3000:]}" for i, o in enumerate(outputs))
  return [[line for line in output.splitlines() if line.startswith(("exported", "failed"))]
          for output in outputs]


def _dirs(root: Path) -> Path:
  for pid in (0, 1):
    (root / f"p{pid}").mkdir(parents=True)
  return root


def test_two_process_export_writes_the_one_process_bytes_from_process_0_only(tmp_path):
  root = _dirs(tmp_path / "pair")
  specs = NAMES + VARIANTS
  for lines in _run_pair(root, "export", specs):
    assert [line.split()[:2] for line in lines] == [["exported", spec] for spec in specs], lines
  # Process 1 took part in every gather but wrote nothing, not even a temp folder.
  assert list((root / "p1").iterdir()) == []
  exported = root / "p0" / "export"
  assert sorted(p.name for p in exported.iterdir()) == sorted(s.replace(":", "_") for s in specs)
  for spec in specs:
    name, _, variant = spec.partition(":")
    cfg, params = hf.load_hf(FIXTURES / "parity" / name)
    folder = tmp_path / "single" / spec.replace(":", "_")
    if variant == "adapter":
      cfg, params = lora_variant(cfg, params)
      single = hf.save_peft_adapter(folder, cfg, params, hf.hf_model_type(cfg), base_model=name)
    else:
      single = hf.save_hf(folder, cfg, params, hf.hf_model_type(cfg),
                          max_shard_size=MAX_SHARD_SIZE, dtype=variant or None)
    files = sorted(p.name for p in single.iterdir())
    if variant != "adapter":  # several shards (bf16: half as many bytes, so fewer)
      assert len([f for f in files if f.startswith("model-")]) >= (2 if variant else 3), files
    name = spec.replace(":", "_")
    assert sorted(p.name for p in (exported / name).iterdir()) == files
    for file in files:
      assert (exported / name / file).read_bytes() == (single / file).read_bytes(), (name, file)


def test_process_0_failing_to_write_fails_both_processes(tmp_path):
  root = _dirs(tmp_path / "pair")
  (root / "p0" / "blocked").write_text("a file where process 0's export folder should go")
  p0, p1 = _run_pair(root, "blocked/export", ["llama"])
  assert len(p0) == 1 and p0[0].startswith("failed llama "), p0
  assert "Error" in p0[0] and "CheckpointError" not in p0[0], p0  # its own error: the OS's
  # The folder as `atomic_io.run_path` makes it: absolute, in process 1's working directory.
  folder = (root / "p1").resolve() / "blocked" / "export" / "llama"
  assert p1 == [f"failed llama CheckpointError: {folder}: process 0 could not write the HF "
                "export; its log says why"]
  assert sorted(p.name for p in (root / "p0").iterdir()) == ["blocked"]
