"""The report package's shared pieces: the table number format, the figure saver, and the sweep's
and rounds' tables built with them."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

from ff_jax.report.fmt import MISSING, fmt, markdown_table
from ff_jax.report.plots import headless_pyplot, save_figure
from ff_jax.report.rounds import rounds_markdown
from ff_jax.report.sweep import write_sweep_report


@pytest.mark.parametrize("value, digits, exponent, text", [
    (None, 4, True, MISSING),
    (True, 4, True, "yes"), (np.bool_(False), 4, True, "no"),
    (3, 4, True, "3"), (np.int64(7), 4, True, "7"),
    (0.5, 4, True, "0.5000"), (np.float32(0.25), 3, True, "0.250"), (0.0, 4, True, "0.0000"),
    (math.nan, 4, True, "NaN"), (math.inf, 3, False, "+inf"), (-math.inf, 4, True, "-inf"),
    # Beyond the fixed digits' reach: exponent notation, unless the scale is known.
    (1.5e-6, 4, True, "1.500e-06"), (123456.0, 4, True, "1.235e+05"), (-2e-4, 3, True, "-2.00e-04"),
    (1.1e-16, 3, False, "0.000"), (123456.0, 1, False, "123456.0"),
    ("a|b\nc", 4, True, "a\\|b c"),
])
def test_fmt(value, digits, exponent, text):
  assert fmt(value, digits, exponent) == text


def test_markdown_table_formats_cells_and_keeps_text():
  assert markdown_table(["a", "b"], [[1, 0.5], ["x", None]]) == [
      "| a | b |", "|---|---|", "| 1 | 0.5000 |", "| x | — |"]


def test_save_figure_writes_the_same_png_atomically_and_closes_the_figure(tmp_path):
  plt = headless_pyplot()
  pngs = []
  for name in ("a.png", "b.png"):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    assert save_figure(fig, tmp_path / name) == tmp_path / name
    assert not plt.fignum_exists(fig.number)
    pngs.append((tmp_path / name).read_bytes())
  assert pngs[0].startswith(b"\x89PNG\r\n\x1a\n") and pngs[0] == pngs[1]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp file left


def _sweep_setup() -> types.SimpleNamespace:
  return types.SimpleNamespace(run_dir="/runs/x", safe_sizes=(4, 8), steps=(1, 2), seeds=(0, 1, 2),
                               batch_size=16, chunk_size=8, threshold="auto:gmm",
                               optim=types.SimpleNamespace(learning_rate=1e-3, schedule="constant"))


def test_sweep_report_tables(tmp_path):
  rows = [{"n": n, "t": t, "seed": seed, "threshold": "auto:gmm", "phi": 0.25, "kept": 5,
           "f1": 0.8 if n == 4 else 0.5 + 0.1 * seed, "auroc": 0.9}
          for n in (4, 8) for t in (1, 2) for seed in (0, 1, 2)]
  optimizer = "the run's safety optimizer (lr 0.001, batch 16)"
  text = write_sweep_report(_sweep_setup(), rows, tmp_path, [], {"total": 12.345},
                            optimizer).read_text()
  assert f"Optimizer: {optimizer}." in text
  # Equal F1s over the seeds have a std of ~1e-16: shown as 0, not in exponent notation.
  assert "| 4 | 0.800 ± 0.000 | 0.800 ± 0.000 |" in text
  assert "| 8 | 0.600 ± 0.082 | 0.600 ± 0.082 |" in text
  assert "| 4 | 0.900 | 0.900 |" in text
  assert "Best single setting: n=4, seed=0, t=1, auto:gmm (ϕ=0.250): F1 0.800, kept 5." in text
  assert "- total: 12.3s" in text
  unlabelled = [dict(r, f1=None, auroc=None) for r in rows]
  text = write_sweep_report(_sweep_setup(), unlabelled, tmp_path, [], {}, optimizer).read_text()
  assert "The noisy set has no labels" in text and "## F1" not in text


def test_rounds_markdown():
  def stages(unsafe):  # two rounds of (downstream, safety)
    return [{"round": k, "stage": stage, "nll/unsafe": u, "nll/other": 0.5}
            for (k, stage), u in zip([(1, "downstream"), (1, "safety"), (2, "downstream"),
                                      (2, "safety")], unsafe)]
  result = {"rounds": 2, "unsafe_examples": "unsafe (labels)", "n_unsafe": 5, "methods": {
      "sequential": stages([1.23456, 3.0, 1.1, math.nan]),
      "forgetfilter": stages([2.0, 3.1, 2.5, 3.2])}}
  text = rounds_markdown(result)
  assert ("| round | stage | sequential: unsafe NLL | sequential: other NLL | "
          "forgetfilter: unsafe NLL | forgetfilter: other NLL |") in text
  assert "| 1 | downstream | 1.235 | 0.500 | 2.000 | 0.500 |" in text
  assert "| 2 | safety | NaN | 0.500 | 3.200 | 0.500 |" in text
  assert text.endswith("last round: sequential 1.100, forgetfilter 2.500.\n")
