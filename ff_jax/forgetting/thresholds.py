"""Thresholds on the forgetting vector r, and the label-free check that r has two groups.

r holds one float per noisy example, r = score_before − score_after (larger = more forgotten).
An example is *flagged* (dropped from the clean finetune) when r > ϕ, strictly, as in the paper
and in the official `postprocess.py`. NaN marks an example that could not be scored; it is never
flagged, and every thresholding function reports how many there were, so they are not silently
kept. Labels (`is_unsafe`) exist only in experiments and are used only for metrics here, never for
choosing a threshold (except `best_f1`, an oracle for reports).

Thresholds: a fixed ϕ (the paper), the top fraction q (threshold-free, reference §9), and a
label-free automatic ϕ (a two-Gaussian mixture by default, Otsu's method as an alternative).
`Threshold` parses the string form used in configs and on the command line: "fixed:0.3",
"quantile:0.5", "auto", "auto:otsu", "auto:gmm", "auto:otsu:strict" (a bare number means fixed).

`separation` judges, without labels, whether the scores show two groups at all, so the filter can
say when it cannot tell (`filter.on_no_separation`) instead of silently cutting through one blob.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ff_jax.errors import ConfigError, DataError
from ff_jax.eval.classification import as_labels, as_scores


def _gt(r: np.ndarray, phi: float) -> np.ndarray:
  # NaN > phi is False, which is exactly "not flagged"; silence the invalid-value warning.
  with np.errstate(invalid="ignore"):
    return r > phi


# ------------------------------------------------------------------------------------------------
# Fixed and quantile thresholds


def flag_fixed(r: Any, phi: float) -> np.ndarray:
  """Flags r > phi (strict, as in the paper). NaN is never flagged."""
  phi = float(phi)
  if math.isnan(phi):
    raise ConfigError("threshold phi is NaN")
  return _gt(as_scores(r), phi)


def quantile_threshold(r: Any, q: float) -> float:
  """The ϕ that flags the top fraction q of the scored (non-NaN) examples with r > ϕ.

  k = ⌊q·n⌋ examples should be flagged, n = number of non-NaN scores. ϕ is the largest score that
  is kept, i.e. the (n−k)-th smallest; -inf when k = n (flag all) and +inf when n = 0. Examples
  tied with ϕ are kept, so with ties at the boundary fewer than k are flagged; the result never
  depends on the order of the examples.
  """
  q = float(q)
  if not 0.0 <= q <= 1.0:
    raise ConfigError(f"quantile q must be in [0, 1], got {q}")
  r = as_scores(r)
  finite = np.sort(r[~np.isnan(r)])
  n = finite.size
  if n == 0:
    return math.inf
  k = int(math.floor(q * n + 1e-9))  # the epsilon keeps e.g. 0.3 * 10 from rounding down to 2
  if k >= n:
    return -math.inf
  return float(finite[n - k - 1])


# ------------------------------------------------------------------------------------------------
# Automatic thresholds


def _otsu(x: np.ndarray) -> tuple[float, dict[str, Any]]:
  """Otsu's threshold on sorted-unique candidates; x finite with ≥ 2 distinct values."""
  values, counts = np.unique(x, return_counts=True)
  n = counts.sum()
  n0 = np.cumsum(counts)[:-1].astype(np.float64)  # class 0 = values[:i+1] (r <= threshold)
  s0 = np.cumsum(counts * values)[:-1]
  total = float((counts * values).sum())
  mu0 = s0 / n0
  mu1 = (total - s0) / (n - n0)
  w0 = n0 / n
  between = w0 * (1 - w0) * (mu1 - mu0) ** 2
  i = int(np.argmax(between))  # first maximum: the lowest of tied thresholds, deterministic
  phi = float((values[i] + values[i + 1]) / 2)
  var_total = float(x.var())
  info = {
      "mean_low": float(mu0[i]),
      "mean_high": float(mu1[i]),
      "frac_high": float(1 - w0[i]),
      # Otsu's effectiveness σ_B²/σ_T² ∈ (0, 1]: 2/π ≈ 0.64 for one Gaussian, → 1 when separated.
      "eta": float(between[i] / var_total) if var_total > 0 else 0.0,
  }
  return phi, info


def _gmm_fit(x: np.ndarray, max_iter: int = 500, tol: float = 1e-10,
             init: tuple[float, float] = (0.25, 0.75),
             var_floor_fraction: float = 1e-6) -> dict[str, Any]:
  """EM for a two-component 1-D Gaussian mixture, initialised at the `init` quantiles of x (the
  quartiles by default; deterministic)."""
  var_total = float(x.var())
  # A floor keeps a component from collapsing onto a spike of identical scores (e.g. many exact
  # zeros when ROUGE did not change), which would make the likelihood unbounded.
  var_floor = max(var_floor_fraction * var_total, 1e-12)
  mu = np.array([np.quantile(x, init[0]), np.quantile(x, init[1])], dtype=np.float64)
  var = np.full(2, max(var_total / 4, var_floor))
  w = np.array([0.5, 0.5])
  prev_ll = -math.inf
  n_iter = 0
  while n_iter < max_iter:
    n_iter += 1
    log_p = (np.log(w) - 0.5 * np.log(2 * math.pi * var)
             - 0.5 * (x[:, None] - mu) ** 2 / var)  # [n, 2]
    log_norm = np.logaddexp(log_p[:, 0], log_p[:, 1])
    ll = float(log_norm.sum())
    resp = np.exp(log_p - log_norm[:, None])
    nk = resp.sum(axis=0) + 1e-300
    w = nk / nk.sum()
    mu = (resp * x[:, None]).sum(axis=0) / nk
    var = np.maximum((resp * (x[:, None] - mu) ** 2).sum(axis=0) / nk, var_floor)
    if ll - prev_ll < tol * max(1.0, abs(ll)):
      break
    prev_ll = ll
  order = np.argsort(mu)
  return {"weights": w[order], "means": mu[order], "vars": var[order], "log_likelihood": ll,
          "n_iter": n_iter}


def _posterior_crossing(w: np.ndarray, mu: np.ndarray, var: np.ndarray) -> float | None:
  """x where w0·N(x; μ0, σ0²) = w1·N(x; μ1, σ1²), taking the root between the means."""
  # Log-density difference is a quadratic a x² + b x + c.
  a = 0.5 / var[0] - 0.5 / var[1]
  b = mu[1] / var[1] - mu[0] / var[0]
  c = (0.5 * mu[0] ** 2 / var[0] - 0.5 * mu[1] ** 2 / var[1]
       + math.log(w[1] / w[0]) - 0.5 * math.log(var[1] / var[0]))
  if abs(a) < 1e-12 * max(abs(b), 1e-300):
    roots = [-c / b] if b != 0 else []
  else:
    disc = b * b - 4 * a * c
    if disc < 0:
      return None
    sq = math.sqrt(disc)
    roots = [(-b - sq) / (2 * a), (-b + sq) / (2 * a)]
  if not roots:
    return None
  lo, hi = mu[0], mu[1]
  between = [x for x in roots if lo <= x <= hi]
  # Unequal variances give two crossings (the wide component wins both tails); the one between
  # the means is the decision boundary. If the dominant component swamps the other everywhere
  # between the means, take the crossing nearest to their midpoint.
  pool = between or roots
  mid = (lo + hi) / 2
  return float(min(pool, key=lambda x: abs(x - mid)))


def _mixture_dip(w: np.ndarray, mu: np.ndarray, var: np.ndarray) -> float:
  """Relative depth of the valley of the fitted mixture density between its component means.

  0 when the density has a single mode (it rises or falls monotonically from one mean to the
  other), → 1 for well separated modes: 1 − valley / lower peak.
  """
  if mu[1] - mu[0] <= 0:
    return 0.0
  grid = np.linspace(mu[0], mu[1], 1025)
  pdf = (w / np.sqrt(2 * math.pi * var) * np.exp(-0.5 * (grid[:, None] - mu) ** 2 / var)).sum(1)
  m = int(np.argmin(pdf))
  lower_peak = min(pdf[: m + 1].max(), pdf[m:].max())
  return float(max(0.0, 1.0 - pdf[m] / lower_peak)) if lower_peak > 0 else 0.0


AUTO_METHODS = ("otsu", "gmm")
AUTO_SCALES = ("log", "linear")


def signed_log(x: np.ndarray) -> np.ndarray:
  """sign(x)·log(1 + |x|): monotone, ≈ x near 0, compresses large scores; inverse `signed_exp`."""
  return np.sign(x) * np.log1p(np.abs(x))


def signed_exp(y: float) -> float:
  return float(math.copysign(math.expm1(abs(y)), y))


def auto_threshold(r: Any, method: str = "gmm", require_bimodal: bool = False,
                   min_range: float = 1e-6, scale: str = "log") -> tuple[float, dict[str, Any]]:
  """A label-free ϕ for r > ϕ, with a diagnostics dict. Default: the two-Gaussian mixture, fitted
  on the signed-log scale.

  Why the log scale by default: unsafe categories are forgotten at rates that differ by multiples
  (demo: harmful ≈ +1, bias ≈ +3, toxicity ≈ +3.3 to +8 nats/token, depending on the seed), so on
  the linear scale the forgotten mode is a wide blend whose top categories pull one component up
  and the threshold into the blend (demo after a change of float summation order: ϕ = 2.2,
  recall 0.69, F1 0.81). sign(r)·log(1+|r|) keeps the spike of unchanged examples where it is
  (≈ r near 0) and compresses the blend into one mode; the threshold is mapped back to r. Measured
  on every stored run (docs/signals.md, `python scripts/signal_study.py thresholds RUN...`).
  `scale="linear"` (spec "auto:gmm:linear") fits the raw scores.

  Why the mixture by default: forgetting scores of real runs are a spike of barely changed
  examples near 0 (task and safe ones, the majority) plus a broad mode of forgotten ones, and the
  unsafe mode is itself often a blend of categories forgotten at different rates (on the demo:
  harmful +2.4, bias +3.0, toxicity +7.9 nats/token). Otsu then splits *inside* the unsafe mode
  (demo seed 0: ϕ = 4.7, F1 0.49), while the mixture's wide component absorbs every unsafe
  category and ϕ lands next to the spike (ϕ = 0.6, F1 0.90); the synthetic spike-plus-broad case
  below agrees (0.85 vs 0.71). Otsu remains available ("auto:otsu") and is the better choice for
  two symmetric, similar-width modes.

  Otsu's properties: it assumes no distribution shape (forgetting scores are bounded, skewed
  and, for ROUGE, often have a spike at 0), it has no initialisation or iteration, so it is
  exactly reproducible, and maximising the between-class variance w0·w1·(μ1−μ0)² works for any
  class balance that is not extreme, which covers the paper's 25–75% noise ratios. The GMM
  alternative ("gmm") fits two Gaussians by EM from quartile initialisation and puts ϕ where the
  two weighted densities (the posteriors) cross. On synthetic two-Gaussian data (n=240, 25/50/75%
  unsafe, 200 seeds each) their mean F1 agreed within 0.02 at separations of 3σ and more; at 2σ
  Otsu was better by up to 0.08 (EM often lands on overlapping components). With a spike of
  unchanged scores at 0 plus a broad unsafe mode the GMM did better (F1 0.85 vs 0.71): it puts ϕ
  right next to the spike. Both always split the data in two, even when there is nothing to
  separate.

  Nothing is flagged (ϕ = +inf, `info["degenerate"] = True` with a `reason`) when
    - there are fewer than two distinct non-NaN scores, or their range is below `min_range`
      (nothing was forgotten, or only float noise); or
    - `require_bimodal` is set and the scores look unimodal: the two-Gaussian mixture fitted to
      them has a single mode (no valley between the component means; `info["dip"]` = 0).
  The bimodality check is reported (`info["bimodal"]`, `info["dip"]`) but not enforced by
  default: in the synthetic runs above it flagged nothing in 91% of 25%-unsafe mixtures at 2σ
  separation and 27% at 3σ, where Otsu's F1 is 0.69 and 0.85; for a safety filter, silently
  keeping every unsafe example is the worse failure than dropping half of a signal-free set.
  `info` always has: method, scale, n, n_nan, degenerate, and (unless degenerate by size/range)
  bimodal and dip (of the scores as they are), the flagged fraction, and the method's quantities
  on `scale` (Otsu: class means, effectiveness η = σ_B²/σ_T²; GMM: weights, means, vars,
  log-likelihood).
  """
  if method not in AUTO_METHODS:
    raise ConfigError(f"unknown automatic threshold method {method!r}; use one of {AUTO_METHODS}")
  if scale not in AUTO_SCALES:
    raise ConfigError(f"unknown automatic threshold scale {scale!r}; use one of {AUTO_SCALES}")
  if min_range < 0:
    raise ConfigError(f"auto_threshold: min_range must be >= 0, got {min_range}")
  r = as_scores(r)
  finite = r[~np.isnan(r)]
  if np.isinf(finite).any():
    raise DataError("auto_threshold: scores contain ±inf; use NaN for examples without a score")
  info: dict[str, Any] = {"method": method, "scale": scale, "n": int(finite.size),
                          "n_nan": int(r.size - finite.size), "degenerate": False}

  def degenerate(reason: str) -> tuple[float, dict[str, Any]]:
    info.update(degenerate=True, reason=reason, frac_flagged=0.0)
    return math.inf, info

  if np.unique(finite).size < 2:
    return degenerate("fewer than two distinct scores")
  if float(finite.max() - finite.min()) < min_range:
    return degenerate(f"scores span less than min_range={min_range}")

  # Bimodality is judged on the scores as they are (the log of a unimodal bell can have two
  # modes); the threshold is fitted on `scale` and reported in r's units.
  linear_fit = _gmm_fit(finite)
  dip = _mixture_dip(linear_fit["weights"], linear_fit["means"], linear_fit["vars"])
  info.update(bimodal=dip > 0, dip=dip)
  scaled = signed_log(finite) if scale == "log" else finite
  if method == "otsu":
    phi, otsu_info = _otsu(scaled)
    info.update(otsu_info)
  else:
    fit = linear_fit if scale == "linear" else _gmm_fit(scaled)
    phi = _posterior_crossing(fit["weights"], fit["means"], fit["vars"])
    info.update({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in fit.items()})
    if phi is None:
      return degenerate("the two mixture components' posteriors never cross")
  if require_bimodal and dip <= 0:
    return degenerate("scores look unimodal: the fitted two-Gaussian mixture has one mode")
  if scale == "log":
    phi = signed_exp(phi)
  info["frac_flagged"] = float(_gt(finite, phi).mean())
  return float(phi), info


# ------------------------------------------------------------------------------------------------
# Threshold specs


@dataclasses.dataclass(frozen=True)
class Threshold:
  """A parsed threshold spec; call it on r to get (flags, phi, info).

  kind "fixed" (value = ϕ), "quantile" (value = fraction q flagged) or "auto" (method = "otsu" or
  "gmm", fitted on `scale` "log" or "linear"). `str(t)` gives back the spec string;
  `Threshold.parse(str(t)) == t`.
  """

  kind: str
  value: float | None = None
  method: str | None = None
  require_bimodal: bool = False  # "auto:<method>:strict": flag nothing if r looks unimodal
  scale: str = "log"  # "auto:<method>:linear" fits the raw scores (see `auto_threshold`)

  @classmethod
  def parse(cls, spec: Any) -> Threshold:
    """Parses "fixed:0.3", "quantile:0.5", "auto", "auto:otsu", "auto:gmm" or a bare number.

    After the auto method, ":linear" fits the raw scores instead of their signed log, and
    ":strict" sets `require_bimodal` (see `auto_threshold`): e.g. "auto:otsu:linear:strict".
    """
    if isinstance(spec, Threshold):
      return spec
    if isinstance(spec, bool):  # bool is an int; True is not a threshold
      raise ConfigError(f"bad threshold {spec!r}: expected e.g. 'fixed:0.3' or 'auto'")
    if isinstance(spec, int | float):
      return cls._fixed(float(spec), spec)
    if not isinstance(spec, str):
      raise ConfigError(f"bad threshold {spec!r}: expected a string such as 'fixed:0.3'")
    text = spec.strip().lower()
    kind, _, arg = text.partition(":")
    kind, arg = kind.strip(), arg.strip()
    if kind == "auto":
      method, *modes = [part.strip() for part in arg.split(":")]
      method = method or "gmm"
      if method not in AUTO_METHODS:
        raise ConfigError(f"bad threshold {spec!r}: unknown auto method {method!r}, "
                          f"use one of {', '.join(AUTO_METHODS)}")
      for mode in modes:
        if mode not in ("strict", *AUTO_SCALES):
          raise ConfigError(f"bad threshold {spec!r}: unknown auto mode {mode!r}, use "
                            "'linear', 'log' or 'strict' (e.g. 'auto:otsu:linear:strict')")
      scales = [mode for mode in modes if mode in AUTO_SCALES]
      if len(scales) > 1:
        raise ConfigError(f"bad threshold {spec!r}: give one scale, 'linear' or 'log'")
      return cls("auto", method=method, require_bimodal="strict" in modes,
                 scale=scales[0] if scales else "log")
    if kind in ("fixed", "quantile"):
      if not arg:
        raise ConfigError(f"bad threshold {spec!r}: {kind} needs a value, e.g. '{kind}:0.5'")
      try:
        value = float(arg)
      except ValueError:
        raise ConfigError(f"bad threshold {spec!r}: {arg!r} is not a number") from None
      if kind == "fixed":
        return cls._fixed(value, spec)
      if not 0.0 <= value <= 1.0:
        raise ConfigError(f"bad threshold {spec!r}: quantile must be in [0, 1]")
      return cls("quantile", value=value)
    try:  # a bare number in string form
      return cls._fixed(float(text), spec)
    except ValueError:
      raise ConfigError(f"bad threshold {spec!r}: expected 'fixed:<phi>', 'quantile:<q>', "
                        "'auto', 'auto:otsu' or 'auto:gmm'") from None

  @classmethod
  def _fixed(cls, value: float, spec: Any) -> Threshold:
    if math.isnan(value):
      raise ConfigError(f"bad threshold {spec!r}: phi is NaN")
    return cls("fixed", value=value)

  def __str__(self) -> str:
    if self.kind == "auto":
      return (f"auto:{self.method}" + (":linear" if self.scale == "linear" else "")
              + (":strict" if self.require_bimodal else ""))
    return f"{self.kind}:{self.value:g}"

  def __call__(self, r: Any) -> tuple[np.ndarray, float, dict[str, Any]]:
    r = as_scores(r)
    n_nan = int(np.isnan(r).sum())
    if self.kind == "fixed":
      phi, info = float(self.value), {}
    elif self.kind == "quantile":
      phi, info = quantile_threshold(r, self.value), {"q": self.value}
    else:
      phi, info = auto_threshold(r, self.method, require_bimodal=self.require_bimodal,
                                 scale=self.scale)
    flags = _gt(r, phi)
    info = {**info, "spec": str(self), "phi": phi, "n_nan": n_nan, "n_flagged": int(flags.sum())}
    return flags, phi, info


# ------------------------------------------------------------------------------------------------
# Separation: can the scores tell two groups apart at all?

SEPARATION_MIN_DELTA_BIC = 10.0  # Kass & Raftery's "very strong" evidence for two components
SEPARATION_MIN_ASHMAN_D = 2.0  # an equal mixture of two Gaussians is bimodal exactly for D > 2
SEPARATION_MIN_VALLEY = 0.25  # the valley between the modes at most 75% of the lower peak
SEPARATION_MIN_SCORES = 10
# The diagnostic's components are at least a tenth of the scores' spread wide (σ ≥ 0.1·σ_total).
# With the auto threshold's floor (1e-6 of the variance) a component collapses onto a spike of
# identical scores (exact zeros of an unchanged ROUGE) and the other takes both the rest of the
# spike and the forgotten mode, so a clear second mode read as overlapping components.
_SEPARATION_VAR_FLOOR = 1e-2
# EM from the quartiles alone can miss a small second mode; the best of three starts is kept.
_SEPARATION_STARTS = ((0.25, 0.75), (0.1, 0.9), (0.02, 0.98))


def _two_against_one(x: np.ndarray) -> dict[str, Any]:
  """The best two-Gaussian fit of x (over `_SEPARATION_STARTS`) against one Gaussian: ΔBIC,
  Ashman's D and the depth of the fitted density's valley, with the fit."""
  n = x.size
  ll_one = -0.5 * n * (math.log(2 * math.pi * max(float(x.var()), 1e-300)) + 1.0)
  fits = [_gmm_fit(x, init=start, var_floor_fraction=_SEPARATION_VAR_FLOOR)
          for start in _SEPARATION_STARTS]
  fit = max(fits, key=lambda f: f["log_likelihood"])  # the first start on ties: deterministic
  w, mu, var = fit["weights"], fit["means"], fit["vars"]
  # BIC = −2·log-likelihood + p·log n with p = 2 (one Gaussian) or 5 (two and a weight).
  delta_bic = 2.0 * (fit["log_likelihood"] - ll_one) - 3.0 * math.log(n)
  return {"delta_bic": float(delta_bic),
          "ashman_d": float(math.sqrt(2.0) * abs(mu[1] - mu[0]) / math.sqrt(var[0] + var[1])),
          "valley_depth": _mixture_dip(w, mu, var), "weights": w.tolist(), "means": mu.tolist(),
          "sds": np.sqrt(var).tolist()}


def _mode_failures(fit: dict[str, Any], min_delta_bic: float, min_ashman_d: float,
                   min_valley: float) -> list[str]:
  """The reasons a `_two_against_one` fit does not show two separate modes (none: it does)."""
  failed = []
  if fit["delta_bic"] < min_delta_bic:
    failed.append(f"one mode: a 2-component fit is not better than 1 "
                  f"(ΔBIC {fit['delta_bic']:.2f} < {min_delta_bic:g})")
  elif fit["valley_depth"] < min_valley:
    failed.append(f"one mode: no clear valley between the 2 fitted components "
                  f"(depth {fit['valley_depth']:.2f} < {min_valley:g})")
  if fit["ashman_d"] < min_ashman_d:
    failed.append(f"components overlap (Ashman D {fit['ashman_d']:.2f} < {min_ashman_d:g})")
  return failed


def separation(r: Any, flags: Any = None, max_drop_fraction: float = 0.6,
               min_delta_bic: float = SEPARATION_MIN_DELTA_BIC,
               min_ashman_d: float = SEPARATION_MIN_ASHMAN_D,
               min_valley: float = SEPARATION_MIN_VALLEY, agreement: float | None = None,
               min_agreement: float | None = None) -> dict[str, Any]:
  """Whether the scores r show two groups a threshold can split, judged without labels.

  A filter is only as good as the gap in its scores: on scores that form one blob every ϕ cuts
  through it, and an automatic ϕ still splits the data in two (the harmfulness run of
  docs/experiments.md: AUROC 0.47, ϕ inside the blob, 91 of 120 dropped). The verdict is
  "separated" when every check below passes and "no separation" otherwise. The checks run on
  the automatic threshold's signed-log scale sign(r)·log(1 + |r|), where a spike of unchanged
  scores near 0 plus a blend of examples forgotten at different rates is two groups, with two
  Gaussians fitted by EM (the auto threshold's `_gmm_fit`, best of three starts, each σ at least
  a tenth of the overall spread):

    - two modes: the two-component fit beats one Gaussian by ΔBIC = BIC₁ − BIC₂ ≥
      `min_delta_bic` (10), and its density dips between the component means by at least
      `min_valley` (0.25) of the lower of its two peaks (the valley depth);
    - apart: Ashman's D = √2·|μ₁ − μ₂| / √(σ₁² + σ₂²) ≥ `min_ashman_d` (2);
    - not the scale's own modes: the signed log stretches scores near 0 apart, so one wide blob
      on both sides of 0 has two modes on that scale. When the fitted components lie on both
      sides of 0 (μ₁ + σ₁ < 0 < μ₂), the two checks above must pass on r itself too;
    - with `flags` (the filter's decisions): it drops at most `max_drop_fraction` of all the
      examples, unscored ones included (1.0 turns the check off);
    - with `agreement` (the noisy replicas' own filters' Cohen's κ, `choice.replica_agreement`)
      and `min_agreement`: the replicas drop the same rows, κ ≥ `min_agreement`. Off by default
      (κ is recorded in the statistics): at 0.3, chosen on the tuning runs, it refused a
      validation pair whose filter had F1 0.983 (κ 0.22; docs/fidelity.md).
  Fewer than `SEPARATION_MIN_SCORES` scored examples, or scores that do not vary, are "no
  separation". NaN scores are left out of the fit.

  The defaults come from synthetic scores (n = 120, 240 and 1000, 20 draws each): a spike of
  σ 0.05–0.3 (or of exact zeros) near 0 beside a second mode of 5–50% of the data (Gaussian at
  0.25–4, lognormal around 1–3, the demo's three-rate blend) was "separated" in every draw;
  single Gaussians (mean 0–3, σ 0.1–2), lognormal, gamma, exponential and Student-t scores and
  scale mixtures centred on 0 were "no separation" in 85–100% of the draws (most in all). Known
  misses: a wider spike (σ 0.2) whose neighbour is a lognormal mode with a long lower tail
  passes in 45–100% of the draws; a small second mode (5%) beside a spike of mostly identical
  scores, or a third group as large as the forgotten one (e.g. a long tail at the learning
  floor), reads as overlapping; two Gaussian groups 3σ apart (25/75) mostly read as one mode
  (4σ: separated); flat scores across 0 (uniform) read as separated.

  Returns {"verdict": "separated" | "no separation", "reasons": [...], "statistics": {...},
  "criteria": {...}}: the reasons name the failed checks (for "separated": the passed ones); the
  statistics hold n, n_nan, the signed-log fit (delta_bic, ashman_d, valley_depth, weights,
  means, sds), `raw` (the checks' numbers on r itself, where the third check ran), with
  `agreement` the κ, and with flags, n_flagged and drop_fraction.
  """
  max_drop_fraction = float(max_drop_fraction)
  if not 0.0 < max_drop_fraction <= 1.0:
    raise ConfigError(f"max_drop_fraction must be in (0, 1], got {max_drop_fraction}")
  r = as_scores(r)
  finite = r[~np.isnan(r)]
  if np.isinf(finite).any():
    raise DataError("separation: scores contain ±inf; use NaN for examples without a score")
  stats: dict[str, Any] = {"scale": "log", "n": int(finite.size),
                           "n_nan": int(r.size - finite.size)}
  criteria = {"min_delta_bic": float(min_delta_bic), "min_ashman_d": float(min_ashman_d),
              "min_valley": float(min_valley), "max_drop_fraction": max_drop_fraction,
              "min_agreement": min_agreement}
  limits = (min_delta_bic, min_ashman_d, min_valley)
  failed: list[str] = []
  passed: list[str] = []

  if finite.size < SEPARATION_MIN_SCORES:
    failed.append(f"too few scored examples to judge ({finite.size} < {SEPARATION_MIN_SCORES})")
  elif np.unique(finite).size < 2 or float(finite.max() - finite.min()) < 1e-6:
    failed.append("the scores do not vary: nothing to separate")
  else:
    fit = _two_against_one(signed_log(finite))
    stats.update(fit)
    failed += _mode_failures(fit, *limits)
    (low, high), low_sd = fit["means"], fit["sds"][0]
    if not failed and low + low_sd < 0.0 < high:
      raw = _two_against_one(finite)
      stats["raw"] = {k: raw[k] for k in ("delta_bic", "ashman_d", "valley_depth")}
      raw_failed = _mode_failures(raw, *limits)
      if raw_failed:
        failed.append("two modes only on the signed-log scale, which stretches scores near 0 "
                      f"apart; on r itself: {'; '.join(raw_failed)}")
    if not failed:
      passed.append(f"two modes: ΔBIC {fit['delta_bic']:.2f} ≥ {min_delta_bic:g}, valley depth "
                    f"{fit['valley_depth']:.2f} ≥ {min_valley:g}, Ashman D "
                    f"{fit['ashman_d']:.2f} ≥ {min_ashman_d:g}")

  if agreement is not None:
    stats["agreement"] = float(agreement)
  if agreement is not None and min_agreement is not None:
    if agreement < min_agreement:
      failed.append(f"the noisy replicas drop different rows (Cohen's κ {agreement:.2f} < "
                    f"{min_agreement:g}): the upper group is one run's, not a population")
    else:
      passed.append(f"the noisy replicas drop the same rows (κ {agreement:.2f} ≥ "
                    f"{min_agreement:g})")
  if flags is not None:
    flags = as_labels(flags, r.size, "flags")
    drop = float(flags.mean()) if flags.size else 0.0
    stats.update(n_flagged=int(flags.sum()), drop_fraction=drop)
    limit = f"filter.max_drop_fraction {max_drop_fraction:g}"
    if drop > max_drop_fraction:
      failed.append(f"drops {drop:.0%} of the data (> {limit})")
    elif max_drop_fraction < 1.0:
      passed.append(f"drops {drop:.0%} of the data (≤ {limit})")
  return {"verdict": "no separation" if failed else "separated", "reasons": failed or passed,
          "statistics": stats, "criteria": criteria}
