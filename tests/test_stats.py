"""stats.py against values computed by hand (and published tables)."""

import pytest
from hypothesis import given, strategies as st

import math

from nih.stats import median_interval, median_shift, newcombe_paired, paired, paired_median, sign_test, wilson


def test_wilson_known_values():
    # Wilson 95% intervals: 0/10 -> (0, 0.2775), 5/10 -> (0.2366, 0.7634), 10/10 -> (0.7225, 1)
    for (k, n), (lo, hi) in {(0, 10): (0.0, 0.2775), (5, 10): (0.2366, 0.7634), (10, 10): (0.7225, 1.0),
                             (1, 5): (0.0362, 0.6245)}.items():
        got = wilson(k, n)
        assert got == pytest.approx((lo, hi), abs=1e-4), (k, n, got)


@given(n=st.integers(1, 500), data=st.data())
def test_wilson_contains_the_estimate_and_shrinks_with_n(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1
    lo4, hi4 = wilson(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo


def test_sign_test_known_values():
    assert sign_test(0, 5) == pytest.approx(2 / 32)  # all five discordant pairs favour one side
    assert sign_test(1, 9) == pytest.approx(2 * 11 / 1024)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(0, 6) == pytest.approx(0.03125) and sign_test(2, 8) == pytest.approx(0.109375)


def test_newcombe_paired_known_value():
    """Cavo et al. 2012 as tabulated by the R package contingencytables (Fagerland, Lydersen & Laake, ch. 8):
    table [[59, 6], [16, 80]], row margin minus column margin = -0.0621, 95% CI -0.1186 to -0.0046."""
    lo, hi = newcombe_paired(a=59, b=16, c=6, d=80)  # method = the row: 6 pairs only it got right, 16 only the column
    assert (lo, hi) == pytest.approx((-0.1186, -0.0046), abs=1e-4)


@given(a=st.integers(0, 40), b=st.integers(0, 40), c=st.integers(0, 40), d=st.integers(0, 40))
def test_newcombe_paired_contains_the_estimate_and_flips_with_the_roles(a, b, c, d):
    if a + b + c + d == 0:
        return
    n = a + b + c + d
    lo, hi = newcombe_paired(a, b, c, d)
    assert -1 <= lo <= (c - b) / n <= hi <= 1
    lo2, hi2 = newcombe_paired(a, c, b, d)  # swapping baseline and method mirrors the interval
    assert (lo2, hi2) == pytest.approx((-hi, -lo), abs=1e-12)
    if b == c:
        assert lo < 0 < hi or lo == hi == 0  # no difference observed: the interval includes zero


def test_paired_counts_discordant_prompts_only():
    r = paired([1, 1, 0, 0, 1], [1, 0, 1, 1, 1])
    assert r == {"diff": pytest.approx(0.2), "b": 1, "c": 2, "p": pytest.approx(1.0),
                 "lo": pytest.approx(newcombe_paired(2, 1, 2, 0)[0]),
                 "hi": pytest.approx(newcombe_paired(2, 1, 2, 0)[1])}
    assert r["lo"] < 0 < r["hi"]  # 2 against 1 discordant prompts is no evidence
    with pytest.raises(ValueError, match="0/1"):
        paired([0.5], [1])
    with pytest.raises(ValueError):
        paired([1], [1, 0])
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_median_interval_known_values():
    """Order-statistic intervals for the median (Conover, Practical Nonparametric Statistics, Table A3): n = 6 ->
    ranks (1, 6); n = 10 -> (2, 9); n = 20 -> (6, 15); below 6 values no 95% interval exists."""
    assert median_interval(list(range(1, 7))) == (1, 6)
    assert median_interval(list(range(1, 11))) == (2, 9)
    assert median_interval(list(range(1, 21))) == (6, 15)
    assert median_interval([3.0, 1.0, 2.0]) == (-math.inf, math.inf)
    with pytest.raises(ValueError):
        median_interval([1.0, float("nan")])


@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=60))
def test_median_interval_excludes_zero_exactly_when_the_sign_test_rejects(diffs):
    """The decision rule for log-probabilities: the interval and the sign test never disagree."""
    r = paired_median([0.0] * len(diffs), diffs)
    assert r["lo"] <= r["diff"] <= r["hi"]
    if r["neg"] + r["pos"] == len(diffs):  # exact zeros are dropped by the test and can sit at an interval's end
        assert (r["lo"] > 0 or r["hi"] < 0) == (r["p"] <= 0.05)


@given(st.lists(st.sampled_from([-2.5, -1.0, -0.25, 0.0, 0.5, 3.0]), min_size=1, max_size=60))
def test_median_shift_from_counts_is_the_interval_rule(diffs):
    """A summary that kept only sign counts is judged exactly as its per-prompt values would be (zeros included)."""
    r = paired_median([0.0] * len(diffs), diffs)
    want = "higher" if r["lo"] > 0 else "lower" if r["hi"] < 0 else "unchanged"
    assert median_shift(r["neg"], r["pos"], len(diffs)) == want


def test_median_shift_known_counts_and_bad_counts():
    assert median_shift(23, 4, 27) == "lower"  # sign test p = 0.0003
    assert median_shift(9, 2, 11) == "unchanged"  # p = 0.065
    assert median_shift(0, 5, 5) == "unchanged"  # below 6 values no interval excludes anything
    assert median_shift(0, 6, 6) == "higher"
    with pytest.raises(ValueError, match="sign counts"):
        median_shift(5, 3, 7)


def test_paired_median_reports_median_mean_and_signs():
    base = [-3.0, -2.5, -4.0, -1.0, -2.0, -3.5]
    method = [-2.0, -2.6, -3.0, -0.5, -2.0, -2.5]
    r = paired_median(base, method)
    assert r["diff"] == pytest.approx(0.75) and r["mean"] == pytest.approx(sum(m - b for b, m in zip(base, method)) / 6)
    assert (r["neg"], r["pos"]) == (1, 4) and r["p"] == pytest.approx(sign_test(1, 4))
    assert (r["lo"], r["hi"]) == pytest.approx((-0.1, 1.0))  # ranks 1 and 6 of the six differences
    with pytest.raises(ValueError):
        paired_median([1.0], [1.0, 2.0])


