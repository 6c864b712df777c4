"""Verdicts on published claims, on constructed data where the right answer is known: a planted
rank rise, a planted sparse update, an update planted off W's principal directions."""

import numpy as np
import pytest
import torch

from alignkit import spectral
from alignkit.claims import effective_rank_claim, principal_claim, sparsity_claim
from alignkit.weights import bf16_unchanged_share, weight_drift


def _states(seed, n=400, d=24):
    """Base states whose covariance spectrum decays as a steep power law and a model whose
    spectrum decays slowly: a higher RankMe and a lower α-ReQ."""
    g = np.random.default_rng(seed)
    q = np.linalg.qr(g.normal(size=(d, d)))[0]
    i = np.arange(1, d + 1)
    low = g.normal(size=(n, d)) * i ** -1.0 @ q
    wide = g.normal(size=(n, d)) * i ** -0.3 @ q
    return low, wide


def test_planted_rank_rise_is_detected_by_both_measures():
    seeds = []
    for s in range(3):
        low, wide = _states(s)
        seeds.append({"base": low, "sft": wide, "grpo": wide, "dpo": low})
    v = effective_rank_claim(seeds, init={"sft": "base", "dpo": "sft", "grpo": "base"}, n_boot=40)
    assert v.claimed["SFT α-ReQ"] == -1 and v.claimed["GRPO α-ReQ"] == +1
    assert v.verdicts["SFT RankMe"] == v.verdicts["SFT α-ReQ"] == "agrees"
    assert v.verdicts["GRPO RankMe"] == v.verdicts["GRPO α-ReQ"] == "disagrees"  # it rose
    assert v.verdicts["DPO RankMe"] == "disagrees"  # DPO went from wide back to low: it fell
    assert v.verdict == "disagrees"
    assert float(v.items["SFT RankMe"].point) > 2 and float(v.items["SFT α-ReQ"].point) < -0.5
    one = effective_rank_claim(seeds[:1], init={"sft": "base"}, claimed={"sft": +1}, n_boot=40)
    assert one.verdict == "inconclusive (1 seed)" and "1 training seed" in one.sentence()
    with pytest.raises(ValueError, match="lacks the states"):
        effective_rank_claim([{"sft": seeds[0]["sft"]}], init={"sft": "base"}, claimed={"sft": 1})


def test_alpha_req_matches_a_slow_fit_and_recovers_a_power_law():
    g = np.random.default_rng(0)
    s = np.sort(g.uniform(0.1, 3.0, size=(4, 9)), -1)  # ascending: the function sorts
    for row, got in zip(s, spectral.alpha_req_from_spectrum(s)):
        lam = np.sort(row)[::-1] ** 2
        slope = np.polyfit(np.log(np.arange(1, 10)), np.log(lam), 1)[0]
        assert got == pytest.approx(-slope, rel=1e-10)
    exact = np.arange(1, 51, dtype=float) ** -0.75  # singular values: lambda ~ i^-1.5
    assert spectral.alpha_req_from_spectrum(exact) == pytest.approx(1.5, rel=1e-10)
    assert spectral.alpha_req_from_spectrum(3.0 * exact) == pytest.approx(1.5, rel=1e-10)
    assert np.isnan(spectral.alpha_req_from_spectrum(np.array([1.0, 0.0, 0.0])))


def _model(g, shapes):
    return {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}


SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (32, 16) for i in range(6)}
SHAPES |= {f"model.layers.{i}.input_layernorm.weight": (16,) for i in range(6)}


def _update(base, kind, g, size=1e-2):
    out = {}
    for n, w in base.items():
        d = torch.randn(w.shape, generator=g) * size
        if kind == "sparse":
            d *= (torch.rand(w.shape, generator=g) < 0.05)
        elif kind == "tiny":
            d *= 1e-4
        out[n] = w + d
    return out


def test_planted_sparse_update_is_called_sparse_and_a_dense_one_is_not():
    own = []
    for s in range(2):
        g = torch.Generator().manual_seed(s)
        base = _model(g, SHAPES)
        tables = {m: weight_drift(base, _update(base, kind, g), k=2, progress=False)
                  for m, kind in (("sft", "dense"), ("dpo", "sparse"), ("grpo", "dense"))}
        own.append(tables)
    v = sparsity_claim(own, n_boot=200)
    assert v.verdicts["DPO − SFT"] == v.verdicts["DPO unchanged share − 0.5"] == "agrees"
    assert v.verdicts["GRPO − SFT"] == "inconclusive (2 seeds)"  # both dense
    assert v.verdicts["GRPO unchanged share − 0.5"] == "disagrees"  # dense: most entries moved
    assert float(v.items["DPO − SFT"].point) > 0.8
    assert v.verdict == "disagrees"


def test_bf16_unchanged_share_matches_a_reference():
    """The paper's rule, ``torch.isclose`` of the bf16 weights at ``atol=1e-5``; small weights
    (|w| ~ 1e-3, where a bf16 step is below 1e-5) make the tolerance matter."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * torch.logspace(-4, 0, 32)
    d = torch.randn(64, 32, generator=g) * 1e-3
    ref = np.mean(torch.isclose((w + d).bfloat16(), w.bfloat16(), rtol=0, atol=1e-5).numpy())
    assert ref > np.mean(((w + d).bfloat16() == w.bfloat16()).numpy())  # the tolerance counts
    row = weight_drift({"a.weight": w}, {"a.weight": w + d}, progress=False).iloc[0]
    assert row["frac_unchanged_bf16"] == pytest.approx(ref, abs=1e-12)
    assert bf16_unchanged_share(w, d) == pytest.approx(ref, abs=1e-12)
    assert bf16_unchanged_share(w, d, scale=0.0) == 1.0
    assert bf16_unchanged_share(w, d, scale=1e-4) > ref  # a smaller update leaves more unchanged


def _principal_pair(g, on_principal, k=2):
    base, tuned = {}, {}
    for n, shape in SHAPES.items():
        if len(shape) == 1:
            w = torch.ones(shape)
            base[n], tuned[n] = w, w + 0.01 * torch.randn(shape, generator=g)
            continue
        u, _, vt = torch.linalg.svd(torch.randn(shape, generator=g), full_matrices=False)
        s = torch.tensor([10.0, 8.0] + [0.1] * (min(shape) - 2))
        w = u @ torch.diag(s) @ vt
        sl = slice(0, k) if on_principal else slice(k, 2 * k)
        d = u[:, sl] @ torch.randn(k, k, generator=g) @ vt[sl] * 0.01
        base[n], tuned[n] = w, w + d
    return base, tuned


def test_update_planted_off_the_principal_directions_is_called_so():
    own = []
    for s in range(2):
        g = torch.Generator().manual_seed(s)
        own.append({m: weight_drift(*_principal_pair(g, on), k=2, progress=False)
                    for m, on in (("sft", True), ("grpo", False))})
    v = principal_claim(own, n_boot=200)
    overlap = [k for k in v.per_seed if "update overlap" in k]
    assert len(overlap) == 2 and all(v.verdicts[k] == "agrees" for k in overlap)
    assert np.mean(v.context["GRPO overlap_left / chance"]) < 0.01
    assert np.mean(v.context["SFT overlap_right / chance"]) > 5
    assert v.verdicts["GRPO − SFT, spectrum drift"] == "agrees"  # SFT moved the top values
    flipped = [{"sft": t["grpo"], "grpo": t["sft"]} for t in own]
    assert principal_claim(flipped, n_boot=200).verdict == "disagrees"


def test_rotation_and_spectrum_drift_of_planted_updates():
    """An update that swaps W's second principal direction for a new one rotates W's top-2
    subspace by half (mean cos^2 1/2) and leaves the top singular values; scaling W's top
    singular value by 1.5 drifts the spectrum by 0.5 * 10 / ||(10, 8)|| and rotates nothing."""
    g = torch.Generator().manual_seed(0)
    u, _, vt = torch.linalg.svd(torch.randn(16, 12, generator=g, dtype=torch.float64))
    s = torch.tensor([10.0, 8.0] + [0.1] * 10, dtype=torch.float64)
    w = u[:, :12] @ torch.diag(s) @ vt
    swap = 7.9 * torch.outer(u[:, 5], vt[5]) - 8.0 * torch.outer(u[:, 1], vt[1])  # 0.1 -> 8
    scale = 5.0 * torch.outer(u[:, 0], vt[0])
    rot = weight_drift({"a.weight": w}, {"a.weight": w + swap}, k=2, progress=False).iloc[0]
    top = weight_drift({"a.weight": w}, {"a.weight": w + scale}, k=2, progress=False).iloc[0]
    assert rot["rotation_left"] == pytest.approx(0.5, abs=1e-9)
    assert rot["rotation_right"] == pytest.approx(0.5, abs=1e-9)
    assert rot["spectrum_drift"] == pytest.approx(0.0, abs=1e-9)
    assert top["rotation_left"] == pytest.approx(0.0, abs=1e-9)
    assert top["spectrum_drift"] == pytest.approx(5.0 / np.hypot(10.0, 8.0), rel=1e-9)


def test_a_zero_update_cannot_confirm_a_claim():
    """An RL run that did not move the weights is trivially 'sparse' and 'off-principal'."""
    own = []
    for s in range(2):
        g = torch.Generator().manual_seed(s)
        base, tuned = _principal_pair(g, True)
        own.append({"sft": weight_drift(base, tuned, k=2, progress=False),
                    "grpo": weight_drift(tuned, tuned, k=2, progress=False)})
    for v in (principal_claim(own, n_boot=50), sparsity_claim(own, rl=["grpo"], n_boot=50)):
        assert v.verdict == "inconclusive (2 seeds)"
        assert all(np.isnan(float(b.point)) for b in v.items.values())
        assert "untestable (an update is zero in some seed)" in v.sentence()


def test_sparsity_at_matched_update_size_separates_shape_from_size():
    """A tiny dense update looks 'sparse' at bf16 (its changes round away), and so would SFT's
    update shrunk to the same norm: the raw item agrees, the size-matched one does not. A planted
    5 %-dense update stays sparser than SFT's update at its size."""
    own = []
    for s in range(2):
        g = torch.Generator().manual_seed(s)
        base = _model(g, SHAPES)
        finals = {m: _update(base, kind, g) for m, kind in (("sft", "dense"), ("dpo", "sparse"),
                                                            ("grpo", "tiny"))}
        tables = {m: weight_drift(base, f, k=2, progress=False) for m, f in finals.items()}
        norm = {m: float(np.sqrt((t["norm_delta"] ** 2).sum())) for m, t in tables.items()}
        for m in ("dpo", "grpo"):  # the definition analyses.weights.matched_unchanged computes
            share = {n: bf16_unchanged_share(w, finals["sft"][n] - w, norm[m] / norm["sft"])
                     for n, w in base.items()}
            tables["sft"][f"unchanged_bf16_at_{m}"] = tables["sft"]["name"].map(share)
        own.append(tables)
    v = sparsity_claim(own, n_boot=200)
    assert v.verdicts["GRPO − SFT"] == "agrees"  # raw: the tiny update leaves entries unchanged
    assert v.verdicts["GRPO − SFT at GRPO's norm"] != "agrees"  # ... as SFT's would at its size
    assert abs(float(v.items["GRPO − SFT at GRPO's norm"].point)) < 0.05
    assert v.verdicts["DPO − SFT at DPO's norm"] == "agrees"  # sparse in shape, not only small
    assert v.roles["GRPO − SFT at GRPO's norm"] == "interpretation"  # outside the verdict
    assert "interpretation, outside the verdict" in v.sentence()
    assert v.verdict == "agrees"  # the claim as the paper states it: both RL updates sparse
