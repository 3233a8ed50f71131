"""Tests for report.md and plots, built from synthetic run directories in the pipeline's formats."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ff_jax.errors import DataError
from ff_jax.eval import classification
from ff_jax.report import analysis, markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = ["id", "kind", "category", "tokens", "nll_before", "nll_after", "acc_before", "acc_after",
          "rouge_before", "rouge_after", "r_nll", "r_acc", "r_rouge", "flagged"]
PHI = 0.5


def _rows(labels: bool = True, rouge: bool = True, curves: bool = False) -> list[dict[str, str]]:
  """Unsafe examples forgotten more than safe and task ones; one NaN, one mistake each way."""
  rng = np.random.default_rng(0)
  spec = [("unsafe", 1.0, 8), ("safe", 0.1, 6), ("task", 0.2, 6)]
  rows = []
  i = 0
  for kind, centre, count in spec:
    for _ in range(count):
      r_nll = centre + 0.1 * rng.standard_normal()
      nll_before = 1.0 + 0.1 * rng.standard_normal()
      r_acc = centre / 2 + 0.05 * rng.standard_normal()
      acc_before = 0.8
      r_rouge = centre / 3 + 0.05 * rng.standard_normal()
      row = {"id": f"ex{i:03d}", "kind": kind if labels else "", "category": "bias",
             "tokens": str(10 + i), "nll_before": repr(nll_before),
             "nll_after": repr(nll_before + r_nll), "acc_before": repr(acc_before),
             "acc_after": repr(acc_before - r_acc),
             "rouge_before": "0.9" if rouge else "", "rouge_after": repr(0.9 - r_rouge) if rouge
             else "", "r_nll": repr(r_nll), "r_acc": repr(r_acc),
             "r_rouge": repr(r_rouge) if rouge else "", "flagged": str(int(r_nll > PHI))}
      if curves:
        for step in (5, 10, 20):
          row[f"r_nll@{step}"] = repr(r_nll * step / 20)
      rows.append(row)
      i += 1
  # A safe example forgotten a lot (false positive), an unsafe one not (false negative), an
  # unscored one (NaN r, never flagged).
  rows[8].update(r_nll="0.9", flagged="1")
  rows[0].update(r_nll="0.05", flagged="0")
  rows[14].update(r_nll="", nll_after="", flagged="0")
  return rows


def _write_run(tmp: Path, labels: bool = True, rouge: bool = True, curves: bool = False,
               optional: bool = True) -> Path:
  run = tmp / "run"
  run.mkdir()
  rows = _rows(labels, rouge, curves)
  header = HEADER + [k for k in rows[0] if k not in HEADER]
  with (run / "scores.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header)
    w.writeheader()
    w.writerows(rows)
  if not optional:
    return run
  n_flag = sum(r["flagged"] == "1" for r in rows)
  (run / "filter.json").write_text(json.dumps({
      "signal": "nll", "threshold": "auto:otsu", "phi": PHI,
      "info": {"eta": 0.81, "bimodal": True, "n_nan": 1},
      "counts": {"kept": len(rows) - n_flag, "flagged": n_flag, "truncated": 2},
      "metrics": None if not labels else {"precision": 0.9, "recall": 0.9, "f1": 0.9}}))
  (run / "metrics.json").write_text(json.dumps({"models": {
      "M0": {"unsafe_rate/bias": 0.1, "unsafe_rate/toxicity": 0.05, "task/qa_exact_match": 0.6,
             "nll/eval_unsafe": 3.2, "loss": 1.5},
      "M1": {"unsafe_rate/bias": 0.7, "unsafe_rate/toxicity": 0.4, "task/qa_exact_match": 0.7,
             "nll/eval_unsafe": 1.1},
      "M2": {"unsafe_rate/bias": 0.2, "unsafe_rate/toxicity": 0.1, "task/qa_exact_match": 0.65,
             "nll/eval_unsafe": 2.8},
      "clean": {"unsafe_rate/bias": 0.12, "unsafe_rate/toxicity": float("nan"),
                "task/qa_exact_match": 0.69, "nll/eval_unsafe": 3.0}}}))
  (run / "manifest.json").write_text(json.dumps({
      "config": {"seed": 3, "data": {"seed": 7, "path": "x"}}, "fingerprints": {"noisy": "abc"},
      "phases": {"release": {"complete": True, "seconds": 10.0},
                 "noisy": {"complete": True, "seconds": 30.0},
                 "score_before": {"complete": True, "seconds": 20.0},
                 "clean": {"complete": False}}}))
  return run


def _is_png(path: Path) -> bool:
  return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def _section(text: str, title: str) -> str:
  start = text.index(f"## {title}")
  end = text.find("\n## ", start + 1)
  return text[start:end if end >= 0 else None]


def test_load_scores_types(tmp_path):
  run = _write_run(tmp_path, rouge=False)
  s = analysis.load_scores(run)
  assert len(s["id"]) == 20 and s["id"][0] == "ex000"
  assert s["kind"][0] == "unsafe"
  assert s["flagged"].dtype == bool and s["tokens"].dtype == np.int64
  assert np.isnan(s["r_nll"][14]) and np.isnan(s["r_rouge"]).all()
  assert s["r_nll"][8] == 0.9


def test_load_scores_errors(tmp_path):
  with pytest.raises(DataError, match="not found"):
    analysis.load_scores(tmp_path)
  (tmp_path / "scores.csv").write_text("id,r_nll\na,0.1\nb,abc\n")
  with pytest.raises(DataError, match=r"scores.csv:3: column 'r_nll'"):
    analysis.load_scores(tmp_path)


def test_full_report(tmp_path):
  run = _write_run(tmp_path, curves=True)
  path = markdown.write_report(run)
  assert path == run / "report.md"
  text = path.read_text()
  for title in ("Summary", "Filter metrics", "Mean forgetting per kind", "Model comparison",
                "Phase timing", "Plots"):
    assert f"## {title}" in text
  for name in ("forgetting_hist", "prf_vs_phi", "forgetting_curves"):
    assert _is_png(run / "plots" / f"{name}.png")
    assert f"(plots/{name}.png)" in text

  s = analysis.load_scores(run)
  y = np.array([k == "unsafe" for k in s["kind"]])
  m = classification.filter_metrics(s["flagged"], y)
  assert (m["tp"], m["fp"], m["fn"]) == (7, 1, 1)
  summary = _section(text, "Summary")
  assert "`auto:otsu`" in summary and "ϕ = 0.5000" in summary
  assert "kept: 12; dropped (flagged): 8; truncated: 2" in summary
  assert f"**{m['f1']:.4f}**" in summary
  assert "`data.seed`=7" in summary and "`seed`=3" in summary

  fm = _section(text, "Filter metrics")
  for sig in ("nll", "acc", "rouge"):
    auc = classification.auroc(s[f"r_{sig}"], y)
    assert f"{auc:.4f}" in fm
  assert "| nll (filter) |" in fm and "oracle" in fm
  oracle = classification.best_f1(s["r_nll"], y)
  assert f"{oracle['f1']:.4f}" in fm

  fg = _section(text, "Mean forgetting per kind")
  mean_unsafe = np.nanmean(s["r_nll"][:8])
  assert f"{mean_unsafe:.4f} (8)" in fg
  assert "(5)" in fg  # the task kind has one unscored example
  assert "step 20" in fg

  mc = _section(text, "Model comparison")
  assert "| metric | M0 | M1 | M2 | clean |" in mc
  assert "| **unsafe_rate** |" in mc and "| bias | 0.1000 | 0.7000 | 0.2000 | 0.1200 |" in mc
  assert "| toxicity | 0.0500 | 0.4000 | 0.1000 | NaN |" in mc
  assert "| **other** |" in mc and "| loss | 1.5000 | — | — | — |" in mc
  # Groups are sorted, with ungrouped metrics last.
  assert mc.index("**nll**") < mc.index("**task**") < mc.index("**unsafe_rate**") \
      < mc.index("**other**")

  tm = _section(text, "Phase timing")
  assert "| noisy | yes | 30.0 | 50.0% |" in tm
  assert "| clean | no | — | — |" in tm
  assert "| **total** | — | 60.0 | 100.0% |" in tm


def test_summary_figures(tmp_path):
  run = _write_run(tmp_path)
  fig = analysis.summary_figures(run)
  s = analysis.load_scores(run)
  y = np.array([k == "unsafe" for k in s["kind"]])
  m = classification.filter_metrics(s["flagged"], y)
  assert fig["labels"] is True and fig["signal"] == "nll" and fig["phi"] == PHI
  assert fig["f1"] == pytest.approx(m["f1"])
  assert (fig["kept"], fig["flagged"], fig["truncated"]) == (12, 8, 2)
  mean = fig["mean_forgetting"]["nll"]
  assert mean["unsafe"] == pytest.approx(np.nanmean(s["r_nll"][:8]))
  assert mean["safe"] == pytest.approx(np.nanmean(s["r_nll"][8:14]))
  assert fig["ratios"]["nll"]["unsafe/safe"] == pytest.approx(mean["unsafe"] / mean["safe"])
  assert fig["ratios"]["nll"]["unsafe/task"] == pytest.approx(mean["unsafe"] / mean["task"])
  assert fig["auroc"] == pytest.approx(classification.auroc(s["r_nll"], y))
  assert set(fig["mean_forgetting"]) == {"nll", "acc", "rouge"}


def test_no_labels_no_rouge(tmp_path):
  run = _write_run(tmp_path, labels=False, rouge=False)
  text = markdown.write_report(run).read_text()
  assert "Labels not available" in text
  assert "labels not available" in _section(text, "Summary")
  assert "precision@ϕ" not in text and "unsafe/safe" not in text
  assert "| (unlabelled) |" in text
  assert _is_png(run / "plots" / "forgetting_hist.png")
  assert not (run / "plots" / "prf_vs_phi.png").exists()
  assert not (run / "plots" / "forgetting_curves.png").exists()
  assert "rouge" not in _section(text, "Mean forgetting per kind")
  fig = analysis.summary_figures(run)
  assert fig["labels"] is False and math.isnan(fig["f1"])
  assert set(fig["mean_forgetting"]) == {"nll", "acc"}


def test_missing_optional_files(tmp_path):
  run = _write_run(tmp_path, optional=False)
  text = markdown.write_report(run).read_text()
  assert "`filter.json` not found" in text
  assert "`metrics.json` not found" in text and "`manifest.json` not found" in text
  # Without filter.json the flags column still gives P/R/F1; counts come from scores.csv.
  assert "kept: 12; dropped (flagged): 8; truncated: —" in text
  assert "F1 at ϕ" in text


def test_no_scores(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.json").write_text(json.dumps({"models": {"M0": {"task/qa_exact_match": 0.5}}}))
  text = markdown.write_report(run).read_text()
  assert "`scores.csv` not found" in text and "| qa_exact_match | 0.5000 |" in text
  assert not (run / "plots").exists()
  assert math.isnan(analysis.summary_figures(run)["f1"])


def test_deterministic_and_stale_plots(tmp_path):
  run = _write_run(tmp_path, curves=True)
  first = markdown.write_report(run).read_text()
  pngs = {p.name: p.read_bytes() for p in (run / "plots").glob("*.png")}
  second = markdown.write_report(run).read_text()
  assert first == second
  assert {p.name: p.read_bytes() for p in (run / "plots").glob("*.png")} == pngs
  assert not list(run.glob(".*.tmp")) and not list((run / "plots").glob(".*.tmp"))
  # A rerun without labels must not leave the labelled run's P/R/F1 plot behind.
  rows = list(csv.DictReader((run / "scores.csv").open()))
  for r in rows:
    r["kind"] = ""
  with (run / "scores.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  markdown.write_report(run)
  assert not (run / "plots" / "prf_vs_phi.png").exists()


def _png_size(path: Path) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk."""
  head = path.read_bytes()[:24]
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_histograms_are_a_grid_with_the_filter_signal_first(tmp_path, monkeypatch):
  # Nine signals, the filter using one late in SIGNALS order: in one strip this was 4500 × 380 px.
  run = _write_run(tmp_path)
  rows = list(csv.DictReader((run / "scores.csv").open()))
  extra = ["nll_lnf", "nll_tail", "nll_auc", "nll_ens", "nll_nens", "grad"]
  for i, r in enumerate(rows):
    for j, name in enumerate(extra):
      r[f"r_{name}"] = repr(float(r["r_acc"]) + 0.01 * (i + j))
  with (run / "scores.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  info = json.loads((run / "filter.json").read_text())
  (run / "filter.json").write_text(json.dumps({**info, "signal": "nll_nens", "phi": 0.3}))

  from ff_jax.report import plots as plots_lib

  seen = {}
  real_save = plots_lib.save_figure

  def spy(fig, path, *args, **kwargs):
    panels = [ax for ax in fig.axes if ax.get_visible()]
    seen[path.name] = {
        "titles": [ax.get_title() for ax in panels],
        "grid": sorted({(round(ax.get_position().x0, 2), round(ax.get_position().y0, 2))
                        for ax in panels}),
        "phi_texts": [t.get_text() for ax in panels for t in ax.texts if "ϕ" in t.get_text()],
        "phi_lines": [len(ax.lines) for ax in panels]}
    return real_save(fig, path, *args, **kwargs)

  monkeypatch.setattr(plots_lib, "save_figure", spy)
  markdown.write_report(run)
  hist = seen["forgetting_hist.png"]
  assert len(hist["titles"]) == 9
  assert hist["titles"][0].startswith("nll_nens: filter signal")
  assert hist["titles"][1:4] == ["nll", "acc", "rouge"]  # then the others in SIGNALS order
  # 4 + 4 + 1 panels: three rows, four columns.
  assert len({x for x, _ in hist["grid"]}) == 4 and len({y for _, y in hist["grid"]}) == 3
  assert hist["phi_texts"] == ["ϕ = 0.3"]  # ϕ labelled on the filter's panel only
  assert hist["phi_lines"][0] == 1 and not any(hist["phi_lines"][1:])
  width, height = _png_size(run / "plots" / "forgetting_hist.png")
  assert 1200 <= width <= 1600 and 600 <= height <= 1000, (width, height)


def test_negative_denominator_ratio_is_nan(tmp_path):
  run = _write_run(tmp_path)
  rows = list(csv.DictReader((run / "scores.csv").open()))
  for r in rows:
    if r["kind"] == "safe":
      r["r_nll"] = "-0.2"
  with (run / "scores.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  fig = analysis.summary_figures(run)
  assert math.isnan(fig["ratios"]["nll"]["unsafe/safe"])
  assert fig["ratios"]["nll"]["unsafe/task"] > 1


def test_partial_labels_and_degenerate_threshold(tmp_path):
  run = _write_run(tmp_path, rouge=False)
  rows = list(csv.DictReader((run / "scores.csv").open()))
  for r in rows[-3:]:
    r["kind"] = ""
  for r in rows:
    r["flagged"] = "0"
  with (run / "scores.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  # An automatic threshold that found r unimodal flags nothing: ϕ = +inf (JSON "Infinity"), and the
  # filter's signal (rouge) was not computed, so the flags alone are scored.
  filt = json.loads((run / "filter.json").read_text())
  filt.update(signal="rouge", phi=math.inf, counts={"kept": 20, "flagged": 0, "truncated": 0})
  (run / "filter.json").write_text(json.dumps(filt))
  text = markdown.write_report(run).read_text()
  assert "ϕ = +inf" in text
  assert "Computed on the 17 labelled of 20 examples." in text
  assert "| (unlabelled) |" in text
  fig = analysis.summary_figures(run)
  assert fig["f1"] == 0.0 and fig["recall"] == 0.0 and math.isnan(fig["auroc"])
  assert _is_png(run / "plots" / "forgetting_hist.png")
  assert not (run / "plots" / "prf_vs_phi.png").exists()
