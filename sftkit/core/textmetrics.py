"""Text metrics through maintained libraries (imported on first use): chrF and BLEU from sacrebleu,
ROUGE-L from rouge-score, macro-F1 from scikit-learn, exact match. Per-item scores (for paired statistics) and corpus scores.

chrF and BLEU are on sacrebleu's 0-100 scale; ROUGE-L F1 and exact match are in [0, 1].
"""

from __future__ import annotations

from typing import Sequence


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"one reference per output: {len(hyps)} outputs, {len(refs)} references")


def chrf_items(hyps: Sequence[str], refs: Sequence[str]) -> list[float]:
    """Sentence-level chrF of each output against its reference (sacrebleu's defaults)."""
    from sacrebleu.metrics import CHRF

    _check(hyps, refs)
    metric = CHRF()
    return [float(metric.sentence_score(h, [r]).score) for h, r in zip(hyps, refs)]


def bleu_items(hyps: Sequence[str], refs: Sequence[str]) -> list[float]:
    """Sentence-level BLEU (exponential smoothing, sacrebleu's sentence default)."""
    from sacrebleu.metrics import BLEU

    _check(hyps, refs)
    metric = BLEU(effective_order=True)
    return [float(metric.sentence_score(h, [r]).score) for h, r in zip(hyps, refs)]


def corpus_chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    from sacrebleu.metrics import CHRF

    _check(hyps, refs)
    return float(CHRF().corpus_score(list(hyps), [list(refs)]).score)


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    from sacrebleu.metrics import BLEU

    _check(hyps, refs)
    return float(BLEU().corpus_score(list(hyps), [list(refs)]).score)


def rouge_l_items(hyps: Sequence[str], refs: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each output against its reference (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    _check(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(r, h)["rougeL"].fmeasure) for h, r in zip(hyps, refs)]


def exact_match_items(hyps: Sequence[str], refs: Sequence[str]) -> list[bool]:
    """Output equals reference after trimming white space."""
    _check(hyps, refs)
    return [h.strip() == r.strip() for h, r in zip(hyps, refs)]


def macro_f1(predicted: Sequence[str], reference: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Macro-averaged F1 over the classes (scikit-learn): every class weighs the same, however rare.

    labels: the task's classes. The average runs over those that occur in these items (as a reference or
    an answer), as scikit-learn does by default, so a class absent from a small sample does not count as
    F1 = 0; a prediction outside the classes (an unparseable answer, a made-up class) is a miss for the
    item's true class and no class of its own. Default: the classes of the references."""
    from sklearn.metrics import f1_score

    _check(predicted, reference)
    if not reference:
        raise ValueError("macro-F1 needs at least one item")
    present = set(reference) | set(predicted)
    labels = sorted(set(reference)) if labels is None else [c for c in labels if c in present]
    if not labels:
        return 0.0
    return float(f1_score(list(reference), list(predicted), labels=labels, average="macro", zero_division=0))
