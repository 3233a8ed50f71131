"""Markdown tables of the paper's experiment (docs/experiments.md) from finished run directories.

  python scripts/experiment_tables.py RUN_DIR...

Per run: the filter (signal, ϕ, kept/flagged, precision/recall/F1/AUROC), the mean forgetting of
the run's signal per kind (is unsafe data forgotten more?), the report's method comparison (one
row per method and baseline), BBQ accuracies where the run has bias data, and the phase times.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from ff_jax.report.fmt import fmt


def _f3(value) -> str:
  # JSON artifacts hold null where a figure is not finite.
  return fmt(value, 3, exponent=False)


def _section(report: str, title: str) -> str:
  lines = report.splitlines()
  if title not in lines:
    return f"({title[3:]}: not in report.md)"
  start = lines.index(title) + 1
  end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
  return "\n".join(lines[start:end]).strip()


def tables(run: Path) -> str:
  filt = json.loads((run / "filter.json").read_text())
  signal = filt["signal"]
  metrics = filt["metrics"]
  counts = filt["counts"]
  with (run / "scores.csv").open() as handle:
    rows = list(csv.DictReader(handle))
  by_kind: dict[str, list[float]] = {}
  for row in rows:
    by_kind.setdefault(row["kind"], []).append(float(row[f"r_{signal}"]))
  out = [f"### {run.name}", "",
         f"Filter: `{signal}`, ϕ = {_f3(filt['phi'])} ({filt['threshold']}): kept "
         f"{counts['kept']}, flagged {counts['flagged']}; precision {_f3(metrics['precision'])}, "
         f"recall {_f3(metrics['recall'])}, F1 {_f3(metrics['f1'])}, AUROC "
         f"{_f3(metrics['auroc'])}.",
         "", "Mean forgetting r (`" + signal + "`) per kind: " + ", ".join(
             f"{k} {np.mean(v):+.3f} (n={len(v)})" for k, v in sorted(by_kind.items())) + ".",
         "", _section((run / "report.md").read_text(), "## Method comparison")]
  models = json.loads((run / "metrics.json").read_text())["models"]
  for name in ("random", "oracle", "replay"):
    path = run / "baselines" / f"{name}.json"
    if path.exists():
      models[name] = json.loads(path.read_text())["metrics"]
  if any("bias/acc_ambig" in m for m in models.values()):
    out += ["", "BBQ accuracy (ambiguous: the unbiased 'unknown' answer; disambiguated: the "
            "answer the context gives) and unparsable answers:", "",
            "| model | acc ambiguous | acc disambiguated | unparsable |", "|---|---|---|---|"]
    for name, m in models.items():
      if "bias/acc_ambig" in m:
        out.append(f"| {name} | {_f3(m['bias/acc_ambig'])} | {_f3(m['bias/acc_disambig'])} | "
                   f"{m['bias/n_unparsable']} |")
  phases = json.loads((run / "manifest.json").read_text())["phases"]
  out += ["", "Phase times (s): " + ", ".join(f"{p} {v['seconds']:.0f}" for p, v in
                                              phases.items() if v.get("seconds")) + "."]
  return "\n".join(out)


if __name__ == "__main__":
  print("\n\n".join(tables(Path(arg)) for arg in sys.argv[1:]))
