"""launch/tpu.py --dry-run: the gcloud commands of a v4-32 slice's life, printed, none run."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from tests.helpers.pipeline_helpers import REPO

SLICE = ["--name", "ff", "--zone", "us-central2-b", "--type", "v4-32", "--project", "proj"]
WHERE = ["--zone", "us-central2-b", "--project", "proj"]


def dry_run(step: str, *args: str) -> list[list[str]]:
  """The commands `launch/tpu.py --dry-run STEP` prints, each split like a shell would."""
  proc = subprocess.run([sys.executable, "launch/tpu.py", "--dry-run", step, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_create_reuses_or_creates_the_vm():
  describe, create = dry_run("create", *SLICE)
  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "ff"]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ff", *WHERE,
                    "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]


def test_create_through_a_queued_resource():
  describe, create = dry_run("create", *SLICE, "--queued", "--spot")
  assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "ff-qr"]
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "ff-qr",
                    "--node-id", "ff", *WHERE, "--accelerator-type", "v4-32",
                    "--runtime-version", "tpu-ubuntu2204-base", "--spot"]


def test_install_on_every_worker():
  scp, ssh = dry_run("install", *SLICE, "--wheel", "dist/ff_jax-0.1-py3-none-any.whl",
                     "--bucket", "gs://runs-bucket")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ff"]
  assert "--worker=all" in ssh
  remote = ssh[ssh.index("--command") + 1]
  assert 'pip install -U "$HOME/ff_jax-0.1-py3-none-any.whl[tpu]"' in remote
  assert "apt-get install -yq gcsfuse" in remote
  (plain,) = dry_run("install", *SLICE)
  assert "pip install -U 'ff-jax[tpu]'" in plain[plain.index("--command") + 1]


def test_run_starts_one_command_on_all_workers_with_the_run_dir_in_the_bucket():
  (ssh,) = dry_run("run", *SLICE, "--bucket", "runs-bucket", "--", "ff-jax", "run",
                   "configs/llama2-7b.yaml", "run_dir=gs://runs-bucket/l2")
  assert "--worker=all" in ssh
  remote = ssh[ssh.index("--command") + 1]
  assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 runs-bucket /gcs/runs-bucket" in remote
  inner = shlex.split(remote.split("nohup sh -c ", 1)[1].split(" > ")[0])[0]
  assert inner == ("FF_JAX_DISTRIBUTED=1 FF_JAX_PROGRESS_INTERVAL=30 ff-jax run "
                   "configs/llama2-7b.yaml run_dir=/gcs/runs-bucket/l2")
  assert remote.endswith("> ~/ff-jax.log 2>&1 &")


def test_logs_and_teardown():
  (logs,) = dry_run("logs", *SLICE, "--worker", "3")
  assert "--worker=3" in logs and logs[-1] == "tail -n +1 -F ~/ff-jax.log"
  (delete,) = dry_run("teardown", *SLICE)
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ff", *WHERE, "--quiet"]
  (delete_qr,) = dry_run("teardown", *SLICE, "--queued")
  assert delete_qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ff-qr"]


def test_up_is_create_install_run_logs():
  commands = dry_run("up", *SLICE, "--", "ff-jax", "run", "configs/llama2-7b.yaml")
  verbs = [c[4] for c in commands]
  assert verbs == ["describe", "create", "ssh", "ssh", "ssh"]


@pytest.mark.parametrize("args, message", [
    (["--", "ff-jax", "run", "run_dir=gs://b/x"], "needs --bucket"),
    ([], "give the command after --"),
])
def test_run_refuses_what_cannot_work(args, message):
  proc = subprocess.run([sys.executable, "launch/tpu.py", "--dry-run", "run", *SLICE, *args],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and message in proc.stderr
