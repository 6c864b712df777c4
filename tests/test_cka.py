"""Tests of alignkit.cka against slow, direct float64 references and known CKA facts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit import cka
from alignkit.cka import (
    StreamingCKA,
    alignment_path,
    best_match,
    bootstrap_layerwise_cka,
    cka_matrix,
    first_departure,
    layerwise_cka,
    linear_cka,
    noise_floor,
    permutation_baseline,
    remapping_index,
    transition_layer,
    transition_layer_bootstrap,
)

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
    feature = linear_cka(x, y, debiased, method="feature")
    gram = linear_cka(x, y, debiased, method="gram")
    assert feature == pytest.approx(gram, abs=1e-12)
    assert linear_cka(x, y, debiased) == pytest.approx(expected, abs=1e-10)
    assert isinstance(feature, float)


def test_u_centred_inner_product_is_song_estimator():
    x, y = rand(15, 4, seed=4), rand(15, 6, seed=5)
    k, l = x @ x.T, y @ y.T
    ku = cka._hsic_gram_(torch.from_numpy(k), debiased=True).numpy()
    lu = cka._hsic_gram_(torch.from_numpy(l), debiased=True).numpy()
    n = k.shape[0]
    assert (ku * lu).sum() / (n * (n - 3)) == pytest.approx(ref_hsic_unbiased(k, l), rel=1e-10)


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
    # Same in Gram space, d > n.
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
# Matrix, layerwise, streaming
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


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("batch", [1, 7, 16, 50])
def test_streaming_equals_full(batch, debiased):
    a, b = related_stacks(3, 50, (12, 9), seed=13)
    a = a + 50.0  # large offset: the streamed sums must not lose it to cancellation
    layer = StreamingCKA(debiased=debiased)
    matrix = StreamingCKA(debiased=debiased, pairs="matrix")
    single = StreamingCKA(debiased=debiased)
    for s in range(0, 50, batch):  # the last batch is shorter for 7 and 16
        layer.update(a[:, s:s + batch], b[:, s:s + batch])
        matrix.update(torch.from_numpy(a[:, s:s + batch]), b[:2, s:s + batch])
        single.update(a[0, s:s + batch], b[0, s:s + batch])
    assert layer.n == 50
    expected = np.array([linear_cka(a[i], b[i], debiased) for i in range(3)])
    assert np.abs(layer.compute() - expected).max() < 1e-10
    # (The direct reference itself loses ~1e-8 to the +50 offset here, so compare with the
    # pairwise loop, which test_cka_matrix_equals_pairwise_loop ties to the reference.)
    loop = np.array([[linear_cka(x, y, debiased) for y in b[:2]] for x in a])
    assert np.abs(matrix.compute() - loop).max() < 1e-10
    assert np.abs(matrix.compute() - ref_matrix(a - 50.0, b[:2], debiased)).max() < 1e-10
    value = single.compute()
    assert isinstance(value, float) and value == pytest.approx(expected[0], abs=1e-10)


def test_streaming_is_not_an_average_of_batch_ckas():
    a, b = related_stacks(1, 40, (5, 5), seed=14)
    stream = StreamingCKA().update(a[:, :20], b[:, :20]).update(a[:, 20:], b[:, 20:])
    halves = np.mean([linear_cka(a[0, :20], b[0, :20]), linear_cka(a[0, 20:], b[0, 20:])])
    assert stream.compute()[0] == pytest.approx(linear_cka(a[0], b[0]), abs=1e-12)
    assert abs(stream.compute()[0] - halves) > 1e-3


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
    with pytest.raises(ValueError, match="acts_a layer 1 has zero variance"):
        StreamingCKA().update(a_const, b).compute()
    with pytest.raises(ValueError, match="acts_a has 20 rows, acts_b has 19"):
        cka_matrix(a, b[:, :19])
    with pytest.raises(ValueError, match="3-D .* got shape \\(20, 5\\)"):
        cka_matrix(a[0], b)
    with pytest.raises(ValueError, match="at least 4 examples for the debiased estimator, got 3"):
        cka_matrix(a[:, :3], b[:, :3], debiased=True)
    with pytest.raises(ValueError, match="at least 4 examples for the debiased estimator, got 3"):
        StreamingCKA(debiased=True).update(a[:, :3], b[:, :3]).compute()
    stream = StreamingCKA().update(a, b)
    with pytest.raises(ValueError, match="acts_a batch has 2 layers x 5 features"):
        stream.update(a[:2], b[:2])


# ---------------------------------------------------------------------------------------------
# Layer correspondence and transitions
# ---------------------------------------------------------------------------------------------


def test_correspondence_on_identity():
    eye = np.eye(6)
    assert best_match(eye).tolist() == list(range(6))
    assert alignment_path(eye) == [(i, i) for i in range(6)]
    assert remapping_index(eye) == 0.0


def test_correspondence_on_shifted_band():
    n_layers = 6
    m = np.zeros((n_layers, n_layers))
    for i in range(n_layers):
        m[i, min(i + 1, n_layers - 1)] = 1.0  # base layer i looks like tuned layer i + 1
    assert best_match(m).tolist() == [1, 2, 3, 4, 5, 5]
    assert remapping_index(m) == pytest.approx(5 / 6)
    assert alignment_path(m) == [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 5)]
    rect = alignment_path(np.random.default_rng(0).random((4, 7)))
    assert rect[0] == (0, 0) and rect[-1] == (3, 6)
    steps = np.diff(np.array(rect), axis=0)
    assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(1) >= 1).all()
    with pytest.raises(ValueError, match="square"):
        remapping_index(np.zeros((3, 4)))


def test_transition_layer_on_hand_curve():
    curve = [1.0, 0.99, 0.98, 0.9, 0.6, 0.55, 0.5]
    assert transition_layer(curve) == 4  # the drop 0.9 -> 0.6 happens entering layer 4
    assert transition_layer(np.array([0.2, 0.9])) == 1
    with pytest.raises(ValueError, match="at least 2 layers"):
        transition_layer([1.0])


def test_first_departure():
    steps = [0, 100, 200, 300]
    by_step = np.array([[1.0, 1.0, 1.0], [0.99, 0.9, 1.0], [0.95, 0.85, 1.0], [0.8, 0.97, 1.0]])
    got = first_departure(steps, by_step, np.array([0.9, 0.95, 0.9]))
    assert got.tolist() == [300, 100, -1]
    assert first_departure(steps, by_step, 0.0).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="strictly increasing"):
        first_departure([0, 200, 100, 300], by_step, 0.9)


# ---------------------------------------------------------------------------------------------
# Controls: bootstrap, noise floor, permutation baseline
# ---------------------------------------------------------------------------------------------


def drifting_stacks(n, n_layers=4, d=16, seed=0, drop_at=None):
    """Base/tuned stacks whose similarity falls with depth (sharply at ``drop_at`` if given)."""
    rs = np.random.default_rng(seed)
    a = rs.standard_normal((n_layers, n, d))
    noise = np.linspace(0.3, 1.2, n_layers)
    if drop_at is not None:
        noise = np.where(np.arange(n_layers) < drop_at, 0.3, 3.0)
    return a, a + noise[:, None, None] * rs.standard_normal((n_layers, n, d))


@pytest.mark.parametrize("debiased", [False, True])
def test_weighted_resample_equals_explicit_resample(debiased):
    a, b = drifting_stacks(30)
    rs = np.random.default_rng(1)
    if debiased:  # half-sample without replacement
        idx = np.sort(rs.permutation(30)[:15])
    else:  # with replacement: duplicates
        idx = rs.integers(0, 30, size=30)
    w = np.bincount(idx, minlength=30).astype(np.float64)[None]
    got = cka._weighted_layerwise(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(w),
                                  debiased, torch.float64).numpy()[0]
    expected = [ref_cka(a[i, idx], b[i, idx], debiased) for i in range(4)]
    assert np.abs(got - expected).max() < 1e-10


@pytest.mark.parametrize("debiased", [False, True])
def test_bootstrap_contains_point_and_narrows(debiased):
    small = bootstrap_layerwise_cka(*drifting_stacks(100), n_boot=100, seed=0, debiased=debiased)
    large = bootstrap_layerwise_cka(*drifting_stacks(800), n_boot=100, seed=0, debiased=debiased)
    for res in (small, large):
        assert (res["lo"] <= res["point"]).all() and (res["point"] <= res["hi"]).all()
        assert res["samples"].shape == (100, 4)
    assert np.allclose(small["point"], layerwise_cka(*drifting_stacks(100), debiased=debiased))
    width_small = (small["hi"] - small["lo"]).mean()
    width_large = (large["hi"] - large["lo"]).mean()
    assert width_large < width_small / 2  # ~ sqrt(8) narrower in theory
    assert small["scheme"] == ("subsample" if debiased else "resample")


def test_noise_floor_band():
    a, b = drifting_stacks(200)
    nf = noise_floor(a, b, n_splits=10, seed=0)
    assert nf["diffs"].shape == (10, 4)
    assert np.allclose(nf["point"], layerwise_cka(a, b))
    assert (nf["half_width"] > 0).all() and (nf["lo"] < nf["point"]).all()
    assert np.allclose(nf["half_width"], 1.96 * np.sqrt((nf["diffs"] ** 2).mean(0)) / 2)
    wider = noise_floor(*drifting_stacks(50), n_splits=10, seed=0)
    assert wider["half_width"].mean() > nf["half_width"].mean()
    # Same order of magnitude as the bootstrap standard error.
    boot = bootstrap_layerwise_cka(a, b, n_boot=100, seed=0)
    assert 0.3 < (nf["se"] / boot["samples"].std(0)).mean() < 3.0


@pytest.mark.parametrize("debiased", [False, True])
def test_permutation_baseline_far_below_true_cka(debiased):
    a, b = drifting_stacks(120, n_layers=3, d=40)
    true = cka_matrix(a, b, debiased)
    chance = permutation_baseline(a, b, n_perm=10, seed=0, debiased=debiased)
    assert chance.shape == (3, 3)
    assert (np.diag(true) - np.diag(chance) > 0.3).all()
    if debiased:
        assert np.abs(chance).max() < 0.05


def test_transition_layer_bootstrap_finds_the_drop():
    a, b = drifting_stacks(120, n_layers=6, drop_at=3)
    res = transition_layer_bootstrap(a, b, n_boot=50, seed=0)
    assert res["point"] == 3
    assert res["lo"] <= 3 <= res["hi"]
    assert np.bincount(res["samples"]).argmax() == 3


def test_numpy_and_torch_inputs_agree():
    a, b = related_stacks(2, 30, (8, 40))
    assert np.array_equal(cka_matrix(a, b), cka_matrix(torch.from_numpy(a), torch.from_numpy(b)))
