"""Scores for LaTeX OCR, with bootstrap confidence intervals.

Try it: python -m modal_jobs.metrics   (scores a few hand-written pairs and times the bootstrap)

Metrics (every rate is corpus level: total edits over total reference units, so a long formula weighs
more than a short one, where a mean of per-sample rates would let a few one-token references dominate):

  exact_match             prediction == reference after stripping surrounding whitespace (the original script)
  cer, wer                character / whitespace-separated-word error rate of the strings as written (jiwer;
                          the original script's numbers, kept for comparison)
  normalized_exact_match  the normal forms (modal_jobs.latex_norm: im2latex tokens, `x^2` = `x^{2}`,
  normalized_cer          redundant braces and spacing commands ignored, `\\left(` = `(` unless configured)
  normalized_wer          are equal / their character error rate / their token error rate (the normal form's
                          tokens are its words)
  token_edit_rate         token-level edit distance over reference tokens, on im2latex tokens with no rewriting
                          (`x ^ 2` = `x^2`, but `x^2` != `x^{2}`): the usual im2latex edit-distance measure
  render_match            (optional) the fraction right when a prediction also counts as right if it renders to
                          the same image as its reference (modal_jobs.synthetic.render_latex, one renderer for
                          both); render_failed counts predictions that do not render, render_reference_failed
                          references that do not (those samples fall back to normalized string equality)

Intervals: a percentile bootstrap over samples (resample the scored samples with replacement, recompute
each corpus metric, take the 2.5th and 97.5th percentiles for 95%). Per-sample edit and unit counts are
computed once; a resample is a row of multinomial counts, so all resamples of all metrics are one matrix
product. The seed is fixed, so the same predictions always give the same intervals.

Empty strings. An empty reference is scored, not skipped: skipping it would reward a model for writing
anything at all where nothing was expected. Each unit the prediction has there counts as an insertion and
the reference adds nothing to the denominator. The denominator is floored at 1, so a corpus (or a sample)
with no reference units scores 0.0 when the prediction is empty too and the number of inserted units
otherwise. (jiwer 4.0 accepts empty references and floors the same way; earlier versions raised, and the
counts are summed here so the rule does not depend on which one is installed.) An empty prediction is an
ordinary prediction: every reference unit is a deletion. A request that failed is not a prediction and
must never reach these functions as "".
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

from modal_jobs.latex_norm import normalize_tokens, tokenize

# (metric, numerator column, denominator column or None for a mean); lower is better unless in HIGHER_IS_BETTER.
_RATES: tuple[tuple[str, str, str | None], ...] = (
    ("exact_match", "exact", None),
    ("cer", "char_edits", "char_units"),
    ("wer", "word_edits", "word_units"),
    ("normalized_exact_match", "normalized_exact", None),
    ("normalized_cer", "normalized_char_edits", "normalized_char_units"),
    ("normalized_wer", "normalized_token_edits", "normalized_token_units"),
    ("token_edit_rate", "token_edits", "token_units"),
    ("render_match", "render_match", None),
)
HIGHER_IS_BETTER = frozenset({"exact_match", "normalized_exact_match", "render_match"})
METRIC_NAMES = tuple(name for name, _, _ in _RATES)
DEFAULT_LENGTH_EDGES = (10, 20, 40, 80)  # reference tokens: buckets 1-10, 11-20, 21-40, 41-80, 81+


def _edit_counts(prediction: str, reference: str, unit: str) -> tuple[int, int]:
    """(edits, reference units) for one pair, after jiwer's default normalisation for that unit."""
    import jiwer

    process = jiwer.process_characters if unit == "char" else jiwer.process_words
    out = process(reference, prediction)
    edits = out.substitutions + out.deletions + out.insertions
    reference_units = out.hits + out.substitutions + out.deletions
    return edits, reference_units


def _rate(edits: float, reference_units: float) -> float:
    return edits / max(reference_units, 1)


def sample_cer(prediction: str, reference: str) -> float:
    """One sample's CER under the same rules as `score`."""
    return _rate(*_edit_counts(prediction, reference, "char"))


def score(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """The original script's three numbers: exact match (after stripping whitespace), corpus CER and WER.

    Returns {"exact_match", "cer", "wer", "num_scored"}; the three scores are None for empty input.
    `score_samples` + `aggregate` give these and the rest, with intervals.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references: pass one of each per sample"
        )
    if not predictions:
        return {"exact_match": None, "cer": None, "wer": None, "num_scored": 0}
    counts = score_samples(predictions, references)
    metrics = aggregate(counts, resamples=0)
    return {name: metrics[name] for name in ("exact_match", "cer", "wer")} | {"num_scored": len(predictions)}


# --- per sample ----------------------------------------------------------------------------------------


def sample_counts(prediction: str, reference: str, left_right: bool = True) -> dict[str, Any]:
    """Everything the corpus metrics need from one pair: match flags, edit and unit counts, lengths."""
    from rapidfuzz.distance import Levenshtein

    char_edits, char_units = _edit_counts(prediction, reference, "char")
    word_edits, word_units = _edit_counts(prediction, reference, "word")
    predicted_norm, reference_norm = normalize_tokens(prediction, left_right), normalize_tokens(reference, left_right)
    predicted_tokens, reference_tokens = tokenize(prediction), tokenize(reference)
    predicted_text, reference_text = " ".join(predicted_norm), " ".join(reference_norm)
    return {
        "exact": int(prediction.strip() == reference.strip()),
        "char_edits": char_edits,
        "char_units": char_units,
        "word_edits": word_edits,
        "word_units": word_units,
        "normalized_exact": int(predicted_norm == reference_norm),
        "normalized_char_edits": Levenshtein.distance(predicted_text, reference_text),
        "normalized_char_units": len(reference_text),
        "normalized_token_edits": Levenshtein.distance(predicted_norm, reference_norm),
        "normalized_token_units": len(reference_norm),
        "token_edits": Levenshtein.distance(predicted_tokens, reference_tokens),
        "token_units": len(reference_tokens),
    }


def score_samples(predictions: Sequence[str], references: Sequence[str], left_right: bool = True) -> list[dict]:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references: pass one of each per sample"
        )
    return [sample_counts(p, r, left_right) for p, r in zip(predictions, references)]


def sample_rate(counts: dict[str, Any], metric: str = "normalized_cer") -> float:
    """One sample's value of a corpus metric (used to rank the worst predictions)."""
    _, numerator, denominator = next(rate for rate in _RATES if rate[0] == metric)
    return float(counts[numerator]) if denominator is None else _rate(counts[numerator], counts[denominator])


# --- render check --------------------------------------------------------------------------------------


class RenderCheck:
    """Renders both strings with the one renderer; equal images count as a match even when strings differ.

    Reference images are cached by string (references repeat across models evaluated in one process).
    Rendering is matplotlib mathtext (~10 ms a formula), pure Python: call it from one thread.
    """

    def __init__(self) -> None:
        self._cache: dict[str, str | None] = {}

    def _digest(self, latex: str) -> str | None:
        if latex not in self._cache:
            from modal_jobs.synthetic import render_latex

            try:
                self._cache[latex] = hashlib.sha256(render_latex(latex)).hexdigest()
            except Exception:  # mathtext raises ValueError, and at times worse, on what it cannot parse
                self._cache[latex] = None
            if len(self._cache) > 10_000:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[latex]

    def __call__(self, prediction: str, reference: str, normalized_exact: bool) -> dict[str, int]:
        reference_image = self._digest(reference)
        prediction_image = None if prediction.strip() == "" else self._digest(prediction)
        same_image = prediction_image is not None and prediction_image == reference_image
        return {
            "render_match": int(bool(normalized_exact) or same_image),
            "prediction_renders": int(prediction_image is not None),
            "reference_renders": int(reference_image is not None),
        }


# --- corpus metrics and intervals ----------------------------------------------------------------------


def aggregate(
    counts: Sequence[dict[str, Any]],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Corpus metrics over per-sample counts, and a percentile bootstrap interval for each.

    Returns every name in METRIC_NAMES (render_match only when the counts carry it, else None),
    render_failed / render_reference_failed (None without a render check), num_scored, and
    intervals {metric: [low, high]} (empty when resamples is 0 or there are no samples).
    """
    import numpy as np

    n = len(counts)
    has_render = n > 0 and all("render_match" in c for c in counts)
    rates = [rate for rate in _RATES if rate[0] != "render_match" or has_render]
    out: dict[str, Any] = {name: None for name in METRIC_NAMES}
    out.update(num_scored=n, render_failed=None, render_reference_failed=None, intervals={})
    if has_render:
        out["render_failed"] = sum(1 - c["prediction_renders"] for c in counts)
        out["render_reference_failed"] = sum(1 - c["reference_renders"] for c in counts)
    if n == 0:
        return out
    columns = sorted({column for _, numerator, denominator in rates for column in (numerator, denominator) if column})
    table = np.array([[c[column] for column in columns] for c in counts], dtype=np.float64)  # n x k
    totals = table.sum(axis=0)
    index = {column: i for i, column in enumerate(columns)}

    def metric(sums: Any, numerator: str, denominator: str | None) -> Any:
        if denominator is None:
            return sums[..., index[numerator]] / n
        return sums[..., index[numerator]] / np.maximum(sums[..., index[denominator]], 1)

    for name, numerator, denominator in rates:
        out[name] = float(metric(totals, numerator, denominator))
    if resamples > 0:
        rng = np.random.default_rng(seed)
        # Row b says how often each sample is drawn in resample b; weights @ table sums every column at once.
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
        sums = weights @ table  # resamples x k
        tail = (1.0 - confidence) / 2.0
        for name, numerator, denominator in rates:
            low, high = np.quantile(metric(sums, numerator, denominator), [tail, 1.0 - tail])
            out["intervals"][name] = [float(low), float(high)]
    return out


def length_buckets(
    counts: Sequence[dict[str, Any]], edges: Iterable[int] = DEFAULT_LENGTH_EDGES
) -> list[dict[str, Any]]:
    """Point metrics per bucket of reference length in im2latex tokens (`token_units`); empty buckets left out."""
    edges = sorted(edges)
    bounds = [(low + 1, high) for low, high in zip([0, *edges], edges)] + [(edges[-1] + 1 if edges else 1, None)]
    rows = []
    for low, high in bounds:
        members = [c for c in counts if c["token_units"] >= low and (high is None or c["token_units"] <= high)]
        if not members:
            continue
        metrics = aggregate(members, resamples=0)
        rows.append(
            {"tokens": f"{low}-{high}" if high is not None else f"{low}+", "samples": len(members)}
            | {name: metrics[name] for name in METRIC_NAMES if metrics[name] is not None}
        )
    return rows


def better(candidate: dict[str, Any], champion: dict[str, Any], metric: str, margin: float = 0.0) -> tuple[bool, str]:
    """Whether `candidate` beats `champion` on `metric` by more than chance: their intervals must not overlap.

    Candidate and champion are Metrics dumps (dicts with `intervals`). Lower is better for error rates,
    higher for exact matches. `margin` must separate the intervals too. Falls back to point values, and
    says so, when either side has no interval for the metric (an older evaluation).
    """
    higher = metric in HIGHER_IS_BETTER
    ours, theirs = candidate.get(metric), champion.get(metric)
    if ours is None or theirs is None:
        return False, f"{metric}: not measured on both (candidate {ours}, champion {theirs})"
    our_interval = (candidate.get("intervals") or {}).get(metric)
    their_interval = (champion.get("intervals") or {}).get(metric)
    if not our_interval or not their_interval:
        wins = ours - theirs > margin if higher else theirs - ours > margin
        return wins, (
            f"{metric}: point values only (no interval on {'candidate' if not our_interval else 'champion'}): "
            f"candidate {ours:.4f} vs champion {theirs:.4f}, margin {margin}"
        )
    if higher:
        gap = our_interval[0] - their_interval[1]
    else:
        gap = their_interval[0] - our_interval[1]
    wins = gap > margin
    describe = (
        f"{metric}: candidate {ours:.4f} [{our_interval[0]:.4f}, {our_interval[1]:.4f}] (n={candidate.get('num_scored')}) "
        f"vs champion {theirs:.4f} [{their_interval[0]:.4f}, {their_interval[1]:.4f}] (n={champion.get('num_scored')}): "
    )
    if wins:
        return True, describe + f"intervals separated by {gap:.4f} > margin {margin}"
    if gap > 0:
        return False, describe + f"intervals separated by only {gap:.4f}, not more than margin {margin}"
    return False, describe + "intervals overlap: not a significant difference"


def _demo() -> None:
    pairs = [
        (r"x^{2}+\frac12", r"x ^ 2 + \frac { 1 } { 2 }"),
        (r"\left( a \right)", r"( a )"),
        (r"\alpha \, \beta", r"\alpha \beta"),
        (r"\sum_{i}^{n} i", r"\sum ^ { n } _ { i } j"),
    ]
    counts = score_samples([p for p, _ in pairs], [r for _, r in pairs])
    for (prediction, reference), c in zip(pairs, counts):
        print(f"{prediction!r:28} vs {reference!r:32} normalized equal: {bool(c['normalized_exact'])}")
    many = counts * 25
    started = time.perf_counter()
    metrics = aggregate(many, resamples=1000)
    print(f"bootstrap over {len(many)} samples x 1000 resamples: {1000 * (time.perf_counter() - started):.1f} ms")
    for name in METRIC_NAMES:
        if metrics[name] is not None:
            print(f"  {name:24} {metrics[name]:.3f}  {metrics['intervals'][name]}")


if __name__ == "__main__":
    _demo()
