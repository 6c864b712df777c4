"""Tests of alignkit.cka against slow, direct float64 references and known CKA facts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.cka import centred_gram, cka_matrix, hsic, layerwise_cka, linear_cka

# ---------------------------------------------------------------------------------------------
# Slow, direct float64 references (numpy only, written from the papers' formulas)
# ---------------------------------------------------------------------------------------------


def ref_hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """HSIC_0 = tr(K H L H) / (n-1)^2 with the explicit centring matrix H."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def ref_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, written out term by term."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float(term1 + term2 - term3) / (n * (n - 3))


def ref_cka(x, y, debiased: bool = False) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    k, l = x @ x.T, y @ y.T
    hsic = ref_hsic_unbiased if debiased else ref_hsic_biased
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def ref_matrix(a, b, debiased: bool = False) -> np.ndarray:
    return np.array([[ref_cka(x, y, debiased) for y in b] for x in a])


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def related_stacks(n_layers=3, n=60, d=(20, 80), seed=0, noise=1.0):
    """Two stacks with layer-dependent relations; stack b is wider than n when d[1] > n."""
    rs = np.random.default_rng(seed)
    a = rs.standard_normal((n_layers, n, d[0])) + 3.0  # non-zero mean on purpose
    mix = rs.standard_normal((n_layers, d[0], d[1]))
    b = a @ mix + noise * rs.standard_normal((n_layers, n, d[1])) * np.arange(1, n_layers + 1)[
        :, None, None]
    return a, b


def ref_u_centre(k: np.ndarray) -> np.ndarray:
    """U-centred Gram (Szekely & Rizzo 2014): <U(K), U(L)> = n (n-3) HSIC_1 (Song et al.)."""
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    rows = kt.sum(1)
    u = kt - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + kt.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def ref_centred_matrix(a, b, debiased: bool) -> np.ndarray:
    """CKA matrix from double-centred (biased) or U-centred (debiased) Grams, in float64."""
    n = a.shape[1]
    h = np.eye(n) - np.ones((n, n)) / n

    def grams(stack):
        out = [x @ x.T for x in np.asarray(stack, dtype=np.float64)]
        return np.stack([ref_u_centre(k) if debiased else h @ k @ h for k in out]).reshape(
            len(out), -1)

    ga, gb = grams(a), grams(b)
    return (ga @ gb.T) / np.sqrt(np.outer((ga * ga).sum(1), (gb * gb).sum(1)))


def ref_feature_cka(x, y, debiased: bool = False) -> float:
    """Feature-space form, no n x n matrix: ||Yc'Xc||^2 / (||Xc'Xc|| ||Yc'Yc||) (biased); the
    debiased one from tr(K~L~) = ||X'Y||^2 - sum k_i l_i, 1'K~1 = ||sum x_i||^2 - sum k_i,
    1'K~L~1 = sum_i (x_i.s_x - k_i)(y_i.s_y - l_i) (k_i = ||x_i||^2)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]

    def h(p, q):
        if not debiased:
            return np.square(q.T @ p).sum()
        kp, kq = np.square(p).sum(1), np.square(q).sum(1)
        sp, sq = p.sum(0), q.sum(0)
        tr = np.square(p.T @ q).sum() - (kp * kq).sum()
        ones = ((p @ sp - kp) * (q @ sq - kq)).sum()
        return (tr + (sp @ sp - kp.sum()) * (sq @ sq - kq.sum()) / ((n - 1) * (n - 2))
                - 2.0 * ones / (n - 2))

    return float(h(x, y) / np.sqrt(h(x, x) * h(y, y)))


# ---------------------------------------------------------------------------------------------
# Golden values and reference agreement
# ---------------------------------------------------------------------------------------------


def test_notes_golden_values():
    rs = np.random.RandomState(1337)
    X = rs.randn(100, 10)
    Y = rs.randn(100, 10) + X
    assert linear_cka(X, Y) == pytest.approx(0.55761, abs=5e-6)
    assert linear_cka(X, Y, debiased=True) == pytest.approx(0.51346, abs=5e-6)
    assert linear_cka(X, Y) == pytest.approx(ref_cka(X, Y), abs=1e-12)
    assert linear_cka(X, Y, debiased=True) == pytest.approx(ref_cka(X, Y, True), abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d1,d2", [(50, 8, 12), (30, 45, 7), (20, 40, 60), (6, 3, 9)])
def test_linear_cka_matches_reference_and_both_forms_agree(n, d1, d2, debiased):
    x = rand(n, d1, seed=1) + 2.0
    y = x @ rand(d1, d2, seed=2) + rand(n, d2, seed=3)
    expected = ref_cka(x, y, debiased)
    assert ref_feature_cka(x, y, debiased) == pytest.approx(expected, abs=1e-12)
    got = linear_cka(x, y, debiased)
    assert isinstance(got, float) and got == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_hsic_from_four_sums(debiased):
    x, y = rand(15, 4, seed=4), rand(15, 6, seed=5)
    k, l = x @ x.T, y @ y.T
    n = k.shape[0]
    if debiased:  # the sums are over the zero-diagonal Grams
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(l, 0.0)
    got = hsic(n, np.trace(k @ l), k.sum(), l.sum(), (k.sum(1) * l.sum(1)).sum(), debiased)
    if debiased:
        x_, y_ = x @ x.T, y @ y.T
        assert got == pytest.approx(ref_hsic_unbiased(x_, y_), rel=1e-10)
        assert got == pytest.approx((ref_u_centre(x_) * ref_u_centre(y_)).sum() / (n * (n - 3)),
                                    rel=1e-10)
    else:  # tr(K H L H) / n^2
        assert got == pytest.approx(ref_hsic_biased(k, l) * (n - 1) ** 2 / n**2, rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_equals_centring_reference(debiased):
    a, b = related_stacks(3, 60, (20, 80))
    expected = ref_centred_matrix(a, b, debiased)
    assert np.abs(cka_matrix(a, b, debiased) - expected).max() < 1e-10
    assert np.abs(cka_matrix(a.astype(np.float32), b.astype(np.float32), debiased)
                  - ref_centred_matrix(a.astype(np.float32), b.astype(np.float32),
                                       debiased)).max() < 1e-6


def test_centred_gram():
    x = rand(30, 5, seed=6) + 10.0
    xc = x - x.mean(0)
    for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        g = centred_gram(torch.from_numpy(x), dt, "x")
        assert g.dtype == dt and np.abs(g.double().numpy() - xc @ xc.T).max() < tol * 5
    tiny = centred_gram(torch.from_numpy(x * 1e-15).float(), torch.float32, "x").double().numpy()
    assert np.abs(tiny / np.trace(tiny) - xc @ xc.T / np.trace(xc @ xc.T)).max() < 1e-6
    with pytest.raises(ValueError, match="x has zero variance"):
        centred_gram(torch.ones(5, 3), torch.float32, "x")


# ---------------------------------------------------------------------------------------------
# Invariances and known facts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased):
    x = rand(40, 12, seed=6)
    y = x[:, :8] + 0.5 * rand(40, 8, seed=7)
    base = linear_cka(x, y, debiased)
    q, _ = np.linalg.qr(rand(12, 12, seed=8))
    assert linear_cka(x @ q, y, debiased) == pytest.approx(base, abs=1e-12)  # rotation
    for s in (1e-3, 1e3, 7.5):  # isotropic scaling
        assert linear_cka(s * x, y, debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x + 100.0, y, debiased) == pytest.approx(base, abs=1e-9)  # translation
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)
    # Same with d > n.
    xw = rand(20, 50, seed=9)
    yw = xw @ rand(50, 30, seed=10)
    base_w = linear_cka(xw, yw, debiased)
    qw, _ = np.linalg.qr(rand(50, 50, seed=11))
    assert linear_cka(xw @ qw, 1e3 * yw, debiased) == pytest.approx(base_w, abs=1e-12)
    assert linear_cka(xw, xw, debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_scale_invariant_in_float32(debiased):
    a, b = related_stacks(2, 40, (16, 50))
    a, b = a.astype(np.float32), b.astype(np.float32)
    base = cka_matrix(a, b, debiased)
    for s in (1e-3, 1e3, 1e-15, 1e15):  # the extremes go through the rescaling path
        assert np.abs(cka_matrix(a * np.float32(s), b, debiased) - base).max() < 1e-6
    assert np.allclose(np.diag(cka_matrix(a, a, debiased)), 1.0, atol=1e-6)


def test_independent_data_debiased_near_zero_biased_not():
    rs = np.random.default_rng(12)
    x, y = rs.standard_normal((512, 1024)), rs.standard_normal((512, 1024))
    biased, unbiased = linear_cka(x, y), linear_cka(x, y, debiased=True)
    assert biased > 0.5 and biased == pytest.approx(0.667, abs=0.02)
    assert abs(unbiased) < 0.02


def test_debiased_can_be_negative_and_is_not_clamped():
    vals = [linear_cka(rand(30, 5, seed=s), rand(30, 5, seed=100 + s), debiased=True)
            for s in range(10)]
    assert min(vals) < 0.0


# ---------------------------------------------------------------------------------------------
# Matrix, layerwise, precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_equals_pairwise_loop(debiased):
    a, b = related_stacks(3, 60, (20, 80))
    b = np.concatenate([b, b[:1] * 2.0 + 1.0])  # 4 layers in b
    loop = np.array([[linear_cka(x, y, debiased) for y in b] for x in a])
    m64 = cka_matrix(a, b, debiased)
    assert m64.shape == (3, 4) and m64.dtype == np.float64
    assert np.abs(m64 - loop).max() < 1e-10
    assert np.abs(loop - ref_matrix(a, b, debiased)).max() < 1e-10
    m32 = cka_matrix(torch.from_numpy(a).float(), torch.from_numpy(b).float(), debiased)
    assert np.abs(m32 - loop).max() < 1e-6
    chunked = cka_matrix(a, b, debiased, max_gram_bytes=1)  # one layer per chunk
    assert np.abs(chunked - m64).max() < 1e-12


@pytest.mark.parametrize("debiased", [False, True])
def test_layerwise_equals_diagonal(debiased):
    a, b = related_stacks(3, 50, (30, 70))
    full = cka_matrix(a, b, debiased)
    assert np.abs(layerwise_cka(a, b, debiased) - np.diag(full)).max() < 1e-12
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    assert np.abs(layerwise_cka(a32, b32, debiased) - np.diag(full)).max() < 1e-6
    with pytest.raises(ValueError, match="same number of layers.*3.*2"):
        layerwise_cka(a, b[:2])


def test_low_precision_inputs():
    a, b = related_stacks(2, 40, (16, 24))
    a, b = a.astype(np.float32), b.astype(np.float32)
    expected = cka_matrix(a, b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for dt, tol in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        got = cka_matrix(ta.to(dt), tb.to(dt))
        assert got.dtype == np.float64 and np.abs(got - expected).max() < tol
        assert np.abs(layerwise_cka(ta.to(dt), tb.to(dt), True)
                      - layerwise_cka(a, b, True)).max() < 2 * tol
    assert np.abs(cka_matrix(a.astype(np.float16), b.astype(np.float16)) - expected).max() < 5e-3
    assert linear_cka(ta[0].half(), tb[0].half()) == pytest.approx(expected[0, 0], abs=5e-3)


# ---------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_offending_value():
    x, y = rand(10, 3), rand(10, 4)
    with pytest.raises(ValueError, match="X has 10 rows, Y has 9"):
        linear_cka(x, y[:9])
    with pytest.raises(ValueError, match="at least 4 examples for the debiased estimator, got 3"):
        linear_cka(x[:3], y[:3], debiased=True)
    with pytest.raises(ValueError, match="at least 2 examples, got 1"):
        linear_cka(x[:1], y[:1])
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        linear_cka(bad, y)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="X contains Inf"):
        linear_cka(bad, y)
    const = np.tile(rand(1, 3), (10, 1))
    with pytest.raises(ValueError, match="X has zero variance"):
        linear_cka(const, y)
    with pytest.raises(ValueError, match="Y has zero variance"):
        linear_cka(x, np.tile(rand(1, 40), (10, 1)), debiased=True)  # Gram path
    with pytest.raises(ValueError, match="X must be 2-D .* got shape \\(2, 10, 3\\)"):
        linear_cka(x[None].repeat(2, 0), y)
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        linear_cka(x.tolist(), y)


def test_stack_errors_name_the_layer():
    a, b = related_stacks(3, 20, (5, 6))
    b_nan = b.copy()
    b_nan[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"acts_b layer 2 contains NaN"):
        cka_matrix(a, b_nan)
    a_inf = a.astype(np.float32)
    a_inf[1, 3, 2] = np.inf
    with pytest.raises(ValueError, match=r"acts_a layer 1 contains Inf"):
        layerwise_cka(a_inf, b)
    a_const = a.astype(np.float32)
    a_const[1] = a_const[1, :1]  # every row of layer 1 identical (e.g. last-token embeddings)
    with pytest.raises(ValueError, match="acts_a layer 1 has zero variance"):
        cka_matrix(a_const, b.astype(np.float32))
    with pytest.raises(ValueError, match="acts_a has 20 rows, acts_b has 19"):
        cka_matrix(a, b[:, :19])
    with pytest.raises(ValueError, match="3-D .* got shape \\(20, 5\\)"):
        cka_matrix(a[0], b)
    with pytest.raises(ValueError, match="at least 4 examples for the debiased estimator, got 3"):
        cka_matrix(a[:, :3], b[:, :3], debiased=True)
    with pytest.raises(ValueError, match="gram_dtype must be torch.float32 or torch.float64"):
        cka_matrix(a, b, gram_dtype=torch.float16)


def test_numpy_and_torch_inputs_agree():
    a, b = related_stacks(2, 30, (8, 40))
    assert np.array_equal(cka_matrix(a, b), cka_matrix(torch.from_numpy(a), torch.from_numpy(b)))
