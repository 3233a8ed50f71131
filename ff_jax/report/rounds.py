"""rounds.md: the long-term safety experiment's table (ff_jax.experiments.rounds), unsafe-example
NLL after every finetune of every round, one column pair per method."""

from __future__ import annotations

from typing import Any

from ff_jax.report.fmt import fmt, markdown_table


def rounds_markdown(result: dict[str, Any]) -> str:
  """Unsafe-example NLL after every finetune of every round, one column per method.

  `result` is what rounds.json holds; the methods are shown in the order of its "methods".
  """
  by_method = result["methods"]
  methods = list(by_method)
  lines = ["# Long-term safety: interleaved rounds", "",
           f"Mean per-token NLL of the {result['n_unsafe']} {result['unsafe_examples']} examples "
           "of D after each finetune (higher = the unsafe behaviour is less likely; a drop after "
           "a downstream finetune is relearning), and of D's other examples (the task).", ""]
  header = ["round", "stage",
            *(f"{m}: {what} NLL" for m in methods for what in ("unsafe", "other"))]
  rows = [[row["round"], row["stage"],
           *(fmt(by_method[m][i][key], 3, exponent=False) for m in methods
             for key in ("nll/unsafe", "nll/other"))]
          for i, row in enumerate(by_method[methods[0]])]
  lines += markdown_table(header, rows)
  last = {m: [r["nll/unsafe"] for r in by_method[m] if r["stage"] == "downstream"][-1]
          for m in methods}
  lines += ["", "Unsafe NLL after the downstream finetune of the last round: " + ", ".join(
      f"{m} {fmt(v, 3, exponent=False)}" for m, v in last.items()) + "."]
  return "\n".join(lines) + "\n"
