"""The signal report (ff_jax.forgetting.signals.signal_report) as a markdown table, for report.md
and scripts/signal_study.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ff_jax.report.fmt import fmt, markdown_table

# F1, P, R and ϕ are at the threshold rule the report was made with (the filter's, label-free);
# best F1 picks ϕ with the labels.
_COLUMNS = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("f1", "F1"), ("precision", "P"),
            ("recall", "R"), ("phi", "ϕ"), ("best_f1", "best F1"))


def signal_table_markdown(report: Mapping[str, Any] | None) -> str:
  """The signal report as a markdown table, one row per signal."""
  if not report:
    return "(no labels: signal quality needs records with a `kind`)"
  groups = sorted({g for row in report.values() for g in row["by_group"]})
  header = ["signal", *(label for _, label in _COLUMNS),
            *(f"AUROC {g.split('=', 1)[1]}" for g in groups)]
  # Three decimals, fixed: these are scores in [0, 1] and thresholds on r, compared by eye.
  rows = [[f"`{name}`", *(fmt(row[key], 3, exponent=False) for key, _ in _COLUMNS),
           *(fmt(row["by_group"].get(g, {}).get("auroc"), 3, exponent=False) for g in groups)]
          for name, row in report.items()]
  return "\n".join(markdown_table(header, rows))
