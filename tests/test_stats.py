"""stats.py against values computed by hand (and published tables)."""

import pytest
from hypothesis import given, strategies as st

import itertools
import math

from nih.stats import (detectable_gain, detectable_shift, gain_power, holm, mean_interval, median_interval, median_p,
                       median_shift, newcombe_p, newcombe_paired, paired, paired_median, shift_power, sign_power,
                       sign_test, t_quantile, wilson)


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




# -----------------------------------------------------------------------------
# Many comparisons


@given(a=st.integers(0, 15), b=st.integers(0, 15), c=st.integers(0, 15), d=st.integers(0, 15))
def test_newcombe_p_is_below_alpha_exactly_when_the_interval_excludes_zero(a, b, c, d):
    """The accuracy rule's p-value: Newcombe's interval at 95% (and at 99%) excludes 0 iff p < alpha."""
    if a + b + c + d == 0:
        return
    p = newcombe_p(a, b, c, d)
    for alpha, z in ((0.05, 1.959964), (0.01, 2.575829)):
        lo, hi = newcombe_paired(a, b, c, d, z)
        if abs(p - alpha) > 1e-6:  # at the boundary itself either side is rounding
            assert (lo > 0 or hi < 0) == (p < alpha), (a, b, c, d, p)


@given(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0]), min_size=1, max_size=40),
       st.sampled_from([0.05, 0.01, 0.2]))
def test_median_p_is_at_most_alpha_exactly_when_the_median_rule_calls_a_shift(diffs, alpha):
    """The log-probability rule's p-value: median_shift at level 1 - alpha calls a shift iff median_p <= alpha
    (zeros included, which the sign test's own p drops)."""
    neg, pos, n = sum(x < 0 for x in diffs), sum(x > 0 for x in diffs), len(diffs)
    called = median_shift(neg, pos, n, level=1 - alpha) != "unchanged"
    assert called == (median_p(neg, pos, n) <= alpha)


def test_holm_known_steps():
    """Holm 1979: p = 0.01, 0.04, 0.03, 0.005 with alpha 0.05 -> thresholds 0.0125, 0.0167, 0.025, 0.05 in p order:
    0.005 and 0.01 pass, 0.03 > 0.025 stops the procedure, so 0.04 is kept too."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    assert holm([0.04, 0.04]) == [False, False] and holm([0.02, 0.04]) == [True, True]
    assert holm([]) == []
    with pytest.raises(ValueError, match="p-values"):
        holm([1.5])


@given(st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_holm_rejects_no_more_than_uncorrected_and_no_fewer_than_bonferroni(ps):
    keep = holm(ps)
    for p, k in zip(ps, keep):
        assert (not k or p <= 0.05) and (k or p > 0.05 / len(ps))


# -----------------------------------------------------------------------------
# Power


def test_gain_power_equals_brute_force_over_every_sequence_of_prompts():
    """gain_power sums the multinomial over tables; here every one of 4^6 sequences of 6 paired prompts is scored
    one by one (its own Newcombe interval), for a table with all four cells and one with no discordance."""
    for table, gain in (((2, 1, 1, 2), 0.2), ((0, 0, 0, 6), 0.5), ((3, 0, 2, 1), 0.0)):
        a, b, c, d = table
        cells = [a / 6, (b + c) / 12, (b + c) / 12 + gain, d / 6 - gain]
        want = 0.0
        for seq in itertools.product(range(4), repeat=6):
            counts = [seq.count(i) for i in range(4)]
            if newcombe_paired(*counts)[0] > 0:
                want += math.prod(cells[i] for i in seq)
        assert gain_power(table, gain) == pytest.approx(want, abs=1e-12), table


@given(a=st.integers(0, 6), b=st.integers(0, 4), c=st.integers(0, 4), d=st.integers(1, 8), n=st.integers(6, 16))
def test_gain_power_grows_with_the_gain_and_the_detectable_gain_reaches_80_percent(a, b, c, d, n):
    room = d / (a + b + c + d)
    powers = [gain_power((a, b, c, d), room * i / 8, n) for i in range(9)]
    assert all(x <= y + 1e-12 for x, y in zip(powers, powers[1:]))
    g = detectable_gain((a, b, c, d), n)
    if g is None:
        assert powers[-1] < 0.8
    else:
        assert gain_power((a, b, c, d), g, n) >= 0.8 > gain_power((a, b, c, d), max(0.0, g - 2e-4), n)


def test_gain_power_known_value_and_bad_gains():
    """No discordance, all 6 wrong: the rule calls 3 of 6 wins and no loss (interval [+0.006, +81.2] points), not 2
    of 6, so the power is P(Binomial(6, g) >= 3)."""
    assert newcombe_paired(0, 0, 3, 3)[0] > 0 >= newcombe_paired(0, 0, 2, 4)[0]
    g = 0.4
    assert gain_power((0, 0, 0, 6), g) == pytest.approx(sum(math.comb(6, i) * g**i * (1 - g) ** (6 - i)
                                                            for i in range(3, 7)))
    assert gain_power((0, 0, 0, 6), g, n=12) > gain_power((0, 0, 0, 6), g)  # more prompts, more power
    with pytest.raises(ValueError, match="both-wrong"):
        gain_power((8, 0, 0, 3), 0.5)
    assert detectable_gain((11, 0, 0, 0)) is None  # no prompt left to win


def test_shift_power_equals_brute_force_over_every_resample():
    """shift_power's binomial is the exact resampling law: all 6^6 resamples of six differences, each judged by the
    median's own interval after the shift."""
    diffs = [-1.5, -0.2, 0.1, 0.3, 0.4, 2.0]
    med = (0.1 + 0.3) / 2
    for shift in (0.1, 0.4, 1.8):
        ys = [x - med + shift for x in diffs]
        hits = sum(median_interval(list(s))[0] > 0 for s in itertools.product(ys, repeat=6))
        assert shift_power(diffs, shift) == pytest.approx(hits / 6**6, abs=1e-12), shift


@given(st.lists(st.floats(-20, 20, allow_nan=False), min_size=6, max_size=30), st.integers(6, 60))
def test_detectable_shift_is_where_the_power_crosses_80_percent(diffs, n):
    s = detectable_shift(diffs, n)
    if s is None:
        assert shift_power(diffs, 1e6, n) < 0.8
    else:
        assert shift_power(diffs, s + 1e-9 * (1 + abs(s)), n) >= 0.8 > shift_power(diffs, s, n) or s == 0


def test_detectable_shift_known_values():
    """n = 11 needs 10 of 11 above 0 (k = 2) and so a share q >= 0.9244 per draw: with 11 observed differences only
    all 11 reach it, so the smallest shift is median - minimum. Below 6 prompts no interval exists."""
    diffs = [-3.0, -0.5, -0.4, -0.1, 0.0, 0.2, 0.3, 0.5, 0.9, 1.0, 4.0]
    assert detectable_shift(diffs) == pytest.approx(0.2 - (-3.0))
    assert sign_power(11, 0.9243) < 0.8 <= sign_power(11, 0.9244)
    assert detectable_shift([1.0, 2.0, 3.0], n=5) is None and sign_power(5, 1.0) == 0.0
    assert detectable_shift(diffs, n=200) < detectable_shift(diffs)


def test_t_quantile_and_mean_interval_known_values():
    """Student's t table (two-sided 95%): df 1 -> 12.706, 2 -> 4.303, 5 -> 2.571, 10 -> 2.228, 30 -> 2.042."""
    for df, t in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.95, df) == pytest.approx(t, abs=5e-4)
    lo, hi = mean_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t_2 = 4.303
    assert (lo, hi) == pytest.approx((2 - 4.3027 / math.sqrt(3), 2 + 4.3027 / math.sqrt(3)), abs=1e-4)
    assert mean_interval([5.0]) == (-math.inf, math.inf)
    with pytest.raises(ValueError):
        t_quantile(0.95, 0)
