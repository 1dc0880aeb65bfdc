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

Many comparisons: each rule's p-value is the smallest alpha at which its own interval excludes 0 (newcombe_p,
median_p), so holm(ps) corrects a family of them with the declared intervals (Holm 1979, Scand. J. Stat. 6:65).

What a design could detect (power at 95%, from the records): gain_power / detectable_gain for accuracy (exact, over
every paired table the prompts could give), shift_power / detectable_shift for the median log-probability shift
(exact, resampling the observed paired differences); mean_interval (Student's t) describes a mean.
"""

import math
from functools import lru_cache
from statistics import NormalDist


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


# -----------------------------------------------------------------------------
# Many comparisons: the rules' own p-values and Holm's step-down correction


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"a confidence level is in (0, 1), got {level}")
    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def newcombe_p(a, b, c, d) -> float:
    """The smallest alpha at which Newcombe's (1 - alpha) interval of newcombe_paired excludes 0 (1.0 when b == c:
    no interval does), found by bisection on z; the accuracy rule at level 1 - alpha calls a difference exactly
    when this is below alpha."""
    if b == c:
        newcombe_paired(a, b, c, d)  # the same input checks
        return 1.0

    def excludes(z):
        lo, hi = newcombe_paired(a, b, c, d, z)
        return lo > 0 or hi < 0

    lo_z, hi_z = 0.0, 40.0  # z -> 0: the interval shrinks to the observed difference, which is not 0
    if excludes(hi_z):
        return 0.0
    for _ in range(80):
        mid = (lo_z + hi_z) / 2
        lo_z, hi_z = (mid, hi_z) if excludes(mid) else (lo_z, mid)
    return math.erfc(lo_z / math.sqrt(2))  # two-sided alpha of z


def median_p(neg: int, pos: int, n: int) -> float:
    """The smallest alpha at which the median's exact (1 - alpha) interval of n paired differences excludes 0:
    2 P(Binomial(n, 1/2) >= max(neg, pos)), capped at 1 (the sign test's p when no difference is exactly 0;
    median_shift at level 1 - alpha says higher or lower exactly when this is <= alpha)."""
    median_shift(neg, pos, n)  # the same input checks
    tail = sum(math.comb(n, i) for i in range(max(neg, pos), n + 1)) / 2**n
    return min(1.0, 2 * tail)


def holm(ps: list, alpha: float = 0.05) -> list:
    """Holm's step-down procedure: which of m hypotheses to reject so that the chance of any false rejection stays
    <= alpha. Sorted ascending, p_(i) is rejected while p_(j) <= alpha / (m - j + 1) for every j <= i."""
    if any(not 0 <= p <= 1 for p in ps):
        raise ValueError(f"p-values lie in [0, 1], got {ps}")
    keep, m = [False] * len(ps), len(ps)
    for rank, i in enumerate(sorted(range(m), key=lambda i: ps[i])):
        if ps[i] > alpha / (m - rank):
            break
        keep[i] = True
    return keep


# -----------------------------------------------------------------------------
# Power: the smallest effect the declared rules call, 80% of the time, at a number of prompts


def _binom_sf(n: int, q: float, j: int) -> float:
    """P(Binomial(n, q) >= j)."""
    return sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(max(j, 0), n + 1))


def sign_power(n: int, q: float, level: float = 0.95) -> float:
    """Power of the log-probability rule (the median's exact interval lies above 0) when each of n independent
    paired differences is above 0 with probability q: it needs n + 1 - k of them above 0 (k of median_interval)."""
    k = _median_rank(n, level)
    return _binom_sf(n, q, n + 1 - k) if k else 0.0


def shift_power(diffs: list, shift: float, n: int | None = None, level: float = 0.95) -> float:
    """Exact power of the log-probability rule for a median shift `shift`, by resampling: n differences (default
    len(diffs)) drawn with replacement from the observed ones, moved to median 0 (no effect) and then by `shift`.
    A draw is above 0 with probability q = share of (d - median + shift) > 0, so the power is sign_power(n, q)."""
    ys = _centred(diffs)
    return sign_power(n or len(ys), sum(y + shift > 0 for y in ys) / len(ys), level)


def detectable_shift(diffs: list, n: int | None = None, power: float = 0.8, level: float = 0.95):
    """The smallest median shift of shift_power reaching `power`: any shift above the returned value does, none
    at or below it (a step function: with m observed differences the share above 0 moves in steps of 1/m). None
    when no shift can (below 6 prompts no 95% interval of a median exists)."""
    ys = sorted(_centred(diffs))
    n, m = n or len(ys), len(ys)
    for j in range(1, m + 1):  # j of the m resampled values must lie above 0
        if sign_power(n, j / m, level) >= power:
            return max(0.0, -ys[m - j])
    return None


def _centred(diffs):
    if not diffs or not all(math.isfinite(x) for x in diffs):
        raise ValueError("power from paired differences needs a non-empty list of finite values")
    xs, n = sorted(diffs), len(diffs)
    med = (xs[(n - 1) // 2] + xs[n // 2]) / 2
    return [x - med for x in diffs]


@lru_cache(maxsize=None)
def _gain_region(n: int, level: float) -> tuple:
    """Every paired table (a, b, c, d) of n prompts whose Newcombe interval lies above 0, with its multinomial
    coefficient: the rejection region of the accuracy rule (only c > b can reject)."""
    z, out = _z(level), []
    for a in range(n + 1):
        for b in range(n + 1 - a):
            for c in range(b + 1, n + 1 - a - b):
                d = n - a - b - c
                if newcombe_paired(a, b, c, d, z)[0] > 0:
                    coef = math.factorial(n) // (math.factorial(a) * math.factorial(b) * math.factorial(c) *
                                                 math.factorial(d))
                    out.append((a, b, c, d, coef))
    return tuple(out)


def _gain_cells(table, gain: float):
    """The model of a gain: the observed table made symmetric (both-right and both-wrong kept, its discordant
    pairs split evenly into wins and losses: no effect), then `gain` of the both-wrong prompts turned into wins."""
    a, b, c, d = table
    m = a + b + c + d
    if min(table) < 0 or m <= 0:
        raise ValueError(f"a paired table needs counts >= 0 and n > 0, got {tuple(table)}")
    if not 0 <= gain <= d / m + 1e-12:
        raise ValueError(f"a gain of {gain:.4f} needs that share of both-wrong prompts; the table has "
                         f"{d / m:.4f} ({d} of {m})")
    half = (b + c) / (2 * m)
    return a / m, half, half + gain, max(0.0, d / m - gain)


def gain_power(table, gain: float, n: int | None = None, level: float = 0.95) -> float:
    """Exact power of the accuracy rule (Newcombe's interval above 0) for an accuracy gain `gain` (a proportion)
    on n prompts (default the table's): the sum, over every table of the rejection region, of its multinomial
    probability under _gain_cells(table, gain). `table` (a, b, c, d) is the observed paired table (both right,
    baseline only, method only, both wrong); it may hold fractional counts (prompts shared by settings, averaged)."""
    p = _gain_cells(table, gain)
    n = n or round(sum(table))
    total = 0.0
    for a, b, c, d, coef in _gain_region(n, level):
        total += coef * p[0] ** a * p[1] ** b * p[2] ** c * p[3] ** d
    return min(1.0, total)


def detectable_gain(table, n: int | None = None, power: float = 0.8, level: float = 0.95):
    """The smallest accuracy gain (a proportion, to 1e-4) that gain_power calls with at least `power`, by
    bisection; None when even the largest gain the table leaves room for (every both-wrong prompt won) falls
    short."""
    room = table[3] / sum(table)
    if gain_power(table, room, n, level) < power:
        return None
    lo, hi = 0.0, room
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gain_power(table, mid, n, level) < power else (lo, mid)
    return hi


# -----------------------------------------------------------------------------
# Describing a mean


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student's t critical value: P(|T| <= t) = level for df degrees of freedom (Abramowitz &
    Stegun 26.7.3-4, the finite series for an integer df, inverted by bisection)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1, got {df!r}")
    _z(level)

    def within(t):  # P(|T| <= t)
        th = math.atan(t / math.sqrt(df))
        s, c = math.sin(th), math.cos(th)
        if df % 2 == 0:
            term = total = 1.0
            for j in range(2, df, 2):
                term *= (j - 1) / j * c * c
                total += term
            return s * total
        term, total = c, c if df > 1 else 0.0
        for j in range(2, df - 1, 2):
            term *= j / (j + 1) * c * c
            total += term
        return 2 / math.pi * (th + s * total)

    lo, hi = 0.0, 1.0
    while within(hi) < level:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if within(mid) < level else (lo, mid)
    return hi


def mean_interval(x: list, level: float = 0.95) -> tuple[float, float]:
    """The Student's t interval of a mean, mean +- t s / sqrt(n) (a description of where the mean lies, not a
    decision rule); (-inf, inf) for a single value."""
    if not x or not all(math.isfinite(v) for v in x):
        raise ValueError("mean_interval() needs a non-empty list of finite values")
    n, mean = len(x), sum(x) / len(x)
    if n == 1:
        return -math.inf, math.inf
    half = t_quantile(level, n - 1) * math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1) / n)
    return mean - half, mean + half
