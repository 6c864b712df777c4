"""Weight-space drift: every metric against a slow numpy reference, invariances, controls, errors."""

import math
import re

import numpy as np
import pytest
import torch
from tiny_models import make_model

from alignkit import weights
from alignkit.weights import gaussian_mass_share, module_name, summarize_drift, weight_drift

MATRIX_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


# ------------------------------------------------------------------ slow references (numpy, float64)


def ref_rankme(s, eps=1e-7):
    p = s / s.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_mass_share(d, mass):
    sq = np.sort(d.ravel() ** 2)[::-1]
    total, acc = sq.sum(), 0.0
    for i, v in enumerate(sq):  # the literal definition: add entries, largest first, until mass is held
        acc += v
        if acc >= mass * total * (1 - 1e-12):
            return (i + 1) / sq.size
    return 1.0


def ref_overlap(d, w, k):
    """Mean cos^2 of the principal angles, via the singular values of U_d^T U_w (full numpy SVDs)."""
    ud, sd, vdt = np.linalg.svd(d)
    uw, sw, vwt = np.linalg.svd(w)
    r = min(k, np.linalg.matrix_rank(d))
    rw = min(k, np.linalg.matrix_rank(w))
    cos_l = np.linalg.svd(ud[:, :r].T @ uw[:, :rw], compute_uv=False)
    cos_r = np.linalg.svd(vdt[:r] @ vwt[:rw].T, compute_uv=False)
    return float(np.sum(cos_l ** 2) / r), float(np.sum(cos_r ** 2) / r)


def ref_row(w, wt, tol, k, mass=0.9):
    w, wt = np.asarray(w, np.float64), np.asarray(wt, np.float64)
    d = wt - w
    out = {"rel_change": np.sqrt(np.sum(d * d)) / np.sqrt(np.sum(w * w)),
           "frac_changed": np.mean(np.abs(d) > tol), "frac_mass": ref_mass_share(d, mass)}
    if w.ndim == 2:
        s = np.linalg.svd(d, compute_uv=False)
        out["eff_rank"] = ref_rankme(s)
        out["rank_delta"] = np.linalg.matrix_rank(d)
        out["overlap_left"], out["overlap_right"] = ref_overlap(d, w, k)
    return out


def perturbed(model, seed=1, scale=0.02, sparse=0.3):
    """A copy of ``model`` with a structured update: low-rank + sparse + small dense part per tensor."""
    tuned = make_model("qwen3", seed=0)
    tuned.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            dense = torch.randn(p.shape, generator=g) * scale * 0.1
            mask = (torch.rand(p.shape, generator=g) < sparse).float()
            upd = dense + mask * torch.randn(p.shape, generator=g) * scale
            if p.ndim == 2:
                a, b = torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g)
                upd += scale * (a @ b)
            p.add_(upd)
    return tuned


@pytest.fixture(scope="module")
def pair(qwen3):
    return qwen3, perturbed(qwen3)


@pytest.fixture(scope="module")
def drift(pair):
    return weight_drift(*pair, tol=1e-3, k=4, progress=False)


# ------------------------------------------------------------------ against the reference


def test_every_metric_matches_slow_reference(pair, drift):
    base, tuned = pair
    sb, st = base.state_dict(), tuned.state_dict()
    assert len(drift) == len(dict(base.named_parameters()))
    for _, row in drift.iterrows():
        ref = ref_row(sb[row["name"]].numpy(), st[row["name"]].numpy(), tol=1e-3, k=4)
        assert row["rel_change"] == pytest.approx(ref["rel_change"], rel=1e-12)
        assert row["frac_changed"] == ref["frac_changed"]
        assert row["frac_mass"] == pytest.approx(ref["frac_mass"], abs=1.0 / row["numel"] + 1e-15)
        if "eff_rank" in ref:
            assert row["rank_delta"] == ref["rank_delta"]
            assert row["eff_rank"] == pytest.approx(ref["eff_rank"], rel=1e-9)
            assert row["overlap_left"] == pytest.approx(ref["overlap_left"], abs=1e-9)
            assert row["overlap_right"] == pytest.approx(ref["overlap_right"], abs=1e-9)
            m, n = row["shape"]
            assert row["chance_left"] == 4 / m and row["chance_right"] == 4 / n
            assert row["eff_rank_max"] == min(m, n)
        else:
            assert np.isnan(row[list(weights.MATRIX_METRICS)].astype(float)).all()


def test_rows_layers_and_modules(drift):
    per_layer = drift[drift["layer"].between(0, 2)]
    assert set(per_layer["module"]) == set(MATRIX_NAMES) | {"input_norm", "post_attn_norm", "q_norm", "k_norm"}
    assert per_layer.groupby("layer").size().tolist() == [11, 11, 11]
    assert drift.loc[drift["layer"] == -1, "module"].tolist() == ["embed"]
    assert drift.loc[drift["layer"] == 3, "module"].tolist() == ["final_norm"]  # tied lm_head: no row
    assert drift.attrs == {"tol": 1e-3, "k": 4, "mass": 0.9, "eps": 1e-7, "n_layers": 3}


def test_untied_lm_head_gets_a_row_and_biases_are_named():
    a, b = make_model("qwen2", seed=0, tie_word_embeddings=False), make_model("qwen2", seed=1, tie_word_embeddings=False)
    df = weight_drift(a, b, progress=False)
    assert df.loc[df["module"] == "lm_head", "layer"].tolist() == [3]
    assert {"q.bias", "k.bias", "v.bias"} <= set(df["module"])
    assert module_name("model.layers.12.mlp.down_proj.weight", 28) == (12, "down")
    assert module_name("model.embed_tokens.weight", 28) == (-1, "embed")
    assert module_name("model.norm.weight", 28) == (28, "final_norm")
    assert module_name("model.layers.0.self_attn.rotary.inv_freq", 28) == (0, "self_attn.rotary.inv_freq")


def test_state_dicts_give_the_same_table_as_modules(pair, drift):
    base, tuned = pair
    sd = weight_drift(base.state_dict(), tuned.state_dict(), tol=1e-3, k=4, progress=False)
    assert "lm_head.weight" in base.state_dict()  # the tied copy is in the state dict ...
    assert sd["name"].tolist() == drift["name"].tolist()  # ... and counted once
    num = drift.select_dtypes("number").columns
    np.testing.assert_array_equal(sd[num].to_numpy(), drift[num].to_numpy())


def test_gaussian_mass_share_matches_monte_carlo():
    z = np.random.default_rng(0).standard_normal(1_000_000)
    for mass in (0.5, 0.9, 0.99):
        assert gaussian_mass_share(mass) == pytest.approx(ref_mass_share(z, mass), abs=2e-3)
    assert gaussian_mass_share(0.9) == pytest.approx(0.4446, abs=1e-4)
    assert gaussian_mass_share(1.0) == 1.0


# ------------------------------------------------------------------ invariances and controls


def test_zero_update_is_all_zeros_never_nan(qwen3):
    df = weight_drift(qwen3, qwen3, progress=False)
    for col in ("rel_change", "frac_changed", "frac_mass", "norm_delta", "frac_changed_dense"):
        assert (df[col] == 0).all(), col
    mat = df[df["module"].isin(MATRIX_NAMES + ("embed",))]
    assert len(mat) == 22
    for col in ("eff_rank", "rank_delta", "overlap_left", "overlap_right", "k_delta"):
        assert (mat[col] == 0).all(), col
    assert mat[list(weights.MATRIX_METRICS)].notna().all().all()


def test_scaling_both_models_changes_nothing_scale_free(pair, drift):
    base, tuned = pair
    c = 3.7
    sb = {k: v.double() * c for k, v in base.state_dict().items()}  # float64: scaling adds no round-off
    st = {k: v.double() * c for k, v in tuned.state_dict().items()}
    scaled = weight_drift(sb, st, tol=1e-3 * c, k=4, progress=False)
    for col in ("rel_change", "frac_changed", "frac_mass", "eff_rank", "rank_delta", "overlap_left", "overlap_right"):
        np.testing.assert_allclose(scaled[col], drift[col], rtol=1e-10, atol=1e-12, err_msg=col)
    np.testing.assert_allclose(scaled["norm_delta"], c * drift["norm_delta"], rtol=1e-12)


def _decaying(m, n, rng):
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 2.0 ** -np.arange(min(m, n), dtype=float) * 10 + 0.1
    return u[:, :min(m, n)] * s @ v[:, :min(m, n)].T, u, v


@pytest.mark.parametrize("r", [1, 3])
def test_low_rank_update_inside_and_outside_the_top_subspace(r):
    rng = np.random.default_rng(r)
    m, n, k = 48, 32, 8
    w, u, v = _decaying(m, n, rng)
    inside = u[:, :r] @ rng.standard_normal((r, r)) @ v[:, :r].T  # within W's top-r (<= k) subspaces
    outside = u[:, k:k + r] @ rng.standard_normal((r, r)) @ v[:, k:k + r].T  # orthogonal to W's top k
    name = "model.layers.0.mlp.up_proj.weight"
    for upd, expected in ((inside, 1.0), (outside, 0.0)):
        pair = {name: torch.tensor(w)}, {name: torch.tensor(w + 0.01 * upd)}
        row = weight_drift(*pair, k=k, progress=False).iloc[0]
        assert row["rank_delta"] == r and row["k_delta"] == r and row["k_base"] == k
        assert row["eff_rank"] <= r * (1 + 2e-6 * n)  # RankMe's eps adds ~1.7e-6 per singular value
        exact = weight_drift(*pair, k=k, eps=0, progress=False).iloc[0]["eff_rank"]
        assert exact <= r + 1e-12 and (r == 1) == (exact == pytest.approx(1.0, abs=1e-12))
        assert row["overlap_left"] == pytest.approx(expected, abs=1e-9)
        assert row["overlap_right"] == pytest.approx(expected, abs=1e-9)


def test_random_update_overlap_is_at_chance_and_rank_at_dense_control():
    rng = np.random.default_rng(0)
    m, n, k = 96, 64, 8
    name = "model.layers.0.mlp.up_proj.weight"
    rows = []
    for _ in range(20):
        w, _, _ = _decaying(m, n, rng)
        d = rng.standard_normal((m, n)) * 0.01
        rows.append(weight_drift({name: torch.tensor(w)}, {name: torch.tensor(w + d)}, k=k, progress=False).iloc[0])
    left = np.mean([r["overlap_left"] for r in rows])
    right = np.mean([r["overlap_right"] for r in rows])
    assert rows[0]["chance_left"] == k / m and rows[0]["chance_right"] == k / n
    assert left == pytest.approx(k / m, abs=0.02) and right == pytest.approx(k / n, abs=0.03)
    # a Gaussian update scores like the seeded Gaussian control, and its mass share like the dense value
    assert np.mean([r["eff_rank"] for r in rows]) == pytest.approx(rows[0]["eff_rank_dense"], rel=0.02)
    assert np.mean([r["frac_mass"] for r in rows]) == pytest.approx(gaussian_mass_share(0.9), abs=0.01)


def test_frac_changed_of_gaussian_update_matches_dense_control():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((200, 100))
    name = "model.layers.0.mlp.up_proj.weight"
    tol = 1e-3
    row = weight_drift({name: torch.tensor(w)}, {name: torch.tensor(w + tol * rng.standard_normal(w.shape))},
                       tol=tol, progress=False).iloc[0]
    assert row["frac_changed"] == pytest.approx(math.erfc(1 / math.sqrt(2)), abs=0.01)  # P(|z| > 1) = 0.317
    assert row["frac_changed_dense"] == pytest.approx(row["frac_changed"], abs=0.01)


def test_sparse_update_is_reported_sparse():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 64))
    d = np.zeros_like(w)
    idx = rng.choice(w.size, size=41, replace=False)
    d.ravel()[idx] = rng.standard_normal(41)
    name = "model.layers.0.mlp.up_proj.weight"
    row = weight_drift({name: torch.tensor(w)}, {name: torch.tensor(w + d)}, progress=False).iloc[0]
    assert row["frac_changed"] == 41 / w.size
    assert row["frac_mass"] <= 41 / w.size
    assert row["frac_changed_dense"] > 0.99  # dense noise of the same norm would touch every entry


def test_default_tol_ignores_float32_round_off(qwen3):
    tuned = {k: (v.double() * (1 + 5e-8)).float() for k, v in qwen3.state_dict().items()}
    loose = weight_drift(qwen3, tuned, progress=False)
    exact = weight_drift(qwen3, tuned, tol=0, progress=False)
    assert (loose["frac_changed"] == 0).all()
    assert exact["frac_changed"].max() > 0  # some entries moved by one float32 ulp


def test_summarize_drift_pools_norms(drift, pair):
    base, tuned = pair
    sb, st = base.state_dict(), tuned.state_dict()
    table = summarize_drift(drift, "module")
    names = drift.loc[drift["module"] == "gate", "name"]
    nd2 = sum(float(((st[n].double() - sb[n].double()) ** 2).sum()) for n in names)
    nb2 = sum(float((sb[n].double() ** 2).sum()) for n in names)
    assert table.loc["gate", "rel_change"] == pytest.approx(math.sqrt(nd2 / nb2), rel=1e-12)
    assert table.loc["gate", "n_tensors"] == 3
    assert table.loc["q_norm", "eff_rank"] != table.loc["q_norm", "eff_rank"]  # NaN for 1-D groups
    by_lm = summarize_drift(drift, ["layer", "module"])
    assert by_lm.loc[(0, "q"), "rel_change"] == pytest.approx(drift.set_index(["layer", "module"]).loc[(0, "q"), "rel_change"])
    with pytest.raises(ValueError, match=re.escape("df lacks column(s) ['norm_base']")):
        summarize_drift(drift.drop(columns="norm_base"))


# ------------------------------------------------------------------ errors


def test_mismatched_shape_names_the_parameter():
    with pytest.raises(ValueError, match=re.escape(
            "parameter 'model.layers.0.mlp.gate_proj.weight' has shape (64, 32) in base and (48, 32) in tuned")):
        weight_drift(make_model("qwen3"), make_model("qwen3", intermediate_size=48), progress=False)


def test_parameter_in_one_model_only_is_named():
    with pytest.raises(ValueError, match=re.escape("parameter 'model.layers.3.self_attn.q_proj.weight' is in tuned only")):
        weight_drift(make_model("qwen3"), make_model("qwen3", num_hidden_layers=4), progress=False)
    with pytest.raises(ValueError, match=re.escape("parameter 'model.layers.0.self_attn.q_norm.weight' is in base only")):
        weight_drift(make_model("qwen3"), make_model("qwen2"), progress=False)


def test_different_classes_with_equal_parameters_are_refused(qwen3):
    other_cls = type("OtherQwen3", (type(qwen3),), {})
    other = other_cls(qwen3.config)
    with pytest.raises(ValueError, match="base is a Qwen3ForCausalLM and tuned a OtherQwen3"):
        weight_drift(qwen3, other, progress=False)


def test_bad_arguments():
    sd = {"w": torch.ones(3, 3)}
    with pytest.raises(ValueError, match=re.escape("tol must be a finite number >= 0, got -1")):
        weight_drift(sd, sd, tol=-1)
    with pytest.raises(ValueError, match=re.escape("k must be an integer >= 1, got 0")):
        weight_drift(sd, sd, k=0)
    with pytest.raises(ValueError, match=re.escape("mass must be in (0, 1], got 1.5")):
        weight_drift(sd, sd, mass=1.5)
    with pytest.raises(TypeError, match="base must be a torch.nn.Module or a state dict"):
        weight_drift("runs/some/checkpoint", sd)
    bad = {"w": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}
    with pytest.raises(ValueError, match=re.escape("parameter 'w' of tuned contains NaN or Inf")):
        weight_drift({"w": torch.eye(2)}, bad, progress=False)


def test_plot_weight_drift_draws_metric_and_control(drift):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignkit.plots import plot_weight_drift

    fig, ax = plt.subplots()
    assert plot_weight_drift(drift, "frac_mass", ax=ax) is fig
    labels = [line.get_label() for line in ax.get_lines()]
    assert "dense Gaussian update" in labels and {"q", "down", "embed"} <= set(labels)
    control = next(line for line in ax.get_lines() if line.get_label() == "dense Gaussian update")
    assert control.get_ydata()[0] == pytest.approx(gaussian_mass_share(0.9))
    fig2 = plot_weight_drift(drift, "overlap_left")
    assert any("chance" in line.get_label() for line in fig2.axes[0].get_lines())
    with pytest.raises(ValueError, match="metric must be one of"):
        plot_weight_drift(drift, "norm")
    plt.close("all")


def test_weight_drift_memory_is_two_float64_copies_of_a_tensor():
    """A tensor as large as a real embedding is measured with its float64 copy and update and
    slices, no more full-size temporaries (Qwen's 151,936 x 1,024: 1.2 GiB each in float64; the
    earlier code held four more at once and broke compare's 8 GiB envelope)."""
    import subprocess
    import sys

    code = r'''
import re, torch
from pathlib import Path
from alignkit.weights import weight_drift
def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024
g = torch.Generator().manual_seed(0)
base = {"w": torch.randn(16384, 1024, generator=g)}
tuned = {"w": base["w"] + 0.01 * torch.randn(16384, 1024, generator=g)}
weight_drift({"w": torch.randn(64, 32)}, {"w": torch.randn(64, 32)}, progress=False)  # warm up
before = hwm()
weight_drift(base, tuned, progress=False)
print(hwm() - before)
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    f64 = 16384 * 1024 * 8
    assert int(out.stdout.split()[-1]) <= 3.2 * f64, out.stdout  # the old code: 4.7x


@pytest.mark.parametrize("shape", [(600, 40), (40, 600)])
def test_dense_rank_control_in_blocks_matches_the_whole_matrix(shape, monkeypatch):
    """Above ``_CHUNK`` entries the Gaussian control's spectrum comes from a Gram summed over
    blocks: the same law, so RankMe within sampling noise of the whole-matrix value, and each
    block's Gram is the exact one of the rows drawn."""
    from alignkit import spectral, weights

    whole = spectral.rankme_from_spectrum(weights._gaussian_spectrum(*shape, torch.device("cpu")))
    monkeypatch.setattr(weights, "_CHUNK", 1000)  # blocks of 25 rows
    blocks = spectral.rankme_from_spectrum(weights._gaussian_spectrum(*shape, torch.device("cpu")))
    assert blocks == pytest.approx(whole, rel=0.01) and blocks < min(shape)
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn((25, 40), generator=g, dtype=torch.float64) for _ in range(24)])
    ref = torch.linalg.svdvals(z).numpy()
    np.testing.assert_allclose(weights._gaussian_spectrum(*shape, torch.device("cpu")), ref, rtol=1e-9)
