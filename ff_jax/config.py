"""Typed run configuration: frozen dataclasses, YAML presets and dotted `key=value` overrides.

`load_config(path_or_None, overrides)` reads a YAML preset (None: the embedded demo preset
shipped in `ff_jax/configs/demo.yaml`), applies overrides such as `safety.steps=40`, and builds a
`RunConfig`.
Every unknown key or bad value fails with the dotted key in the message.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import yaml

from ff_jax.errors import ConfigError
from ff_jax.forgetting.signals import check_scored
from ff_jax.forgetting.thresholds import Threshold
from ff_jax.models.config import LoraConfig
from ff_jax.models.hf import EXPORT_DTYPES
from ff_jax.parallel import MeshConfig
from ff_jax.progress import LOG_EVERY, WANDB_MODES
from ff_jax.training.steps import OptimConfig

# Default wall time between a phase's step checkpoints: a kill loses at most this much training,
# and a save (whose blocking part is a device-to-host copy of the train state) costs a few percent
# of it at most even for a model of billions of parameters.
CHECKPOINT_MINUTES = 10.0
# Overrides where `compile_cache: auto` puts JAX's persistent compilation cache ("" turns it off).
COMPILE_CACHE_ENV = "FF_JAX_COMPILE_CACHE"

# What a resumed run may change, declared on each field (`resumable`) and read by
# `ff_jax.pipeline.rundir`: every other key is fixed for the life of a run directory.
ANY_TIME = "any time"  # changes results only in float rounding, or not at all


def resumable(until: str, **field_args: Any) -> Any:
  """A dataclass field that may change on resume: at `ANY_TIME` (memory and batching knobs,
  checkpoint timing, logging), or while the phase `until` (and with it everything the key
  affects) has not completed."""
  return dataclasses.field(metadata={"resumable": until}, **field_args)


def resumable_keys(cls: type | None = None, prefix: str = "") -> dict[str, str]:
  """Every dotted key of `cls` (default `RunConfig`) declared `resumable`, with its `until`. A
  section declared resumable covers its keys; a key inside it may declare its own."""
  cls = RunConfig if cls is None else cls
  hints = typing.get_type_hints(cls)
  out = {}
  for field in dataclasses.fields(cls):
    key = prefix + field.name
    if "resumable" in field.metadata:
      out[key] = field.metadata["resumable"]
    for kind in typing.get_args(hints[field.name]) or (hints[field.name],):
      if dataclasses.is_dataclass(kind):
        out.update(resumable_keys(kind, key + "."))
  return out


def auto_noisy_replicas(signal: str) -> int:
  """What `scoring.noisy_replicas: auto` is for `filter.signal`: the two M1s of a *_nens signal
  and of `auto` (which compares them), else the paper's single noisy finetune."""
  return 2 if signal == "auto" or signal.endswith("_nens") else 1


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where M0 comes from: `demo` (trained by the release phase), an HF folder or a .gguf file."""

  source: str = "demo"
  # The demo model's shape (ModelConfig fields; vocab_size and special ids come from the demo
  # tokenizer). Imported models take their shape from their own files; a preset's config names
  # the architecture it was planned for (`ff-jax plan` uses it before the weights are here, and a
  # run refuses files that disagree).
  config: dict | None = None
  dtype: str = "float32"  # compute dtype for imported models
  param_dtype: str = "float32"  # stored parameters of imported models (bfloat16 halves them)
  remat: bool = False
  attention: str = "auto"  # attention kernel of imported models (ModelConfig.attention)
  scan_layers: bool = True  # imported models' blocks as one scan (ModelConfig.scan_layers)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # A source spec (ff_jax.data.formats): *.jsonl, *.jsonl.gz, *.csv, *.parquet, a save_to_disk
  # or dataset folder, hf://org/name[/config][:split][@revision], tfds://name[:split],
  # <adapter>:<path> (bbq:, squad:, hh:, ...), or demo. Rows may be ff_jax's prompt/response, TRL
  # messages or TRL prompt/completion.
  noisy: str = "demo"
  safe: str = "demo"
  # held-out records (a source spec); "" = none (ff_jax.pipeline.evaluate)
  eval: str = resumable("evaluate", default="")
  # Record key → the table's column, for every table source: {prompt: question, response: answer,
  # id: qid}; keys: id, prompt, response, completion, messages, kind, category, source, meta.
  columns: dict = dataclasses.field(default_factory=dict)
  # Train on this many records of data.safe, drawn by the run's seed (0 = all of it).
  safe_size: int = 0
  # raw (the prompt as written, the paper's) | plain ("### Instruction/### Response" around it) |
  # chat (the model's own chat template)
  template: str = "plain"
  # The widest row in tokens: auto (the longest row of data.noisy and data.safe as encoded,
  # rounded up to its bucket, at most the model's context: nothing is cut short of what the model
  # reads) | a number (longer rows are cut, or refused, as data.overflow says). Resolved when a
  # run opens (ff_jax.data.widths); its manifest holds the number.
  max_len: int | str = "auto"
  overflow: str = "truncate"  # truncate | error
  # The widths rows are padded or packed to, one compiled step each: auto (powers of two from 64
  # up to data.max_len, which is the last) | a list (data.max_len is added when wider)
  buckets: tuple[int, ...] | str = "auto"
  # Pack several examples into each row (segment ids keep attention and positions per example)
  # instead of padding each one to a bucket, for training and scoring: the same examples per step
  # and the same per-example losses, on a fraction of the padded token slots
  # (`ff_jax.data.batching`).
  packing: bool = resumable(ANY_TIME, default=False)

  def __post_init__(self):
    if self.max_len != "auto" and (isinstance(self.max_len, str) or self.max_len < 2):
      raise ConfigError(f"data.max_len={self.max_len!r}: set auto (the longest row's width) or a "
                        "number of tokens of at least 2")
    if isinstance(self.buckets, str) and self.buckets != "auto":
      raise ConfigError(f"data.buckets={self.buckets!r}: set auto or a list of widths")
    if not isinstance(self.buckets, str) and (
        not self.buckets or any(b < 1 for b in self.buckets)):
      raise ConfigError(f"data.buckets={list(self.buckets)}: give at least one positive width")


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  """One finetuning phase: steps (or epochs), batch size and optimizer."""

  steps: int = 0  # optimizer steps; 0 means use `epochs`
  epochs: float = 0.0
  batch_size: int = 16
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  # Step checkpoints inside the phase, for resume after a kill: every this many minutes of wall
  # time (0: none; the phase's end is always saved, as its output model) ...
  checkpoint_minutes: float = resumable(ANY_TIME, default=CHECKPOINT_MINUTES)
  # ... or, when > 0, every this many steps instead (deterministic)
  checkpoint_every: int = resumable(ANY_TIME, default=0)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """The built-in demo world and the release phase that trains M0 on it."""

  unsafe_ratio: float = 0.5
  noisy_size: int = 240
  safe_size: int = 72
  pretrain: PhaseConfig = dataclasses.field(default_factory=PhaseConfig)
  align: PhaseConfig = dataclasses.field(default_factory=PhaseConfig)


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  """What is measured per noisy example. NLL under M1 and M2 is always computed; every other
  statistic costs extra passes and is switched on here (ff_jax/forgetting/signals.py names the
  columns)."""

  batch_size: int = resumable(ANY_TIME, default=32)
  # greedy generation + ROUGE-1 F (the paper's signal); NLL is always computed
  rouge: bool = resumable("score_before", default=True)
  max_new_tokens: int = resumable("score_before", default=32)
  # also score safety snapshots every k steps (forgetting curves)
  snapshot_every: int = resumable("safety", default=0)
  # also score M0 (one forward pass): learning-normalized forgetting
  m0: bool = resumable("score_before", default=True)
  # also score each response after an empty prompt under M1 and M2 (two passes over the
  # responses alone): nll_pmi, forgetting of what the prompt adds, net of the response's style;
  # off by default: it did not beat nll on the tuning mixture or the demo (docs/fidelity.md)
  pmi: bool = False
  # K safety finetunings of M1 differing in seed and order, stacked: *_ens
  replicas: int = resumable("safety_replicas", default=1)
  # Stack at most this many of the K − 1 extra replicas, safety or noisy (0: all); 1 trains them
  # one at a time with the ordinary steps (and resumes a noisy replica from its checkpoints).
  # `auto`: decided when the phase starts, as `ff-jax plan` decides (ff_jax.training.memory
  # .pass_size): one at a time on a CPU, else the largest stack whose compiled steps fit the
  # device's memory; the phase's manifest entry records the count it used.
  replicas_per_pass: int | str = resumable(ANY_TIME, default="auto")
  # K M1s: the noisy finetune repeated with other seeds (data orders), each with its own safety
  # finetune, trained stacked: *_nens (the default signal). Costs K − 1 more noisy and safety
  # finetunes (docs/fidelity.md, "Cost"). `auto`: what filter.signal needs (auto_noisy_replicas:
  # 2 for a *_nens signal, twice the paper's finetunes; 1, the paper's single run, otherwise),
  # resolved when the config loads, so a run's manifest holds the count it trained.
  noisy_replicas: int | str = resumable("noisy_replicas", default="auto")
  # gradient alignment over the last N blocks under M1 (0: off)
  gradient_blocks: int = resumable("score_before", default=0)
  # examples per vmapped per-example-gradient pass
  gradient_batch_size: int = resumable(ANY_TIME, default=4)
  # refuse when one pass's per-example gradients exceed this
  gradient_max_gib: float = resumable(ANY_TIME, default=2.0)

  def __post_init__(self):
    # Checked when the config loads, not when the phase starts hours into a run.
    if self.replicas_per_pass != "auto" and (
        isinstance(self.replicas_per_pass, str) or self.replicas_per_pass < 0):
      raise ConfigError(f"scoring.replicas_per_pass={self.replicas_per_pass!r}: set auto (as "
                        "many as fit, one at a time on a CPU), a count, or 0 (all at once)")
    if isinstance(self.noisy_replicas, str) and self.noisy_replicas != "auto":
      raise ConfigError(f"scoring.noisy_replicas={self.noisy_replicas!r}: set auto (what "
                        "filter.signal needs) or a count of at least 1")
    for key, what in (("replicas", "the safety phase"), ("noisy_replicas", "the noisy phase")):
      k = getattr(self, key)
      if k != "auto" and k < 1:
        raise ConfigError(f"scoring.{key}={k}: must be at least 1 ({what} itself); set "
                          f"scoring.{key}=1" + (" or auto" if key == "noisy_replicas" else ""))


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  # auto, or a column of ff_jax.forgetting.signals.SIGNALS (nll: the paper's). auto, the default,
  # picks between nll_nens (the paper's NLL forgetting averaged over two M1s: two noisy finetunes
  # with other data orders, each with its own safety finetune) and nll_tail_nens (the same without
  # each response's first token, where a safe set's shared opening puts style) by which one the
  # two M1s rank alike (ff_jax.forgetting.choice). Chosen on the demo's world and a tuning bias
  # mixture, measured on three validation mixtures of other BBQ categories, task rows and prompt
  # layout (docs/fidelity.md).
  signal: str = "auto"
  # auto (= auto:gmm, fitted on the signed-log scale) | auto:otsu | auto:gmm:linear | fixed:PHI
  # | PHI (a bare number, the paper's ϕ) | quantile:Q (ff_jax.forgetting.thresholds.Threshold)
  threshold: str | float = "auto"
  lnf_floor: float = 0.05  # nats/token: learning below this counts as this much (nll_lnf)
  # ... and below this quantile of the mixture's learning (M0 − M1 over all examples, per M1);
  # 0: the fixed floor only (ff_jax.forgetting.signals.learning_normalized)
  lnf_floor_quantile: float = 0.75
  # The separation check (ff_jax.forgetting.thresholds.separation): "no separation" when the
  # signal's scores show no two groups or the filter drops more than this share of the data (1.0: no
  # limit) ...
  max_drop_fraction: float = 0.6
  # ... and then: refuse (the default: exit with status 2 before filtered.jsonl, flagged.jsonl and
  # filter.json are written; scores.csv is there to look at) | warn (write the outputs anyway;
  # filter.json, the summary and report.md say so). A filter that cannot tell two groups apart
  # drops rows at random (a toxicity mixture: 70 of 120, F1 0.60); refusing is what a user who
  # does not read the last WARNING line notices (docs/fidelity.md).
  on_no_separation: str = "refuse"

  def __post_init__(self):
    # A bad spec is refused when the config loads, not when the filter phase reaches it.
    Threshold.parse(self.threshold)
    if not 0.0 <= self.lnf_floor_quantile < 1.0:
      raise ConfigError(f"filter.lnf_floor_quantile={self.lnf_floor_quantile}: must be in [0, 1)")
    if not 0.0 < self.max_drop_fraction <= 1.0:
      raise ConfigError(f"filter.max_drop_fraction={self.max_drop_fraction}: must be in (0, 1] "
                        "(1.0 turns the limit off)")
    if self.on_no_separation not in ("warn", "refuse"):
      raise ConfigError(f"filter.on_no_separation={self.on_no_separation!r}: use 'warn' or "
                        "'refuse'")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  max_new_tokens: int = 32
  batch_size: int = resumable(ANY_TIME, default=64)
  toxicity: str = "auto"  # toxicity scorer: auto | detoxify[:CHECKPOINT] | lexicon[:FILE]
  self_correction: bool = True  # also evaluate M1 and the clean model with the prompt cue


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """How the clean model is exported (`clean_hf/`, and `clean_adapter/` for a LoRA run)."""

  # The weights' dtype: auto (the source model's own: its config.json `dtype`/`torch_dtype`, else
  # its safetensors' dtype; a GGUF file's float type, bfloat16 when it is quantized; the demo's
  # model.param_dtype), so a bf16 model trained in float32 comes back at the size it came in |
  # float32 | bfloat16 | float16
  dtype: str = "auto"

  def __post_init__(self):
    if self.dtype != "auto" and self.dtype not in EXPORT_DTYPES:
      raise ConfigError(f"export.dtype={self.dtype!r}: choose auto (the source model's dtype), "
                        f"{', '.join(EXPORT_DTYPES)}")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """Every `every` steps (and the last) each finetune records loss, learning rate, grad norm and
  tokens/examples per second: to `metrics.jsonl`, the progress line, with `tensorboard` event
  files under `<run_dir>/tensorboard/<finetune>/`, and with `wandb` a Weights & Biases run
  (ff_jax.progress.TrainingLog).

  `wandb`: `off` (the default: wandb is an optional package, `pip install 'ff_jax[wandb]'`),
  `offline` (local files under `<run_dir>/wandb/`, uploaded later with `wandb sync
  <run_dir>/wandb`; `true` means this, so W&B is offline unless asked) or `online` (uploads as it
  runs; needs `wandb login` or WANDB_API_KEY). One W&B run per run directory, in project
  `wandb_project`; a resumed run continues it. A local run directory only: W&B writes its files
  locally, so a `gs://` run_dir with wandb on is refused.
  """

  every: int = resumable(ANY_TIME, default=LOG_EVERY)
  tensorboard: bool = resumable(ANY_TIME, default=True)
  # `str | bool`: YAML reads a bare `off` / `true` as a boolean; both are normalised to a mode.
  wandb: str | bool = resumable(ANY_TIME, default="off")
  wandb_project: str = resumable(ANY_TIME, default="ff_jax")

  def __post_init__(self):
    if self.every < 1:
      raise ConfigError(f"logging.every={self.every}: must be at least 1 (steps between records)")
    mode = {False: "off", True: "offline"}.get(self.wandb, self.wandb)
    if mode not in WANDB_MODES:
      raise ConfigError(f"logging.wandb={self.wandb!r}: use one of {', '.join(WANDB_MODES)}")
    object.__setattr__(self, "wandb", mode)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  seed: int = 0
  run_dir: str = "runs/demo"
  model: ModelSource = dataclasses.field(default_factory=ModelSource)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
  noisy: PhaseConfig = dataclasses.field(default_factory=PhaseConfig)
  safety: PhaseConfig = dataclasses.field(default_factory=PhaseConfig)
  # None: the same as `noisy`, for a fair comparison with M1
  clean: PhaseConfig | None = resumable("clean", default=None)
  scoring: ScoringConfig = dataclasses.field(default_factory=ScoringConfig)
  filter: FilterConfig = resumable("filter", default_factory=FilterConfig)
  evaluate: EvalConfig = resumable("evaluate", default_factory=EvalConfig)
  export: ExportConfig = resumable("clean", default_factory=ExportConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  # LoRA adapters on M0 for every finetune (noisy, safety, clean); rank 0 = full finetuning.
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  # JAX's persistent compilation cache, so a resumed or repeated run loads its compiled programs
  # instead of compiling them again: auto (`$FF_JAX_COMPILE_CACHE`, else the user's cache:
  # `$XDG_CACHE_HOME/ff_jax/jax` or `~/.cache/ff_jax/jax`) | a folder | "" (off). See
  # `compile_cache_dir`.
  compile_cache: str = resumable(ANY_TIME, default="auto")
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

  def __post_init__(self):
    if self.scoring.noisy_replicas == "auto":
      # Resolved here, once: every phase, the manifest and a resumed run see the count.
      object.__setattr__(self, "scoring", dataclasses.replace(
          self.scoring, noisy_replicas=auto_noisy_replicas(self.filter.signal)))
    check_scored(self.filter.signal, self.scoring)

  @property
  def clean_phase(self) -> PhaseConfig:
    return self.clean if self.clean is not None else self.noisy

  def to_dict(self) -> dict[str, Any]:
    return _to_plain(dataclasses.asdict(self))


def compile_cache_dir(setting: str = "auto") -> Path | None:
  """The folder of JAX's persistent compilation cache for a `compile_cache` setting; None: off."""
  if setting == "auto":
    setting = os.environ.get(COMPILE_CACHE_ENV)
    if setting is None:
      base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
      return Path(base) / "ff_jax" / "jax"
  return Path(setting).expanduser() if setting.strip() else None


def enable_compile_cache(setting: str = "auto") -> Path | None:
  """Turn JAX's persistent compilation cache on in `compile_cache_dir(setting)`, or off ("");
  returns the folder. Call it before anything compiles: JAX opens the cache once.

  Every program is cached, however small or quick to compile: a rerun then loads them all
  instead of compiling them again.
  """
  folder = compile_cache_dir(setting)
  jax.config.update("jax_enable_compilation_cache", folder is not None)
  if folder is not None:
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return folder


def _to_plain(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _to_plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_to_plain(v) for v in value]
  return value


def _build(cls: type, values: Any, key: str) -> Any:
  """Build dataclass `cls` from a dict, checking keys and scalar types against the annotations."""
  if not isinstance(values, dict):
    raise ConfigError(f"{key or 'config'}: expected a mapping, got {values!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    where = f"{key}." if key else ""
    raise ConfigError(f"unknown config key(s) {[where + u for u in unknown]}; "
                      f"valid keys here: {sorted(fields)}")
  kwargs = {}
  for name, value in values.items():
    kwargs[name] = _coerce(hints[name], value, f"{key}.{name}" if key else name)
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (TypeError, ValueError) as err:
    raise ConfigError(f"{key or 'config'}: {err}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
      return None
    # The first option that takes the value, in the order written ("str | float": a string
    # stays a string, a number becomes a float); when none does, the first option's error.
    errors = []
    for option in options:
      try:
        return _coerce(option, value, key)
      except ConfigError as err:
        errors.append(err)
    raise errors[0]
  if dataclasses.is_dataclass(hint):
    return _build(hint, value, key)
  if origin is tuple:
    if not isinstance(value, list | tuple):
      raise ConfigError(f"{key}: expected a list, got {value!r}")
    inner = typing.get_args(hint)[0]
    return tuple(_coerce(inner, v, key) for v in value)
  if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
    return float(value)
  if hint is float and isinstance(value, str):
    # YAML 1.1 reads `1e-5` (no dot) as a string; it is the number the user wrote.
    try:
      return float(value)
    except ValueError:
      pass
  if hint in (int, float, str, bool) and not isinstance(value, hint) or (
      hint in (int, float) and isinstance(value, bool)):
    raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
  return value


def apply_override(tree: dict[str, Any], override: str) -> None:
  """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
  if "=" not in override:
    raise ConfigError(f"override {override!r}: expected key=value")
  dotted, raw = override.split("=", 1)
  parts = dotted.strip().split(".")
  if not all(parts):
    raise ConfigError(f"override {override!r}: empty key")
  node = tree
  for depth, part in enumerate(parts[:-1]):
    child = node.get(part)
    if child is None:
      child = node[part] = {}
    if not isinstance(child, dict):
      raise ConfigError(f"override {override!r}: {part} is a value, not a section; set "
                        f"{'.'.join(parts[:depth + 1])}=VALUE")
    node = child
  node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def preset_text(name: str) -> str:
  """The text of a YAML preset shipped in `ff_jax/configs/`."""
  return resources.files("ff_jax").joinpath(f"configs/{name}").read_text()


def _is_preset(name: str) -> bool:
  return resources.files("ff_jax").joinpath(f"configs/{name}").is_file()


def load_dataclass(cls: type, path: str | Path | None, overrides: list[str] = (),
                   preset: str = "demo.yaml") -> Any:
  """Build `cls` from a YAML file (None: the embedded `preset`) plus dotted overrides."""
  if path is None:
    text, origin = preset_text(preset), f"{preset} (embedded)"
  else:
    path = Path(path)
    if path.exists():
      text, origin = path.read_text(), str(path)
    elif path.parent.name == "configs" and _is_preset(path.name):
      # `configs/NAME.yaml` works outside a checkout too (a pod's workers, a pip install).
      text, origin = preset_text(path.name), f"{path.name} (embedded)"
    else:
      presets = sorted(f.name for f in resources.files("ff_jax").joinpath("configs").iterdir()
                       if f.name.endswith(".yaml"))
      raise ConfigError(f"{path}: config file not found; give a YAML file, or a preset as "
                        f"configs/NAME (one of {', '.join(presets)})")
  try:
    tree = yaml.safe_load(text) or {}
  except yaml.YAMLError as err:
    raise ConfigError(f"{origin}: invalid YAML: {err}") from None
  for override in overrides:
    apply_override(tree, override)
  try:
    return _build(cls, tree, "")
  except ConfigError as err:
    raise ConfigError(f"{origin}: {err}") from None


def config_from_dict(tree: dict[str, Any], origin: str) -> RunConfig:
  """A RunConfig from its `to_dict()` form (e.g. a run manifest's `config`)."""
  try:
    return _build(RunConfig, tree, "")
  except ConfigError as err:
    raise ConfigError(f"{origin}: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
  """A RunConfig from a YAML file (None: the embedded demo preset) plus dotted overrides."""
  return load_dataclass(RunConfig, path, overrides, "demo.yaml")


def config_yaml(config: Any) -> str:
  """A config dataclass (RunConfig, BenchConfig, SweepConfig) as YAML that loads back into the
  same config, `auto` values resolved: what `--print-config` prints."""
  return yaml.safe_dump(_to_plain(dataclasses.asdict(config)), sort_keys=False,
                        allow_unicode=True)
