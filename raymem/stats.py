"""Small-sample tests for "beyond the null", as the labeler uses them.

The null images of a prompt (its entity replaced by the class noun) are few (4-8), so their spread is
*estimated*, not known: a z-score against it with a normal cut-off fires far more often than it says
(~12 % instead of 5 % at 4 null images). These tests carry the estimation error:

  prediction_p    one new image against a null sample: Student's t prediction interval, n - 1 degrees
                  of freedom, s * sqrt(1 + 1/n) (exact false-positive rate under normality)
  paired_p        a prompt's images against the null images of the same seeds (they share the initial
                  noise, so the seed's share of the variance cancels): one-sided paired t-test
  bh_adjusted     Benjamini-Hochberg adjusted p-values, across the several elements tested for one
                  prompt or one image (false discovery rate at the level the adjusted p is compared with)

All are one-sided (is the scan image *higher* than the null?).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

# Spread floor in logits: a null whose images happen to agree almost exactly must not turn a tiny
# difference into a significant one (the CLIP logit's own resolution is about this).
SD_FLOOR = 0.5


@dataclass(frozen=True)
class TestResult:
    p: float
    statistic: float  # t
    effect: float  # mean difference in logits (paired) or difference to the null mean (prediction)
    n: int  # null images (prediction) or seed pairs (paired)


def prediction_p(x: float, null: list[float] | np.ndarray) -> TestResult | None:
    """P(a fresh null image scores >= x): t = (x - mean) / (s * sqrt(1 + 1/n)), df = n - 1."""
    null = np.asarray(null, np.float64)
    n = len(null)
    if n < 2:
        return None
    sd = max(float(null.std(ddof=1)), SD_FLOOR)
    effect = float(x - null.mean())
    t = effect / (sd * np.sqrt(1.0 + 1.0 / n))
    return TestResult(float(_st.t.sf(t, df=n - 1)), float(t), effect, n)


def paired_p(scan: dict[int, float], null: dict[int, float]) -> TestResult | None:
    """One-sided paired t-test of scan - null over the seeds both have ({seed: logit})."""
    seeds = sorted(set(scan) & set(null))
    if len(seeds) < 2:
        return None
    d = np.array([scan[s] - null[s] for s in seeds], np.float64)
    n = len(d)
    sd = max(float(d.std(ddof=1)), SD_FLOOR)
    t = float(d.mean()) / (sd / np.sqrt(n))
    return TestResult(float(_st.t.sf(t, df=n - 1)), t, float(d.mean()), n)


def bh_adjusted(pvalues: dict) -> dict:
    """Benjamini-Hochberg adjusted p-values ({key: p} -> {key: adjusted p}); keys with p None pass through."""
    keys = [k for k, p in pvalues.items() if p is not None]
    out = {k: None for k, p in pvalues.items() if p is None}
    if not keys:
        return out
    p = np.array([pvalues[k] for k in keys], np.float64)
    m = len(p)
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    for rank, i in enumerate(order):
        out[keys[i]] = float(adjusted[rank])
    return out


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float] | None:
    """Exact two-sided (1 - alpha) interval of a proportion k / n (None when n is 0)."""
    if n <= 0:
        return None
    lo = float(_st.beta.ppf(alpha / 2, k, n - k + 1)) if k > 0 else 0.0
    hi = float(_st.beta.ppf(1 - alpha / 2, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def cluster_bootstrap(
    numerators: list[int], denominators: list[int], reps: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile interval of sum(num) / sum(den) when whole clusters (e.g. a prompt's images, which
    share the prompt and so are not independent) are resampled with replacement."""
    num, den = np.asarray(numerators, float), np.asarray(denominators, float)
    if len(num) == 0 or den.sum() <= 0:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(num), size=(reps, len(num)))
    d = den[picks].sum(axis=1)
    ratios = num[picks].sum(axis=1)[d > 0] / d[d > 0]
    return float(np.quantile(ratios, alpha / 2)), float(np.quantile(ratios, 1 - alpha / 2))
