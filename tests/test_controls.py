"""Tests of alignkit.controls: bootstrap, noise floor, permutation baseline, transition layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cka import ref_cka

from alignkit.cka import cka_matrix, layerwise_cka
from alignkit.controls import (
    bootstrap_cka_matrix,
    bootstrap_layerwise_cka,
    noise_floor,
    permutation_baseline,
    transition_layer_bootstrap,
)
from alignkit.layers import transition_layer


def drifting_stacks(n, n_layers=4, d=16, seed=0, drop_at=None):
    """Base/tuned stacks whose similarity falls with depth (sharply at ``drop_at`` if given)."""
    rs = np.random.default_rng(seed)
    a = rs.standard_normal((n_layers, n, d))
    noise = np.linspace(0.3, 1.2, n_layers)
    if drop_at is not None:
        noise = np.where(np.arange(n_layers) < drop_at, 0.3, 3.0)
    return a, a + noise[:, None, None] * rs.standard_normal((n_layers, n, d))


def ref_curve(a, b, rows, debiased):
    """Layerwise CKA recomputed directly on the rows ``rows`` (duplicates kept)."""
    return np.array([ref_cka(a[i, rows], b[i, rows], debiased) for i in range(a.shape[0])])


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bootstrap_samples_equal_direct_recomputation(debiased, dtype):
    """Debiased: half-samples without replacement; biased: resamples with duplicates."""
    a, b = drifting_stacks(30)
    res = bootstrap_layerwise_cka(a.astype(dtype), b.astype(dtype), n_boot=6, seed=3,
                                  debiased=debiased)
    rng = np.random.default_rng(3)  # the draws the function makes for this seed
    if debiased:
        assert res["scheme"] == "subsample" and res["m"] == 15
        rows = [rng.permutation(30)[:15] for _ in range(6)]
    else:
        assert res["scheme"] == "resample" and res["m"] == 30
        rows = list(rng.integers(0, 30, size=(6, 30)))
        assert any(len(np.unique(r)) < 30 for r in rows)  # duplicates present
    expected = np.array([ref_curve(a, b, r, debiased) for r in rows])
    tol = 1e-10 if dtype == np.float64 else 1e-6
    assert np.abs(res["samples"] - expected).max() < tol
    assert np.abs(res["point"] - ref_curve(a, b, np.arange(30), debiased)).max() < tol
    # Debiased CKA on resamples with duplicates: the estimator on the duplicated rows.
    dup = bootstrap_layerwise_cka(a, b, n_boot=3, seed=4, debiased=True, scheme="resample")
    rows = np.random.default_rng(4).integers(0, 30, size=(3, 30))
    assert np.abs(dup["samples"] - [ref_curve(a, b, r, True) for r in rows]).max() < 1e-10


@pytest.mark.parametrize("debiased", [False, True])
def test_noise_floor_diffs_equal_direct_recomputation(debiased):
    a, b = drifting_stacks(41)  # odd n: one example is left out of each split
    nf = noise_floor(a, b, n_splits=3, seed=5, debiased=debiased)
    rng = np.random.default_rng(5)
    for s in range(3):
        perm = rng.permutation(41)
        diff = ref_curve(a, b, perm[:20], debiased) - ref_curve(a, b, perm[20:40], debiased)
        assert np.abs(nf["diffs"][s] - diff).max() < 1e-10


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


def test_bootstrap_errors():
    a, b = drifting_stacks(20)
    with pytest.raises(ValueError, match="ci must be in"):
        bootstrap_layerwise_cka(a, b, n_boot=5, ci=1.5)
    with pytest.raises(ValueError, match="n_boot must be >= 2"):
        bootstrap_layerwise_cka(a, b, n_boot=1)
    with pytest.raises(ValueError, match="scheme must be"):
        bootstrap_layerwise_cka(a, b, n_boot=5, scheme="jackknife")
    with pytest.raises(ValueError, match="needs at least 8 examples, got 7"):
        bootstrap_layerwise_cka(a[:, :7], b[:, :7], n_boot=5, debiased=True)
    with pytest.raises(ValueError, match="same number of layers in both stacks, got 4"):
        noise_floor(a, b[:3])
    with pytest.raises(ValueError, match="noise_floor needs at least 8 examples, got 7"):
        noise_floor(a[:, :7], b[:, :7], debiased=True)


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


@pytest.mark.parametrize("debiased", [False, True])
def test_permutation_baseline_equals_shuffled_cka_matrix(debiased):
    a, b = drifting_stacks(40, n_layers=2, d=8)
    b = np.concatenate([b, b[:1] + 1.0])  # 3 layers in b
    got = permutation_baseline(a, torch.from_numpy(b).float(), n_perm=3, seed=6,
                               debiased=debiased)
    rng = np.random.default_rng(6)
    expected = np.mean([cka_matrix(a, b[:, rng.permutation(40)], debiased) for _ in range(3)], 0)
    assert got.shape == (2, 3) and np.abs(got - expected).max() < 1e-6


def test_transition_layer_bootstrap_finds_the_drop():
    a, b = drifting_stacks(120, n_layers=6, drop_at=3)
    res = transition_layer_bootstrap(a, b, n_boot=50, seed=0)
    assert res["point"] == 3 == transition_layer(res["curve"])
    assert res["lo"] <= 3 <= res["hi"]
    assert np.bincount(res["samples"]).argmax() == 3
    with pytest.raises(ValueError, match="at least 2 layers, got 1"):
        transition_layer_bootstrap(a[:1], b[:1], n_boot=5)


def test_bootstrap_cka_matrix_against_direct_recomputation():
    """Every resampled cell is CKA recomputed on the drawn rows (duplicates kept), across depths
    and widths; the diagonal of a same-depth pair is bootstrap_layerwise_cka's curves."""
    rs = np.random.default_rng(0)
    a = rs.standard_normal((3, 24, 8))
    b = np.concatenate([a[:2] @ rs.standard_normal((8, 5)), rs.standard_normal((2, 24, 5))])  # 4 x 5 wide
    res = bootstrap_cka_matrix(a, b, n_boot=5, seed=2)
    rows = np.random.default_rng(2).integers(0, 24, size=(5, 24))
    expected = np.array([[[ref_cka(a[i, r], b[j, r], False) for j in range(4)] for i in range(3)] for r in rows])
    assert res["samples"].shape == (5, 3, 4) and np.abs(res["samples"] - expected).max() < 1e-6
    ref_point = [[ref_cka(a[i], b[j], False) for j in range(4)] for i in range(3)]
    assert np.abs(res["point"] - ref_point).max() < 1e-6
    assert (res["lo"] <= res["hi"]).all()
    a2, b2 = drifting_stacks(24)
    diag = bootstrap_cka_matrix(a2, b2, n_boot=4, seed=5)["samples"][:, range(4), range(4)]
    curves = bootstrap_layerwise_cka(a2, b2, n_boot=4, seed=5)["samples"]
    assert np.abs(diag - curves).max() < 1e-6


def test_bootstrap_cka_matrix_ties():
    """A model layer that copies one reference layer matches it alone; two identical reference
    layers tie; a layer unrelated to everything ties broadly (no argmax is a finding there)."""
    rs = np.random.default_rng(1)
    ref = rs.standard_normal((4, 60, 10))
    ref[3] = ref[2]  # reference layers 2 and 3 identical
    model = np.stack([ref[0] + 0.05 * rs.standard_normal((60, 10)), ref[2], rs.standard_normal((60, 10))])
    res = bootstrap_cka_matrix(ref, model, n_boot=100, seed=0)
    assert res["best"][0] == 0 and np.nonzero(res["ties"][:, 0])[0].tolist() == [0]
    assert set(np.nonzero(res["ties"][:, 1])[0]) == {2, 3}
    assert res["ties"][:, 2].sum() >= 2
    with pytest.raises(ValueError, match="n_boot must be >= 2"):
        bootstrap_cka_matrix(ref, model, n_boot=1)
