"""launch/tpu.py: the gcloud commands of a v4-32 slice's life printed by --dry-run (with the wheel
of the checkout built for real, offline), the local mode run for real as CPU processes, and every
command that the presets, launch/README.md and the dry run name checked against the parsers and
help of the launcher, ff-jax and hf.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from ff_jax import cli
from ff_jax.cpu_devices import cpu_device_flags
from launch import tpu
from launch.worker import VENV
from tests.helpers.pipeline_helpers import REPO, TINY_DEMO, cli_env

SLICE = ["--name", "ff", "--zone", "us-central2-b"]
WHERE = ["--zone", "us-central2-b"]
BIN = Path(sys.executable).parent  # where this venv's ff-jax and hf are
LLAMA = ["ff-jax", "run", "configs/llama2-7b.yaml", "--run-dir", "gs://runs-bucket/l2"]
# Arguments in a bucket, which the launcher must pass on to every worker exactly as they are.
IN_BUCKET = ["--run-dir", "gs://runs-bucket/l2", "data.noisy=gs://runs-bucket/data/noisy.jsonl"]


def launch(*args: str, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "launch/tpu.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=env)


def dry_run(step: str, *args: str) -> list[list[str]]:
  """The commands `launch/tpu.py --dry-run STEP` prints, each split like a shell would."""
  proc = launch("--dry-run", step, *args)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def remote(ssh: list[str]) -> str:
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ff"] and "--worker=all" in ssh
  return ssh[ssh.index("--command") + 1]


def offline_env() -> dict[str, str]:
  """This environment with every proxy pointing at a closed port: anything that reaches for the
  network fails."""
  env = dict(os.environ)
  for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    env[var] = "http://127.0.0.1:9"
  env["PIP_NO_INDEX"] = "1"
  return env


# -- the pod's steps ----------------------------------------------------------------------------


def test_create_reuses_or_creates_the_vm():
  describe, create = dry_run("create", *SLICE, "--type", "v4-32", "--project", "proj")
  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "ff"]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ff", *WHERE, "--project",
                    "proj", "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]


def test_create_through_a_queued_resource():
  describe, create = dry_run("create", *SLICE, "--type", "v5p-64", "--queued", "--spot")
  assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "ff-qr"]
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "ff-qr",
                    "--node-id", "ff", *WHERE, "--accelerator-type", "v5p-64",
                    "--runtime-version", "v2-alpha-tpuv5", "--spot"]


def test_up_on_a_v4_32_slice_installs_a_wheel_of_the_checkout_in_a_python_3_11_venv():
  """No flags beyond the slice: the wheel is built from the checkout (offline, for real), copied
  to every worker and installed with its tpu extra into a Python >= 3.11 venv, which runs."""
  proc = launch("--dry-run", "up", *SLICE, "--type", "v4-32", "--", "ff-jax", "run",
                "configs/llama2-7b.yaml", env=offline_env())
  assert proc.returncode == 0, proc.stderr
  commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
  describe, create, build, scp, install, run, logs = commands
  assert create[4] == "create" and create[-4:] == ["--accelerator-type", "v4-32", "--version",
                                                   "tpu-ubuntu2204-base"]
  assert build[:7] == [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                       "--no-index"]
  wheel = Path(scp[5])
  assert wheel.parent == REPO / "dist" and wheel.is_file()
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[6] == "ff:~/"
  assert "--worker=all" in scp
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  assert {"ff_jax/cli.py", "ff_jax/parallel.py", "ff_jax/configs/llama2-7b.yaml"} <= names
  assert not any("__pycache__" in name for name in names)
  assert "Requires-Python: >=3.11" in metadata and "Provides-Extra: tpu" in metadata
  assert "Provides-Extra: gcs" in metadata
  setup = remote(install)
  assert f"uv venv --clear --seed --python 3.11 $HOME/{VENV}" in setup
  assert (f'$HOME/{VENV}/bin/python -m pip install --quiet "$HOME/{wheel.name}[tpu,gcs]"'
          in setup)
  assert setup.endswith(f"$HOME/{VENV}/bin/ff-jax --version")
  assert "gcsfuse" not in proc.stdout and "/gcs/" not in proc.stdout
  started = remote(run)
  assert started.startswith(f'export PATH="$HOME/{VENV}/bin:$PATH" && (nohup env ')
  assert "FF_JAX_DISTRIBUTED=1 ff-jax run configs/llama2-7b.yaml > ~/ff-jax.log" in started
  assert logs[-1] == "tail -n +1 -F ~/ff-jax.log" and "--worker=0" in logs


def test_the_venv_step_makes_python_3_11_only_where_it_is_missing(tmp_path):
  """The worker's shell step, run here against a stand-in uv that records its arguments: no venv
  -> uv makes one with Python 3.11; a venv with Python >= 3.11 -> left alone."""
  from launch.pod import python_venv

  uv = tmp_path / ".local" / "bin" / "uv"
  uv.parent.mkdir(parents=True)
  uv.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/uv-calls\n'
                f'mkdir -p $HOME/{VENV}/bin && ln -sf {sys.executable} $HOME/{VENV}/bin/python\n')
  uv.chmod(0o755)
  env = {**os.environ, "HOME": str(tmp_path)}
  for _ in range(2):
    subprocess.run(["sh", "-c", python_venv()], env=env, check=True, timeout=60)
  calls = (tmp_path / "uv-calls").read_text().splitlines()
  assert calls == [f"venv --clear --seed --python 3.11 {tmp_path}/{VENV}"]


def test_install_a_prebuilt_wheel_with_its_tpu_and_gcs_extras_on_every_worker(tmp_path):
  """The `gcs` extra (gcsfs, google-cloud-storage) is what lets ff-jax on a worker read and write
  the bucket itself; nothing else is installed for it."""
  wheel = tmp_path / "ff_jax-0.1-py3-none-any.whl"
  wheel.write_bytes(b"")
  scp, ssh = dry_run("install", *SLICE, "--wheel", str(wheel))
  assert scp[5] == str(wheel) and "--worker=all" in scp
  setup = remote(ssh)
  assert f'pip install --quiet "$HOME/{wheel.name}[tpu,gcs]"' in setup
  assert "gcsfuse" not in setup and "apt-get" not in setup


def test_run_starts_one_command_on_all_workers_with_its_gs_arguments_as_they_are():
  """The run directory and data in the bucket reach every worker's ff-jax unchanged (it reads and
  writes them natively): no mount before the command, no /gcs/ path in it."""
  (ssh,) = dry_run("run", *SLICE, "--", *LLAMA[:3], *IN_BUCKET)
  script = remote(ssh)
  assert script.startswith(f'export PATH="$HOME/{VENV}/bin:$PATH" && (nohup env ')
  started = shlex.split(script.split("(nohup ", 1)[1].split(" > ")[0])
  assert started == ["env", "FF_JAX_PROGRESS_INTERVAL=30", "PYTHONUNBUFFERED=1",
                     "FF_JAX_DISTRIBUTED=1", *LLAMA[:3], *IN_BUCKET]
  assert script.endswith("> ~/ff-jax.log 2>&1 < /dev/null &)")


@pytest.mark.parametrize("command", [
    ["hf", "download", "openai-community/gpt2-xl", "--local-dir", "models/gpt2-xl"],
    ["gcloud", "storage", "cp", "gs://runs-bucket/data/noisy.jsonl", "data/"],
])
def test_exec_runs_in_the_foreground_with_the_venv_first_on_path(command):
  (ssh,) = dry_run("exec", *SLICE, "--", *command)
  assert remote(ssh) == f'export PATH="$HOME/{VENV}/bin:$PATH" && {shlex.join(command)}'


def test_local_passes_gs_arguments_as_they_are():
  """`local` builds its processes' commands as `run` does: a run directory in a bucket is ff-jax's
  to reach (with the `gcs` extra and credentials here), not refused or rewritten."""
  commands = dry_run("local", "--processes", "2", "--", *LLAMA[:3], *IN_BUCKET)
  assert len(commands) == 2
  for command in commands:  # env K=V ... COMMAND > LOG 2>&1
    assert command[command.index("ff-jax"):-3] == [*LLAMA[:3], *IN_BUCKET]


def test_logs_and_teardown():
  (logs,) = dry_run("logs", *SLICE, "--worker", "3")
  assert "--worker=3" in logs and logs[-1] == "tail -n +1 -F ~/ff-jax.log"
  (delete,) = dry_run("teardown", *SLICE)
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ff", *WHERE, "--quiet"]
  (delete_qr,) = dry_run("teardown", *SLICE, "--queued")
  assert delete_qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ff-qr"]


@pytest.mark.parametrize("args, message", [
    # An upgrading user's --bucket: refused before anything runs, saying why.
    (["run", *SLICE, "--bucket", "runs-bucket", "--", *LLAMA], "--bucket runs-bucket: no longer"),
    (["up", *SLICE, "--bucket", "runs-bucket", "--", *LLAMA], "drop --bucket"),
    (["run", *SLICE], "give it after --"),
    (["exec", *SLICE], "give the command after --"),
    (["install", *SLICE, "--wheel", "dist/absent.whl"], "no such wheel file"),
    (["create", *SLICE, "--type", "v9-8"], "unknown TPU generation"),
    (["local", "--processes", "0", "--", "ff-jax", "plan"], "must be at least 1"),
])
def test_refuses_what_cannot_work_with_one_message(args, message):
  proc = launch("--dry-run", *args)
  assert proc.returncode == 2 and message in proc.stderr
  assert proc.stdout == ""  # refused before any command is printed, let alone run
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# -- local mode ---------------------------------------------------------------------------------


def local_env() -> dict[str, str]:
  env = cli_env()
  env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
  return env


def test_local_runs_the_pods_worker_command_with_a_local_cluster_environment(tmp_path):
  (pod,) = dry_run("run", *SLICE, "--", "ff-jax", "plan")
  pod_argv = shlex.split(remote(pod).split("(nohup ", 1)[1].split(" > ")[0])
  proc = launch("--dry-run", "local", "--processes", "2", "--devices-per-process", "3",
                "--log-dir", str(tmp_path), "--", "ff-jax", "plan")
  assert proc.returncode == 0, proc.stderr
  lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
  assert len(lines) == 2
  for pid, line in enumerate(lines):
    argv = shlex.split(line[2:].split(" > ")[0])
    assert line.endswith(f"> {tmp_path}/process-{pid}.log 2>&1")
    env = dict(word.split("=", 1) for word in argv[1:-2])
    assert argv[0] == pod_argv[0] == "env" and argv[-2:] == pod_argv[-2:] == ["ff-jax", "plan"]
    port = env.pop("FF_JAX_COORDINATOR").removeprefix("localhost:")
    assert port.isdigit()
    assert env == {"FF_JAX_PROGRESS_INTERVAL": "30", "PYTHONUNBUFFERED": "1",
                   "FF_JAX_NUM_PROCESSES": "2", "FF_JAX_PROCESS_ID": str(pid),
                   "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": cpu_device_flags(3)}
  assert not list(tmp_path.iterdir())  # a dry run starts nothing


CLUSTER_PROBE = ("import jax; from ff_jax import parallel; "
                 "assert parallel.initialize_distributed(); "
                 "print(f'process {jax.process_index()} of {jax.process_count()}: "
                 "{jax.device_count()} devices, {jax.local_device_count()} local', flush=True)")


def test_local_processes_form_one_jax_cluster(tmp_path):
  proc = launch("local", "--processes", "2", "--devices-per-process", "2", "--log-dir",
                str(tmp_path), "--", sys.executable, "-c", CLUSTER_PROBE, env=local_env())
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for pid in (0, 1):
    log = (tmp_path / f"process-{pid}.log").read_text()
    assert f"process {pid} of 2: 4 devices, 2 local" in log
  assert "process 0 of 2: 4 devices, 2 local" in proc.stdout  # process 0's output, streamed
  assert "process 1 of 2" not in proc.stdout


def sleeper(tmp_path: Path, fail: str = "") -> list[str]:
  """A command whose process writes its pid to pid-I and sleeps two minutes; process `fail`
  instead exits with status 3 once every other process has written its pid."""
  return [sys.executable, "-c", "import os, pathlib, sys, time\n"
          "pid, count = os.environ['FF_JAX_PROCESS_ID'], os.environ['FF_JAX_NUM_PROCESSES']\n"
          f"if pid == {fail!r}:\n"
          f"  while len(list(pathlib.Path('{tmp_path}').glob('pid-*'))) < int(count) - 1:\n"
          "    time.sleep(0.05)\n"
          "  sys.exit(3)\n"
          f"pathlib.Path('{tmp_path}/.pid-' + pid).write_text(str(os.getpid()))\n"
          f"os.replace('{tmp_path}/.pid-' + pid, '{tmp_path}/pid-' + pid)\n"
          "time.sleep(120)\nprint('finished', flush=True)"]


def gone(pid_file: Path) -> bool:
  try:
    os.kill(int(pid_file.read_text()), 0)
  except ProcessLookupError:
    return True
  return False


def test_a_failing_process_fails_the_launch_and_stops_the_others(tmp_path):
  start = time.monotonic()
  proc = launch("local", "--processes", "3", "--log-dir", str(tmp_path / "logs"), "--",
                *sleeper(tmp_path, fail="1"), env=local_env())
  assert proc.returncode == 3, proc.stderr
  assert time.monotonic() - start < 60
  assert "process 1 of 3 failed (status 3)" in proc.stderr.splitlines()[-1]
  for pid in (0, 2):  # stopped, not left running
    assert gone(tmp_path / f"pid-{pid}")
    assert "finished" not in (tmp_path / "logs" / f"process-{pid}.log").read_text()


def test_terminating_the_launch_stops_every_process(tmp_path):
  launcher = subprocess.Popen([sys.executable, "launch/tpu.py", "local", "--processes", "2",
                               "--log-dir", str(tmp_path / "logs"), "--", *sleeper(tmp_path)],
                              cwd=REPO, env=local_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
  pid_files = [tmp_path / f"pid-{pid}" for pid in (0, 1)]
  deadline = time.monotonic() + 60
  while not all(f.exists() for f in pid_files):
    assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
    time.sleep(0.1)
  launcher.terminate()
  _, stderr = launcher.communicate(timeout=60)
  assert launcher.returncode == 128 + signal.SIGTERM, stderr
  assert all(gone(f) for f in pid_files)


def test_local_needs_the_program_on_path(tmp_path):
  env = {**local_env(), "PATH": "/usr/bin:/bin"}
  proc = launch("local", "--processes", "2", "--log-dir", str(tmp_path), "--", "ff-jax", "plan",
                env=env)
  assert proc.returncode == 2 and "ff-jax: not found on PATH" in proc.stderr


@pytest.mark.slow
def test_local_two_process_run_of_the_tiny_demo(tmp_path):
  """`ff-jax run --until noisy` of the tiny demo as two processes of two devices (~1 min)."""
  run_dir = tmp_path / "run"
  proc = launch("local", "--processes", "2", "--devices-per-process", "2", "--log-dir",
                str(tmp_path / "logs"), "--", "ff-jax", "run", "--run-dir", str(run_dir),
                "--until", "noisy", *TINY_DEMO, env=local_env(), timeout=900)
  logs = [(tmp_path / "logs" / f"process-{pid}.log").read_text() for pid in (0, 1)]
  assert proc.returncode == 0, "\n".join(text[-3000:] for text in logs)
  manifest = (run_dir / "manifest.json").read_text()
  assert '"noisy"' in manifest and (run_dir / "models" / "M1").is_dir()
  assert "[noisy] 8/8 steps" in proc.stdout  # process 0's progress, streamed


# -- every command named in the presets, the README and the dry run exists ------------------------

PRESETS = sorted((REPO / "ff_jax" / "configs").glob("*.yaml"))
README = REPO / "launch" / "README.md"
PATH_IN_TEXT = re.compile(r"(?<![\w/:.~$-])((?:[\w.-]+/)+[\w.-]+\.(?:py|sh|md|ya?ml))\b")


def snippets(path: Path) -> list[str]:
  """The command lines of a preset's comments (continued lines joined) and the code of its or a
  Markdown file's backquotes."""
  text = path.read_text()
  if path.suffix == ".yaml":
    comments = "\n".join(line[1:] for line in text.splitlines() if line.startswith("#"))
    lines = [line.strip() for line in comments.replace("\\\n", " ").splitlines()
             if line.startswith("   ")]
    return lines + re.findall(r"`([^`\n]+)`", comments)
  blocks = re.findall(r"```\n(.*?)```", text, re.S)
  inline = re.findall(r"`([^`\n]+)`", re.sub(r"```\n.*?```", "", text, flags=re.S))
  return [block.replace("\\\n", " ") for block in blocks] + inline


def simple_commands(snippet: str) -> list[list[str]]:
  """The simple commands of a shell snippet, split at line ends, &&, |, ;, parentheses and
  redirections."""
  commands = []
  for line in snippet.splitlines():
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    current: list[str] = []
    for token in lexer:
      if set(token) <= set("();<>|&"):
        commands.append(current)
        current = []
      else:
        current.append(token)
    commands.append(current)
  return [command for command in commands if command]


def dry_run_snippets() -> list[str]:
  """What the dry run of a slice's life prints: the local commands and every worker's script."""
  out = []
  for step, args in [("up", [*SLICE, "--", *LLAMA[:3], *IN_BUCKET]),
                     ("exec", [*SLICE, "--", "hf", "download", "openai-community/gpt2-xl",
                               "--local-dir", "models/gpt2-xl"]),
                     ("local", ["--processes", "2", "--", "ff-jax", "plan"])]:
    for command in dry_run(step, *args):
      if "--command" in command:
        out.append(command[command.index("--command") + 1])
      elif command[0] != "gcloud":
        out.append(shlex.join(command))
  return out


@functools.cache
def hf_download_help() -> str:
  return subprocess.run([str(BIN / "hf"), "download", "--help"], capture_output=True, text=True,
                        timeout=60, check=True).stdout


@functools.cache
def ff_jax_help(command: str) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
    cli.parse_args([command, "--help"])
  return out.getvalue()


@functools.cache
def launcher_help() -> str:
  """The help of every step of launch/tpu.py, one text."""
  texts = [tpu._parser().format_help()]
  for step in [*tpu.POD_STEPS, "local"]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
      tpu._parser().parse_args([step, "--help"])
    texts.append(out.getvalue())
  return "\n".join(texts)


def parses(parse: Callable[[list[str]], object], words: list[str]) -> object:
  try:
    return parse(words)
  except SystemExit:
    pytest.fail(f"`{shlex.join(words)}` does not parse (see the error above)")


def check_command(words: list[str]) -> set[str]:
  """The programs this command runs (the launcher, and the command it passes on), checked
  against their parsers or help; empty if not ours."""
  while words and (words[0] == "env" or re.fullmatch(r"[A-Z_]+=\S*", words[0])):
    words = words[1:]
  program = words[0].rsplit("/", 1)[-1] if words else ""
  rest = words[1:]
  if words[:1] == ["launch/tpu.py"]:
    if rest:  # not just the launcher named in prose
      args = parses(tpu._parser().parse_args, rest)
      assert getattr(args, "bucket", None) is None, f"`{shlex.join(words)}`: --bucket is refused"
    return {"launch/tpu.py", *(check_command(rest[rest.index("--") + 1:]) if "--" in rest
                               else ())}
  elif program == "ff-jax":
    if len(rest) == 1:  # a command named in prose (`ff-jax filter`), or --version
      with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_:
        cli.parse_args([*rest, "--help"])
      assert exit_.value.code == 0, f"ff-jax has no {rest[0]}"
    elif rest:
      args = parses(cli.parse_args, rest)
      for option in (word.split("=")[0] for word in rest if word.startswith("--")):
        assert re.search(rf"{option}\b(?!-)", ff_jax_help(rest[0])), f"ff-jax has no {option}"
      config = cli.split_config(getattr(args, "args", []))[0]
      assert config is None or (REPO / config).is_file(), f"{config}: no such file"
  elif program == "hf":
    assert rest[:1] in ([], ["download"]), words
    for option in (word.split("=")[0] for word in rest if word.startswith("--")):
      assert option in hf_download_help(), f"hf download has no {option}"
  elif words and re.fullmatch(r"--[a-z][a-z-]*", words[0]):
    # An option named in prose: one of the launcher's.
    assert words[0] in launcher_help(), f"launch/tpu.py has no {words[0]}"
  else:
    return set()
  return {program} if program in ("ff-jax", "hf") else set()


@pytest.mark.parametrize("source", [*PRESETS, README, "dry run"],
                         ids=lambda source: getattr(source, "name", source))
def test_every_command_file_and_option_named_exists(source):
  texts = dry_run_snippets() if source == "dry run" else snippets(source)
  programs = set().union(*(check_command(words) for text in texts
                           for words in simple_commands(text)))
  for named in PATH_IN_TEXT.findall(" ".join(texts) if source == "dry run" else source.read_text()):
    if not named.startswith(("models/", "data/", "runs/")):
      assert (REPO / named).exists(), f"{source}: {named} does not exist"
  text = " ".join(texts)
  assert "huggingface-cli" not in text and "launch/tpu.sh" not in text
  assert "gcsfuse" not in text and "/gcs/" not in text  # gs:// paths are passed as they are
  if source in (README, REPO / "ff_jax" / "configs" / "llama2-7b.yaml"):
    assert {"launch/tpu.py", "ff-jax", "hf"} <= programs
  if source == "dry run":
    assert {"ff-jax", "hf"} <= programs
