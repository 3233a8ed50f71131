"""What a job runs on: the model source, its tokenizer, the noisy and safe sets, and fingerprints.

The model is the built-in demo (trained by the `release` phase), an HF folder (`config.json` +
safetensors + `tokenizer.json`), a GGUF file, or a Hub id or `pkg:NAME` that
`ff_jax.models.hub.resolve_model_source` turns into one of those. Data is the demo world or the
user's sources (any spec of `ff_jax.data.formats.load_source`; `data.safe_size` draws a subset of
the safe set by the run's seed). Fingerprints of all of them go into the run manifest, so a run
directory is never resumed on other inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ff_jax.atomic_io import folder_complete, local_folder, write_folder
from ff_jax.config import RunConfig
from ff_jax.data import records as records_io
from ff_jax.data.demo import DemoWorld, build_demo_world, train_demo_tokenizer
from ff_jax.data.formats import load_source
from ff_jax.data.kept import Source
from ff_jax.data.records import Record
from ff_jax.data.templates import flattening_warning
from ff_jax.errors import ConfigError, DataError
from ff_jax.models import ModelConfig
from ff_jax.models.gguf import gguf_dtype, load_gguf, load_gguf_metadata
from ff_jax.models.hf import checkpoint_dtype, config_from_hf, load_hf, save_hf, save_peft_adapter
from ff_jax.models.hf_config import hf_model_type
from ff_jax.models.hub import parse_hub_id, resolve_model_source
from ff_jax.models.tokenizer import TextTokenizer
from ff_jax.pipeline.rundir import RunDir
from ff_jax.progress import log
from ff_jax.run_files import finetune_seed


@dataclasses.dataclass
class JobInputs:
  source: str
  kind: str  # demo | hf | gguf
  tokenizer: TextTokenizer
  model_config: ModelConfig
  noisy: list[Record]
  safe: list[Record]
  world: DemoWorld | None
  fingerprints: dict[str, str]
  compute_dtype: str = "float32"
  eval: list[Record] = dataclasses.field(default_factory=list)  # data.eval (held out)
  # data.noisy's source, which writes the kept rows back in their own format (None: the demo)
  noisy_source: Source | None = None
  # The dtype the source's weights are stored in (`source_dtype`): what `export.dtype: auto`
  # exports in.
  source_dtype: str = "float32"
  # What a PEFT adapter names as its base model: the Hub id or the folder as resolved (None: the
  # demo, whose base is the run's models/M0).
  base_model: str | None = None

  @property
  def is_demo_model(self) -> bool:
    return self.kind == "demo"

  def load_m0(self, mesh, rules) -> Any:
    """The user's aligned model, streamed from its files onto the mesh."""
    if self.kind == "hf":
      return load_hf(self.source, mesh=mesh, rules=rules)[1]
    return load_gguf(self.source, mesh=mesh, rules=rules)[1]

  def export_dtype(self, setting: str) -> str:
    """The dtype `export.dtype` = `setting` writes in (`auto`: the source's)."""
    return self.source_dtype if setting == "auto" else setting

  def export_hf(self, folder: Path, params, dtype: str | None = None,
                card: str | None = None) -> Path:
    """Write the clean model (no adapters) as an HF folder of the family its config describes (the
    demo model is Llama-style), in `dtype`, with `card` as its README.md."""
    cfg = self.model_config
    return save_hf(folder, cfg, params, hf_model_type(cfg), tokenizer=self.tokenizer, dtype=dtype,
                   card=card)

  def export_adapter(self, folder: Path, cfg: ModelConfig, params,
                     card: str | None = None) -> Path:
    """Write the LoRA adapters in `params` (`cfg`: the model with adapters) as a PEFT folder whose
    base is the source model."""
    return save_peft_adapter(folder, cfg, params, hf_model_type(self.model_config),
                             base_model=self.base_model, card=card)


def _file_digest(path: Path) -> str:
  """Cheap content fingerprint of a (possibly multi-GB) file: size plus head and tail hashes."""
  size = path.stat().st_size
  digest = hashlib.sha256(str(size).encode())
  with path.open("rb") as handle:
    digest.update(handle.read(1 << 20))
    if size > 2 << 20:
      handle.seek(-(1 << 20), 2)
      digest.update(handle.read())
  return digest.hexdigest()


def _model_fingerprint(source: Path) -> str:
  if source.is_file():
    return _file_digest(source)
  digest = hashlib.sha256()
  for path in sorted(source.iterdir()):
    if path.is_file() and (path.suffix in (".json", ".safetensors", ".jinja")):
      digest.update(path.name.encode() + _file_digest(path).encode())
  return digest.hexdigest()


def _demo_tokenizer(world: DemoWorld, run: RunDir) -> TextTokenizer:
  """The run's demo tokenizer if the release phase saved one, else a freshly trained one."""
  if folder_complete(run.tokenizer):
    with local_folder(run.tokenizer) as folder:
      return TextTokenizer.from_folder(folder)
  return train_demo_tokenizer(world.texts())


def save_tokenizer(tokenizer: TextTokenizer, run: RunDir) -> None:
  """Keep the tokenizer in the run directory (`write_folder`: atomically, by process 0)."""
  if folder_complete(run.tokenizer):
    return
  write_folder(run.tokenizer, tokenizer.save)


def _read_source(cfg: RunConfig, role: str) -> Source:
  spec = getattr(cfg.data, role)
  try:
    source = load_source(spec, cfg.data.columns)
  except FileNotFoundError:
    raise DataError(f"data.{role}: {spec}: file not found") from None
  except DataError as err:  # name the setting too: a run reads several sources
    raise DataError(f"data.{role}: {err}") from None
  if not source.records:
    raise DataError(f"data.{role}: {spec} holds no records")
  return source


def _warn_flattened(cfg: RunConfig, sources: dict[str, Source | None]) -> None:
  """One line where conversational rows are rendered without the chat template."""
  counts = {f"data.{role}": (source.conversations,
                             sum("prompt_messages" in r.meta for r in source.records))
            for role, source in sources.items() if source is not None}
  warning = flattening_warning(counts, cfg.data.template)
  if warning:
    log(warning)


def subsample_safe(records: list[Record], size: int, seed: int) -> list[Record]:
  """`size` records of the safe set drawn by the run's seed, in their source order (`size` 0 or
  at least the set's size: all of them). The draw is part of the safe set's fingerprint."""
  if size < 0:
    raise ConfigError(f"data.safe_size: must be 0 (all) or positive, got {size}")
  if not size or size >= len(records):
    return records
  rng = np.random.default_rng(finetune_seed(seed, "safe_subsample"))
  chosen = np.sort(rng.choice(len(records), size=size, replace=False))
  return [records[i] for i in chosen]


def _check_held_out(heldout: list[Record], noisy: list[Record], safe: list[Record]) -> None:
  """An evaluation prompt that is also trained on measures memory, not behaviour: refuse it."""
  trained = {r.prompt for r in noisy} | {r.prompt for r in safe}
  for r in heldout:
    if r.prompt in trained:
      raise DataError(f"data.eval: record {r.id!r} has a prompt that data.noisy or data.safe "
                      "trains on; held-out evaluation needs disjoint prompts (build the sets "
                      "with ff_jax.data.mixture.write_mixture)")


def _demo_model_config(cfg: RunConfig, tokenizer: TextTokenizer) -> ModelConfig:
  if cfg.model.config is None:
    raise ConfigError("model.config: the demo model needs its shape (see configs/demo.yaml)")
  try:
    return ModelConfig.from_dict({
        **cfg.model.config, "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id})
  except TypeError as err:
    raise ConfigError(f"model.config: {err}") from None


def source_dtype(path: Path, kind: str) -> str:
  """The float dtype of an HF folder's or a GGUF file's weights (float32 when a folder says
  nothing)."""
  if kind == "gguf":
    return gguf_dtype(path)
  return checkpoint_dtype(path) or "float32"


def _imported_model(cfg: RunConfig, path: Path) -> tuple[ModelConfig, TextTokenizer, str]:
  """(config, tokenizer, kind) of a GGUF file or an HF folder, without reading any weight: the
  architecture checked against a preset's `model.config`, the run's settings applied."""
  source = cfg.model.source
  if path.is_file() and path.suffix == ".gguf":
    model_cfg, tokenizer = load_gguf_metadata(path)
    kind = "gguf"
  elif path.is_dir() and (path / "config.json").exists():
    model_cfg = config_from_hf(json.loads((path / "config.json").read_text()),
                               str(path / "config.json"))
    tokenizer, kind = TextTokenizer.from_folder(path), "hf"
  else:
    raise ConfigError(f"model.source: {source}: expected 'demo', an HF folder with config.json, "
                      "or a .gguf file")
  if cfg.model.config:
    _check_architecture(model_cfg, cfg.model.config, source)
  return _run_settings(cfg, model_cfg), tokenizer, kind


def _check_architecture(model_cfg: ModelConfig, expected: dict[str, Any], source: str) -> None:
  """A preset's `model.config` (the architecture it was planned for) must match the files."""
  actual = model_cfg.to_dict()
  for key, want in expected.items():
    if key not in actual:
      raise ConfigError(f"model.config.{key}: not a model setting; known: {sorted(actual)}")
    got, want = actual[key], _as_config_value(want)
    if key == "rope_scaling":
      got = {k: v for k, v in got.items() if k in want}
    if got != want:
      raise ConfigError(f"model.config.{key}: the preset says {want!r} but {source} has {got!r}; "
                        "the preset was planned for another model")


def _as_config_value(value: Any) -> Any:
  """A YAML list (e.g. `layer_types`) as the tuple ModelConfig holds, so equal settings compare
  equal."""
  return tuple(value) if isinstance(value, list) else value


def planned_model_config(cfg: RunConfig) -> ModelConfig:
  """The model's shape for `ff-jax plan`: from the source's files where they are on this machine,
  else from `model.config` (a preset's architecture: a 7B model is planned before it is
  downloaded)."""
  source = cfg.model.source
  if source == "demo":
    world = build_demo_world(seed=cfg.seed, n_noisy=cfg.demo.noisy_size,
                             unsafe_ratio=cfg.demo.unsafe_ratio, n_safe_set=cfg.demo.safe_size)
    return _demo_model_config(cfg, _demo_tokenizer(world, RunDir(cfg.run_dir)))
  try:  # never download for a plan: a preset's architecture plans a model not fetched yet
    path = resolve_model_source(source, download=False)
  except ConfigError:
    path = None
  if path is not None and path.exists():
    return _imported_model(cfg, path)[0]
  if cfg.model.config:
    try:
      model_cfg = ModelConfig.from_dict(dict(cfg.model.config))
    except TypeError as err:
      raise ConfigError(f"model.config: {err} (planning {source} from its architecture needs "
                        "every shape field)") from None
  else:
    raise ConfigError(f"model.source: {source}: not on this machine, and model.config does not "
                      "give its architecture; plan where the model is, or add model.config")
  return _run_settings(cfg, model_cfg)


def _run_settings(cfg: RunConfig, model_cfg: ModelConfig) -> ModelConfig:
  """An imported architecture with the run's dtypes, remat, attention kernel and layer scan
  (validated)."""
  return model_cfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                           remat=cfg.model.remat, attention=cfg.model.attention,
                           scan_layers=cfg.model.scan_layers)


def load_inputs(cfg: RunConfig, run: RunDir) -> JobInputs:
  source = cfg.model.source
  demo_data = cfg.data.noisy == "demo" or cfg.data.safe == "demo"
  world = None
  if source == "demo" or demo_data:
    world = build_demo_world(seed=cfg.seed, n_noisy=cfg.demo.noisy_size,
                             unsafe_ratio=cfg.demo.unsafe_ratio, n_safe_set=cfg.demo.safe_size)
  noisy_source = None if cfg.data.noisy == "demo" else _read_source(cfg, "noisy")
  noisy = world.noisy if noisy_source is None else noisy_source.records
  safe_source = None if cfg.data.safe == "demo" else _read_source(cfg, "safe")
  safe = world.safe_set if safe_source is None else safe_source.records
  safe = subsample_safe(safe, cfg.data.safe_size, cfg.seed)
  if not safe:
    raise DataError("data.safe: the safe set is empty")
  prints = {"noisy": records_io.fingerprint(noisy), "safe": records_io.fingerprint(safe)}
  eval_source = _read_source(cfg, "eval") if cfg.data.eval else None
  heldout = eval_source.records if eval_source else []
  _warn_flattened(cfg, {"noisy": noisy_source, "safe": safe_source, "eval": eval_source})
  if heldout:
    _check_held_out(heldout, noisy, safe)
    prints["eval"] = records_io.fingerprint(heldout)

  base_model = None
  if source == "demo":
    tokenizer = _demo_tokenizer(world, run)
    model_cfg = _demo_model_config(cfg, tokenizer)
    kind, dtype = "demo", model_cfg.param_dtype  # trained by the release phase in this dtype
  else:
    path = resolve_model_source(source)
    model_cfg, tokenizer, kind = _imported_model(cfg, path)
    prints["model"] = _model_fingerprint(path)
    dtype = source_dtype(path, kind)
    # A Hub id is what PEFT and the Hub know the model by; a local source, by its resolved path.
    base_model = source if parse_hub_id(source) and not Path(source).exists() else str(
        path.resolve())
    source = str(path)  # what the loaders open (`pkg:` or a Hub id resolved to files)
  return JobInputs(source=str(source), kind=kind, tokenizer=tokenizer, model_config=model_cfg,
                   noisy=noisy, safe=safe, world=world, fingerprints=prints, eval=heldout,
                   noisy_source=noisy_source, source_dtype=dtype, base_model=base_model)
