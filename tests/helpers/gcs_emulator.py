"""A Cloud Storage API on 127.0.0.1 for the tests: the `gcp-storage-emulator` wheel's server, run
as a child process (`python -m tests.helpers.gcs_emulator DATA_DIR PORT`), and the environment
that points every client at it.

The three clients a run uses each read their own variable: gcsfs (etils.epath's `gs://` backend,
behind `atomic_io`) `STORAGE_EMULATOR_HOST`; TensorStore (Orbax's checkpoints) its
`TENSORSTORE_GCS_HTTP_URL` and a fixed token from `GOOGLE_AUTH_TOKEN_FOR_TESTING`. gcsfs's
experimental bucket-type probe asks a gRPC control API the emulator has not got, so it is off.

The emulator ignores the generation preconditions of Cloud Storage's API and sends no
`x-goog-generation` header with a download; TensorStore, which reads and commits an OCDBT
manifest by generation, then fails now and then ("Malformed StorageGeneration", more often on a
loaded machine). `serve` adds them as Cloud Storage defines them: a download answers 304 when
`ifGenerationNotMatch` names the object's generation and 412 when `ifGenerationMatch` does not, an
upload 412 when `ifGenerationMatch` does not (0: the object must not exist), and every download
names its generation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

from tests.helpers.paths import REPO

BUCKET = "ff-jax-test"


def emulator_env(url: str) -> dict[str, str]:
  """What a process needs to talk to the emulator at `url` instead of Google's servers."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _object_name(request) -> str | None:
  """The object a request names in its path or query; None for a multipart upload (its body
  names it), whose preconditions go unchecked."""
  return request.params.get("object_id") or request.query.get("name", [None])[0]


def _generation(storage, request) -> str | None:
  """The generation of the object a request names, or None when there is none."""
  from gcp_storage_emulator.exceptions import NotFound

  try:
    name = _object_name(request)
    return str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
  except NotFound:
    return None


def _failed_precondition(request, generation: str | None, download: bool) -> HTTPStatus | None:
  match = request.query.get("ifGenerationMatch", [None])[0]
  if match is not None and match != (generation or "0"):
    return HTTPStatus.PRECONDITION_FAILED
  not_match = request.query.get("ifGenerationNotMatch", [None])[0]
  if download and generation is not None and not_match == generation:
    return HTTPStatus.NOT_MODIFIED
  return None


def _with_preconditions(handler, download: bool):
  def handle(request, response, storage, *args, **kwargs):
    if _object_name(request) is None:
      return handler(request, response, storage, *args, **kwargs)
    generation = _generation(storage, request)
    failed = _failed_precondition(request, generation, download)
    if failed is not None:
      response.status = failed
      return
    handler(request, response, storage, *args, **kwargs)
    if download and generation is not None and response.status.value < 300:
      response["x-goog-generation"] = generation
  return handle


def serve(data_dir: str, port: int) -> None:
  """The emulator on 127.0.0.1:`port` with bucket `BUCKET`, preconditions kept (module
  docstring), until killed."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  # `get` serves `?alt=media` downloads (TensorStore's reads) as well as metadata.
  wrapped = {objects.get: _with_preconditions(objects.get, download=True),
             objects.download: _with_preconditions(objects.download, download=True),
             objects.insert: _with_preconditions(objects.insert, download=False)}
  server.HANDLERS = tuple((regex, {method: wrapped.get(fn, fn) for method, fn in handlers.items()})
                          for regex, handlers in server.HANDLERS)
  server.create_server("127.0.0.1", port, False, BUCKET, data_dir=data_dir).run()


def emulator_installed() -> bool:
  return importlib.util.find_spec("gcp_storage_emulator") is not None


@contextlib.contextmanager
def running_emulator(data_dir: Path) -> Iterator[str]:
  """An emulator keeping its objects under `data_dir`, with bucket `BUCKET`; yields its URL."""
  assert emulator_installed(), "gcp-storage-emulator is not installed (pip install -e '.[test]')"
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = (data_dir.parent / f"{data_dir.name}.log").open("w")
  proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.gcs_emulator", str(data_dir),
                           str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
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


if __name__ == "__main__":
  serve(sys.argv[1], int(sys.argv[2]))
