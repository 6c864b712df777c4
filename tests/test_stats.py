"""The summaries shared by the reports: fraction of the mean gap, tied best candidates, McNemar,
and the across-seed verdict rule, each against a slow reference or a case with a known answer."""

import math

import numpy as np
import pytest

from alignkit.stats import Band, envelope, gap_fraction, mcnemar, near_best, sign_verdict


def _slow_gap_fraction(delta, gap, n_boot, seed, ci=0.95):
    """Resample examples explicitly, one bootstrap at a time."""
    n = len(gap)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    point = np.mean(delta, 0) / np.mean(gap)
    boots = []
    for c in counts:
        idx = np.repeat(np.arange(n), c)
        boots.append(np.mean(delta[idx], 0) / np.mean(gap[idx]))
    lo, hi = np.quantile(np.array(boots), [(1 - ci) / 2, (1 + ci) / 2], axis=0)
    return point, lo, hi


def test_gap_fraction_matches_a_slow_reference():
    rng = np.random.default_rng(1)
    gap = rng.gamma(2.0, 2.0, 40)
    delta = gap[:, None] * rng.uniform(0, 1, (40, 5)) + rng.normal(0, 0.3, (40, 5))
    got = gap_fraction(delta, gap, n_boot=300, seed=3)
    point, lo, hi = _slow_gap_fraction(delta, gap, 300, 3)
    np.testing.assert_allclose(got.point, point, rtol=1e-12)
    np.testing.assert_allclose(got.lo, lo, rtol=1e-10)
    np.testing.assert_allclose(got.hi, hi, rtol=1e-10)


def test_gap_fraction_is_the_plotted_ratio_not_the_mean_npe():
    """One example with a tiny gap makes the mean of ratios large; the plotted curve (mean Δ over
    mean gap) is unaffected, and that is what gap_fraction returns."""
    gap = np.array([5.0, 5.0, 5.0, 0.11])
    delta = np.array([[2.5], [2.5], [2.5], [1.0]])
    frac = gap_fraction(delta, gap, n_boot=50).point[0]
    assert frac == pytest.approx(8.5 / 15.11)
    assert np.mean(delta[:, 0] / gap) > 2.5 > frac


def test_gap_fraction_invariances_and_full_recovery():
    rng = np.random.default_rng(0)
    gap = rng.uniform(1, 3, 30)
    delta = rng.normal(1, 1, (30, 4))
    a = gap_fraction(delta, gap, n_boot=200, seed=5)
    b = gap_fraction(7.0 * delta, 7.0 * gap, n_boot=200, seed=5)  # units (nats vs bits) cancel
    np.testing.assert_allclose(b.point, a.point, rtol=1e-12)
    np.testing.assert_allclose(b.lo, a.lo, rtol=1e-12)
    perm = rng.permutation(30)
    np.testing.assert_allclose(gap_fraction(delta[perm], gap[perm]).point, a.point, rtol=1e-12)
    full = gap_fraction(np.repeat(gap[:, None], 3, 1), gap, n_boot=100)
    np.testing.assert_allclose(np.stack([full.point, full.lo, full.hi]), 1.0, rtol=1e-12)


def test_gap_fraction_skips_nan_rows_with_their_gap():
    gap = np.array([1.0, 2.0, 100.0])
    delta = np.array([[0.5], [1.0], [np.nan]])
    assert gap_fraction(delta, gap, n_boot=20).point[0] == pytest.approx(0.5)


@pytest.mark.parametrize("delta,gap,match", [
    (np.ones((3, 2)), np.ones(4), "needs delta"),
    (np.ones((3, 2)), np.array([1.0, np.inf, 1.0]), "infinite"),
    (np.ones((2, 2)), np.array([1.0, -1.0]), "mean gap is 0"),
])
def test_gap_fraction_errors(delta, gap, match):
    with pytest.raises(ValueError, match=match):
        gap_fraction(delta, gap)


def test_near_best_reports_ties_not_an_argmax():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (60, 1))
    # columns 2 and 3 equal in expectation (noise only), column 0 far below, column 1 slightly below
    values = np.hstack([base - 5, base + 1.0 + rng.normal(0, 0.05, (60, 1)),
                        base + 2 + rng.normal(0, 0.5, (60, 1)),
                        base + 2 + rng.normal(0, 0.5, (60, 1))])
    best, ties = near_best(values, n_boot=500)
    assert int(best) in (2, 3)
    assert ties.tolist() == [False, False, True, True]


def test_near_best_per_receiver_with_nan_donors():
    rng = np.random.default_rng(0)
    v = rng.normal(0, 0.1, (30, 2, 3))
    v[:, 0, 1] += 3.0  # receiver 0: donor 1 clearly best
    v[:, 1, 2] = np.nan  # receiver 1: donor 2 never measured
    v[:, 1, 0] += 3.0
    best, ties = near_best(v, n_boot=200)
    assert best.tolist() == [1, 0]
    assert ties.tolist() == [[False, True, False], [True, False, False]]


def test_mcnemar_exact_values():
    a = np.array([True] * 10 + [False] * 10)
    b = np.array([True] * 10 + [True] * 10)  # b gains 10 problems, loses none
    r = mcnemar(a, b)
    assert (r["only_a"], r["only_b"], r["n"]) == (0, 10, 20)
    assert r["p"] == pytest.approx(2 / 2**10)
    assert r["diff"] == pytest.approx(0.5)
    # 3 vs 5 discordant: p = 2 * P(X <= 3), X ~ Binom(8, 1/2)
    a = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0], bool)
    b = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 0], bool)
    expected = 2 * sum(math.comb(8, i) for i in range(4)) / 256
    assert mcnemar(a, b)["p"] == pytest.approx(expected)
    assert mcnemar(a, a)["p"] == 1.0
    with pytest.raises(ValueError, match="same problems"):
        mcnemar(a, a[:5])


def _band(point, lo, hi):
    return Band(np.float64(point), np.float64(lo), np.float64(hi))


def test_sign_verdict_needs_every_seed_and_two_of_them():
    up = [_band(1.0, 0.5, 1.5), _band(0.8, 0.1, 1.4), _band(1.2, 0.9, 1.6)]
    assert sign_verdict(up, +1) == "agrees"
    assert sign_verdict(up, -1) == "disagrees"
    assert sign_verdict(up[:1], +1) == "cannot tell"  # one seed: training variance unknown
    mixed = up[:2] + [_band(0.3, -0.2, 0.8)]
    assert sign_verdict(mixed, +1) == "cannot tell"
    env = envelope(mixed)
    assert (float(env.point), float(env.lo), float(env.hi)) == pytest.approx((0.7, -0.2, 1.5))
    with pytest.raises(ValueError, match="claimed"):
        sign_verdict(up, 0)
