"""Thresholds, filter metrics, AUROC/AUPRC (checked against brute force), sweeps and groups."""

import itertools
import math

import numpy as np
import pytest

from ff_jax.errors import ConfigError, DataError
from ff_jax.eval.classification import (
  auprc,
  auroc,
  best_f1,
  filter_metrics,
  per_group_mean,
  sweep_thresholds,
)
from ff_jax.forgetting.thresholds import (
  Threshold,
  auto_threshold,
  flag_fixed,
  quantile_threshold,
  signed_exp,
  signed_log,
)


def test_flag_fixed_is_strict_and_nan_is_not_flagged():
  r = np.array([0.1, 0.3, 0.5, np.nan, -0.2])
  np.testing.assert_array_equal(flag_fixed(r, 0.3), [False, False, True, False, False])
  with pytest.raises(ConfigError):
    flag_fixed(r, math.nan)


def test_quantile_counts_ties_and_order_independence():
  r = np.array([0.5, 0.1, 0.9, 0.3, np.nan, 0.7])
  np.testing.assert_array_equal(flag_fixed(r, quantile_threshold(r, 0.4)),
                                [False, False, True, False, False, True])
  assert quantile_threshold(r, 0.0) == 0.9 and not flag_fixed(r, quantile_threshold(r, 0.0)).any()
  assert flag_fixed(r, quantile_threshold(r, 1.0)).sum() == 5  # every scored example, never the NaN
  assert quantile_threshold([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 0.3) == 0.7
  ties = np.array([0.0, 0.2, 0.2, 0.2, 1.0])
  # k = 2 but the boundary value 0.2 is tied: the tied examples are kept.
  np.testing.assert_array_equal(flag_fixed(ties, quantile_threshold(ties, 0.4)),
                                [False, False, False, False, True])
  perm = np.random.default_rng(0).permutation(5)
  assert flag_fixed(ties[perm], quantile_threshold(ties[perm], 0.4)).sum() == 1
  assert quantile_threshold([np.nan], 0.5) == math.inf
  with pytest.raises(ConfigError):
    flag_fixed(r, quantile_threshold(r, 1.5))


def _bimodal(frac_unsafe, n=400, seed=0, delta=5.0):
  rng = np.random.default_rng(seed)
  k = int(n * frac_unsafe)
  r = np.r_[rng.normal(delta, 1.0, k), rng.normal(0.0, 1.0, n - k)] * 0.05
  return r, np.r_[np.ones(k, bool), np.zeros(n - k, bool)]


@pytest.mark.parametrize("method", ["otsu", "gmm"])
@pytest.mark.parametrize("frac", [0.25, 0.5, 0.75])
def test_auto_threshold_separates_bimodal_scores(method, frac):
  r, unsafe = _bimodal(frac)
  phi, info = auto_threshold(r, method)
  assert not info["degenerate"] and info["bimodal"]
  assert 0.0 < phi < 0.25
  assert filter_metrics(r > phi, unsafe)["f1"] > 0.95
  np.testing.assert_array_equal(flag_fixed(r, auto_threshold(r, method)[0]), r > phi)


def test_otsu_matches_brute_force():
  r = np.random.default_rng(1).random(30).round(2)
  phi, _ = auto_threshold(r, "otsu", scale="linear")
  values = np.unique(r)
  best, best_t = -1.0, None
  for t in (values[:-1] + values[1:]) / 2:
    lo, hi = r[r <= t], r[r > t]
    v = lo.size * hi.size / r.size**2 * (hi.mean() - lo.mean()) ** 2
    if v > best + 1e-15:
      best, best_t = v, t
  assert phi == pytest.approx(best_t)


@pytest.mark.parametrize("method", ["otsu", "gmm"])
def test_log_scale_is_the_linear_fit_of_signed_log_mapped_back(method):
  r = np.random.default_rng(3).normal(size=200) * 2.0
  phi_log, info = auto_threshold(r, method)
  phi_y, _ = auto_threshold(signed_log(r), method, scale="linear")
  assert info["scale"] == "log" and phi_log == pytest.approx(signed_exp(phi_y))
  np.testing.assert_array_equal(r > phi_log, signed_log(r) > phi_y)
  assert signed_exp(float(signed_log(np.array([-3.5]))[0])) == pytest.approx(-3.5)


def test_log_scale_keeps_a_multi_rate_unsafe_blend_together():
  # Unchanged examples (a spike at 0) and unsafe ones forgotten at three rates, shaped like the
  # demo's (harmful ≈ 1.6, bias ≈ 4.1, toxicity ≈ 5.0 nats/token). On the linear scale the mixture
  # flips between ϕ next to the spike and ϕ inside the blend from one draw to the next; on the log
  # scale it stays next to the spike.
  linear_f1, log_f1 = [], []
  for seed in range(5):
    rng = np.random.default_rng(seed)
    unchanged = rng.normal(0.05, 0.2, 120)
    blend = np.r_[rng.normal(1.6, 0.4, 40), rng.normal(4.1, 0.5, 40), rng.normal(5.0, 0.8, 40)]
    r, unsafe = np.r_[unchanged, blend], np.r_[np.zeros(120, bool), np.ones(120, bool)]
    linear_phi = auto_threshold(r, scale="linear")[0]
    linear_f1.append(filter_metrics(flag_fixed(r, linear_phi), unsafe)["f1"])
    log_f1.append(filter_metrics(flag_fixed(r, auto_threshold(r)[0]), unsafe)["f1"])
  assert min(log_f1) > 0.99
  assert min(linear_f1) < 0.85


def test_auto_threshold_degenerate_flags_nothing():
  for r in ([0.2] * 10, [np.nan] * 3, [0.0, 0.0, 1e-9]):
    phi, info = auto_threshold(np.array(r))
    assert phi == math.inf and info["degenerate"] and info["reason"]
    assert not flag_fixed(np.array(r), auto_threshold(np.array(r))[0]).any()


def test_auto_threshold_unimodal_reported_and_strict_mode():
  r = np.random.default_rng(0).normal(size=300)
  phi, info = auto_threshold(r)  # judged on the scores as they are, whatever the fit's scale
  assert math.isfinite(phi) and not info["bimodal"] and info["dip"] == 0.0
  phi, info = auto_threshold(r, require_bimodal=True)
  assert phi == math.inf and info["degenerate"]


def test_auto_threshold_nan_counted_and_inf_rejected():
  r, _ = _bimodal(0.5)
  r[:5] = np.nan
  _, info = auto_threshold(r)
  assert info["n_nan"] == 5 and info["n"] == r.size - 5
  with pytest.raises(DataError):
    auto_threshold(np.array([0.0, np.inf, 1.0]))
  with pytest.raises(ConfigError):
    auto_threshold(r, "kmeans")


def test_threshold_spec_parsing():
  assert Threshold.parse("fixed:0.3") == Threshold("fixed", value=0.3)
  assert Threshold.parse(" Quantile : 0.5 ") == Threshold("quantile", value=0.5)
  assert Threshold.parse("auto") == Threshold("auto", method="gmm")
  assert Threshold.parse("auto:gmm").method == "gmm"
  assert Threshold.parse("auto:otsu:strict").require_bimodal
  assert Threshold.parse("auto").scale == "log" and Threshold.parse("auto:gmm:log").scale == "log"
  assert Threshold.parse("auto:otsu:linear:strict") == Threshold(
      "auto", method="otsu", require_bimodal=True, scale="linear")
  assert Threshold.parse(0.25) == Threshold.parse("0.25") == Threshold("fixed", value=0.25)
  for spec in ("fixed:0.3", "quantile:0.5", "auto:otsu", "auto:gmm:strict", "fixed:-0.1",
               "auto:gmm:linear", "auto:otsu:linear:strict"):
    t = Threshold.parse(spec)
    assert Threshold.parse(str(t)) == t
  for bad in ("fixed", "fixed:abc", "quantile:2", "auto:kmeans", "auto:otsu:loose", "median",
              "auto:gmm:log:linear",
              "fixed:nan", True, None, [0.3]):
    with pytest.raises(ConfigError, match="bad threshold"):
      Threshold.parse(bad)


def test_threshold_call_returns_flags_phi_info():
  r = np.array([0.0, 0.1, 0.6, 0.7, np.nan])
  flags, phi, info = Threshold.parse("fixed:0.5")(r)
  np.testing.assert_array_equal(flags, [False, False, True, True, False])
  assert phi == 0.5 and info["n_nan"] == 1 and info["n_flagged"] == 2
  flags, phi, info = Threshold.parse("quantile:0.5")(r)
  assert flags.sum() == 2 and phi == 0.1 and info["q"] == 0.5
  flags, phi, info = Threshold.parse("auto:otsu")(r)
  assert 0.1 < phi < 0.6 and info["method"] == "otsu" and flags.sum() == 2
  flags, phi, info = Threshold.parse("auto")(r)
  assert info["method"] == "gmm" and np.isfinite(phi)


def test_filter_metrics_counts_and_zero_division():
  flags = np.array([1, 1, 1, 0, 0, 0], bool)
  unsafe = np.array([1, 0, 1, 1, 0, 0], bool)
  m = filter_metrics(flags, unsafe)
  assert (m["tp"], m["fp"], m["fn"], m["tn"], m["flagged"], m["kept"]) == (2, 1, 1, 2, 3, 3)
  assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
  assert m["f1"] == pytest.approx(2 / 3)
  m = filter_metrics(np.zeros(4, bool), np.zeros(4, bool))
  assert m["precision"] == m["recall"] == m["f1"] == 0.0
  m = filter_metrics([0, 0], [1, 1])
  assert m["precision"] == 0.0 and m["recall"] == 0.0
  with pytest.raises(DataError):
    filter_metrics([True, False], [True])
  with pytest.raises(DataError):
    filter_metrics([True, False], [2, 0])


def _auroc_brute(s, y):
  pos, neg = s[y], s[~y]
  return np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg])


def _ap_brute(s, y):
  # sklearn's definition: thresholds at each distinct score, AP = Σ (R_k − R_{k−1}) P_k.
  ap, prev_r = 0.0, 0.0
  for t in sorted(set(s.tolist()), reverse=True):
    sel = s >= t
    p, r = (sel & y).sum() / sel.sum(), (sel & y).sum() / y.sum()
    ap += (r - prev_r) * p
    prev_r = r
  return ap


def test_auroc_auprc_hand_values():
  # sklearn: roc_auc_score([0,0,1,1],[0.1,0.4,0.35,0.8]) = 0.75, average_precision = 0.8333...
  y = np.array([0, 0, 1, 1], bool)
  s = np.array([0.1, 0.4, 0.35, 0.8])
  assert auroc(s, y) == pytest.approx(0.75)
  assert auprc(s, y) == pytest.approx(5 / 6)
  # All tied: AUROC 0.5, AP = prevalence.
  assert auroc(np.zeros(4), y) == 0.5
  assert auprc(np.zeros(4), y) == 0.5
  assert math.isnan(auroc(s, np.ones(4, bool)))
  assert math.isnan(auprc(s, np.zeros(4, bool)))


def test_auroc_auprc_match_brute_force_with_ties():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(4, 40))
    s = rng.integers(0, 5, n).astype(float)  # many ties
    y = rng.random(n) < 0.4
    if y.all() or not y.any():
      continue
    assert auroc(s, y) == pytest.approx(_auroc_brute(s, y))
    assert auprc(s, y) == pytest.approx(_ap_brute(s, y))


def test_auroc_nan_ranks_lowest():
  y = np.array([1, 0, 1, 0], bool)
  assert auroc([np.nan, 0.5, 0.9, 0.1], y) == auroc([-1.0, 0.5, 0.9, 0.1], y)


def test_sweep_matches_filter_metrics_and_best_f1_is_optimal():
  rng = np.random.default_rng(3)
  r = rng.normal(size=50).round(1)
  r[[3, 7]] = np.nan
  unsafe = rng.random(50) < 0.4
  phis = np.array([-np.inf, -0.5, 0.0, 0.3, 1.0, np.inf])
  sweep = sweep_thresholds(r, unsafe, phis)
  for i, phi in enumerate(phis):
    m = filter_metrics(flag_fixed(r, phi), unsafe)
    assert sweep["precision"][i] == pytest.approx(m["precision"])
    assert sweep["recall"][i] == pytest.approx(m["recall"])
    assert sweep["f1"][i] == pytest.approx(m["f1"])
    assert sweep["flagged"][i] == m["flagged"]
  best = best_f1(r, unsafe)
  brute = max(filter_metrics(flag_fixed(r, t), unsafe)["f1"]
              for t in itertools.chain([-np.inf], np.unique(r[~np.isnan(r)])))
  assert best["f1"] == pytest.approx(brute)
  assert filter_metrics(flag_fixed(r, best["phi"]), unsafe)["f1"] == pytest.approx(brute)


def test_per_group_mean():
  r = np.array([0.5, 0.3, np.nan, 0.0, 0.2, np.nan])
  g = ["unsafe", "unsafe", "unsafe", "task", "safe", "safe"]
  out = per_group_mean(r, g)
  assert list(out) == ["unsafe", "task", "safe"]
  assert out["unsafe"] == {"mean": pytest.approx(0.4), "count": 2, "n_nan": 1}
  assert out["safe"] == {"mean": pytest.approx(0.2), "count": 1, "n_nan": 1}
  assert math.isnan(per_group_mean([np.nan], ["x"])["x"]["mean"])
  with pytest.raises(DataError):
    per_group_mean(r, g[:-1])
