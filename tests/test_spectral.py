"""Tests of alignkit.spectral against direct numpy SVD formulas and known spectral facts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignkit import spectral
from alignkit.spectral import (
    bootstrap_layer_metrics,
    layer_metrics,
    layer_spectra,
    paired_delta,
    rank_vs_n,
    rankme,
    rankme_from_spectrum,
    renyi_effective_rank,
    renyi_from_spectrum,
    singular_values_from_gram,
    spectrum,
)

INF = float("inf")
ALPHAS = [0.25, 0.5, 1, 1.5, 2, 3, 10, INF]

# ---------------------------------------------------------------------------------------------
# Slow, direct float64 references (numpy SVD of the centred matrix, formulas from the papers)
# ---------------------------------------------------------------------------------------------


def ref_centred(x, center: bool = True) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(0, keepdims=True) if center else x


def ref_sigma(x, center: bool = True) -> np.ndarray:
    return np.linalg.svd(ref_centred(x, center), compute_uv=False)


def ref_rankme(x, eps: float = 1e-7) -> float:
    """Garrido et al. 2023: p_k = sigma_k / ||sigma||_1 + eps (singular values, not variances)."""
    s = ref_sigma(x)
    p = s / s.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_rankme_sigma2(x, eps: float = 1e-7) -> float:
    """The wrong variant some implementations use: p_k from sigma_k^2."""
    s2 = ref_sigma(x) ** 2
    p = s2 / s2.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_renyi(x, alpha: float) -> float:
    """exp(S_alpha), S_alpha = log(sum p^alpha) / (1 - alpha), p = sigma^2 / sum sigma^2.

    Singular values at or below numpy's ``matrix_rank`` tolerance (``sigma_1 * max(n, d) * eps``)
    are round-off (e.g. the direction removed by centring) and are dropped: at small alpha their
    ``p^alpha`` would otherwise weigh in (``(1e-30)^0.25 ~ 1e-8``).
    """
    s = ref_sigma(x)
    s = s[s > s[0] * max(np.shape(x)) * np.finfo(np.float64).eps]
    lam = s**2
    p = lam / lam.sum()
    if alpha == 0:
        return float(np.linalg.matrix_rank(ref_centred(x)))
    if alpha == 1:
        q = p[p > 0]
        return float(np.exp(-np.sum(q * np.log(q))))
    if math.isinf(alpha):
        return float(1.0 / p.max())
    return float(np.sum(p**alpha) ** (1.0 / (1.0 - alpha)))


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def anisotropic(n: int, d: int, seed: int = 0, shift: float = 3.0) -> np.ndarray:
    """Gaussian data with a decaying spectrum (std 1 / (k + 1)^0.7) and a non-zero mean."""
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.arange(1, d + 1) ** 0.7
    return rng.standard_normal((n, d)) * scales @ random_orthogonal(d, rng) + shift


SHAPES = [(120, 40), (30, 90)]  # n > d and n < d


# ---------------------------------------------------------------------------------------------
# Agreement with the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("center", [True, False])
def test_spectrum_matches_svd(n, d, center):
    x = anisotropic(n, d)
    s = spectrum(x, center=center)
    ref = ref_sigma(x, center)
    assert s.dtype == np.float64 and s.shape == (min(n, d),)
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, ref, rtol=0, atol=1e-9 * ref[0])


@pytest.mark.parametrize("n, d", SHAPES)
def test_rankme_matches_reference_and_uses_sigma_not_sigma2(n, d):
    x = anisotropic(n, d)
    got = rankme(x)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, ref_rankme(x), rtol=1e-8)
    # The sigma^2 variant is a different (smaller) number on anisotropic data ...
    assert ref_rankme_sigma2(x) < 0.9 * got
    # ... and without eps it is exactly the Shannon (alpha = 1) Rényi rank of the variances.
    s = spectrum(x)
    np.testing.assert_allclose(rankme_from_spectrum(s**2, eps=0.0), renyi_effective_rank(x, 1),
                               rtol=1e-10)


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_renyi_matches_reference(n, d, alpha):
    x = anisotropic(n, d, seed=1)
    got = renyi_effective_rank(x, alpha)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, ref_renyi(x, alpha), rtol=1e-9)


@pytest.mark.parametrize("n, d", SHAPES)
def test_participation_ratio_is_renyi_2(n, d):
    x = anisotropic(n, d, seed=2)
    lam = ref_sigma(x) ** 2
    pr = renyi_effective_rank(x, 2)
    np.testing.assert_allclose(pr, lam.sum() ** 2 / np.sum(lam**2), rtol=1e-10)
    np.testing.assert_allclose(pr, ref_renyi(x, 2), rtol=1e-10)


def test_list_of_alphas_is_one_spectrum_many_orders():
    x = anisotropic(80, 30, seed=3)
    vec = renyi_effective_rank(x, ALPHAS)
    assert isinstance(vec, np.ndarray) and vec.shape == (len(ALPHAS),)
    np.testing.assert_allclose(vec, [renyi_effective_rank(x, a) for a in ALPHAS], rtol=1e-12)
    # np.inf and float("inf") are the same order; the from-spectrum form agrees.
    assert renyi_effective_rank(x, np.inf) == renyi_effective_rank(x, INF)
    np.testing.assert_allclose(renyi_from_spectrum(spectrum(x), ALPHAS, shape=x.shape), vec,
                               rtol=1e-12)


def test_from_spectrum_forms_are_vectorised():
    s = layer_spectra(np.stack([anisotropic(50, 20, seed=i) for i in range(3)]))
    assert s.shape == (3, 20)
    np.testing.assert_allclose(s[1], spectrum(anisotropic(50, 20, seed=1)), rtol=1e-12)
    np.testing.assert_allclose(rankme_from_spectrum(s), [rankme_from_spectrum(r) for r in s])
    np.testing.assert_allclose(renyi_from_spectrum(s, [0.5, 2]),
                               [renyi_from_spectrum(r, [0.5, 2]) for r in s])
    lam = s**2
    np.testing.assert_allclose(renyi_from_spectrum(s, 2),
                               lam.sum(-1) ** 2 / (lam**2).sum(-1), rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Limits and monotonicity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d", SHAPES)
def test_alpha_one_is_continuous(n, d):
    x = anisotropic(n, d, seed=4)
    at_one = renyi_effective_rank(x, 1)
    for delta, rtol in ((1e-4, 1e-3), (1e-6, 1e-5)):
        lo, hi = renyi_effective_rank(x, [1 - delta, 1 + delta])
        assert lo == pytest.approx(at_one, rel=rtol) and hi == pytest.approx(at_one, rel=rtol)
        assert lo >= at_one >= hi  # and still on the right side (non-increasing in alpha)


def test_alpha_inf_is_one_over_max_p():
    x = anisotropic(100, 25, seed=5)
    lam = ref_sigma(x) ** 2
    assert renyi_effective_rank(x, INF) == pytest.approx(lam.sum() / lam.max(), rel=1e-12)
    # and large finite orders approach it without overflow
    assert renyi_effective_rank(x, 1e6) == pytest.approx(lam.sum() / lam.max(), rel=1e-4)


@pytest.mark.parametrize("n, d, r", [(200, 50, 7), (40, 100, 5)])
def test_alpha_zero_is_numerical_rank_of_centred_matrix(n, d, r):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((n, r)) @ rng.standard_normal((r, d)) + 5.0 * rng.standard_normal(d)
    assert renyi_effective_rank(x, 0) == np.linalg.matrix_rank(ref_centred(x)) == r
    # without centring the mean adds a direction
    assert renyi_effective_rank(x, 0, center=False) == np.linalg.matrix_rank(x) == r + 1


@pytest.mark.parametrize("n, d", SHAPES + [(60, 60)])
def test_renyi_is_non_increasing_in_alpha(n, d):
    x = anisotropic(n, d, seed=7)
    grid = list(np.linspace(0, 4, 41)) + [1 - 1e-6, 1 + 1e-6, 20, INF]
    grid.sort()
    vals = renyi_effective_rank(x, grid)
    assert np.all(np.diff(vals) <= 1e-12 * vals[:-1])
    assert vals[-1] < vals[0]


# ---------------------------------------------------------------------------------------------
# Invariances and known spectra
# ---------------------------------------------------------------------------------------------


def all_metrics(x) -> np.ndarray:
    return np.array([rankme(x), *renyi_effective_rank(x, ALPHAS), renyi_effective_rank(x, 0)])


@pytest.mark.parametrize("n, d", SHAPES)
def test_invariant_to_rotation_and_isotropic_scaling(n, d):
    x = anisotropic(n, d, seed=8)
    base = all_metrics(x)
    q = random_orthogonal(d, np.random.default_rng(9))
    np.testing.assert_allclose(all_metrics(x @ q), base, rtol=1e-8)
    for c in (1e-3, 1e3):
        np.testing.assert_allclose(all_metrics(c * x), base, rtol=1e-10)


def test_isotropic_rank_r_gaussian_has_effective_rank_r():
    n, d, r = 4000, 64, 8
    rng = np.random.default_rng(10)
    x = rng.standard_normal((n, r)) @ random_orthogonal(d, rng)[:r]  # rank r, isotropic inside
    assert renyi_effective_rank(x, 2) == pytest.approx(r, rel=0.1)
    assert rankme(x) == pytest.approx(r, rel=0.1)
    assert renyi_effective_rank(x, 1) == pytest.approx(r, rel=0.1)
    assert renyi_effective_rank(x, 0) == r


@pytest.mark.parametrize("n, d", SHAPES)
def test_single_direction_has_effective_rank_one(n, d):
    rng = np.random.default_rng(11)
    x = np.outer(rng.standard_normal(n), rng.standard_normal(d)) + rng.standard_normal(d)
    # RankMe's eps gives each of the min(n, d) values p ~ eps: entropy += eps (1 - log eps) each.
    eps = 1e-7
    tol = min(n, d) * eps * (1 - math.log(eps)) + 1e-6
    assert 1.0 <= rankme(x, eps=eps) <= 1.0 + tol
    assert rankme(x, eps=0.0) == pytest.approx(1.0, abs=1e-6)
    # Rényi drops eigenvalues below the rank tolerance: exactly one direction is left.
    np.testing.assert_allclose(renyi_effective_rank(x, [0, 0.5, 1, 2, INF]), 1.0, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_input_is_accumulated_in_float64(dtype):
    x = torch.from_numpy(anisotropic(300, 48, seed=12)).to(dtype)
    x64 = x.double().numpy()  # the values actually stored
    np.testing.assert_allclose(rankme(x), ref_rankme(x64), rtol=1e-8)
    np.testing.assert_allclose(renyi_effective_rank(x, [0.5, 2, INF]),
                               [ref_renyi(x64, a) for a in (0.5, 2, INF)], rtol=1e-8)
    if dtype == torch.float16:
        np.testing.assert_allclose(rankme(x.numpy()), ref_rankme(x64), rtol=1e-8)
        stack = layer_metrics(x[None])
        np.testing.assert_allclose(stack["rankme"], [ref_rankme(x64)], rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# Per-layer tables, bootstrap, paired Δ, rank vs n
# ---------------------------------------------------------------------------------------------


def stack(n_layers: int, n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.stack([anisotropic(n, d, seed=seed + i) for i in range(n_layers)])


@pytest.mark.parametrize("n, d", SHAPES)
def test_layer_metrics_matches_per_matrix_functions(n, d):
    acts = stack(3, n, d)
    table = layer_metrics(torch.from_numpy(acts))
    assert list(table) == ["rankme", "alpha_req", "renyi_0.5", "renyi_1", "renyi_2", "renyi_inf"]
    for key in table:
        assert table[key].shape == (3,) and table[key].dtype == np.float64
    np.testing.assert_allclose(table["rankme"], [ref_rankme(x) for x in acts], rtol=1e-8)
    for got, x in zip(table["alpha_req"], acts):  # a log-log line fit of the eigenvalues
        lam = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2  # descending
        lam = lam[lam > lam[0] * max(n, d) * np.finfo(float).eps]
        slope = np.polyfit(np.log(np.arange(1, len(lam) + 1)), np.log(lam), 1)[0]
        assert got == pytest.approx(-slope, rel=1e-6)
    for a in (0.5, 1, 2, INF):
        np.testing.assert_allclose(table[spectral.metric_key(a)],
                                   [ref_renyi(x, a) for x in acts], rtol=1e-9)


@pytest.mark.parametrize("n, d, scheme", [(40, 100, "subsample"), (150, 20, "subsample"),
                                          (40, 100, "resample"), (150, 20, "resample")])
def test_bootstrap_samples_are_metrics_of_the_resampled_rows(n, d, scheme):
    """The Gram path (m <= d: G[idx][:, idx], double-centred) and covariance path are exact."""
    acts = stack(2, n, d, seed=20)
    out = bootstrap_layer_metrics(acts, alphas=(0, 0.5, 2), n_boot=5, seed=3, scheme=scheme)
    rng, m = np.random.default_rng(3), (n if scheme == "resample" else round(0.8 * n))
    if scheme == "resample":  # the documented draws: n rows with replacement, or m distinct rows
        rows = rng.integers(0, n, size=(5, n))
    else:
        rows = np.stack([rng.permutation(n)[:m] for _ in range(5)])
    assert out["rankme"]["m"] == m
    for b in (0, 4):
        direct = layer_metrics(acts[:, rows[b]], alphas=(0, 0.5, 2))
        for key, val in direct.items():
            np.testing.assert_allclose(out[key]["samples"][b], val, rtol=1e-8, err_msg=key)
    np.testing.assert_allclose(out["renyi_2"]["point"], layer_metrics(acts, (2,))["renyi_2"])


def test_bootstrap_interval_contains_point_and_matches_sampling_spread():
    # 150 independent "layers" drawn from one distribution: their spread is the true sampling sd.
    n_layers, n, d = 150, 120, 16
    rng = np.random.default_rng(30)
    scales = 1.0 / np.arange(1, d + 1) ** 0.7
    acts = rng.standard_normal((n_layers, n, d)) * scales
    out = bootstrap_layer_metrics(acts, alphas=(1, 2), n_boot=60, seed=1)
    for key in ("rankme", "renyi_1", "renyi_2"):
        res = out[key]
        assert np.all(res["lo"] < res["point"]) and np.all(res["point"] < res["hi"])
        boot_sd = np.mean(res["hi"] - res["lo"]) / (2 * 1.96)
        true_sd = res["point"].std()
        assert 0.6 < boot_sd / true_sd < 1.6, (key, boot_sd, true_sd)
    # subsamples (80 %) of data with n not >> d sit lower than the full sample: the interval
    # is centred on the point estimate regardless
    assert np.all(out["rankme"]["mean"] < out["rankme"]["point"])


def test_bootstrap_with_replacement_is_biased_low_but_interval_is_centred():
    acts = stack(2, 40, 100, seed=40)
    out = bootstrap_layer_metrics(acts, alphas=(1,), n_boot=30, scheme="resample")
    res = out["rankme"]
    assert np.all(res["samples"].max(0) < res["point"])  # duplicates lose distinct rows
    assert np.all(res["lo"] < res["point"]) and np.all(res["point"] < res["hi"])


def test_rank_vs_n_is_capped_by_n_and_ends_at_the_full_sample():
    acts = np.random.default_rng(60).standard_normal((2, 200, 64))  # isotropic: rank grows with n
    ns = [4, 16, 64, 200]
    out = rank_vs_n(acts, ns, n_repeats=2)
    assert out["rankme"].shape == (4, 2)
    np.testing.assert_array_equal(out["cap"], [3, 15, 63, 64])
    assert np.all(out["rankme"] <= out["cap"][:, None] + 1e-3)
    assert np.all(np.diff(out["rankme"], axis=0) > 0)
    np.testing.assert_allclose(out["rankme"][-1], layer_metrics(acts)["rankme"], rtol=1e-10)
    np.testing.assert_allclose(out["rankme_std"][-1], 0.0, atol=1e-10)
    with pytest.raises(ValueError, match=r"every n must be in \[2, 200\], got 1"):
        rank_vs_n(acts, [1, 10])


# ---------------------------------------------------------------------------------------------
# Errors at the boundary
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    good = anisotropic(10, 4)
    with pytest.raises(ValueError, match="needs at least 2 rows, got 1"):
        rankme(good[:1])
    nan = good.copy()
    nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="contains NaN"):
        rankme(nan)
    inf = good.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="contains Inf"):
        renyi_effective_rank(inf, 2)
    with pytest.raises(ValueError, match=r"expected a 2-D \[n, d\] matrix, got shape \(5,\)"):
        spectrum(np.ones(5))
    with pytest.raises(ValueError, match="alpha must be >= 0, got -1"):
        renyi_effective_rank(good, -1)
    with pytest.raises(ValueError, match="alpha must be >= 0, got -0.5"):
        renyi_effective_rank(good, [1, -0.5])
    with pytest.raises(ValueError, match="zero variance"):
        rankme(np.tile(good[:1], (6, 1)))  # identical rows
    with pytest.raises(ValueError, match="zero variance"):
        renyi_effective_rank(np.zeros((6, 3)), 2, center=False)
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        rankme([[1.0, 2.0], [3.0, 4.0]])


def test_stack_errors_name_the_layer():
    acts = stack(3, 12, 5)
    bad = acts.copy()
    bad[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="acts layer 1 contains NaN"):
        layer_metrics(bad)
    const = acts.copy()
    const[2] = const[2, :1]
    with pytest.raises(ValueError, match="acts layer 2 has zero variance"):
        bootstrap_layer_metrics(const, n_boot=3)
    with pytest.raises(ValueError, match=r"expected a 3-D \[n_layers, n, d\] stack"):
        layer_metrics(acts[0])
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        layer_metrics(acts, alphas=(1, -2))
    with pytest.raises(ValueError, match=r"subsampling 0.99 of 12 rows keeps 12; the subsample "
                       r"bootstrap needs 2 <= m < n \(use more rows or another frac\)"):
        bootstrap_layer_metrics(acts, n_boot=3, frac=0.99)


def test_paired_delta_interval():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 120, 16))
    b = a.copy()
    b[1, :, :8] *= 3.0  # layer 1: variance concentrated -> lower effective rank
    ba = bootstrap_layer_metrics(a, alphas=(1,), n_boot=40, seed=0)
    bb = bootstrap_layer_metrics(b, alphas=(1,), n_boot=40, seed=0)
    d = paired_delta(bb, ba)["rankme"]
    assert d["point"][0] == 0 and d["lo"][0] == 0 and d["hi"][0] == 0  # identical layer: zero width
    assert d["hi"][1] < 0 and d["lo"][1] <= d["point"][1] <= d["hi"][1]
    other = bootstrap_layer_metrics(a, alphas=(1,), n_boot=20, seed=0)
    with pytest.raises(ValueError, match="bootstraps differ"):
        paired_delta(other, ba)


def test_paired_delta_point_is_the_difference_of_points():
    """Every metric of the tuned bootstrap, its point minus the base point; unknown metrics fail."""
    acts = stack(3, 60, 20, seed=50)
    base = bootstrap_layer_metrics(acts, n_boot=3)
    tuned = bootstrap_layer_metrics(acts[:, :, :10], n_boot=3)
    delta = paired_delta(tuned, base)
    assert set(delta) == set(base)
    for key in base:
        np.testing.assert_array_equal(delta[key]["point"], tuned[key]["point"] - base[key]["point"])
    same = paired_delta(base, base)
    np.testing.assert_allclose(same["renyi_2"]["point"], 0.0, atol=1e-10)
    with pytest.raises(ValueError, match="renyi_3: the base bootstrap has no such metric"):
        paired_delta(bootstrap_layer_metrics(acts, alphas=(3,), n_boot=3), base)


def test_singular_values_from_gram_zeroes_round_off():
    lam = torch.tensor([-1e-18, 1e-20, 0.25, 4.0], dtype=torch.float64)  # ascending, as eigvalsh
    np.testing.assert_array_equal(singular_values_from_gram(lam, (3, 4)), [2.0, 0.5, 0.0, 0.0])
    x = anisotropic(30, 12)
    xc = torch.from_numpy(ref_centred(x))
    s = singular_values_from_gram(torch.linalg.eigvalsh(xc.T @ xc), x.shape)
    np.testing.assert_allclose(s, ref_sigma(x), rtol=0, atol=1e-9 * ref_sigma(x)[0])
