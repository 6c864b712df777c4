"""The notebooks' closing sentences and verdicts, on constructed results whose answer is known."""

import numpy as np
import torch
from test_results import band, cka_result, patch_result
from tiny_models import make_model

from alignkit import report, spectral, stages, weights
from alignkit.evaluate import CheckpointEval, FlipTable
from alignkit.patching import PatchResult
from alignkit.results import CompareResult, PatchingResult, RunResults, SpectralResult
from alignkit.stats import Band

L = 5


def flat(value, n=L, half=0.1):
    v = np.full(n, float(value))
    return Band(v, v - half, v + half)


def test_summarize_sft():
    def ev(step, correct, lp):
        return CheckpointEval(checkpoint="c", step=step, weights_hash="h", key="k", n=10,
                              accuracy=sum(correct) / 10, correct=correct, predictions=["1"] * 10,
                              outputs=["1"] * 10, answer_logprob=[lp] * 10, mean_answer_logprob=lp)

    evals = [ev(0, [True] * 2 + [False] * 8, -3.0), ev(5, [True] * 7 + [False] * 3, -1.0),
             ev(10, [True] * 6 + [False] * 4, -0.5)]
    from pathlib import Path

    text = report.summarize_sft(RunResults(Path("runs/sft/x"), evals, FlipTable([{}] * 4, [{}] * 2)))
    assert "Base accuracy **20.0 %**" in text and "after 10 steps **60.0 %**" in text
    assert "a change of +40.0 points; best checkpoint: step 5." in text
    assert "from -3.00 to -0.50 nats" in text and "4 flip examples and 2 controls" in text
    assert "Smoke mode" not in text and "Smoke mode" in report.summarize_sft(
        RunResults(Path("x"), evals, FlipTable([], [])), smoke=True)


def test_summarize_cka():
    res = cka_result()
    res.classic[10] = Band(np.array([0.99, 0.95, 0.9, 0.8, 0.85]), np.zeros(L), np.ones(L))
    res.noise_classic = np.full(L, 0.02)
    res.transition = (3, 2, 4)
    res.best = np.array([0, 1, 2, 4, 4])
    res.alt_curve = np.array([0.5, 0.3, 0.7, 0.6])
    text = report.summarize_cka(res)
    assert "classic CKA ranges from 0.990 to 0.800; the largest drift is at layer **2**" in text
    assert "4 of 5 hook points drift beyond the noise floor (first: 0)." in text
    assert "steepest drop in layerwise CKA is into layer **2** (bootstrap 95 % interval: layers 1–3)" in text
    assert "1 of 5 base layers match another tuned layer best" in text
    assert "runs from 0.700 (layer 2) down to 0.300 (layer 1)" in text


def test_summarize_spectral_detects_an_isotropic_rise():
    """Base: low-rank activations; final: isotropic. RankMe (and every Rényi rank) must rise."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(L, 200, 2, generator=g) @ torch.randn(L, 2, 16, generator=g)
    base = low + 0.05 * torch.randn(L, 200, 16, generator=g)
    final = torch.randn(L, 200, 16, generator=g)
    boot = {s: spectral.bootstrap_layer_metrics(a, alphas=(1.0, 2.0), n_boot=20)
            for s, a in ((0, base), (10, final))}
    res = SpectralResult.from_bootstraps(
        boot, labels=["embed", "0", "1", "2", "3"], dropped=[], pooling="mean", alphas=(1.0, 2.0),
        width=16, ns=[16, 32], rank_vs_n=np.stack([np.ones((2, L)), 2 * np.ones((2, L))]),
        cka_drift=np.arange(L) / 10)
    assert (res.n, res.m, res.ci) == (200, 160, 0.95)
    text = report.summarize_spectral(res)
    assert "The paired interval of Δ RankMe excludes 0 at 5 layers where rank **rose** (embed, 0, 1, 2, 3)" in text
    assert "and 0 where it **fell** (none)" in text
    assert report.rank_stability(res) == 1.0 and "in 100 % of (n, layer) cells" in text
    res.rank_vs_n[1, 0] = 0.5  # the smaller n disagrees everywhere: 0 %, the full n not counted
    assert report.rank_stability(res) == 0.0
    for alpha in ("1", "2"):
        line = next(x for x in text.splitlines() if x.startswith(f"- Rényi α = {alpha}:"))
        assert "mean Δ +" in line and "), +" in line  # rises in both halves of the stack


def planted_patching(n=20, rise=(0.0, 0.5, 1.2, 2.0, 2.0)):
    """Flips whose gap is 2 nats, written into the residual stream between layers 1 and 3."""
    rise = np.asarray(rise)

    def sweep(delta, gap=2.0):
        recv = np.zeros(n)
        return PatchResult(lp_patched=delta, delta=delta, npe=delta / gap, kl=np.abs(delta),
                           lp_receiver=recv, lp_donor=recv + gap, kl_receiver=np.ones(n),
                           npe_valid=np.ones(n, bool), meta={"n_npe_masked": 0})

    flips, controls = np.tile(rise, (n, 1)), np.tile(rise / 4, (n, 1))
    sweeps = {}
    for c in ("resid", "attn", "mlp"):
        for d, sign in (("denoise", 1), ("noise", -1)):
            sweeps[f"flips/{c}/{d}"] = sweep(sign * flips)
            sweeps[f"controls/{c}/{d}"] = sweep(sign * controls)
    cross = np.zeros((n, L, L))
    cross[:, :, 4] = 1.0  # the last tuned layer is the best donor for every base layer
    return PatchingResult(
        sets={"flips": [{}] * n, "controls": [{}] * n}, labels={"flips": "flips", "controls": "controls"},
        base_step=0, final_step=10, sweeps=sweeps, by_pos={"all": sweeps["flips/resid/denoise"]},
        cross={"flips": sweep(cross)},
        ablation={"flips/revert": sweep(-flips / 2), "flips/graft": sweep(flips / 4),
                  "flips/mean_diff": sweep(-flips / 2),  # half the effect is example-specific
                  # at the answer rows a constant shift carries 90 % of the change
                  "flips/mean_diff@answer": sweep(-flips / 10), "flips/noise@answer": sweep(-flips)},
        cka_matrix=np.eye(L))


def test_summarize_patching_on_a_planted_circuit():
    text = report.summarize_patching(planted_patching(), n_boot=50)
    assert "tuned − base answer log-prob on the flips 2.000 [2.000, 2.000] nats" in text
    # rise / gap = 0.6 at layer 2, every example alike: the interval is a point
    assert "recovers 0.60 [0.60, 0.60] of it at layer 2, the first layer at or above one half" in text
    assert "the first whose interval lies above one half is layer 2. Median NPE at layer 2: 0.60." in text
    assert "resid at layer 3: +2.000 [+2.000, +2.000] (controls +0.500)" in text
    assert "(ratio 4.00)" in text
    # donor 4 is best for every receiver; with every example alike nothing ties with it
    assert "1–1 tied donors per base layer (mean 1.0)" in text
    assert "the receiver's own layer is among them for 1 of 5 base layers" in text
    assert "CKA alignment-path partner for 1 and the CKA best match for 1 of 5." in text
    assert "reverting layer 3 alone changes the tuned model's answer log-prob most (-1.000" in text
    assert "keeping only its mean changes it by -1.000 nats (50 % of the full effect;" in text
    assert ("(the answer-predicting rows only): at layer 3, where removing the tuned − base residual "
            "difference there changes the tuned model's answer log-prob most (-2.000 nats), keeping only "
            "its mean changes it by -0.200 nats (10 % of the full effect;") in text
    assert "(the prompt rows only)" not in text  # not computed: not reported


def planted_compare(sft_acc=0.5):
    base = make_model("qwen3", seed=0)
    big = make_model("qwen3", seed=1)  # an unrelated model: a large update
    small = make_model("qwen3", seed=0)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    drift = {"sft": weights.weight_drift(base, big, progress=False),
             "grpo": weights.weight_drift(big, small, progress=False)}
    methods = ["sft", "grpo"]
    g = np.random.default_rng(0)
    low = g.normal(size=(80, 2)) @ g.normal(size=(2, 16)) + 0.01 * g.normal(size=(80, 16))
    wide = g.normal(size=(80, 16))

    def scalar(p):
        return Band(np.float64(p), np.float64(p - 0.05), np.float64(p + 0.05))

    structure = {g: {"sft": scalar(0.6), "grpo": scalar(0.2)}
                 for g in ("90 %-mass share", "overlap, output space", "overlap, input space",
                           "share |ΔW| > 1e-05")}
    res = CompareResult(
        methods=methods, init={"sft": "base", "grpo": "sft"},
        accuracy={k: {"step": 1, "accuracy": a, "acc_lo": a - 0.1, "acc_hi": a + 0.1}
                  for k, a in (("base", 0.1), ("sft", sft_acc), ("grpo", 0.45))},
        n_eval=100, pooling="mean", labels=["embed", "0", "1", "2"], dropped=[],
        cka={m: Band(np.array([0.99, 0.9, 0.8, 0.85]), np.zeros(4), np.ones(4)) for m in methods},
        cka_floor=np.full(4, 0.01), rank_vs_base={"sft": flat(1.0, 4), "grpo": flat(1.0, 4)},
        rank_vs_init={"sft": flat(1.0, 4), "grpo": flat(-1.0, 4)}, patch_set="flips",
        patches={m: patch_result(3, (3,)) for m in methods}, patch_curves={m: band(3) for m in methods},
        drift=drift, own=drift, structure=structure,
        structure_controls={g: 0.4 for g in structure},
        correct={"base": [True] + [False] * 9, "sft": [True] * 5 + [False] * 5,
                 "grpo": [True] * 4 + [False] * 6},
        last_states={"base": low, "sft": wide, "grpo": low}, matched_unchanged={"grpo": 0.3},
        claims=[])
    res.claims = stages.compare_claims([res.last_states], [res.own], [res.matched_unchanged], res.init)
    return res


def test_summarize_compare_and_the_claims():
    text = report.summarize_compare(planted_compare())
    assert "**SFT** (from the base): accuracy 50.0 % (95 % CI 40.0–60.0) vs base 10.0 %" in text
    assert "CKA vs base lowest at layer **1** (0.800" in text
    assert "Largest own weight update: **SFT**" in text
    # paired accuracy: SFT gains 4 problems and loses none (p = 2 / 2^4); GRPO loses 1 of SFT's
    assert "paired: vs base +40.0 points (McNemar p = 0.12, 4 gained / 0 lost)" in text
    assert "vs SFT -10.0 points (McNemar p = 1, 0 gained / 1 lost)" in text
    claims_text = text.split("**Published claims")[1]
    assert claims_text.count("one training seed, which cannot decide") == 3
    assert claims_text.count("Verdict over one training seed, which cannot decide: **cannot tell**") == 3
    assert "Li et al. 2025" in claims_text and "Mukherjee et al. 2025" in claims_text
    assert "SFT at GRPO's update norm: 0.300" in claims_text
    # the planted SFT rank rise is visible in the single seed's interval (above 0)
    sft_rank = claims_text.split("SFT RankMe ")[1]
    assert sft_rank.startswith("+") and "1 of 1 seeds on the claimed side" in sft_rank


# ---- across training seeds ---------------------------------------------------------------------

def test_seed_wording():
    assert (report.k_of_n(2, 3), report.k_of_n(3, 3), report.k_of_n(1, 1)) == (
        "in 2 of 3 seeds", "in all 3 seeds", "in the one seed")
    assert report.mode_sentence([11, 11, 4]) == "**11** in 2 of 3 seeds (other seeds: 4)"
    assert report.mode_sentence([4, 11]) == "**4** in 1 of 2 seeds (other seeds: 11)"  # tie: first
    assert report.mode_sentence(["7"] * 3) == "**7** in all 3 seeds"
    assert report.seed_values([0.5, 0.6, 0.7]) == "0.60 (mean of 3 seeds: 0.50, 0.60, 0.70)"
    assert report.seed_values([0.5]) == "0.50"


def _evals(finals, middle):
    def ev(step, correct):
        return CheckpointEval(checkpoint="c", step=step, weights_hash=f"h{step}", key="k", n=10,
                              accuracy=sum(correct) / 10, correct=correct, predictions=["1"] * 10,
                              outputs=["1"] * 10, answer_logprob=[-1.0] * 10, mean_answer_logprob=-1.0)

    return [ev(0, [False] * 10), ev(5, [True] * middle + [False] * (10 - middle)),
            ev(10, [True] * finals + [False] * (10 - finals))]


def test_summarize_sft_across_seeds():
    from pathlib import Path

    runs_ = [RunResults(Path(f"runs/sft/s{i}"), _evals(f, m), FlipTable([{}] * f, []))
             for i, (f, m) in enumerate(((8, 3), (1, 3)))]
    text = report.summarize_sft(runs_)
    assert "(the same base for every seed); after 10 SFT steps **45.0 % (mean of 2 seeds: 80.0 %, 10.0 %)**" in text
    # 8 gained / 0 lost: p = 2 / 2^8 < 0.05; 1 gained: p = 1
    assert "Above the base by McNemar's paired test (p < 0.05) in 1 of 2 seeds; p per seed: 0.0078, 1." in text
    assert "Best checkpoint: step **10** in 1 of 2 seeds (other seeds: 5)." in text
    assert "Flips per seed: 8, 1" in text
    assert "<details>" in text and text.count("Base accuracy **0.0 %**") == 3  # + each seed's own lines
    assert report.summarize_sft(runs_[:1]) == report.summarize_sft(runs_[0])  # one seed: as before


def test_summarize_cka_across_seeds():
    a, b = cka_result(), cka_result()
    for r, low in ((a, 3), (b, 2)):
        point = np.full(L, 0.99)
        point[low] = 0.5
        r.classic[r.steps[-1]] = Band(point, point - 0.01, point + 0.01)
        r.noise_classic = np.full(L, 0.02)
    text = report.summarize_cka([a, b])
    assert f"layer **{a.labels[3]}** in 1 of 2 seeds (other seeds: {a.labels[2]})" in text
    assert "lowest CKA 0.500 (mean of 2 seeds: 0.500, 0.500)" in text
    assert "Hook points beyond the noise floor per seed: 1, 1 of 5." in text


def _spectral(rise: bool):
    g = torch.Generator().manual_seed(0)
    low = torch.randn(L, 200, 2, generator=g) @ torch.randn(L, 2, 16, generator=g)
    low = low + 0.05 * torch.randn(L, 200, 16, generator=g)
    wide = torch.randn(L, 200, 16, generator=g)
    pair = (low, wide) if rise else (wide, low)
    boot = {s: spectral.bootstrap_layer_metrics(x, alphas=(1.0,), n_boot=20)
            for s, x in zip((0, 10), pair)}
    return SpectralResult.from_bootstraps(
        boot, labels=["embed", "0", "1", "2", "3"], dropped=[], pooling="mean", alphas=(1.0,),
        width=16, ns=[16, 32], rank_vs_n=np.stack([np.ones((2, L)), 2 * np.ones((2, L))]),
        cka_drift=np.arange(L) / 10)


def test_summarize_spectral_across_seeds_names_disagreement():
    """One seed's rank rises at every layer, the other's falls: no layer holds in every seed."""
    text = report.summarize_spectral([_spectral(True), _spectral(False)])
    assert "Paired Δ RankMe interval above 0 in every seed at no layer; below 0 in every seed at no layer" in text
    assert "above in one seed and below in another at embed, 0, 1, 2, 3" in text
    assert "Layers above 0 per seed: 5, 0; below: 0, 5 of 5." in text
    assert "positive in 1 of 2 seeds" in text
    both_up = report.summarize_spectral([_spectral(True), _spectral(True)])
    assert "above 0 in every seed at embed, 0, 1, 2, 3" in both_up and "positive in all 2 seeds" in both_up


def test_summarize_patching_across_seeds():
    later = planted_patching(rise=(0.0, 0.2, 0.5, 1.2, 2.0))  # half the gap only from layer 3
    text = report.summarize_patching([planted_patching(), later], n_boot=50)
    assert "recovers half the mean gap, mean Δ / mean gap as plotted): layer **2** in 1 of 2 seeds (other seeds: 3)" in text
    assert "its fraction per seed: 0.60 [0.60, 0.60], 0.60 [0.60, 0.60]" in text
    assert "resid at layer **3** in 1 of 2 seeds (other seeds: 4)" in text
    assert "flips / controls 4.00 (mean of 2 seeds: 4.00, 4.00)" in text
    assert "own tuned layer is among the donors tied with the best one, per seed: 1 of 5, 1 of 5" in text
    assert ("(the answer-predicting rows only): at the layer where removing the difference there matters "
            "most (a change of -2.00 (mean of 2 seeds: -2.00, -2.00) nats), keeping only its mean still "
            "changes the answer log-prob by 10 % (mean of 2 seeds: 10 %, 10 %) of that") in text


def test_summarize_compare_across_seeds():
    results = [planted_compare(0.5), planted_compare(0.3)]
    verdicts = stages.claims_over_seeds(results, n_boot=50)
    text = report.summarize_compare(results, verdicts)
    assert "accuracy 40.0 % (mean of 2 seeds: 50.0 %, 30.0 %)" in text
    assert text.startswith("- Base accuracy 10.0 % (the same base in every seed).")
    assert "CKA vs base lowest at layer **1** in all 2 seeds" in text
    assert "Largest own weight update: **SFT** in all 2 seeds" in text
    claims_text = text.split("**Published claims")[1]
    assert "over 2 training seeds" in claims_text
    assert [v.n_seeds for v in verdicts] == [2, 2, 2]
    # the planted SFT rank rise holds in both seeds: the first claim's SFT item is on its side
    assert "2 of 2 seeds on the claimed side: agrees" in claims_text.split("SFT RankMe ")[1].split(")")[0]
    import pytest

    with pytest.raises(ValueError, match="differ in methods or inits"):
        other = planted_compare()
        other.init = {"sft": "base", "grpo": "base"}
        stages.claims_over_seeds([results[0], other])


def test_heatmap_contrast_and_pooling_summary():
    assert report.heatmap_contrast(np.ones((6, 6))) == 0.0  # flat
    assert report.heatmap_contrast(np.eye(6)) == 1.0  # layers match only themselves
    import pytest

    with pytest.raises(ValueError, match="no cell 3 or more layers off"):
        report.heatmap_contrast(np.eye(3))
    sharp, flat = cka_result(), cka_result()
    for r, mat, best in ((sharp, np.eye(L), np.arange(L)), (flat, np.ones((L, L)), np.zeros(L, int))):
        r.matrix, r.chance, r.best = mat, np.zeros((L, L)), best
    sharp.pooling, flat.pooling = "question", "mean"
    assert report.pooling_effect(flat)["embed_best"] == L - 1 and report.pooling_effect(sharp)["embed_best"] == 0
    text = report.summarize_pooling([sharp, sharp], [flat, flat])
    assert "mean pooling 4, 4; question pooling 0, 0 (per seed, of 4)" in text
    assert "mean 0.000 (mean of 2 seeds: 0.000, 0.000); question 1.000" in text
    assert "the mean-pooled heatmap is flatter than the question-pooled one in all 2 seeds" in text
