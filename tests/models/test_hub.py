"""Models by Hub id, from a real Hugging Face cache layout built in tmp_path (no network).

The cache is laid out exactly as huggingface_hub writes it (blobs named by git/LFS hash,
`snapshots/<commit>/` symlinks, `refs/<branch>`), checked with huggingface_hub's own
`scan_cache_dir`; ids are resolved in a fresh interpreter with HF_HUB_CACHE / HF_HOME and
HF_HUB_OFFLINE set in its environment, as a user sets them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache
from tokenizers import Tokenizer, models, pre_tokenizers

from ff_jax.errors import ConfigError
from ff_jax.models import abstract_model, forward, positions_from_mask
from ff_jax.models.hf import load_hf
from ff_jax.models.hub import HubId, parse_hub_id, resolve_model_source
from ff_jax.models.tokenizer import TextTokenizer
from tests.helpers.paths import FIXTURES, REPO

LLAMA = FIXTURES / "parity" / "llama"
QWEN2 = FIXTURES / "parity" / "qwen2"
SP_GGUF = FIXTURES / "gguf_sp" / "tiny-llama-sp.gguf"
MAIN = "1f0e" * 10  # the commit refs/main points at
OLD = "0a1b" * 10  # an older commit, reachable by hash only
GGUF_COMMIT = "9c8d" * 10


def git_blob_sha1(data: bytes) -> str:
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hf_cache(cache: Path, repo: str, commit: str, files: dict[str, bytes],
                    refs: tuple[str, ...] = ()) -> Path:
  """Lay `files` out as huggingface_hub's cache does; returns the snapshot folder.

  Blobs are named by their ETag: the SHA-256 of LFS files (weights), the git blob SHA-1 of the
  rest; snapshot entries are relative symlinks into blobs/; refs/<branch> holds the commit hash.
  """
  repo_dir = cache / f"models--{repo.replace('/', '--')}"
  snapshot = repo_dir / "snapshots" / commit
  for name, data in files.items():
    lfs = name.endswith((".safetensors", ".gguf"))
    blob = repo_dir / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data))
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = snapshot / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  for ref in refs:
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
  return snapshot


def model_files(folder: Path, scratch: Path) -> dict[str, bytes]:
  """An HF repo's files: the fixture's config and weights, and a word-level tokenizer's files."""
  files = {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}
  vocab_size = json.loads(files["config.json"])["vocab_size"]
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  TextTokenizer(tokenizer=tok, eos_id=2, pad_id=0, bos_id=1).save(scratch)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    files[name] = (scratch / name).read_bytes()
  return files


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
  """A Hugging Face cache holding a few repos, the way huggingface_hub lays them out."""
  cache = tmp_path_factory.mktemp("hf_home") / "hub"
  scratch = tmp_path_factory.mktemp("tokenizer")
  add_to_hf_cache(cache, "ff-test/tiny-llama", MAIN, model_files(LLAMA, scratch), refs=("main",))
  add_to_hf_cache(cache, "ff-test/tiny-llama", OLD, model_files(QWEN2, scratch))
  add_to_hf_cache(cache, "ff-test/tiny-gguf", GGUF_COMMIT,
                  {"tiny-llama-sp.gguf": SP_GGUF.read_bytes()}, refs=("main",))
  # A sharded snapshot whose second shard was never downloaded.
  sharded = model_files(LLAMA, scratch)
  weights = sharded.pop("model.safetensors")
  index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight":
                                          "model-00001-of-00002.safetensors",
                                          "lm_head.weight": "model-00002-of-00002.safetensors"}}
  sharded["model.safetensors.index.json"] = json.dumps(index).encode()
  sharded["model-00001-of-00002.safetensors"] = weights
  add_to_hf_cache(cache, "ff-test/sharded", MAIN, sharded, refs=("main",))
  return cache


def resolve_elsewhere(sources: list[str], env: dict[str, str]) -> dict[str, dict]:
  """Resolve `sources` in a fresh interpreter whose environment holds `env` (and no other HF_*)."""
  script = ("import json, sys\n"
            "from ff_jax.errors import ConfigError\n"
            "from ff_jax.models.hub import resolve_model_source\n"
            "out = {}\n"
            "for source in sys.argv[1:]:\n"
            "  try:\n"
            "    out[source] = {'path': str(resolve_model_source(source))}\n"
            "  except ConfigError as err:\n"
            "    out[source] = {'error': str(err)}\n"
            "print(json.dumps(out))\n")
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
  proc = subprocess.run([sys.executable, "-c", script, *sources], env={**clean, **env}, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def logits_of(folder: Path) -> np.ndarray:
  cfg, params = load_hf(folder)
  expected = np.load(LLAMA / "expected.npz")
  ids, mask = expected["input_ids"], expected["attention_mask"]
  graphdef, _, _ = abstract_model(cfg)
  logits, _ = forward(graphdef, params, ids, positions_from_mask(mask), mask)
  return np.asarray(logits)


def test_cache_layout_is_what_huggingface_hub_reads(cache):
  repos = {repo.repo_id: repo for repo in scan_cache_dir(cache).repos}
  assert set(repos) == {"ff-test/tiny-llama", "ff-test/tiny-gguf", "ff-test/sharded"}
  revisions = {rev.commit_hash: rev for rev in repos["ff-test/tiny-llama"].revisions}
  assert set(revisions) == {MAIN, OLD}
  assert revisions[MAIN].refs == {"main"} and not revisions[OLD].refs
  assert {f.file_name for f in revisions[MAIN].files} == {
      "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
  cached = try_to_load_from_cache("ff-test/tiny-llama", "model.safetensors", cache_dir=cache)
  assert Path(cached).read_bytes() == (LLAMA / "model.safetensors").read_bytes()


def test_hub_ids_resolve_offline_from_the_cache(cache):
  llama = "ff-test/tiny-llama"
  sources = [llama, f"{llama}@main", f"{llama}@{MAIN}", f"{llama}@{OLD}",
             "ff-test/tiny-gguf:tiny-llama-sp.gguf",
             f"ff-test/tiny-gguf@{GGUF_COMMIT}:tiny-llama-sp.gguf"]
  got = resolve_elsewhere(sources, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
  paths = {source: Path(got[source]["path"]) for source in sources}  # KeyError: an error came
  snapshots = cache / "models--ff-test--tiny-llama" / "snapshots"
  assert paths[llama] == paths[f"{llama}@main"] == paths[f"{llama}@{MAIN}"] == snapshots / MAIN
  assert paths[f"{llama}@{OLD}"] == snapshots / OLD
  for source in sources[4:]:
    assert paths[source].read_bytes() == SP_GGUF.read_bytes()

  want = logits_of(LLAMA)
  np.testing.assert_array_equal(logits_of(paths[f"{llama}@main"]), want)
  assert load_hf(paths[f"{llama}@{OLD}"])[0].qkv_bias  # the older commit holds the qwen2 model
  assert TextTokenizer.from_folder(paths[llama]).eos_id == 2


def test_missing_models_name_the_cache_and_the_download_command(cache):
  sources = ["ff-test/absent", "ff-test/tiny-llama@nope", "ff-test/tiny-gguf:other.gguf",
             "ff-test/sharded"]
  got = resolve_elsewhere(sources, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
  for source in sources:
    error = got[source].get("error")
    assert error is not None, (source, got[source])
    assert error.startswith(f"model.source: {source}: ") and "HF_HUB_OFFLINE is set" in error
    assert f"--cache-dir {cache}" in error and "Fetch it with: hf download ff-test/" in error

  absent = got["ff-test/absent"]["error"]
  assert f"{cache / 'models--ff-test--absent'}" in absent
  assert "nothing of this repo is cached" in absent
  assert "--include config.json" in absent and "--include 'model-*.safetensors'" in absent

  bad_revision = got["ff-test/tiny-llama@nope"]["error"]
  assert "ff-test/tiny-llama@nope is not in the Hugging Face cache" in bad_revision
  assert "--revision nope" in bad_revision
  assert f"cached refs: main = {MAIN[:12]}" in bad_revision and OLD[:12] in bad_revision

  other = got["ff-test/tiny-gguf:other.gguf"]["error"]
  assert "other.gguf of ff-test/tiny-gguf" in other
  assert "hf download ff-test/tiny-gguf other.gguf --cache-dir" in other

  assert "missing: model-00002-of-00002.safetensors" in got["ff-test/sharded"]["error"]


def test_unreachable_hub_falls_back_to_the_cache(cache):
  """HF_HOME (not HF_HUB_CACHE) locates the cache; the Hub's address refuses connections."""
  env = {"HF_HOME": str(cache.parent), "HF_ENDPOINT": "http://127.0.0.1:9",
         "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
  start = time.perf_counter()
  got = resolve_elsewhere(["ff-test/tiny-llama", "ff-test/absent"], env)
  print(f"\nresolution with an unreachable Hub: {time.perf_counter() - start:.1f}s")
  assert got["ff-test/tiny-llama"] == {
      "path": str(cache / "models--ff-test--tiny-llama" / "snapshots" / MAIN)}
  error = got["ff-test/absent"]["error"]
  assert "the Hub could not be reached" in error and "hf download ff-test/absent" in error


class RefusingHub(BaseHTTPRequestHandler):
  """A stand-in Hub that answers every request with the error the real Hub gives for it.

  Only the error (`X-Error-Code`, which huggingface_hub turns into its exception types) depends
  on the path: the repo, revision or file named in it does not exist, or the repo is gated.
  """

  ERRORS = (("no-repo", 404, "RepoNotFound"), ("gated", 403, "GatedRepo"),
            ("/revision/nope", 404, "RevisionNotFound"), ("/resolve/", 404, "EntryNotFound"))

  def answer(self, body: bool) -> None:
    status, code = next(((status, code) for part, status, code in self.ERRORS
                         if part in self.path), (500, "Unexpected"))
    payload = json.dumps({"error": code}).encode()
    self.send_response(status)
    self.send_header("X-Error-Code", code)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(payload)))
    self.end_headers()
    if body:
      self.wfile.write(payload)

  def do_GET(self):  # noqa: N802 - http.server's naming
    self.answer(body=True)

  def do_HEAD(self):  # noqa: N802
    self.answer(body=False)

  def log_message(self, *args):
    pass


def test_hub_errors_are_one_clear_message(cache):
  """Online, the Hub's answers (no repo, gated, no revision, no file) become ConfigErrors."""
  server = ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    got = resolve_elsewhere(
        ["ff-test/no-repo", "ff-test/gated", "ff-test/tiny-llama@nope",
         "ff-test/tiny-gguf:other.gguf", "ff-test/tiny-llama"],
        {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"})
  finally:
    server.shutdown()
    server.server_close()
  assert got["ff-test/no-repo"]["error"] == (
      "model.source: ff-test/no-repo: no Hub repo ff-test/no-repo (or it is private: log in with "
      "hf auth login)")
  assert "ff-test/gated is gated on the Hub" in got["ff-test/gated"]["error"]
  assert got["ff-test/tiny-llama@nope"]["error"] == (
      "model.source: ff-test/tiny-llama@nope: the Hub repo ff-test/tiny-llama has no revision "
      "'nope' (a branch, tag or full commit hash)")
  assert got["ff-test/tiny-gguf:other.gguf"]["error"] == (
      "model.source: ff-test/tiny-gguf:other.gguf: the Hub repo ff-test/tiny-gguf has no file "
      "'other.gguf'")
  assert got["ff-test/tiny-llama"]["path"].endswith(MAIN)  # cached: the Hub is not asked


def test_local_paths_packages_and_invalid_sources(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shutil.copytree(LLAMA, tmp_path / "org" / "name")
  # An existing path wins over the Hub id it also spells.
  assert resolve_model_source("org/name") == Path("org/name")
  assert resolve_model_source(str(SP_GGUF)) == SP_GGUF
  with pytest.raises(ConfigError, match=r"model\.source: pkg:no_such_package_ff_jax: package "
                                        r"'no_such_package_ff_jax' is not installed"):
    resolve_model_source("pkg:no_such_package_ff_jax")
  for source in ["", "just-a-name", "/no/such/model", "./org/absent", "a/b/c", "org/name@",
                 "org/name:weights.bin", "org--bad/name", "demo"]:
    with pytest.raises(ConfigError, match=r"^model\.source: .* is neither an existing file or "
                                          r"folder nor a Hugging Face Hub id"):
      resolve_model_source(source)


def test_no_download_reads_the_cache_only(cache, monkeypatch):
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  assert resolve_model_source("ff-test/tiny-llama", download=False).name == MAIN
  with pytest.raises(ConfigError, match="downloads are off here"):
    resolve_model_source("ff-test/absent", download=False)


def test_parse_hub_id():
  assert parse_hub_id("org/name") == HubId("org/name")
  assert parse_hub_id("Org-1/na.me_2@v1.0") == HubId("Org-1/na.me_2", "v1.0")
  assert parse_hub_id("org/name@refs/pr/3") == HubId("org/name", "refs/pr/3")
  assert parse_hub_id("org/name:q4/m.Q4_K.gguf") == HubId("org/name", None, "q4/m.Q4_K.gguf")
  assert parse_hub_id(f"org/name@{MAIN}:m.gguf") == HubId("org/name", MAIN, "m.gguf")
  for bad in ["name", "org/name/extra", "org/name:model.bin", "-org/name", "org/na--me", "org/n m"]:
    assert parse_hub_id(bad) is None, bad
