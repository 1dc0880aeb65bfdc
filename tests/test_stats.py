"""stats.py against values computed by hand (and published tables)."""

import pytest
from hypothesis import given, strategies as st

from stats import paired, sign_test, wilson


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


def test_paired_counts_discordant_prompts_only():
    r = paired([1, 1, 0, 0, 1], [1, 0, 1, 1, 1])
    assert r == {"diff": pytest.approx(0.2), "b": 1, "c": 2, "p": pytest.approx(1.0)}
    with pytest.raises(ValueError):
        paired([1], [1, 0])
    with pytest.raises(ValueError):
        wilson(3, 2)
