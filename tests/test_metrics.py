"""Scores on hand-written pairs whose metrics were counted by hand; bootstrap intervals; the render check."""

from __future__ import annotations

import time

import pytest

from modal_jobs.latex_norm import normalize
from modal_jobs.metrics import (
    RenderCheck,
    aggregate,
    better,
    length_buckets,
    sample_cer,
    sample_counts,
    sample_rate,
    score,
    score_samples,
)


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


# --- normalized metrics, token edit rate -------------------------------------------------------------


def _one(prediction: str, reference: str, **kwargs) -> dict:
    return aggregate(score_samples([prediction], [reference], **kwargs), resamples=0)


def test_spacing_and_braces_do_not_count_after_normalisation():
    result = _one(r"x^{2}+\frac12", r"x ^ 2 + \frac { 1 } { 2 }")
    assert result["exact_match"] == 0.0 and result["cer"] > 0  # raw: different strings
    assert result["normalized_exact_match"] == 1.0
    assert result["normalized_cer"] == 0.0 and result["normalized_wer"] == 0.0


def test_left_right_counts_only_when_configured():
    assert _one(r"\left( a \right)", "( a )")["normalized_exact_match"] == 1.0
    assert _one(r"\left( a \right)", "( a )", left_right=False)["normalized_exact_match"] == 0.0


def test_token_edit_rate_counts_im2latex_tokens():
    # Reference tokens: \frac { a } { b } (7). The prediction drops nothing but writes `c` for `b`: 1 / 7.
    assert _one(r"\frac{a}{c}", r"\frac { a } { b }")["token_edit_rate"] == pytest.approx(1 / 7)
    # Spacing never counts; the braces do (no rewriting): `x^2` vs `x ^ { 2 }` is 2 insertions in 5.
    assert _one("x^2", "x ^ 2")["token_edit_rate"] == 0.0
    assert _one("x^2", "x ^ { 2 }")["token_edit_rate"] == pytest.approx(2 / 5)


def test_normalized_wer_is_the_token_error_rate_of_the_normal_forms():
    # Normal forms: `x ^ { 2 } + y` (7 tokens) vs `x ^ { 3 } + y`: one substitution.
    result = _one("x^3+y", "x^{2} + y")
    assert result["normalized_wer"] == pytest.approx(1 / 7)
    # Characters of the normal form `x ^ { 2 } + y` (13): one substitution.
    assert result["normalized_cer"] == pytest.approx(1 / 13)


def test_normalized_metrics_are_corpus_level():
    # Normal forms: `a` (1 token) and `b + c + d` (5 tokens); one substitution in each: 2 / 6.
    result = aggregate(score_samples(["z", "b + c + e"], ["a", "b+c+d"]), resamples=0)
    assert result["normalized_wer"] == pytest.approx(2 / 6)
    assert result["normalized_exact_match"] == 0.0


def test_empty_prediction_and_reference_after_normalisation():
    assert _one("", "")["normalized_cer"] == 0.0
    assert _one(r"\,", "")["normalized_exact_match"] == 1.0  # nothing but spacing is nothing
    assert _one("", "x^2")["normalized_wer"] == 1.0


def test_sample_rate_matches_the_corpus_rate_of_one_sample():
    counts = sample_counts("x^3", "x^{2}")
    assert sample_rate(counts, "normalized_cer") == _one("x^3", "x^{2}")["normalized_cer"]
    assert sample_rate(counts, "cer") == pytest.approx(sample_cer("x^3", "x^{2}"))


# --- bootstrap intervals -----------------------------------------------------------------------------


def _corpus(n: int, wrong_every: int) -> list[dict]:
    predictions = [("x^3" if i % wrong_every == 0 else "x^{2}") for i in range(n)]
    return score_samples(predictions, ["x^2"] * n)


def test_every_metric_gets_an_interval_around_its_value():
    result = aggregate(_corpus(60, 3), resamples=1000)
    for name in ("exact_match", "cer", "wer", "normalized_exact_match", "normalized_cer", "normalized_wer",
                 "token_edit_rate"):
        low, high = result["intervals"][name]
        assert low <= result[name] <= high, name
    low, high = result["intervals"]["normalized_exact_match"]
    assert result["normalized_exact_match"] == pytest.approx(2 / 3)
    assert 0.5 < low < 2 / 3 < high < 0.8  # binomial sd at n=60 is ~0.06
    assert result["num_scored"] == 60


def test_intervals_narrow_with_more_samples_and_are_reproducible():
    small, large = aggregate(_corpus(30, 3)), aggregate(_corpus(300, 3))
    width = lambda r: r["intervals"]["normalized_cer"][1] - r["intervals"]["normalized_cer"][0]  # noqa: E731
    assert width(large) < width(small) / 2
    assert aggregate(_corpus(30, 3)) == small  # fixed seed
    assert aggregate(_corpus(30, 3), seed=1)["intervals"] != small["intervals"]


def test_a_perfect_corpus_has_a_zero_width_interval():
    result = aggregate(score_samples(["a"] * 20, ["a"] * 20))
    assert result["intervals"]["cer"] == [0.0, 0.0]
    assert result["intervals"]["exact_match"] == [1.0, 1.0]


def test_no_intervals_without_resamples_or_samples():
    assert aggregate(_corpus(10, 2), resamples=0)["intervals"] == {}
    empty = aggregate([], resamples=1000)
    assert empty["intervals"] == {} and empty["cer"] is None and empty["num_scored"] == 0


def test_bootstrap_is_fast():
    counts = _corpus(100, 3)
    started = time.perf_counter()
    aggregate(counts, resamples=1000)
    assert time.perf_counter() - started < 0.5


# --- render check, length buckets, the gate's comparison ---------------------------------------------


def test_render_check_counts_equal_images_and_failed_renders():
    check = RenderCheck()
    same = check(r"\alpha", r"\alpha", normalized_exact=True)
    assert same == {"render_match": 1, "prediction_renders": 1, "reference_renders": 1}
    # Normal forms differ (primes and font switches are not rewritten), images are the same.
    assert normalize("x'") != normalize(r"x^\prime")
    assert check("x'", r"x^\prime", normalized_exact=False)["render_match"] == 1
    assert check(r"{\rm d}x", r"\mathrm{d}x", normalized_exact=False)["render_match"] == 1
    wrong = check("x+y", "x-y", normalized_exact=False)
    assert wrong == {"render_match": 0, "prediction_renders": 1, "reference_renders": 1}
    broken = check(r"\frac{x", "x", normalized_exact=False)
    assert broken == {"render_match": 0, "prediction_renders": 0, "reference_renders": 1}
    assert check("", "x", normalized_exact=False)["prediction_renders"] == 0


def test_render_match_reaches_the_corpus_metrics():
    check = RenderCheck()
    pairs = [("x'", r"x^\prime"), ("x+y", "x-y"), (r"\frac{x", "x")]
    counts = score_samples([p for p, _ in pairs], [r for _, r in pairs])
    for c, (p, r) in zip(counts, pairs):
        c.update(check(p, r, c["normalized_exact"]))
    result = aggregate(counts, resamples=200)
    assert result["render_match"] == pytest.approx(1 / 3)
    assert result["render_failed"] == 1 and result["render_reference_failed"] == 0
    assert "render_match" in result["intervals"]
    assert aggregate(counts[:1] + score_samples(["a"], ["a"]), resamples=0)["render_match"] is None  # not all checked


def test_length_buckets():
    references = ["a", "a b c d e f g h i j k l", "x"]  # 1, 12 and 1 tokens
    rows = length_buckets(score_samples(["a", "a b c", "y"], references), edges=[10])
    assert [(r["tokens"], r["samples"]) for r in rows] == [("1-10", 2), ("11+", 1)]
    assert rows[0]["normalized_exact_match"] == 0.5
    assert rows[1]["token_edit_rate"] == pytest.approx(9 / 12)


def test_better_compares_intervals_not_points():
    champion = {"cer": 0.30, "num_scored": 50, "intervals": {"cer": [0.25, 0.35]}}
    close = {"cer": 0.28, "num_scored": 50, "intervals": {"cer": [0.23, 0.33]}}
    clear = {"cer": 0.10, "num_scored": 50, "intervals": {"cer": [0.07, 0.13]}}
    wins, why = better(close, champion, "cer")
    assert not wins and "overlap" in why  # a lower point value is not enough
    wins, why = better(clear, champion, "cer")
    assert wins and "separated" in why
    assert not better(clear, champion, "cer", margin=0.2)[0]
    # Higher is better for exact match.
    assert better({"exact_match": 0.9, "intervals": {"exact_match": [0.85, 0.95]}},
                  {"exact_match": 0.5, "intervals": {"exact_match": [0.4, 0.6]}}, "exact_match")[0]
    # Without intervals (an older evaluation) it says it fell back to point values.
    wins, why = better({"cer": 0.1}, champion, "cer")
    assert wins and "point values only" in why
