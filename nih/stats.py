"""
Small-sample statistics for needle-in-a-haystack scores: each cell is a yes/no answer, so a table of accuracies
needs intervals, and a method compared with the baseline on the same prompts needs a paired test.

- wilson(k, n): the Wilson score interval of a proportion k/n (good at 0/n and n/n, unlike the normal interval).
- sign_test(b, c): the exact two-sided McNemar test on the discordant pairs of a paired comparison: b prompts that
  only the baseline got right, c prompts that only the method got right. Under "no difference" each discordant pair
  is a fair coin, so p = P(Binomial(b + c, 1/2) at least as far from (b + c) / 2 as observed).
- newcombe_paired(a, b, c, d): a 95% interval for the difference of two paired proportions (Newcombe 1998, Stat. Med.
  17:2635, method 10: Wilson intervals of the two margins, combined with their estimated correlation).
- paired_table(base, method) / paired(base, method): the 2x2 table, and all of the above, for two lists of 0/1
  scores on the same prompts.
- median_interval(x) / paired_median(base, method): the exact, distribution-free 95% interval of a median (of the
  paired differences) from order statistics, the inversion of the sign test: it excludes 0 exactly when the sign
  test rejects at 5%, so an interval and a p-value can never disagree (ties at exactly 0 count for no shift).
- median_shift(neg, pos, n): that interval's verdict (lower / higher / unchanged) from the sign counts alone.
"""

import math


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval for k successes out of n."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k = {k}, n = {n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact ends: rounding must not exclude 0/n or n/n


def sign_test(b: int, c: int) -> float:
    """Exact two-sided McNemar / sign test p-value for b vs c discordant pairs (1.0 when there are none)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b = {b}, c = {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def newcombe_paired(a: int, b: int, c: int, d: int, z: float = 1.959964) -> tuple[float, float]:
    """95% interval for p_method - p_base = (c - b) / n from a paired 2x2 table (Newcombe 1998, method 10).

    a: both right, b: only the baseline right, c: only the method right, d: both wrong. The two margins get Wilson
    intervals; their correlation phi (with Newcombe's continuity adjustment of a d - b c) narrows the combination,
    since the same prompts are scored twice. The interval includes 0 unless the difference is clear.
    """
    if min(a, b, c, d) < 0 or a + b + c + d == 0:
        raise ValueError(f"a paired table needs counts >= 0 and n >= 1, got {(a, b, c, d)}")
    n = a + b + c + d
    p1, p2 = (a + c) / n, (a + b) / n  # method, baseline
    l1, u1 = wilson(a + c, n, z)
    l2, u2 = wilson(a + b, n, z)
    margins = (a + c) * (b + d) * (a + b) * (c + d)
    x = a * d - b * c
    x = x - n / 2 if x > n / 2 else (0 if x >= 0 else x)  # Newcombe's adjustment of the phi numerator
    phi = x / math.sqrt(margins) if margins else 0.0
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def paired_table(base: list, method: list) -> tuple[int, int, int, int]:
    """The paired 2x2 table (a, b, c, d) of two lists of 0/1 scores on the same prompts: both right, only the
    baseline right, only the method right, both wrong."""
    if len(base) != len(method) or not base:
        raise ValueError(f"paired scores need two equal, non-empty lists, got {len(base)} and {len(method)}")
    if any(x not in (0, 1) for x in (*base, *method)):
        raise ValueError("paired() takes 0/1 scores; use paired_median() for a continuous measure")
    a = sum(1 for x, y in zip(base, method) if x and y)
    b = sum(1 for x, y in zip(base, method) if x and not y)  # baseline right, method wrong
    c = sum(1 for x, y in zip(base, method) if y and not x)  # method right, baseline wrong
    return a, b, c, len(base) - a - b - c


def paired(base: list, method: list) -> dict:
    """Compare two lists of 0/1 scores on the same prompts: accuracy difference (method - baseline) with its 95%
    interval, discordant counts b (baseline only) and c (method only), and the sign-test p-value."""
    a, b, c, d = paired_table(base, method)
    lo, hi = newcombe_paired(a, b, c, d)
    return {"diff": (c - b) / len(base), "lo": lo, "hi": hi, "b": b, "c": c, "p": sign_test(b, c)}


def median_interval(x: list, level: float = 0.95) -> tuple[float, float]:
    """Exact distribution-free interval for the median of x: (x_(k), x_(n+1-k)) of the sorted values, with the
    largest k such that P(Binomial(n, 1/2) <= k - 1) <= (1 - level) / 2; its coverage is at least `level`. Below
    6 values no such k exists at 95% and the interval is (-inf, inf): too few prompts to locate a median."""
    if not x or not all(math.isfinite(v) for v in x):
        raise ValueError("median_interval() needs a non-empty list of finite values")
    n, xs = len(x), sorted(x)
    k = _median_rank(n, level)
    if k == 0:
        return -math.inf, math.inf
    return xs[k - 1], xs[n - k]


def _median_rank(n: int, level: float = 0.95) -> int:
    """The k of median_interval: the largest k with P(Binomial(n, 1/2) <= k - 1) <= (1 - level) / 2 (0: none)."""
    k, cdf, alpha = 0, 0.0, (1 - level) / 2
    while True:
        cdf += math.comb(n, k) / 2**n  # P(Bin <= k)
        if cdf > alpha:
            return k
        k += 1


def median_shift(neg: int, pos: int, n: int, level: float = 0.95) -> str:
    """The log-probability rule from counts alone: "lower" when the median interval of n paired differences lies
    below 0, "higher" when above, else "unchanged". The interval's upper end x_(n+1-k) is below 0 exactly when at
    least n + 1 - k differences are negative, so the verdict needs only how many fell on each side of 0 (this is
    how a summary whose per-prompt values were not kept is judged by the same rule)."""
    if min(neg, pos) < 0 or neg + pos > n:
        raise ValueError(f"sign counts need 0 <= neg + pos <= n, got {neg} negative and {pos} positive of {n}")
    k = _median_rank(n, level)
    if k and neg >= n + 1 - k:
        return "lower"
    if k and pos >= n + 1 - k:
        return "higher"
    return "unchanged"


def paired_median(base: list, method: list) -> dict:
    """A continuous paired measure on the same prompts (e.g. the log-probability of the answer), decided by one rule:
    the median of method - base with its exact 95% interval (median_interval); a shift counts when the interval
    excludes 0, which is the sign test at 5% (its p is reported too). The mean difference is descriptive."""
    if len(base) != len(method) or not base:
        raise ValueError(f"paired values need two equal, non-empty lists, got {len(base)} and {len(method)}")
    diffs = [y - x for x, y in zip(base, method)]
    lo, hi = median_interval(diffs)
    neg, pos = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    xs, n = sorted(diffs), len(diffs)
    median = (xs[(n - 1) // 2] + xs[n // 2]) / 2
    return {"diff": median, "lo": lo, "hi": hi, "mean": sum(diffs) / n, "neg": neg, "pos": pos,
            "p": sign_test(neg, pos)}
