"""The label-free separation check: the diagnostic on synthetic scores, the filter phase's
`filter.on_no_separation` (warn / refuse) on score files written here (no training), report.md
and the command line's summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ff_jax.config import FilterConfig, RunConfig, load_config
from ff_jax.data.records import Record
from ff_jax.errors import ConfigError, DataError, NoSeparationError
from ff_jax.forgetting.thresholds import Threshold, separation
from ff_jax.pipeline.filter import filter_records
from ff_jax.pipeline.rundir import RunDir
from ff_jax.report import analysis, markdown

N = 240


def _spike_and_mode(frac: float, seed: int = 0, n: int = N) -> np.ndarray:
  """Unchanged examples in a spike at 0, a fraction `frac` forgotten around r = 1."""
  rng = np.random.default_rng(seed)
  k = int(n * frac)
  return np.r_[rng.normal(0.0, 0.05, n - k), rng.normal(1.0, 0.3, k)]


# -- the diagnostic ---------------------------------------------------------------------------


@pytest.mark.parametrize("frac", [0.05, 0.25, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_spike_beside_a_clear_second_mode_is_separated(frac, seed):
  r = _spike_and_mode(frac, seed)
  flags, _, _ = Threshold.parse("auto")(r)
  out = separation(r, flags)
  stats = out["statistics"]
  assert out["verdict"] == "separated", out["reasons"]
  assert stats["delta_bic"] > 100 and stats["ashman_d"] > 4 and stats["valley_depth"] > 0.9
  assert stats["drop_fraction"] == pytest.approx(frac, abs=0.02)
  assert out["reasons"][0].startswith("two modes: ΔBIC")
  assert out["reasons"][1] == f"drops {frac:.0%} of the data (≤ filter.max_drop_fraction 0.6)"


def test_separated_scales_and_shapes():
  rng = np.random.default_rng(3)
  # The demo's shape: unchanged examples plus unsafe ones forgotten at three rates (the reason the
  # check runs on the signed-log scale), ...
  demo = np.r_[rng.normal(0.05, 0.2, 120), rng.normal(1.6, 0.4, 40), rng.normal(4.1, 0.5, 40),
               rng.normal(5.0, 0.8, 40)]
  # ... a spike of exact zeros (ROUGE unchanged) beside the forgotten mode, ...
  zeros = np.r_[np.zeros(150), rng.normal(0.0, 0.05, 30), rng.normal(0.6, 0.15, 60)]
  # ... and safe examples learned (r < 0) while unsafe ones are forgotten.
  learned = np.r_[rng.normal(-0.5, 0.2, 180), rng.normal(1.0, 0.3, 60)]
  for r in (demo, zeros, learned):
    assert separation(r)["verdict"] == "separated", separation(r)["reasons"]
  # Components on both sides of 0 are checked on r itself too, where these are two modes.
  assert "raw" in separation(learned)["statistics"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_blob_is_no_separation(seed):
  rng = np.random.default_rng(seed)
  blobs = {
      "gaussian": rng.normal(0.3, 0.5, N),
      "lognormal": rng.lognormal(0.0, 0.5, N),
      # The harmfulness run's shape: three kinds with about the same mean forgetting.
      "three kinds alike": np.r_[rng.normal(0.03, 0.3, 80), rng.normal(0.12, 0.3, 80),
                                 rng.normal(-0.09, 0.3, 80)],
  }
  for name, r in blobs.items():
    out = separation(r)
    assert out["verdict"] == "no separation", name
    assert any(reason.startswith(("one mode:", "components overlap")) for reason in
               out["reasons"]), (name, out["reasons"])


@pytest.mark.parametrize("seed", [0, 2])
def test_a_wide_blob_around_0_is_not_split_by_the_log_scale(seed):
  # sign(r)·log(1+|r|) stretches scores near 0 apart: one wide Gaussian or Student-t blob around 0
  # has two modes on that scale, so the check asks r itself, where there is one.
  rng = np.random.default_rng(seed)
  for r in (rng.normal(0.0, 1.0, N), 3.0 * rng.standard_t(3, N)):
    out = separation(r)
    assert out["verdict"] == "no separation"
    assert out["statistics"]["ashman_d"] > 2  # separated-looking on the signed-log scale alone
    assert "raw" in out["statistics"]
    assert out["reasons"][0].startswith("two modes only on the signed-log scale")


def test_dropping_most_of_the_data_is_no_separation_unless_the_limit_is_lifted():
  r = _spike_and_mode(0.25)
  flags = r > np.quantile(r, 0.29)  # 71% dropped, most of the spike with the forgotten mode
  out = separation(r, flags)
  assert out["verdict"] == "no separation"
  assert out["reasons"] == ["drops 71% of the data (> filter.max_drop_fraction 0.6)"]
  assert out["statistics"]["n_flagged"] == 170 and out["criteria"]["max_drop_fraction"] == 0.6
  assert separation(r, flags, max_drop_fraction=0.75)["verdict"] == "separated"
  lifted = separation(r, np.ones(N, bool), max_drop_fraction=1.0)
  assert lifted["verdict"] == "separated" and len(lifted["reasons"]) == 1


def test_degenerate_scores_nan_and_bad_input():
  for r, why in (([0.2] * 30, "do not vary"), ([0.1, 0.5, 0.9], "too few scored examples"),
                 ([np.nan] * 20, "too few scored examples")):
    out = separation(np.array(r))
    assert out["verdict"] == "no separation" and why in out["reasons"][0]
  # NaN (unscored) is left out of the fit but counts in the share of the data dropped.
  r = _spike_and_mode(0.25)
  with_nan = np.r_[r, [np.nan] * 10]
  flags = np.r_[r > 0.5, [False] * 10]
  out = separation(with_nan, flags)
  assert out["verdict"] == "separated"
  assert out["statistics"]["n"] == N and out["statistics"]["n_nan"] == 10
  assert out["statistics"]["drop_fraction"] == pytest.approx((r > 0.5).sum() / (N + 10))
  assert out["statistics"]["delta_bic"] == separation(r)["statistics"]["delta_bic"]
  with pytest.raises(DataError, match="inf"):
    separation(np.r_[r, np.inf])
  with pytest.raises(DataError, match="flags"):
    separation(r, flags[:5])
  with pytest.raises(ConfigError, match="max_drop_fraction"):
    separation(r, max_drop_fraction=0.0)


def test_the_settings_are_checked_when_the_config_loads():
  cfg = load_config(None, ["filter.on_no_separation=warn", "filter.max_drop_fraction=1"])
  assert cfg.filter.on_no_separation == "warn" and cfg.filter.max_drop_fraction == 1.0
  assert FilterConfig().on_no_separation == "refuse" and FilterConfig().max_drop_fraction == 0.6
  with pytest.raises(ConfigError, match="filter.on_no_separation='stop'"):
    load_config(None, ["filter.on_no_separation=stop"])
  for bad in ("0", "1.5", "-0.2"):
    with pytest.raises(ConfigError, match=f"filter.max_drop_fraction={float(bad)}"):
      load_config(None, [f"filter.max_drop_fraction={bad}"])


# -- the filter phase, report.md and the command line -----------------------------------------


def _run_dir(root: Path, r: np.ndarray, kinds: list[str]) -> tuple[RunDir, list[Record]]:
  """A run directory holding the score tables the filter phase reads, with r_nll = r."""
  rng = np.random.default_rng(7)
  before = 2.0 + 0.1 * rng.standard_normal(r.size)
  run = RunDir(root)
  root.mkdir(parents=True, exist_ok=True)
  (root / "scores_before.json").write_text(json.dumps(
      {"nll": before.tolist(), "acc": [0.8] * r.size, "tokens": [12] * r.size}))
  (root / "scores_after.json").write_text(json.dumps(
      {"nll": (before + r).tolist(), "acc": (0.8 - r / 10).tolist()}))
  records = [Record(id=f"ex{i:03d}", prompt="p", response="r", kind=k, category="bias")
             for i, k in enumerate(kinds)]
  return run, records


def _cfg(root: Path, on_no_separation: str, threshold: str = "auto") -> RunConfig:
  return RunConfig(run_dir=str(root), filter=FilterConfig(
      signal="nll", threshold=threshold, on_no_separation=on_no_separation))


def _blob(root: Path) -> tuple[RunDir, list[Record]]:
  # Forgetting that does not tell the kinds apart: one blob, as in the harmfulness run.
  rng = np.random.default_rng(1)
  r = np.r_[rng.normal(0.03, 0.3, 80), rng.normal(0.12, 0.3, 80), rng.normal(-0.09, 0.3, 80)]
  return _run_dir(root, r, ["unsafe"] * 80 + ["task"] * 80 + ["safe"] * 80)


def test_warn_filters_anyway_and_says_so_in_filter_json_and_report(tmp_path):
  run, records = _blob(tmp_path / "run")
  out = filter_records(_cfg(run.root, "warn"), run, records, truncated=0)
  assert out["separation"] == "no separation"
  filt = json.loads(run.file("filter.json").read_text())
  block = filt["separation"]
  assert block["verdict"] == "no separation" and block["reasons"]
  assert {"delta_bic", "ashman_d", "valley_depth", "drop_fraction"} <= set(block["statistics"])
  assert any("drops" in reason and "filter.max_drop_fraction 0.6" in reason
             for reason in block["reasons"])  # the auto ϕ split the blob: most of it dropped
  kept = run.file("filtered.jsonl").read_text().splitlines()
  assert len(kept) == out["kept"] == filt["counts"]["kept"] and out["flagged"] > N * 0.6

  warning = analysis.separation_warning(run.root)
  assert out["warning"] == warning  # the phase logs the one it computed, the CLI reads it back
  assert warning.startswith("WARNING: no separation") and "filter.signal=nll" in warning
  assert f"dropped {out['flagged']} of {N} examples" in warning
  assert block["reasons"][0] in warning
  text = markdown.write_report(run.root).read_text()
  summary = text[text.index("## Summary"):text.index("\n## ", text.index("## Summary") + 1)]
  assert "> **WARNING: no separation" in summary
  assert ("- Separation (label-free, ff_jax.forgetting.thresholds.separation): **no separation**"
          in summary)
  assert analysis.summary_figures(run.root)["separation"] == "no separation"


def test_refuse_raises_before_writing_any_filtered_output(tmp_path):
  run, records = _blob(tmp_path / "run")
  # What an earlier filter run (another signal, under warn) left must not survive the refusal.
  for name in ("filtered.jsonl", "flagged.jsonl", "filter.json"):
    run.file(name).write_text("stale\n")
  with pytest.raises(NoSeparationError) as err:
    filter_records(_cfg(run.root, "refuse"), run, records, truncated=0)
  message = str(err.value)
  assert "filter.signal='nll'" in message and "filter.threshold=auto:gmm" in message
  assert "one mode: a 2-component fit is not better than 1" in message
  assert "filter.on_no_separation=warn" in message and "filter.max_drop_fraction" in message
  for name in ("filtered.jsonl", "flagged.jsonl", "filter.json"):
    assert not run.file(name).exists(), name
  assert run.file("scores.csv").is_file()  # kept on purpose: the scores to look at
  assert analysis.separation_warning(run.root) is None


def test_separated_scores_pass_refuse_and_the_report_has_no_warning(tmp_path):
  r = _spike_and_mode(0.25)
  run, records = _run_dir(tmp_path / "run", r, ["safe"] * 180 + ["unsafe"] * 60)
  out = filter_records(_cfg(run.root, "refuse", "fixed:0.5"), run, records, truncated=0)
  assert out["separation"] == "separated" and out["f1"] > 0.95
  block = json.loads(run.file("filter.json").read_text())["separation"]
  assert block["verdict"] == "separated" and block["reasons"][0].startswith("two modes")
  assert analysis.separation_warning(run.root) is None
  text = markdown.write_report(run.root).read_text()
  assert "WARNING" not in text and "**separated**" in text


def test_the_command_line_summary_ends_with_the_warning(tmp_path, monkeypatch, capsys):
  from ff_jax import cli
  from ff_jax.pipeline import driver

  run, records = _blob(tmp_path / "run")

  def fake_run_job(cfg, restart=False, until=None, redo_from=None):
    # The phases before `filter` are what this test does not need: their score files are here.
    filter_records(cfg, run, records, truncated=0)
    return run.root

  monkeypatch.setattr(driver, "run_job", fake_run_job)
  overrides = [f"run_dir={run.root}", "filter.signal=nll", "filter.threshold=auto"]
  # The default refuses: exit status 2, the reasons on stderr, scores.csv only.
  assert cli.main(["run", *overrides]) == 2
  assert "the filter cannot tell groups apart" in capsys.readouterr().err
  assert (run.root / "scores.csv").exists() and not (run.root / "filter.json").exists()
  overrides.append("filter.on_no_separation=warn")
  assert cli.main(["run", *overrides]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"report: {run.root / 'report.md'}"
  assert lines[-1].startswith("WARNING: no separation: the filter cannot tell two groups apart")
  assert cli.main(["run", *overrides, "--until", "score_after"]) == 0
  assert "WARNING" not in capsys.readouterr().out


def test_replica_agreement_is_recorded_and_checked_only_when_asked():
  """κ of the noisy replicas' own filters is in the statistics; with `min_agreement` replicas that
  drop other rows make "no separation" (off by default: docs/fidelity.md)."""
  r = _spike_and_mode(0.25)
  flags, _, _ = Threshold.parse("auto")(r)
  out = separation(r, flags, agreement=0.2)
  assert out["verdict"] == "separated" and out["statistics"]["agreement"] == 0.2
  assert out["criteria"]["min_agreement"] is None
  assert separation(r, flags, agreement=0.9, min_agreement=0.3)["verdict"] == "separated"
  strict = separation(r, flags, agreement=0.2, min_agreement=0.3)
  assert strict["verdict"] == "no separation"
  assert "noisy replicas drop different rows (Cohen's κ 0.20 < 0.3)" in strict["reasons"][0]
  assert "agreement" not in separation(r, flags)["statistics"]  # one run: nothing to compare
