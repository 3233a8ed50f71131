"""The model card (README.md) of the clean model's exports: how the model was made.

It names the source model, the fingerprints of the data, the filter's signal, threshold and ϕ, the
kept and dropped counts, and the clean finetune's essential settings. It holds no date and no
machine-specific path other than the sources as configured, so exporting the same run again writes
the same bytes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ff_jax.atomic_io import run_path
from ff_jax.config import RunConfig
from ff_jax.run_files import CLEAN_ADAPTER, CLEAN_HF, FILTER_SUMMARY, MANIFEST

TAGS = ("forgetfilter", "ff_jax")


def read_filter_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
  """`filter.json` of a run (None when it is missing or unreadable: the card says so)."""
  path = run_path(run_dir) / FILTER_SUMMARY
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _front_matter(base_model: str | None, library: str, tags: tuple[str, ...]) -> list[str]:
  lines = ["---"]
  if base_model is not None:
    lines.append(f"base_model: {json.dumps(base_model)}")
  lines.append(f"library_name: {library}")
  lines.append("tags:")
  lines.extend(f"- {tag}" for tag in tags)
  return [*lines, "---", ""]


def _number(value: Any) -> str:
  return f"{value:.6g}" if isinstance(value, float) else str(value)


def model_card(cfg: RunConfig, fingerprints: dict[str, str], summary: dict[str, Any] | None,
               base_model: str | None, dtype: str, examples: int, adapter: bool = False,
               adapter_folder: bool = False) -> str:
  """The README.md of `clean_hf/` (`adapter`: of `clean_adapter/`, the PEFT folder, which
  `adapter_folder` says the run writes).

  `base_model`: the source's Hub id or resolved path (None: the demo); it goes into the YAML
  front matter only when it is a Hub id, which the Hub links (a local path there would not
  validate). `summary`: filter.json; `examples`: the rows the clean model was finetuned on.
  """
  hub_id = base_model if base_model is not None and not base_model.startswith("/") else None
  library = "peft" if adapter else "transformers"
  tags = (*TAGS, "lora") if cfg.lora.rank else TAGS
  source = "the built-in demo model (this run's `models/M0`)" if cfg.model.source == "demo" else (
      f"`{cfg.model.source}`")
  what = ("LoRA adapter (PEFT) of" if adapter else
          "Model") + " finetuned by ForgetFilter on the examples of a noisy dataset that it kept"
  lines = [*_front_matter(hub_id, library, tags), "# ForgetFilter clean model", "",
           f"{what}: the source model finetuned on the kept rows only, never on the dropped ones "
           "(the rows it forgot most after a brief finetune on a safe set).", "",
           "## Source", "", f"- model: {source}"]
  if base_model is not None and base_model != cfg.model.source:
    lines.append(f"- resolved to: `{base_model}`")
  for name in sorted(fingerprints):
    lines.append(f"- fingerprint of {'the model' if name == 'model' else 'data.' + name}: "
                 f"`{fingerprints[name]}`")
  lines.append(f"- data.noisy: `{cfg.data.noisy}`; data.safe: `{cfg.data.safe}`")
  lines += ["", "## Filter", ""]
  if summary is None:
    lines.append(f"- {FILTER_SUMMARY} was not readable: the filter's outcome is unknown")
  else:
    counts = summary.get("counts", {})
    kept, dropped = counts.get("kept"), counts.get("flagged")
    total = kept + dropped if isinstance(kept, int) and isinstance(dropped, int) else "?"
    lines += [f"- signal: `{summary.get('signal')}`",
              f"- threshold: `{summary.get('threshold')}`, ϕ = {_number(summary.get('phi'))}",
              f"- kept: {kept} of {total} rows; dropped: {dropped}"]
    if counts.get("truncated"):
      lines.append(f"- truncated to data.max_len={cfg.data.max_len}: {counts['truncated']}")
    verdict = (summary.get("separation") or {}).get("verdict")
    if verdict is not None:
      lines.append(f"- separation check: {verdict}")
  phase = cfg.clean_phase
  length = f"{phase.steps} steps" if phase.steps else f"{_number(phase.epochs)} epochs"
  lines += ["", "## Clean finetune", "",
            f"- {examples} rows, {length}, batch size {phase.batch_size}, learning rate "
            f"{_number(phase.optim.learning_rate)} ({phase.optim.schedule}), seed {cfg.seed}",
            f"- template: {cfg.data.template}, max_len {cfg.data.max_len}"]
  if cfg.lora.rank:
    alone = f", `{CLEAN_ADAPTER}/` the adapters alone (PEFT)" if adapter or adapter_folder else ""
    lines.append(f"- LoRA: rank {cfg.lora.rank}, alpha {_number(cfg.lora.alpha)}, targets "
                 f"{', '.join(cfg.lora.targets)}; `{CLEAN_HF}/` holds the adapters merged into the "
                 f"weights{alone}")
  lines.append(f"- weights: {dtype}")
  lines += ["", f"The run directory's {MANIFEST} holds the whole config and each phase's outcome; "
            "`ff-jax run` with that config repeats the run.", ""]
  return "\n".join(lines)
