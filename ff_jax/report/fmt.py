"""The number format of every markdown table the project writes (report.md, the sweep's report,
rounds.md, the signal table), so one value reads the same in all of them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

MISSING = "—"  # a value the run does not have: a metric not computed, a phase not timed


def fmt(value: Any, digits: int = 4, exponent: bool = True) -> str:
  """`value` as the text of a table cell.

  None is MISSING, a bool yes/no, an integer as it is, a float with `digits` decimals (NaN as
  "NaN", infinities as "+inf"/"-inf"), anything else as text with `|` escaped and newlines
  flattened, so it stays in its cell. With `exponent`, a float of 1e5 or more, or nonzero below
  10^-digits, is written as d.ddde±XX, so a large value does not widen its column and a small one
  does not read as 0; pass False for numbers on a known scale (F1, AUROC, NLL, seconds), where a
  1e-16 spread over seeds is rounding, not a value to show.
  """
  if value is None:
    return MISSING
  if isinstance(value, bool | np.bool_):
    return "yes" if value else "no"
  if isinstance(value, int | np.integer):
    return str(int(value))
  if isinstance(value, float | np.floating):
    value = float(value)
    if math.isnan(value):
      return "NaN"
    if math.isinf(value):
      return "+inf" if value > 0 else "-inf"
    if exponent and value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
      return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"
  return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
  """The lines of a markdown table. Cells go through `fmt` with its defaults; a cell formatted
  otherwise (other digits, "mean ± std") is passed as its text."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  return lines + ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
