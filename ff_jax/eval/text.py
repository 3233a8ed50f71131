"""Text metrics on decoded strings: ROUGE-1/L F and the official SQuAD v1.1 EM/F1.

ROUGE-1 F is the paper's per-example score s(f(x; θ), y), so forgetting r = s_before − s_after is
only comparable with the paper (and the official code) if it is computed exactly as
`rouge_score.rouge_scorer.RougeScorer(['rouge1'], use_stemmer=True).score(target, pred)` does. The
tokenizer is re-implemented here (it is three regex lines) so that stemming can be memoised per
token: stemming dominates the cost, and forgetting runs score every example several times. The
stemmer itself is NLTK's Porter stemmer, the one rouge_score uses, so results are identical.

SQuAD EM/F1 follow the official v1.1 evaluation script (multiset token F1 after normalisation),
not the official ForgetFilter code's set-based `f1_str` (reference §9, bug 18).
"""

from __future__ import annotations

import collections
import functools
import re
import string
from collections.abc import Iterable, Sequence

import numpy as np

from ff_jax.errors import ConfigError, DataError

# rouge_score.tokenize: lowercase, non-alphanumerics to spaces, stem tokens longer than 3 chars,
# then keep only tokens that are non-empty [a-z0-9]+.
_NON_ALPHANUM_RE = re.compile(r"[^a-z0-9]+")
_SPACES_RE = re.compile(r"\s+")
_VALID_TOKEN_RE = re.compile(r"^[a-z0-9]+$")


@functools.cache
def _porter_stemmer():
  try:
    from nltk.stem import porter  # what rouge_score's DefaultTokenizer uses
  except ImportError as e:  # nltk comes with rouge-score
    raise ConfigError(
        "ROUGE-1 needs NLTK's Porter stemmer; install it with `pip install rouge-score`") from e
  return porter.PorterStemmer()


@functools.lru_cache(maxsize=200_000)
def _stem(token: str) -> str:
  return _porter_stemmer().stem(token)


def rouge_tokenize(text: str) -> list[str]:
  """Tokens exactly as rouge_score's default tokenizer with `use_stemmer=True` produces them."""
  tokens = _SPACES_RE.split(_NON_ALPHANUM_RE.sub(" ", text.lower()))
  tokens = [_stem(t) if len(t) > 3 else t for t in tokens]
  return [t for t in tokens if _VALID_TOKEN_RE.match(t)]


def _fmeasure(overlap: int, n_target: int, n_pred: int) -> float:
  # rouge_score divides by max(count, 1), so an empty side gives P or R = 0 and F = 0.
  precision = overlap / max(n_pred, 1)
  recall = overlap / max(n_target, 1)
  if precision + recall > 0:
    return 2 * precision * recall / (precision + recall)
  return 0.0


def rouge1_f(target: str, prediction: str) -> float:
  """ROUGE-1 F-measure of `prediction` against `target` (rouge_score, `use_stemmer=True`)."""
  target_counts = collections.Counter(rouge_tokenize(target))
  pred_counts = collections.Counter(rouge_tokenize(prediction))
  overlap = sum((target_counts & pred_counts).values())
  return _fmeasure(overlap, sum(target_counts.values()), sum(pred_counts.values()))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l_f(target: str, prediction: str) -> float:
  """ROUGE-L F-measure (longest common subsequence), as rouge_score's `rougeL` with stemming."""
  t, p = rouge_tokenize(target), rouge_tokenize(prediction)
  return _fmeasure(_lcs_length(t, p), len(t), len(p))


def rouge1_f_batch(targets: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
  """ROUGE-1 F for aligned lists of targets and predictions, as a float64 array."""
  if len(targets) != len(predictions):
    raise DataError(
        f"rouge1_f_batch: {len(targets)} targets but {len(predictions)} predictions")
  return np.array([rouge1_f(t, p) for t, p in zip(targets, predictions)], dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# SQuAD v1.1 (official evaluate-v1.1.py semantics)

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """Lowercase, drop ASCII punctuation, drop articles a/an/the, collapse whitespace."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES_RE.sub(" ", s).split())


def _golds_list(golds: str | Iterable[str]) -> list[str]:
  golds = [golds] if isinstance(golds, str) else list(golds)
  if not golds:
    raise DataError("SQuAD metric: an example has no gold answers")
  return golds


def _token_f1(prediction: str, gold: str) -> float:
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if num_same == 0:  # v1.1 semantics: also 0 when both are empty after normalisation
    return 0.0
  precision = num_same / len(pred_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, golds: str | Iterable[str]) -> float:
  """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(g) for g in _golds_list(golds)))


def squad_f1(prediction: str, golds: str | Iterable[str]) -> float:
  """Multiset token F1 after normalisation, maximised over the gold answers."""
  return max(_token_f1(prediction, g) for g in _golds_list(golds))


def squad_scores(pairs: Iterable[tuple[str, str | Sequence[str]]]) -> dict[str, float | int]:
  """Mean official SQuAD v1.1 exact match and F1 over (prediction, gold answers) pairs, in [0, 1].

  The official script prints both × 100; the max over gold answers is taken per example.
  """
  em, f1 = [], []
  for pred, golds in pairs:
    em.append(squad_em(pred, golds))
    f1.append(squad_f1(pred, golds))
  if not em:
    raise DataError("squad_scores: no predictions to score")
  return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1)), "n": len(em)}
