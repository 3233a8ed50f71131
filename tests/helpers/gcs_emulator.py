"""A Cloud Storage API on 127.0.0.1 for the tests: the `gcp-storage-emulator` wheel's server, run
as a child process, and the environment that points every client at it.

The three clients a run uses each read their own variable: gcsfs (etils.epath's `gs://` backend,
behind `atomic_io`) `STORAGE_EMULATOR_HOST`; TensorStore (Orbax's checkpoints) its
`TENSORSTORE_GCS_HTTP_URL` and a fixed token from `GOOGLE_AUTH_TOKEN_FOR_TESTING`. gcsfs's
experimental bucket-type probe asks a gRPC control API the emulator has not got, so it is off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BUCKET = "ff-jax-test"


def emulator_env(url: str) -> dict[str, str]:
  """What a process needs to talk to the emulator at `url` instead of Google's servers."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def emulator_command() -> list[str] | None:
  """The emulator's command line, or None where the wheel is not installed."""
  script = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
  return [script] if script else None


@contextlib.contextmanager
def running_emulator(data_dir: Path) -> Iterator[str]:
  """An emulator keeping its objects under `data_dir`, with bucket `BUCKET`; yields its URL."""
  command = emulator_command()
  assert command, "gcp-storage-emulator is not installed (pip install -e '.[test]')"
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = (data_dir.parent / f"{data_dir.name}.log").open("w")
  proc = subprocess.Popen([*command, "--data-dir", str(data_dir), "start", "--host", "127.0.0.1",
                           "--port", str(port), "--default-bucket", BUCKET],
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    _wait_until_serving(url, proc)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _wait_until_serving(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the storage emulator exited with {proc.returncode}")
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2):
        return
    except OSError:
      time.sleep(0.2)
  raise RuntimeError(f"the storage emulator did not answer at {url} in {timeout} s")


@contextlib.contextmanager
def pointed_at(url: str) -> Iterator[None]:
  """This process's clients (and its children) talk to the emulator at `url` for the block."""
  saved = {key: os.environ.get(key) for key in emulator_env(url)}
  os.environ.update(emulator_env(url))
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
