"""Paired statistics and text metrics on hand-computed cases."""

import math

import numpy as np
import pytest

from sftkit.core.stats import (
    McNemar,
    bootstrap_statistic,
    mcnemar_exact,
    mcnemar_items_needed,
    paired_bootstrap,
    paired_verdict,
    wilson_interval,
    win_tie_loss,
)
from sftkit.core.textmetrics import (
    bleu_items,
    chrf_items,
    corpus_bleu,
    corpus_chrf,
    exact_match_items,
    macro_f1,
    rouge_l_items,
)


def pairs(a_only, b_only, both, neither):
    a = [1] * a_only + [0] * b_only + [1] * both + [0] * neither
    b = [0] * a_only + [1] * b_only + [1] * both + [0] * neither
    return a, b


@pytest.mark.parametrize("a_only,b_only,p", [
    (0, 0, 1.0),  # no discordant item: no evidence
    (0, 5, 2 * 0.5 ** 5),  # all five discordant items favour B: 2 * 1/32
    (1, 9, 2 * (1 + 10) / 1024),  # two-sided: 2 * P(X <= 1), X ~ Bin(10, 1/2)
    (5, 5, 1.0),
    (3, 0, 0.25),  # 2 * 1/8
    (2, 12, 2 * (1 + 14 + 91) / 2 ** 14),  # 2 * P(X <= 2), X ~ Bin(14, 1/2)
])
def test_mcnemar_exact_on_known_tables(a_only, b_only, p):
    a, b = pairs(a_only, b_only, both=7, neither=4)
    result = mcnemar_exact(a, b)
    assert (result.a_only, result.b_only, result.both, result.neither) == (a_only, b_only, 7, 4)
    assert result.p_value == pytest.approx(p, rel=1e-9)
    assert mcnemar_exact(b, a).p_value == pytest.approx(p, rel=1e-9)  # symmetric


def test_mcnemar_refuses_what_is_not_paired_binary():
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match=r"b\[1\]=0.5 is not a binary score"):
        mcnemar_exact([1, 0], [1, 0.5])


def test_paired_bootstrap_covers_the_true_difference_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    true, n, sims, hits = 0.3, 40, 200, 0
    for i in range(sims):
        base = rng.normal(0, 1, n)  # item difficulty, shared by both variants: the pairing matters
        a = base + true + rng.normal(0, 0.5, n)
        b = base + rng.normal(0, 0.5, n)
        ci = paired_bootstrap(a, b, n_resamples=999, seed=i)
        hits += ci.low <= true <= ci.high
    assert 0.89 <= hits / sims <= 0.99, hits / sims


def test_paired_bootstrap_is_seeded_and_handles_no_spread():
    a, b = [1, 0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 0, 0, 1, 0, 1]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    same = paired_bootstrap([1, 1, 0], [0, 0, -1])
    assert (same.diff, same.low, same.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([1, 2], [1])


def test_win_tie_loss_and_wilson():
    assert win_tie_loss([1, 0.5, 0, 1], [0, 0.5, 1, 0]) == (2, 1, 1)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)  # the Wilson bound at 0/20


def test_items_needed_matches_connors_formula_by_hand():
    # p10 = 0.25, p01 = 0.05: delta 0.2, discordant 0.3; z 1.95996 and 0.84162
    by_hand = (1.959964 * math.sqrt(0.3) + 0.841621 * math.sqrt(0.3 - 0.04)) ** 2 / 0.04
    assert mcnemar_items_needed(0.25, 0.05) == math.ceil(by_hand) == 57
    assert mcnemar_items_needed(0.1, 0.1) is None


def test_verdicts_in_plain_words():
    a, b = pairs(45, 4, 30, 21)
    verdict = paired_verdict("the adapter", "zero-shot", paired_bootstrap(a, b), mcnemar_exact(a, b))
    assert verdict.startswith("the adapter is better than zero-shot by 41 points (95% CI")
    assert "p < 0.001" in verdict and "on 100 items" in verdict
    a, b = pairs(3, 1, 10, 6)
    verdict = paired_verdict("few-shot", "zero-shot", paired_bootstrap(a, b), mcnemar_exact(a, b))
    assert verdict.startswith("no detectable difference between few-shot and zero-shot on 20 items")
    assert "items would be needed" in verdict
    worse = paired_verdict("A", "B", paired_bootstrap(*pairs(1, 30, 10, 9)), McNemar(1, 30, 10, 9, 1e-8))
    assert worse.startswith("B is better than A by 58 points")


def test_text_metrics_match_the_libraries_and_their_fixed_points():
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps = ["the cat sat on the mat", "1993-05-18", "completely different words"]
    refs = ["the cat sat on the mat", "1993-05-19", "nothing alike here"]
    chrf = chrf_items(hyps, refs)
    assert chrf[0] == pytest.approx(100.0) and 0 < chrf[1] < 100
    assert chrf[1] == pytest.approx(sacrebleu.sentence_chrf(hyps[1], [refs[1]]).score)
    assert bleu_items(hyps, refs)[0] == pytest.approx(100.0)
    assert corpus_chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    rouge = rouge_l_items(hyps, refs)
    assert rouge[0] == 1.0 and rouge[2] == 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rouge[1] == pytest.approx(scorer.score(refs[1], hyps[1])["rougeL"].fmeasure)
    assert exact_match_items([" a ", "b"], ["a", "c"]) == [True, False]
    with pytest.raises(ValueError, match="one reference per output"):
        chrf_items(["a"], [])


def test_verdicts_never_overclaim():
    # every item flipped the same way: a point interval, but the exact test decides
    a, b = pairs(16, 0, 0, 0)
    assert paired_verdict("adapter", "zero-shot", paired_bootstrap(a, b), mcnemar_exact(a, b)).startswith(
        "adapter is better than zero-shot by 100 points (95% CI 100 to 100, p < 0.001) on 16 items")
    # a non-binary score on one item, or with no spread, and no exact test: nothing is claimed
    one = paired_verdict("A", "B", paired_bootstrap([0.7], [0.2]), scale=1.0, unit="score")
    assert one.startswith("no detectable difference") and "0.5 score" in one
    # few discordant items: the interval may exclude 0 while the exact test does not; the verdict says so
    a, b = pairs(3, 0, 50, 47)
    text = paired_verdict("A", "B", paired_bootstrap(a, b), mcnemar_exact(a, b))
    assert text.startswith("no detectable difference") and "p = 0.250" in text
    assert paired_bootstrap(a, b).excludes_zero and "the interval excludes 0 but the exact test does not" in text


def test_macro_f1_by_hand():
    # class a: 1 hit, 1 false alarm, 0 misses -> F1 2/3; class b: 1 hit, 0 false alarms, 2 misses -> F1 1/2
    assert macro_f1(["a", "b", "a", "x"], ["a", "b", "b", "b"]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # an answer outside the classes ("x") is a miss for its item; a class with no reference still counts
    assert macro_f1(["x", "x"], ["a", "a"], labels=["a", "b"]) == 0.0
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0
    # classes of the task that these items never show (as reference or answer) are not averaged in as 0
    assert macro_f1(["a", "b"], ["a", "b"], labels=["a", "b", "c", "d"]) == 1.0
    assert macro_f1(["a", "(invalid)"], ["a", "b"], labels=["a", "b", "c"]) == pytest.approx((1.0 + 0.0) / 2)
    # a rare class weighs as much as a common one: always answering the common class scores 0.5 * F1
    assert macro_f1(["a"] * 10, ["a"] * 9 + ["b"]) == pytest.approx((2 * 0.9 / 1.9) / 2)
    with pytest.raises(ValueError, match="one reference per output"):
        macro_f1(["a"], [])


def test_bootstrap_statistic_covers_and_agrees_with_the_paired_bootstrap():
    rng = np.random.default_rng(2)
    true, n, sims, hits = 0.3, 40, 150, 0
    for i in range(sims):
        base = rng.normal(0, 1, n)
        a, b = base + true + rng.normal(0, 0.5, n), base + rng.normal(0, 0.5, n)
        ci = bootstrap_statistic(n, lambda idx: float(np.mean(a[idx] - b[idx])), n_resamples=999, seed=i)
        hits += ci.low <= true <= ci.high
    assert 0.88 <= hits / sims <= 0.99, hits / sims
    a, b = rng.normal(0, 1, 60), rng.normal(0, 1, 60)
    stat = bootstrap_statistic(60, lambda idx: float(np.mean(a[idx] - b[idx])), seed=5)
    assert stat == bootstrap_statistic(60, lambda idx: float(np.mean(a[idx] - b[idx])), seed=5)  # seeded
    ref = paired_bootstrap(a, b, seed=5)
    assert stat.diff == pytest.approx(ref.diff)
    assert stat.low == pytest.approx(ref.low, abs=0.1) and stat.high == pytest.approx(ref.high, abs=0.1)
    one = bootstrap_statistic(1, lambda idx: 0.25)
    assert (one.diff, one.low, one.high, one.n) == (0.25, 0.25, 0.25, 1)
    # a statistic no resample moves (perfect answers) has a point interval, not a widened one
    refs = ["a", "b", "c", "d", "e"] * 3
    perfect = bootstrap_statistic(len(refs), lambda idx: macro_f1([refs[i] for i in idx], [refs[i] for i in idx]))
    assert (perfect.diff, perfect.low, perfect.high) == (1.0, 1.0, 1.0)
