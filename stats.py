"""
Small-sample statistics for needle-in-a-haystack scores: each cell is a yes/no answer, so a table of accuracies
needs intervals, and a method compared with the baseline on the same prompts needs a paired test.

- wilson(k, n): the Wilson score interval of a proportion k/n (good at 0/n and n/n, unlike the normal interval).
- sign_test(b, c): the exact two-sided McNemar test on the discordant pairs of a paired comparison: b prompts that
  only the baseline got right, c prompts that only the method got right. Under "no difference" each discordant pair
  is a fair coin, so p = P(Binomial(b + c, 1/2) at least as far from (b + c) / 2 as observed).
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


def paired(base: list, method: list) -> dict:
    """Compare two lists of 0/1 scores on the same prompts: accuracy difference, discordant counts, p-value."""
    if len(base) != len(method) or not base:
        raise ValueError(f"paired scores need two equal, non-empty lists, got {len(base)} and {len(method)}")
    b = sum(1 for x, y in zip(base, method) if x and not y)  # baseline right, method wrong
    c = sum(1 for x, y in zip(base, method) if y and not x)  # method right, baseline wrong
    return {"diff": (sum(method) - sum(base)) / len(base), "b": b, "c": c, "p": sign_test(b, c)}
