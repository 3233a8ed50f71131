"""ROUGE-1 must match rouge_score exactly (it defines the paper's forgetting signal); SQuAD EM/F1
must follow the official v1.1 script; refusal markers must fire on refusals only."""

import numpy as np
import pytest

from ff_jax.errors import DataError
from ff_jax.eval.safety import is_refusal
from ff_jax.eval.text import (
  normalize_answer,
  rouge1_f,
  rouge1_f_batch,
  rouge_tokenize,
  squad_em,
  squad_f1,
)

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

PAIRS = [
  ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."),
  ("the cats are running", "cat ran"),
  ("", ""),
  ("", "something"),
  ("something", ""),
  ("!!! ???", "..."),
  ("The answer is ans2: The grandson", "the answer is ans2 the grandson"),
  ("Generously, generous generalizations generated", "generate general generosity"),
  ("Café naïve résumé — über 2024-05-01", "cafe naive resume uber 2024 05 01"),
  ("I'm sorry, but I can't help with that.", "Im sorry but I cannot help with that"),
  ("a a a b b c", "a b b b d"),
  ("Line one\nLine two\tTabbed", "line TWO tabbed one"),
  ("studies studying studied", "study"),
  ("12345 abc123 x_y", "12345 ABC123 x y"),
]


@pytest.mark.parametrize("target,prediction", PAIRS)
def test_rouge1_matches_rouge_score(target, prediction):
  ref = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(target, prediction)
  assert rouge1_f(target, prediction) == ref["rouge1"].fmeasure


def test_rouge1_random_strings_match_rouge_score():
  rng = np.random.default_rng(0)
  words = ["running", "runs", "the", "A", "cats", "cat's", "happily", "happy", "fox,", "—", "3",
           "generously", "izing", "ly", "on", "ÉCOLE", "agreed", "agreement", "x", "caresses"]
  scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
  targets, preds = [], []
  for _ in range(200):
    targets.append(" ".join(rng.choice(words, rng.integers(0, 12))))
    preds.append(" ".join(rng.choice(words, rng.integers(0, 12))))
  got = rouge1_f_batch(targets, preds)
  want = [scorer.score(t, p)["rouge1"].fmeasure for t, p in zip(targets, preds)]
  assert got.dtype == np.float64
  np.testing.assert_array_equal(got, want)


def test_rouge_tokenize_matches_default_tokenizer():
  from rouge_score import tokenizers
  tok = tokenizers.DefaultTokenizer(use_stemmer=True)
  for text, _ in PAIRS:
    assert rouge_tokenize(text) == tok.tokenize(text)


def test_rouge1_batch_length_mismatch():
  with pytest.raises(DataError, match="2 targets but 1 predictions"):
    rouge1_f_batch(["a", "b"], ["a"])


def test_squad_normalize_and_em():
  assert normalize_answer("The  Cat, an apple!") == "cat apple"
  assert squad_em("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
  assert squad_em("Eiffel", ["Eiffel Tower", "tower"]) == 0.0
  assert squad_em("Tower", "tower") == 1.0  # a single gold string is accepted


def test_squad_f1_is_multiset_and_maxed_over_golds():
  # pred "a b b", gold "b b c": common multiset {b:2} -> P=2/3, R=2/3 (set-based would give 1/2).
  assert squad_f1("x b b", ["b b c"]) == pytest.approx(2 / 3)
  assert squad_f1("Denver Broncos", ["Broncos", "the Denver Broncos"]) == 1.0
  assert squad_f1("Denver", ["Denver Broncos"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
  assert squad_f1("", ["anything"]) == 0.0
  assert squad_f1("the", ["a"]) == 0.0  # both empty after normalisation: 0 in v1.1
  with pytest.raises(DataError):
    squad_f1("x", [])


@pytest.mark.parametrize("text", [
  "I'm sorry, but I can't help with that.",
  "I cannot provide instructions for making weapons.",
  "As an AI language model, I must decline.",
  "I\u2019m not able to assist with this request.",
  "Sorry, but that is something I won't do.",
])
def test_refusals_detected(text):
  assert is_refusal(text)


@pytest.mark.parametrize("text", [
  "Sure! Here is a recipe for pancakes: mix flour, eggs and milk.",
  "The capital of France is Paris.",
  "Step 1: open the terminal. Step 2: run the command.",
])
def test_compliant_text_is_not_refusal(text):
  assert not is_refusal(text)


def test_custom_markers():
  assert is_refusal("Nope.", markers=("nope",))
  assert not is_refusal("I cannot", markers=("nope",))
