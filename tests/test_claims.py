"""Verdicts on published claims, on constructed data where the right answer is known: a planted
rank rise, a planted sparse update, an update planted off W's principal directions."""

import numpy as np
import pytest
import torch

from alignkit.claims import effective_rank_claim, principal_claim, sparsity_claim
from alignkit.weights import bf16_unchanged_share, weight_drift


def _states(seed, n=120, d=24, rank=4):
    """Base states of rank ~``rank`` and a model whose states spread over 3x as many directions."""
    g = np.random.default_rng(seed)
    low = g.normal(size=(n, rank)) @ g.normal(size=(rank, d)) + 0.01 * g.normal(size=(n, d))
    wide = g.normal(size=(n, 3 * rank)) @ g.normal(size=(3 * rank, d)) + 0.01 * g.normal(size=(n, d))
    return low, wide


def test_planted_rank_rise_is_detected_by_both_definitions():
    seeds = []
    for s in range(3):
        low, wide = _states(s)
        seeds.append({"base": low, "sft": wide, "grpo": wide, "dpo": low})
    v = effective_rank_claim(seeds, init={"sft": "base", "dpo": "sft", "grpo": "base"}, n_boot=40)
    assert v.verdicts["SFT RankMe"] == v.verdicts["SFT covariance"] == "agrees"
    assert v.verdicts["GRPO RankMe"] == v.verdicts["GRPO covariance"] == "disagrees"  # it rose
    assert v.verdicts["DPO RankMe"] == "disagrees"  # DPO went from wide back to low: it fell
    assert v.verdict == "disagrees"
    assert float(v.items["SFT RankMe"].point) > 2
    one = effective_rank_claim(seeds[:1], init={"sft": "base"}, claimed={"sft": +1}, n_boot=40)
    assert one.verdict == "cannot tell" and "cannot decide" in one.sentence()
    with pytest.raises(ValueError, match="lacks the states"):
        effective_rank_claim([{"sft": seeds[0]["sft"]}], init={"sft": "base"}, claimed={"sft": 1})


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
    assert v.verdicts["DPO − SFT"] == "agrees"
    assert v.verdicts["GRPO − SFT"] == "cannot tell"  # both dense: the difference straddles 0
    assert float(v.items["DPO − SFT"].point) > 0.8
    assert v.verdict == "cannot tell"


def test_bf16_unchanged_share_matches_a_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    d = torch.randn(64, 32, generator=g) * 1e-3
    ref = np.mean(((w + d).bfloat16() == w.bfloat16()).numpy())
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
    assert v.verdict == "agrees"
    assert float(v.context["GRPO output overlap / chance"].point) < 0.01
    assert float(v.context["SFT input overlap / chance"].point) > 5
    flipped = [{"sft": t["grpo"], "grpo": t["sft"]} for t in own]
    assert principal_claim(flipped, n_boot=200).verdict == "disagrees"


def test_a_zero_update_cannot_confirm_a_claim():
    """An RL run that did not move the weights is trivially 'sparse' and 'off-principal'."""
    own = []
    for s in range(2):
        g = torch.Generator().manual_seed(s)
        base, tuned = _principal_pair(g, True)
        own.append({"sft": weight_drift(base, tuned, k=2, progress=False),
                    "grpo": weight_drift(tuned, tuned, k=2, progress=False)})
    for v in (principal_claim(own, n_boot=50), sparsity_claim(own, rl=["grpo"], n_boot=50)):
        assert v.verdict == "cannot tell"
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
    assert v.verdict != "agrees"
