"""Statistics for scores: intervals that behave at 0% and 100%, and paired comparisons of two
variants on the same items (exact McNemar, paired bootstrap, win/tie/loss, items needed, verdict)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- paired comparisons: two variants scored on the same items ------------------------------------
# The building blocks of "prompt or fine-tune?": each variant answers the same held-out items, so the
# tests are paired (much more power than comparing two independent rates). scipy does the numerics;
# it is imported on first use, so ``sftkit.core`` stays cheap to import.


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on paired binary scores: only the discordant items carry information."""

    a_only: int  # items variant A got right and B wrong
    b_only: int  # items B got right and A wrong
    both: int
    neither: int
    p_value: float

    @property
    def n(self) -> int:
        return self.a_only + self.b_only + self.both + self.neither


def _as_bools(name: str, values: Sequence) -> list[bool]:
    out = []
    for i, v in enumerate(values):
        if v in (0, 1) or isinstance(v, bool):
            out.append(bool(v))
        else:
            raise ValueError(f"{name}[{i}]={v!r} is not a binary score; allowed: True/False or 0/1")
    return out


def mcnemar_exact(a: Sequence, b: Sequence) -> McNemar:
    """Exact (binomial) McNemar test of paired binary scores ``a`` and ``b`` (same items, same order).

    p is the two-sided binomial test of the discordant counts against 1/2; with no discordant item
    there is no evidence of a difference and p = 1."""
    xa, xb = _as_bools("a", a), _as_bools("b", b)
    if len(xa) != len(xb):
        raise ValueError(f"paired scores need the same items: a has {len(xa)}, b has {len(xb)}")
    a_only = sum(x and not y for x, y in zip(xa, xb))
    b_only = sum(y and not x for x, y in zip(xa, xb))
    both = sum(x and y for x, y in zip(xa, xb))
    discordant = a_only + b_only
    if discordant == 0:
        p = 1.0
    else:
        from scipy.stats import binomtest

        p = float(binomtest(a_only, discordant, 0.5, alternative="two-sided").pvalue)
    return McNemar(a_only, b_only, both, len(xa) - discordant - both, min(1.0, p))


@dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over the same items, with a bootstrap confidence interval."""

    diff: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95,
                     n_resamples: int = 9999, seed: int = 0) -> PairedDifference:
    """Bootstrap CI (BCa, items resampled in pairs, seeded) of the mean difference ``a - b``."""
    import numpy as np

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.shape != xb.shape or xa.ndim != 1:
        raise ValueError(f"paired scores need the same items: a has {xa.size}, b has {xb.size}")
    if xa.size == 0:
        raise ValueError("no items to compare")
    d = xa - xb
    diff = float(d.mean())
    if xa.size < 2 or np.all(d == d[0]):  # no spread: the bootstrap distribution is a point
        return PairedDifference(diff, diff, diff, int(xa.size), confidence)
    from scipy.stats import bootstrap

    res = bootstrap((xa, xb), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                    confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                    random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):  # BCa can fail on very discrete data: percentile
        res = bootstrap((xa, xb), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                        confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                        random_state=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PairedDifference(diff, low, high, int(xa.size), confidence)


def bootstrap_statistic(n: int, statistic, *, confidence: float = 0.95, n_resamples: int = 1999,
                        seed: int = 0) -> PairedDifference:
    """Bootstrap CI (BCa, seeded; percentile where BCa is undefined) of any statistic of ``n`` items
    resampled together, for corpus metrics that are not means of per-item scores (macro-F1).
    ``statistic(indices)`` gets an int array of item indices (with repeats) and returns a float, e.g.
    F1 of variant a minus F1 of variant b on those items: resampling the indices keeps the pairs
    together. A statistic that no resample moves has a point interval."""
    import warnings

    import numpy as np

    if n < 1:
        raise ValueError("no items to compare")
    idx = np.arange(n)
    value = float(statistic(idx))
    if n < 2:
        return PairedDifference(value, value, value, n, confidence)
    from scipy.stats import bootstrap

    def stat(i):
        return statistic(np.asarray(i, dtype=int))

    low = high = math.nan
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a degenerate distribution: handled below
            res = bootstrap((idx,), stat, vectorized=False, confidence_level=confidence, n_resamples=n_resamples,
                            method=method, random_state=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            break
        if np.ptp(res.bootstrap_distribution) == 0:  # every resample gives the same value
            low = high = float(res.bootstrap_distribution[0])
            break
    return PairedDifference(value, low, high, n, confidence)


def win_tie_loss(a: Sequence[float], b: Sequence[float]) -> tuple[int, int, int]:
    """Items where a scores higher, the same, lower than b."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: a has {len(a)}, b has {len(b)}")
    wins = sum(x > y for x, y in zip(a, b))
    losses = sum(x < y for x, y in zip(a, b))
    return wins, len(a) - wins - losses, losses


def mcnemar_items_needed(p_a_only: float, p_b_only: float, *, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Items a McNemar test needs to detect the difference ``p_a_only - p_b_only`` (the discordant
    rates) at ``alpha`` with ``power`` (Connor's normal approximation); None if there is none to find."""
    from statistics import NormalDist

    delta, pd = p_a_only - p_b_only, p_a_only + p_b_only
    if delta == 0 or pd <= 0 or pd - delta * delta < 0:
        return None
    z = NormalDist()
    za, zb = z.inv_cdf(1 - alpha / 2), z.inv_cdf(power)
    n = (za * math.sqrt(pd) + zb * math.sqrt(pd - delta * delta)) ** 2 / (delta * delta)
    return math.ceil(n)


def paired_verdict(a_name: str, b_name: str, diff: PairedDifference, test: McNemar | None = None, *,
                   scale: float = 100.0, unit: str = "points", alpha: float = 0.05) -> str:
    """The comparison in plain words: which is better, by how much, how sure; or that no difference was
    detected, and about how many items would show one of the size seen."""
    p = test.p_value if test is not None else None
    pct = round(diff.confidence * 100)
    d, lo, hi = diff.diff * scale, diff.low * scale, diff.high * scale
    p_text = "" if p is None else (", p < 0.001" if p < 0.001 else f", p = {p:.3f}")
    fmt = (lambda v: f"{v:.0f}") if max(abs(d), abs(lo), abs(hi)) >= 10 else (lambda v: f"{v:.2g}")
    # with an exact test, it decides; without one, a point interval (no spread, or one item) proves nothing
    significant = diff.excludes_zero and (p < alpha if p is not None else diff.n >= 2 and diff.high > diff.low)
    if significant:
        better, worse = (a_name, b_name) if d > 0 else (b_name, a_name)
        lo_abs, hi_abs = sorted((abs(lo), abs(hi)))
        return (f"{better} is better than {worse} by {fmt(abs(d))} {unit} ({pct}% CI {fmt(lo_abs)} to "
                f"{fmt(hi_abs)}{p_text}) on {diff.n} items")
    text = (f"no detectable difference between {a_name} and {b_name} on {diff.n} items "
            f"({a_name} - {b_name} = {'+' if d >= 0 else '-'}{fmt(abs(d))} {unit}, {pct}% CI "
            f"{fmt(lo)} to {fmt(hi)}{p_text})")
    if diff.excludes_zero and p is not None and p >= alpha:
        text += f"; the interval excludes 0 but the exact test does not (p = {p:.3f}): too few items disagree"
    if test is not None and test.n:
        needed = mcnemar_items_needed(test.a_only / test.n, test.b_only / test.n, alpha=alpha)
        if needed is not None and needed > diff.n:
            text += f"; about {needed} items would be needed to detect a difference of this size"
    return text
