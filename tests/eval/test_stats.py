"""Statistics of reports: the paired t-test by hand."""

import math

import pytest

from demoalign.eval.stats import mean_std, paired_t_test, verdict


def test_paired_t_test_by_hand():
    # diffs 2, 3, 0: mean 5/3, sd sqrt(7/3), t = (5/3) / (sqrt(7/3)/sqrt(3)) = 1.88982...
    t, p = paired_t_test([3, 5, 4], [1, 2, 4])
    assert t == pytest.approx((5 / 3) / (math.sqrt(7 / 3) / math.sqrt(3)))
    # Student t with 2 df has the closed form two-sided p = 1 − t / sqrt(2 + t²).
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert p == pytest.approx(0.19937, abs=1e-4)
    assert paired_t_test([1, 2], [1, 2]) == (0.0, 1.0)
    assert paired_t_test([2, 3], [1, 2])[1] == 0.0
    # Differences equal up to float rounding are equal: no p-value from rounding noise.
    assert paired_t_test(
        [0.94, 0.9366666666666666, 0.9433333333333334],
        [0.9333333333333333, 0.93, 0.9366666666666668],
    ) == (float("inf"), 0.0)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert verdict([3, 5, 4], [1, 2, 4])[0] == "not significant"
    assert verdict([1, 2, 4], [3, 5, 4])[0] == "no"
    assert verdict([5.0, 6.1, 7.0, 8.1], [1.0, 2.0, 3.1, 4.0])[0] == "yes"


def test_paired_bootstrap_is_narrower_than_unpaired_when_items_vary_together():
    """Two models scored on the same items, the second always 0.1 above: the paired interval of
    the difference is the point 0.1, while the two models' own intervals overlap."""
    from demoalign.eval.stats import bootstrap_interval, paired_deltas

    base = [float(i % 7) for i in range(50)]
    model = [v + 0.1 for v in base]
    low, high = bootstrap_interval(paired_deltas(model, base), 500, seed=0)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    model_low, _ = bootstrap_interval(model, 500, seed=0)
    _, base_high = bootstrap_interval(base, 500, seed=0)
    assert model_low < base_high, "unpaired intervals should overlap here"
    with pytest.raises(ValueError, match="same items"):
        paired_deltas([1.0, 2.0], [1.0])


def test_paired_t_interval_by_hand():
    from demoalign.eval.stats import paired_t_interval

    # diffs 1, 2, 3: mean 2, sd 1, t(0.975, df 2) = 4.302653 -> half width 4.302653 / sqrt(3)
    d = paired_t_interval([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert d["difference"] == 2.0 and d["n"] == 3
    assert d["low"] == pytest.approx(2 - half) and d["high"] == pytest.approx(2 + half)
    same = paired_t_interval([1.0, 2.0], [0.5, 1.5])
    assert same["low"] == same["high"] == same["difference"] == 0.5
