"""Scores on hand-written pairs whose exact match, CER and WER were counted by hand."""

from __future__ import annotations

import pytest

from modal_jobs.metrics import sample_cer, score


def test_identical_strings_score_perfectly():
    result = score([r"\frac{a}{b}", "x^2"], [r"\frac{a}{b}", "x^2"])
    assert result == {"exact_match": 1.0, "cer": 0.0, "wer": 0.0, "num_scored": 2}


def test_exact_match_ignores_surrounding_whitespace_only():
    result = score([" x^2\n", "x ^ 2"], ["x^2", "x^2"])
    assert result["exact_match"] == 0.5


def test_cer_is_corpus_level_not_a_mean_of_samples():
    # 1 substitution in 6 characters, 1 deletion in 2: 2 / 8, where a mean of rates would give 1/3.
    result = score(["abcdeX", "a"], ["abcdef", "ab"])
    assert result["cer"] == pytest.approx(2 / 8)
    assert result["exact_match"] == 0.0


def test_wer_counts_whitespace_separated_tokens():
    # 7 words, one substituted; a split into more words adds insertions.
    assert score([r"\frac { a } { c }"], [r"\frac { a } { b }"])["wer"] == pytest.approx(1 / 7)
    assert score(["a b c"], ["a bc"])["wer"] == pytest.approx(2 / 2)  # 1 substitution + 1 insertion


def test_empty_prediction_is_all_deletions():
    result = score([""], ["abc"])
    assert result == {"exact_match": 0.0, "cer": 1.0, "wer": 1.0, "num_scored": 1}


def test_empty_reference_counts_insertions_and_adds_nothing_to_the_denominator():
    result = score(["ab", "abc"], ["", "abc"])
    assert result["cer"] == pytest.approx(2 / 3)
    assert result["wer"] == pytest.approx(1 / 1)
    assert result["exact_match"] == 0.5


def test_all_empty_references():
    assert score(["", " "], ["", ""])["cer"] == 0.0
    assert score(["ab"], [""])["cer"] == 2.0  # denominator floored at 1


def test_no_samples_gives_no_scores():
    assert score([], []) == {"exact_match": None, "cer": None, "wer": None, "num_scored": 0}


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="one of each"):
        score(["a"], ["a", "b"])


def test_sample_cer():
    assert sample_cer("abd", "abc") == pytest.approx(1 / 3)
    assert sample_cer("", "") == 0.0
