"""The notebooks' closing sentences and verdicts (each analysis's ``summarize``, one function over
a list of seeds), on constructed results whose answer is known."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_results import band, cka_result, patch_result
from tiny_models import make_model

from alignkit import spectral, weights
from alignkit.analyses import behaviour, cka, common, compare, patching
from alignkit.analyses import spectral as spectral_analysis
from alignkit.analyses.behaviour import BehaviourResult
from alignkit.analyses.compare import CompareResult
from alignkit.analyses.patching import PatchingResult
from alignkit.analyses.spectral import SpectralResult
from alignkit.analyses.weights import WeightsResult, structure
from alignkit.evaluate import CheckpointEval, FlipTable
from alignkit.patching import GenerationResult, PatchResult
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
    text = behaviour.summarize([BehaviourResult(["0", "5", "10"], evals,
                                                FlipTable([{}] * 4, [{}] * 2), Path("runs/x"))])
    assert "Base accuracy **20.0 %**" in text and "after 10 training steps **60.0 %**" in text
    assert "(95 % CI 31.3–83.2), a change of +40.0 points." in text
    assert "Best checkpoint: step **5**." in text
    assert "from -3.00 to -0.50 nats" in text and "Flips: 4; controls: 2" in text
    assert "seed" not in text  # one seed reads as one run
    assert "Smoke mode" not in text
    assert common.summary_text(text, smoke=True).endswith(common.SMOKE_NOTE + "\n")


def test_summarize_cka():
    res = cka_result()
    res.classic[10] = Band(np.array([0.99, 0.95, 0.9, 0.8, 0.85]), np.zeros(L), np.ones(L))
    res.noise_classic = np.full(L, 0.02)
    res.transition = (3, 2, 4)
    res.best = np.array([0, 1, 2, 4, 4])
    res.alt_curve = np.array([0.5, 0.3, 0.7, 0.6])
    text = cka.summarize([res])
    assert "classic CKA): layer **2**; lowest CKA 0.800." in text
    assert "Hook points beyond the noise floor: 4 of 5." in text
    assert "steepest drop in layerwise CKA): into layer **2**; bootstrap 95 % interval: layers 1–3." in text
    assert "best tuned match is another layer: 1 of 5" in text
    assert "lowest at layer **1**; lowest CKA 0.300." in text
    assert "First departures from the noise band (step per layer): embed: —, 0: 5" in text


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
    text = spectral_analysis.summarize([res])
    assert "Paired Δ RankMe interval above 0 at embed, 0, 1, 2, 3; below 0 at no layer." in text
    assert "Of the 5 layers, above 0: 5; below 0: 0." in text
    assert res.stability() == 1.0 and "in 100 % of (n, layer) cells" in text
    res.rank_vs_n[1, 0] = 0.5  # the smaller n disagrees everywhere: 0 %, the full n not counted
    assert res.stability() == 0.0
    for alpha in ("1", "2"):
        line = next(x for x in text.splitlines() if x.startswith(f"- Rényi α = {alpha}, upper"))
        assert "mean Δ +" in line and "positive in the one seed" in line  # a rise


def planted_patching(n=20, rise=(0.0, 0.5, 1.2, 2.0, 2.0), metric="computed"):
    """Flips whose gap is 2 nats, written into the residual stream between layers 1 and 3; under
    the computed metric the controls' gap is a quarter of it, under the answer metric and the copy
    control the controls show the whole gap."""
    rise = np.asarray(rise)

    def sweep(delta, gap=2.0):
        recv = np.zeros(len(delta))
        return PatchResult(lp_patched=delta, delta=delta, npe=delta / gap, kl=np.abs(delta),
                           lp_receiver=recv, lp_donor=recv + gap, kl_receiver=np.ones(len(delta)),
                           npe_valid=np.ones(len(delta), bool),
                           meta={"n_npe_masked": 0, "n_examples": len(delta)})

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
        cka_matrix=np.eye(L), metric=metric,
        checks={"computed/flips": sweep(flips), "computed/controls": sweep(controls, 0.5),
                "answer/flips": sweep(flips), "answer/controls": sweep(flips[:10]),
                "copy/flips": sweep(flips), "copy/controls": sweep(flips)},
        generation={"flips": generation(np.arange(L) >= 3, False, True),
                    "controls": generation(np.arange(L) != 1, True, True)})


def generation(solved_at, receiver, donor, n=10):
    """Every example solved exactly at the layers ``solved_at`` with the patch held."""
    correct = np.tile(solved_at, (n, 1))
    return GenerationResult(correct=correct, receiver=np.full(n, receiver), donor=np.full(n, donor),
                            predictions=[["1"] * L] * n, outputs=[["#### 1"] * L] * n, meta={})


def _cfg():
    from alignkit.config import get_config

    return get_config("tiny", overrides={"patching.n_boot": 50})


def test_summarize_patching_on_a_planted_circuit():
    res = planted_patching()
    text = patching.summarize([res], _cfg())
    assert "log-prob of the scored tokens on the flips): 2.000 [2.000, 2.000] nats" in text
    assert ("computed (the results the solution computes): gap on the flips 2.00, on the controls "
            "0.50 nats, the controls' share 0.25 [0.25, 0.25]") in text
    assert "answer (the final answer after the gold solution): gap on the flips 2.00, on the controls 2.00" in text
    assert ("The sweeps below score `computed`, the metric whose controls carry the smaller share "
            "in the one seed.") in text and "still show most" not in text
    assert "- **Sets**: 20 of 20 flips, 20 of 20 controls (those with something to score under `computed`)" in text
    assert ("flips solved at the best layer 10 of 10 (layer 3); first layer solving at least half: 3; "
            "alone, the reference solves 0 and the tuned model 10 of them. The controls (solved by both "
            "alone): 0 of 10 still solved at the worst layer, 10 at the last") in text
    as_answer = patching.summarize([planted_patching(metric="answer")], _cfg())
    assert ("The sweeps below score `answer`, the metric whose controls carry the smaller share in "
            "no seed. Its controls still show most of the flips' gap (share above one half in the "
            "one seed)") in as_answer
    with pytest.raises(ValueError, match="different metrics"):
        patching.summarize([res, planted_patching(metric="answer")], _cfg())
    # rise / gap = 0.6 at layer 2, every example alike: the interval is a point
    assert "recovers half the mean gap, mean Δ / mean gap as plotted): layer **2**; its fraction: 0.60 [0.60, 0.60]" in text
    assert "first layer whose interval lies above one half: 2." in text
    assert res.half_depth(50) == (2, 2)
    assert "resid at layer **3**, mean Δ +2.000 (controls +0.500)" in text
    assert "flips / controls 4.00." in text and res.specificity() == pytest.approx(4.0)
    # donor 4 is best for every receiver in every resample, and beats the own layer of 0..3
    assert ("a CKA alignment-path partner and the CKA best match: 1, 1 and 1 of 5 (median frequency "
            "1.00); reference layers where another donor beats the own layer (intervals simultaneous "
            "over the donors): 4 of 5 (0, 1, 2, 3).") in text
    assert "reverting one layer changes the tuned model's scored log-prob most at layer **3**" in text
    assert "(all rows, one global mean): at layer **3**" in text and "by 50 % of that" in text
    assert ("(the rows predicting the scored tokens only): at layer **3**, where removing the difference there "
            "matters most (a change of -2.00 [-2.00, -2.00] nats, selected layer), keeping only its mean "
            "still changes the scored log-prob by 10 % of that") in text
    assert "(the prompt rows only)" not in text  # not computed: not reported
    # a zero effect: removing the difference at the answer rows changes nothing beyond noise
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, (20, L))
    noise -= noise.mean(0)  # every layer's mean exactly 0: each interval straddles it
    res.ablation["flips/noise@answer"] = dataclasses.replace(res.ablation["flips/noise@answer"], delta=noise)
    zero = patching.summarize([res], _cfg())
    line = next(x for x in zero.splitlines() if "(the rows predicting the scored tokens only)" in x)
    assert "no effect" in line and "nothing to share" in line and "%" not in line, line


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
    values, controls = structure(drift, 20, 0, 1e-5)
    w = WeightsResult("base", methods, {"sft": "base", "grpo": "sft"}, drift, drift, values,
                      controls, {"grpo": 0.3})
    res = CompareResult(
        methods=methods, init={"sft": "base", "grpo": "sft"},
        accuracy={k: {"step": 1, "accuracy": a, "acc_lo": a - 0.1, "acc_hi": a + 0.1}
                  for k, a in (("base", 0.1), ("sft", sft_acc), ("grpo", 0.45))},
        n_eval=100, pooling="mean", labels=["embed", "0", "1", "2"], dropped=[],
        cka={m: Band(np.array([0.99, 0.9, 0.8, 0.85]), np.zeros(4), np.ones(4)) for m in methods},
        cka_floor=np.full(4, 0.01), rank_vs_base={"sft": flat(1.0, 4), "grpo": flat(1.0, 4)},
        rank_vs_init={"sft": flat(1.0, 4), "grpo": flat(-1.0, 4)}, patch_set="flips",
        patches={m: patch_result(3, (3,)) for m in methods}, patch_curves={m: band(3) for m in methods},
        weights=w,
        correct={"base": [True] + [False] * 9, "sft": [True] * 5 + [False] * 5,
                 "grpo": [True] * 4 + [False] * 6},
        last_states={"base": low, "sft": wide, "grpo": low}, claims=[], base_hash="b0")
    res.claims = compare.compare_claims([res.last_states], [drift], [w.matched_unchanged], res.init)
    return res


def test_summarize_compare_and_the_claims():
    text = compare.summarize([planted_compare()])
    assert "**SFT** (from the base): accuracy 50.0 % (95 % CI 40.0–60.0) vs base 10.0 %" in text
    assert "CKA vs base lowest at layer **1**; mean CKA 0.885" in text
    assert "Largest own weight update: **SFT**" in text
    # paired accuracy: SFT gains 4 problems and loses none (p = 2 / 2^4); GRPO loses 1 of SFT's
    assert "paired: vs base +40.0 points (McNemar p = 0.12, 4 gained / 0 lost)" in text
    assert "vs SFT -10.0 points (McNemar p = 1, 0 gained / 1 lost)" in text
    claims_text = text.split("**Published claims")[1]
    assert claims_text.count("Verdict over 1 training seed (") == 3
    assert claims_text.count("**inconclusive (1 seed)**") == 3  # one seed decides nothing
    assert "Li et al. 2025" in claims_text and "Mukherjee et al. 2025" in claims_text
    assert "SFT at GRPO's update norm: 0.300" in claims_text
    # the planted SFT rank rise is visible in the single seed's interval (above 0)
    sft_rank = claims_text.split("SFT RankMe ")[1]
    assert sft_rank.startswith("+") and "1 above, 0 below, 0 straddle 0 (1 seed)" in \
        sft_rank.split("claimed")[0]


# ---- across training seeds ---------------------------------------------------------------------

def test_seed_wording():
    assert (common.k_of_n(2, 3), common.k_of_n(3, 3), common.k_of_n(1, 1), common.k_of_n(0, 1)) == (
        "in 2 of 3 seeds", "in all 3 seeds", "in the one seed", "in no seed")
    assert common.mode_sentence([11, 11, 4]) == "**11** in 2 of 3 seeds (other seeds: 4)"
    assert common.mode_sentence([4, 11]) == "**4** in 1 of 2 seeds (other seeds: 11)"  # tie: first
    assert common.mode_sentence(["7"] * 3) == "**7** in all 3 seeds"
    assert common.mode_sentence([7]) == "**7**"
    assert common.seed_values([0.5, 0.6, 0.7]) == "0.60 (mean of 3 seeds: 0.50, 0.60, 0.70)"
    assert common.seed_values([0.5]) == "0.50"
    assert (common.per_seed([3, 4]), common.per_seed([3])) == ("per seed 3, 4", "3")


def _evals(finals, middle):
    def ev(step, correct):
        return CheckpointEval(checkpoint="c", step=step, weights_hash=f"h{step}", key="k", n=10,
                              accuracy=sum(correct) / 10, correct=correct, predictions=["1"] * 10,
                              outputs=["1"] * 10, answer_logprob=[-1.0] * 10, mean_answer_logprob=-1.0)

    return [ev(0, [False] * 10), ev(5, [True] * middle + [False] * (10 - middle)),
            ev(10, [True] * finals + [False] * (10 - finals))]


def test_summarize_sft_across_seeds():
    runs_ = [BehaviourResult(["0", "5", "10"], _evals(f, m), FlipTable([{}] * f, []), Path(f"s{i}"))
             for i, (f, m) in enumerate(((8, 3), (1, 3)))]
    text = behaviour.summarize(runs_)
    assert "(the same base for every seed); after 10 training steps **45.0 % (mean of 2 seeds: 80.0 %, 10.0 %)**" in text
    # 8 gained / 0 lost: p = 2 / 2^8 < 0.05; 1 gained: p = 1
    assert "McNemar's paired test (p < 0.05): higher in 1 of 2 seeds; p per seed 0.0078, 1." in text
    assert "Best checkpoint: step **10** in 1 of 2 seeds (other seeds: 5)." in text
    assert "Flips: per seed 8, 1" in text
    details = common.each_seed(runs_, behaviour.summarize)
    assert "<details>" in details and details.count("Base accuracy **0.0 %**") == 2
    assert behaviour.summarize(runs_[:1]) in details  # each seed's own block: the same function


def test_summarize_cka_across_seeds():
    a, b = cka_result(), cka_result()
    for r, low in ((a, 3), (b, 2)):
        point = np.full(L, 0.99)
        point[low] = 0.5
        r.classic[r.steps[-1]] = Band(point, point - 0.01, point + 0.01)
        r.noise_classic = np.full(L, 0.02)
    text = cka.summarize([a, b])
    assert f"layer **{a.labels[3]}** in 1 of 2 seeds (other seeds: {a.labels[2]})" in text
    assert "lowest CKA 0.500 (mean of 2 seeds: 0.500, 0.500)" in text
    assert "Hook points beyond the noise floor: per seed 1, 1 of 5." in text


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
    text = spectral_analysis.summarize([_spectral(True), _spectral(False)])
    assert "Paired Δ RankMe interval above 0 in every seed at no layer; below 0 in every seed at no layer" in text
    assert "above in one seed and below in another at embed, 0, 1, 2, 3" in text
    assert "Of the 5 layers, above 0: per seed 5, 0; below 0: per seed 0, 5." in text
    assert "positive in 1 of 2 seeds" in text
    both_up = spectral_analysis.summarize([_spectral(True), _spectral(True)])
    assert "above 0 in every seed at embed, 0, 1, 2, 3" in both_up and "positive in all 2 seeds" in both_up


def test_summarize_patching_across_seeds():
    later = planted_patching(rise=(0.0, 0.2, 0.5, 1.2, 2.0))  # half the gap only from layer 3
    text = patching.summarize([planted_patching(), later], _cfg())
    assert "recovers half the mean gap, mean Δ / mean gap as plotted): layer **2** in 1 of 2 seeds (other seeds: 3)" in text
    assert "its fraction: per seed 0.60 [0.60, 0.60], 0.60 [0.60, 0.60]" in text
    assert "resid at layer **3** in 1 of 2 seeds (other seeds: 4)" in text
    assert "flips / controls 4.00 (mean of 2 seeds: 4.00, 4.00)" in text
    assert ("the CKA best match: per seed 1, 1 and 1 of 5 (median frequency 1.00), 1, 1 and 1 of 5 "
            "(median frequency 1.00); reference layers where another donor beats the own layer") in text
    assert ("(the rows predicting the scored tokens only): at layer **3** in 1 of 2 seeds (other seeds: 4), where "
            "removing the difference there matters most (a change of per seed -2.00 [-2.00, -2.00], "
            "-2.00 [-2.00, -2.00] nats, selected layer), keeping only its mean still changes the "
            "scored log-prob by per seed 10 %, 10 % of that") in text


def test_summarize_compare_across_seeds():
    results = [planted_compare(0.5), planted_compare(0.3)]
    verdicts = compare.claims_over_seeds(results, n_boot=50)
    text = compare.summarize(results)
    assert "accuracy 40.0 % (mean of 2 seeds: 50.0 %, 30.0 %)" in text
    assert text.startswith("- Base accuracy 10.0 % (the same base in every seed).")
    assert "CKA vs base lowest at layer **1** in all 2 seeds" in text
    assert "Largest own weight update: **SFT** in all 2 seeds" in text
    claims_text = text.split("**Published claims")[1]
    assert "over 2 training seeds" in claims_text
    assert [v.n_seeds for v in verdicts] == [2, 2, 2]
    # the planted SFT rank rise holds in both seeds: the first claim's SFT item is on its side
    assert "2 above, 0 below, 0 straddle 0 (2 seeds); claimed > 0): agrees" in \
        claims_text.split("SFT RankMe ")[1].split("; SFT α-ReQ")[0]
    other_base = planted_compare(0.3)
    other_base.base_hash = "b1"  # the same accuracy, other weights: not the same base
    assert "the seeds' bases differ" in compare.summarize([results[0], other_base])
    with pytest.raises(ValueError, match="differ in methods or inits"):
        other = planted_compare()
        other.init = {"sft": "base", "grpo": "base"}
        compare.claims_over_seeds([results[0], other])


def test_heatmap_contrast_and_pooling_summary():
    assert cka.heatmap_contrast(np.ones((6, 6))) == 0.0  # flat
    assert cka.heatmap_contrast(np.eye(6)) == 1.0  # layers match only themselves
    with pytest.raises(ValueError, match="no cell 3 or more layers off"):
        cka.heatmap_contrast(np.eye(3))
    sharp, flat = cka_result(), cka_result()
    for r, mat, best in ((sharp, np.eye(L), np.arange(L)), (flat, np.ones((L, L)), np.zeros(L, int))):
        r.matrix, r.chance, r.best = mat, np.zeros((L, L)), best
    sharp.pooling, flat.pooling = "question", "mean"
    assert flat.pooling_effect()["embed_best"] == L - 1 and sharp.pooling_effect()["embed_best"] == 0
    text = cka.summarize_pooling([sharp, sharp], [flat, flat])
    assert "mean pooling: per seed 4, 4; question pooling: per seed 0, 0 (of 4)" in text
    assert "mean 0.000 (mean of 2 seeds: 0.000, 0.000); question 1.000" in text
    assert "the mean-pooled heatmap is flatter than the question-pooled one in all 2 seeds" in text


def test_summarize_patching_at_the_real_models_budget():
    """The real model's preset runs the resid sweeps only (no cross-layer grid, no extra sweeps,
    no generation): its summary says what was not run and states nothing about it."""
    from alignkit.config import get_config

    full = planted_patching()
    lean = dataclasses.replace(
        full, sweeps={k: v for k, v in full.sweeps.items() if "/resid/" in k}, cross={},
        ablation={}, generation={}, by_pos={"all": full.by_pos["all"]},
        checks={k: v for k, v in full.checks.items() if k.startswith("computed/")})
    cfg = get_config("smollm2-135m", overrides={"patching.n_boot": 50})
    assert cfg.patching.extras == () and cfg.patching.n_cross == 0
    text = patching.summarize([lean, lean], cfg)
    assert "- **Cross-layer**: not run (`patching.n_cross=0`" in text
    assert "**Weights**" not in text and "Mean-ablated" not in text and "with the patch held" not in text
    assert ("- **Not run** at this preset's budget (`patching.extras`): the resid patch by positions "
            "(prompt rows, answer-predicting rows), the other metrics' sweeps") in text
    assert "resid at layer **3** in all 2 seeds" in text and "attn at layer" not in text
    assert "Not run" not in patching.summarize([full, full], _cfg())  # the toy runs every sweep


def test_the_published_runs_and_their_summaries():
    from alignkit.analyses import summaries
    from alignkit.config import PUBLISHED, get_config
    from alignkit.plots import figure_dir

    toy, real = summaries.published("tiny"), summaries.published("smollm2-135m")
    assert "05_post_training_compare" in toy and "05_compare_models" not in toy
    assert "05_compare_models" in real and not any(n.startswith("05_post") for n in real)
    assert set(toy) - {n for n in toy if n.startswith("05_")} == set(real) - {"05_compare_models"}
    root = Path("/tmp/x")
    assert figure_dir(get_config("smollm2-135m", overrides={"root": str(root)})) == \
        root / "images" / PUBLISHED["smollm2-135m"]
    moved = figure_dir(get_config("smollm2-135m", overrides={"root": str(root), "sft.max_steps": 2}))
    assert moved.is_relative_to(root / "reports")
    assert summaries.run_name(get_config("smollm2-135m")).startswith("SmolLM2-135M-Instruct")
    assert summaries.run_name(get_config("tiny")) == "embedded"
