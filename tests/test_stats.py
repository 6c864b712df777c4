"""The summaries shared by the reports: fraction of the mean gap, tied best candidates, McNemar,
and the across-seed verdict rule (the seed as the unit), each against a slow reference or a case
with a known answer."""

import math
from fractions import Fraction

import numpy as np
import pytest

from alignkit.stats import (
    Band,
    argmax_frequencies,
    bootstrap_mean,
    gap_fraction,
    mcnemar,
    seed_interval,
    seed_verdict,
    sides,
    t_quantile,
    versus_reference,
)


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


def test_argmax_frequencies_say_how_sure_the_best_is():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (60, 1))
    # columns 2 and 3 equal in expectation (noise only), column 0 far below, column 1 slightly below
    values = np.hstack([base - 5, base + 1.0 + rng.normal(0, 0.05, (60, 1)),
                        base + 2 + rng.normal(0, 0.5, (60, 1)),
                        base + 2 + rng.normal(0, 0.5, (60, 1))])
    freq = argmax_frequencies(values, n_boot=500)
    assert freq.sum() == pytest.approx(1.0) and freq[0] == 0 and freq[1] == 0
    assert 0.2 < freq[2] < 0.8 and 0.2 < freq[3] < 0.8  # a tie: neither is sure
    # a slow reference: the same resamples (multinomial counts per example), one at a time
    counts = np.random.default_rng(0).multinomial(60, np.full(60, 1 / 60), size=500)
    slow = np.bincount([int(np.argmax(values[np.repeat(np.arange(60), c)].mean(0))) for c in counts],
                       minlength=4) / 500
    np.testing.assert_allclose(freq, slow)
    v = rng.normal(0, 0.1, (30, 2, 3))
    v[:, 0, 1] += 3.0  # receiver 0: donor 1 clearly best
    v[:, 1, 2] = np.nan  # receiver 1: donor 2 never measured
    v[:, 1, 0] += 3.0
    np.testing.assert_allclose(argmax_frequencies(v, n_boot=200), [[0, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="all NaN"):
        argmax_frequencies(np.full((5, 2), np.nan), n_boot=10)


def test_versus_reference_intervals_are_simultaneous():
    rng = np.random.default_rng(1)
    n, k = 40, 12
    # under the null (every column equal to the reference in expectation), how often does some
    # column's interval exclude 0? simultaneous: about 5 % of rows; one-at-a-time: far more
    rows = rng.normal(0, 1, (n, 200, k)) + rng.normal(0, 1, (n, 200, 1))
    vs = versus_reference(rows, np.zeros(200, int), n_boot=400)
    any_excl = ((vs["lo"] > 0) | (vs["hi"] < 0)).any(-1).mean()
    assert any_excl < 0.12, any_excl
    one = bootstrap_mean(rows - rows[..., :1], n_boot=400)
    assert ((one["lo"] > 0) | (one["hi"] < 0)).any(-1).mean() > 2 * any_excl
    np.testing.assert_array_equal(vs["point"][:, 0], 0)
    np.testing.assert_array_equal(vs["lo"][:, 0], 0)
    # a planted remapping: donor 3 beats the own layer (2) by 1 nat, the rest equal to it
    v = rng.normal(0, 0.3, (n, 1, k))
    v[:, 0, 3] += 1.0
    vs = versus_reference(v, np.array([2]), n_boot=400)
    assert vs["lo"][0, 3] > 0 and vs["point"][0, 3] == pytest.approx(1.0, abs=0.25)
    assert (vs["lo"][0] > 0).sum() <= 2  # a null donor may cross at the family-wise rate
    with pytest.raises(ValueError, match="versus_reference needs"):
        versus_reference(v, np.array([2, 3]))


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


def test_mcnemar_is_exact_beyond_a_thousand_discordant_pairs():
    """The old ``int / 2.0**m`` overflowed at m >= 1,024; exact rational arithmetic is the
    reference."""
    for only_a, only_b in ((500, 600), (1000, 1100), (3000, 3001)):
        a = np.array([True] * only_a + [False] * only_b)
        r = mcnemar(a, ~a)
        m, k = only_a + only_b, min(only_a, only_b)
        exact = min(Fraction(1), 2 * Fraction(sum(math.comb(m, i) for i in range(k + 1)), 2**m))
        assert r["p"] == pytest.approx(float(exact), rel=1e-9)
    assert 0 < mcnemar(np.array([True] * 1000 + [False] * 1100),
                       np.array([False] * 1000 + [True] * 1100))["p"] < 0.05


def test_t_quantile_matches_closed_forms_and_tables():
    for q in (0.9, 0.975, 0.995):
        assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-9)
        assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)),
                                                 rel=1e-9)
    assert t_quantile(0.975, 4) == pytest.approx(2.776445105, rel=1e-8)  # Student's table
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959966, rel=1e-5)  # the normal's
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)


def _band(point, lo, hi):
    return Band(np.float64(point), np.float64(lo), np.float64(hi))


def test_seed_interval_is_students_t_over_the_seeds():
    b = seed_interval([1.0, 2.0, 3.0])
    half = 4.302652730 / math.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert (float(b.point), float(b.lo), float(b.hi)) == pytest.approx((2, 2 - half, 2 + half))
    one = seed_interval([0.7])
    assert float(one.point) == 0.7 and np.isnan(float(one.lo)) and np.isnan(float(one.hi))
    with pytest.raises(ValueError, match="finite"):
        seed_interval([1.0, np.nan])


def test_seed_verdict_with_opposite_seeds_zero_effects_and_one_seed():
    assert seed_verdict([1.0, 1.1, 0.9], +1) == "agrees"
    assert seed_verdict([1.0, 1.1, 0.9], -1) == "disagrees"
    assert seed_verdict([2.0, -1.5, 1.8], +1) == "inconclusive (3 seeds)"  # a seed opposite
    assert seed_verdict([0.01, -0.02, 0.0], +1) == "inconclusive (3 seeds)"  # no effect
    assert seed_verdict([5.0], +1) == "inconclusive (1 seed)"  # training noise unknown
    with pytest.raises(ValueError, match="claimed"):
        seed_verdict([1.0, 2.0], 0)


def test_seed_verdict_false_agreement_rate_under_the_null():
    """Mean effect 0, per-run spread 1: the old rule (every seed's interval of half-width 0.2 on
    the claimed side) agreed in ~18 % of 2-seed draws; the t rule at most 2.5 %."""
    g = np.random.default_rng(0)
    for n in (2, 3):
        draws = g.normal(size=(4000, n))
        rate = np.mean([seed_verdict(d, +1) == "agrees" for d in draws])
        old = np.mean([(d - 0.2 > 0).all() for d in draws])
        assert rate < 0.035 and old > 0.07


def test_sides_names_seeds_above_below_and_straddling():
    bands = [_band(1.0, 0.5, 1.5), _band(-1.0, -1.5, -0.5), _band(0.3, -0.2, 0.8)]
    assert sides(bands) == "1 above, 1 below, 1 straddle 0 (3 seeds)"
    assert sides(bands[:1]) == "1 above, 0 below, 0 straddle 0 (1 seed)"
