"""Scores for LaTeX OCR: exact match, character error rate (CER) and word error rate (WER).

Pure functions over strings; jiwer does the alignments. Rates are corpus level: total edits over total
reference units, so a long formula weighs more than a short one (a mean of per-sample rates would let a
handful of one-character references dominate).

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

from typing import Any


def _edit_counts(prediction: str, reference: str, unit: str) -> tuple[int, int]:
    """(edits, reference units) for one pair, after jiwer's default normalisation for that unit."""
    import jiwer

    process = jiwer.process_characters if unit == "char" else jiwer.process_words
    out = process(reference, prediction)
    edits = out.substitutions + out.deletions + out.insertions
    reference_units = out.hits + out.substitutions + out.deletions
    return edits, reference_units


def _rate(edits: int, reference_units: int) -> float:
    return edits / max(reference_units, 1)


def sample_cer(prediction: str, reference: str) -> float:
    """One sample's CER under the same rules as `score` (used to rank the worst samples in a report)."""
    return _rate(*_edit_counts(prediction, reference, "char"))


def score(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Exact match (after stripping surrounding whitespace), corpus CER and corpus WER.

    Returns {"exact_match", "cer", "wer", "num_scored"}; the three scores are None for empty input.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references: pass one of each per sample"
        )
    if not predictions:
        return {"exact_match": None, "cer": None, "wer": None, "num_scored": 0}
    char_edits = char_units = word_edits = word_units = matches = 0
    for prediction, reference in zip(predictions, references):
        edits, units = _edit_counts(prediction, reference, "char")
        char_edits, char_units = char_edits + edits, char_units + units
        edits, units = _edit_counts(prediction, reference, "word")
        word_edits, word_units = word_edits + edits, word_units + units
        matches += prediction.strip() == reference.strip()
    return {
        "exact_match": matches / len(predictions),
        "cer": _rate(char_edits, char_units),
        "wer": _rate(word_edits, word_units),
        "num_scored": len(predictions),
    }
