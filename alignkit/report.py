"""The sentences under each notebook: ``summarize_*`` turns a stage's result into Markdown, so
every number in a closing cell comes from tested code (``tests/test_report.py``)."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from alignkit import spectral, weights
from alignkit.layers import alignment_path, best_match
from alignkit.results import (
    CKAResult,
    CompareResult,
    CrossCKAResult,
    LensResult,
    PatchingResult,
    RunResults,
    SpectralResult,
)
from alignkit.stats import Band, bootstrap_mean, gap_fraction, mcnemar, near_best

SMOKE_NOTE = "- *Smoke mode: tiny sizes, the numbers mean nothing.*"


def _lines(lines: list[str], smoke: bool) -> str:
    return "\n".join(lines + ([SMOKE_NOTE] if smoke else []))


def _sft_lines(res: RunResults) -> list[str]:
    """One seed of notebook 01: base and final accuracy, best checkpoint, answer log-prob, flips."""
    rows = res.summary()
    first, last = rows[0], rows[-1]
    best = max(rows, key=lambda r: r["accuracy"])
    return [
        f"- Base accuracy **{100 * first['accuracy']:.1f} %** (95 % CI {100 * first['acc_lo']:.1f}"
        f"–{100 * first['acc_hi']:.1f}) on {res.evals[0].n} held-out problems; after "
        f"{last['step']} steps **{100 * last['accuracy']:.1f} %** ({100 * last['acc_lo']:.1f}–"
        f"{100 * last['acc_hi']:.1f}), a change of "
        f"{100 * (last['accuracy'] - first['accuracy']):+.1f} points; best checkpoint: step "
        f"{best['step']}.",
        f"- Mean answer log-prob moved from {first['answer_logprob']:.2f} to "
        f"{last['answer_logprob']:.2f} nats.",
        f"- {len(res.table.flips)} flip examples and {len(res.table.controls)} controls were saved "
        f"to `{res.run_dir.name}/flips.json` for notebooks 02–04."]


def _cka_lines(res: CKAResult) -> list[str]:
    """One seed of notebook 02: drift at the final checkpoint, transition, remapping, departures."""
    final = res.steps[-1]
    lw, lw_deb = res.classic[final].point, res.debiased[final].point
    above = [lab for lab, v, hw in zip(res.labels, lw, res.noise_classic) if v < 1 - hw]
    least = int(np.argmin(lw))
    point, lo, hi = res.transition
    alt = res.alt_curve
    return [
        f"- **Drift at the final checkpoint (step {final})**, {res.pooling} pooling: classic CKA "
        f"ranges from {lw.max():.3f} to {lw.min():.3f}; the largest drift is at layer "
        f"**{res.labels[least]}** (CKA {lw[least]:.3f}, debiased {lw_deb[least]:.3f}). "
        f"{len(above)} of {len(res.labels)} hook points drift beyond the noise floor"
        + (f" (first: {above[0]})." if above else "."),
        f"- **Transition**: the steepest drop in layerwise CKA is into layer "
        f"**{res.labels[point]}** (bootstrap 95 % interval: layers {res.labels[lo]}–"
        f"{res.labels[hi]}).",
        f"- **Remapping index** {res.remap:.2f} (mean |best-matching tuned layer − own layer|); "
        f"{sum(int(b) != i for i, b in enumerate(res.best))} of {len(res.labels)} base layers "
        "match another tuned layer best.",
        "- **Over training**: first departures from the noise band (step per layer): "
        + ", ".join(f"{lab}: {int(s) if s >= 0 else '—'}"
                    for lab, s in zip(res.labels, res.departure)) + ".",
        f"- With **{res.alt_pooling}** pooling the final layerwise CKA runs from {alt.max():.3f} "
        f"(layer {res.alt_labels[int(np.argmax(alt))]}) down to {alt.min():.3f} (layer "
        f"{res.alt_labels[int(np.argmin(alt))]})."]


def heatmap_contrast(mat: np.ndarray, far: int = 3) -> float:
    """Mean diagonal of a cross-layer CKA matrix minus the mean of its cells ``far`` or more
    layers off the diagonal: 0 for a flat heatmap, large when layers match only themselves."""
    mat = np.asarray(mat, dtype=np.float64)
    i, j = np.indices(mat.shape)
    off = np.abs(i - j) >= far
    if not off.any():
        raise ValueError(f"a {mat.shape} matrix has no cell {far} or more layers off the diagonal")
    return float(np.diag(mat).mean() - mat[off].mean())


def pooling_effect(res: CKAResult) -> dict:
    """What the template-in-the-pooling question asks of one CKA result: ``embed_best`` (decoder
    layers of the base whose best tuned match is the embedding; None without an embedding row),
    ``contrast`` (``heatmap_contrast`` of the matrix minus its permutation baseline) and
    ``remap`` (the remapping index)."""
    embed = res.labels[0] == "embed"
    return {"embed_best": int(sum(int(b) == 0 for b in res.best[1:])) if embed else None,
            "contrast": heatmap_contrast(res.matrix - res.chance), "remap": float(res.remap)}


def summarize_pooling(new: Sequence[CKAResult], old: Sequence[CKAResult]) -> str:
    """Notebook 02, section 5: per seed, the embedding-as-best-match count and the heatmap's
    contrast under the question pooling (``new``) and the old mean pooling (``old``)."""
    if len(new) != len(old) or not new:
        raise ValueError(f"one result per seed under each pooling, got {len(new)} and {len(old)}")
    a, b = [pooling_effect(r) for r in new], [pooling_effect(r) for r in old]
    n, pn, po = len(new), new[0].pooling, old[0].pooling
    lines = []
    if a[0]["embed_best"] is not None:
        lines.append(
            f"- Decoder layers whose best tuned match is the embedding: {po} pooling "
            + ", ".join(str(x["embed_best"]) for x in b) + f"; {pn} pooling "
            + ", ".join(str(x["embed_best"]) for x in a)
            + f" (per seed, of {len(new[0].labels) - 1}).")
    flatter = sum(x["contrast"] < y["contrast"] for x, y in zip(b, a))
    lines.append(f"- Heatmap contrast (diagonal minus far-off-diagonal CKA above chance): {po} "
                 f"{seed_values([x['contrast'] for x in b], '{:.3f}')}; {pn} "
                 f"{seed_values([x['contrast'] for x in a], '{:.3f}')}: the {po}-pooled heatmap is "
                 f"flatter than the {pn}-pooled one {k_of_n(flatter, n)}.")
    return "\n".join(lines)


def rank_stability(res: SpectralResult) -> float:
    """Share of (probe size, layer) cells whose Δ RankMe sign equals the sign at the largest n,
    the largest n itself left out (it always agrees with itself)."""
    sign = np.sign(res.rank_vs_n[1] - res.rank_vs_n[0])
    if len(sign) < 2:
        return float("nan")
    return float((sign[:-1] == sign[-1]).mean())


def rank_drift_correlation(res: SpectralResult) -> float:
    """Spearman correlation across layers of CKA drift and Δ RankMe (final − base)."""
    drank = res.point["rankme"][-1] - res.point["rankme"][0]
    return float(pd.Series(res.cka_drift).rank().corr(pd.Series(drank).rank()))


def _spectral_lines(res: SpectralResult) -> list[str]:
    """One seed of notebook 03: RankMe base → final, separated layers, halves, Rényi deltas,
    stability."""
    b0, b1 = res.band("rankme", res.steps[0]), res.band("rankme", res.steps[-1])
    paired = res.delta("rankme", res.steps[-1])  # the same probe rows in both: paired intervals
    d = paired.point
    up = [lab for i, lab in enumerate(res.labels) if paired.lo[i] > 0]
    down = [lab for i, lab in enumerate(res.labels) if paired.hi[i] < 0]
    half = len(res.labels) // 2
    big, small = int(np.argmax(np.abs(d))), int(np.argmin(np.abs(d)))
    lines = [
        f"- **RankMe, base → final (step {res.steps[-1]})**: mean over layers "
        f"{b0.point.mean():.2f} → {b1.point.mean():.2f}; largest change at layer "
        f"**{res.labels[big]}** ({d[big]:+.2f}), smallest at layer **{res.labels[small]}** "
        f"({d[small]:+.2f}).",
        f"- The paired interval of Δ RankMe excludes 0 at {len(up)} layers where rank **rose** "
        f"({', '.join(up) or 'none'}) and {len(down)} where it **fell** "
        f"({', '.join(down) or 'none'}).",
        f"- Mean Δ RankMe in the lower half of the stack {d[:half].mean():+.2f}, in the upper half "
        f"{d[half:].mean():+.2f} (the study's hypothesis: a rise in mid-to-late layers)."]
    for alpha in res.alphas:
        delta = res.delta(spectral.metric_key(alpha), res.steps[-1]).point
        lines.append(f"- Rényi α = {alpha:g}: mean Δ {delta[:half].mean():+.2f} (lower half of the "
                     f"stack), {delta[half:].mean():+.2f} (upper half).")
    lines.append(f"- Δ sign at smaller probe sizes equals the sign at the full size in "
                 f"{100 * rank_stability(res):.0f} % of (n, layer) cells; Spearman correlation "
                 f"of CKA drift with Δ RankMe across layers: {rank_drift_correlation(res):.2f}.")
    return lines


def curve(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Band:
    return Band.of(bootstrap_mean(values, n_boot=n_boot, seed=seed))  # mean over axis 0


def best_donors(res: PatchingResult, set_: str = "flips", n_boot: int = 1000,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``best: [L]`` the tuned donor layer whose cross-layer patch raises each base layer most,
    and ``ties: [L, L]`` every donor tied with it (``stats.near_best``: the paired bootstrap
    interval of the difference from the best reaches 0). The tied set is the finding, not the
    argmax."""
    return near_best(res.cross[set_].delta, n_boot=n_boot, seed=seed)


def patch_fraction(r, n_boot: int = 1000, seed: int = 0) -> Band:
    """``[L]`` the fraction of the mean gap a sweep recovers: mean Δ / mean gap, the quantity
    its curve plots against the dashed gap, with a paired bootstrap interval over examples."""
    return gap_fraction(r.delta, r.lp_donor - r.lp_receiver, n_boot=n_boot, seed=seed)


def half_depth(frac: Band) -> tuple[int | None, int | None]:
    """The first layer whose gap fraction reaches 0.5, and the first whose interval lies
    entirely above 0.5 (``None``: no such layer)."""
    first = next((i for i, v in enumerate(frac.point) if v >= 0.5), None)
    sure = next((i for i, v in enumerate(frac.lo) if v > 0.5), None)
    return first, sure


def _patching_lines(res: PatchingResult, n_boot: int = 1000, seed: int = 0,
                    min_gap: float = 0.1) -> list[str]:
    """One seed of notebook 04: gap, peaks per component, sufficiency depth, specificity,
    cross-layer,
    weight ablation and the mean-ablated difference."""
    def peak(values):
        c = curve(values, n_boot, seed)
        i = int(np.nanargmax(np.abs(c.point)))
        return i, c.point[i], c.lo[i], c.hi[i]

    res_d = res.sweep("flips", "resid", "denoise")
    gap = curve((res_d.lp_donor - res_d.lp_receiver)[:, None], n_boot, seed)
    n_flips, n_controls = len(res.sets["flips"]), len(res.sets["controls"])
    lines = [f"- **Sets**: {n_flips} {res.labels['flips']}, {n_controls} "
             f"{res.labels['controls']}; tuned − base answer log-prob on the flips "
             f"{gap.point[0]:.3f} [{gap.lo[0]:.3f}, {gap.hi[0]:.3f}] nats (mean, 95 % interval); "
             f"NPE masked for {res_d.meta['n_npe_masked']} flips with a gap below {min_gap} nats."]
    components = sorted({k.split("/")[1] for k in res.sweeps}, key=["resid", "attn", "mlp"].index)
    for direction in ("denoise", "noise"):
        parts = []
        for comp in components:
            i, p, lo, hi = peak(res.sweep("flips", comp, direction).delta)
            pc = curve(res.sweep("controls", comp, direction).delta, n_boot, seed).point[i]
            parts.append(f"{comp} at layer {i}: {p:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                         f"(controls {pc:+.3f})")
        lines.append(f"- **{direction}**: the largest mean Δ per component on the flips — "
                     + "; ".join(parts) + ".")
    frac = patch_fraction(res_d, n_boot, seed)
    first, sure = half_depth(frac)
    if first is None:
        lines.append("- **Sufficiency depth**: no single-layer resid patch recovers half the mean "
                     f"gap (largest fraction {np.nanmax(frac.point):.2f}, mean Δ / mean gap).")
    else:
        median_npe = float(np.nanmedian(res_d.npe[:, first]))
        lines.append(
            "- **Sufficiency depth** (fraction of the mean gap, mean Δ / mean gap, as plotted): "
            f"the tuned residual stream patched into the base recovers {frac.point[first]:.2f} "
            f"[{frac.lo[first]:.2f}, {frac.hi[first]:.2f}] of it at layer {first}, the first layer "
            "at or above one half; "
            + (f"the first whose interval lies above one half is layer {sure}" if sure is not None
               else "no layer's interval lies entirely above one half")
            + f". Median NPE at layer {first}: {median_npe:.2f}.")
    lines.append("- The peaks above are maxima over layers: their intervals are not corrected "
                 "for that selection.")
    flip_size = np.nanmean(np.abs(res_d.delta))
    ctrl_size = np.nanmean(np.abs(res.sweep("controls", "resid", "denoise").delta))
    lines.append(f"- **Specificity**: mean |Δ| of the resid denoise sweep over layers is "
                 f"{flip_size:.3f} nats on the flips and {ctrl_size:.3f} on the controls (ratio "
                 f"{flip_size / ctrl_size:.2f}).")
    best, ties = best_donors(res, "flips", n_boot, seed)
    L = len(best)
    path = set(map(tuple, alignment_path(res.cka_matrix)))
    cka_best = best_match(res.cka_matrix)
    size = ties.sum(1)
    lines.append(
        f"- **Cross-layer** (tuned donors tied with the best one, paired bootstrap over examples): "
        f"{int(size.min())}–{int(size.max())} tied donors per base layer (mean {size.mean():.1f}); "
        f"the receiver's own layer is among them for {int(np.diag(ties).sum())} of {L} base "
        f"layers; the tied set holds a CKA alignment-path partner for "
        f"{sum(any((i, int(j)) in path for j in np.flatnonzero(ties[i])) for i in range(L))} and "
        f"the CKA best match for {int(sum(ties[i, cka_best[i]] for i in range(L)))} of {L}.")
    i_rev, p_rev, lo_rev, hi_rev = peak(res.ablation["flips/revert"].delta)
    i_gr, p_gr, lo_gr, hi_gr = peak(res.ablation["flips/graft"].delta)
    lines.append(f"- **Weights**: reverting layer {i_rev} alone changes the tuned model's answer "
                 f"log-prob most ({p_rev:+.3f} [{lo_rev:+.3f}, {hi_rev:+.3f}] nats); grafting "
                 f"layer {i_gr} into the base changes it most ({p_gr:+.3f} [{lo_gr:+.3f}, "
                 f"{hi_gr:+.3f}]).")
    for q, (j, full, md) in mean_ablation(res).items():
        rows = "all rows, one global mean" if q == "all" else f"the {POSITION_NAMES[q]} only"
        lines.append(
            f"- **Mean-ablated difference** ({rows}): at layer {j}, where removing the tuned − "
            f"base residual difference there changes the tuned model's answer log-prob most "
            f"({full:+.3f} nats), keeping only its mean changes it by {md:+.3f} nats "
            f"({100 * md / full:.0f} % of the full effect; near 0 %, a constant shift carries the "
            "change)." if abs(full) > 1e-12 else
            f"- **Mean-ablated difference** ({rows}): removing the residual difference changes "
            "nothing here.")
    return lines


POSITION_NAMES = {"prompt": "prompt rows", "answer": "answer-predicting rows"}


def mean_ablation(res: PatchingResult) -> dict[str, tuple[int, float, float]]:
    """``{"all" | "prompt" | "answer": (layer, full, kept)}`` on the flips: the layer where
    removing the tuned − base residual difference at those rows (the resid noise patch) changes
    the tuned model's mean answer log-prob most, that change, and the change when only the
    example-specific part is removed there (the rows' mean difference kept). ``kept / full`` near
    0: a constant shift at those rows (a steering vector) carries the change."""
    out = {}
    for q in ("all", "prompt", "answer"):
        md_key, full_key = ("flips/mean_diff", None) if q == "all" else (
            f"flips/mean_diff@{q}", f"flips/noise@{q}")
        if md_key not in res.ablation:
            continue
        full_r = (res.sweep("flips", "resid", "noise") if full_key is None
                  else res.ablation[full_key])
        full = np.nanmean(full_r.delta, 0)
        j = int(np.nanargmax(np.abs(full)))
        out[q] = (j, float(full[j]), float(np.nanmean(res.ablation[md_key].delta, 0)[j]))
    return out


def _sign_counts(d: Band) -> tuple[int, int]:  # layers whose interval is above / below zero
    return int((d.lo > 0).sum()), int((d.hi < 0).sum())


def whole_model(res: CompareResult, method: str) -> pd.Series:
    """The own update of ``method`` pooled over the whole model."""
    return weights.summarize_drift(res.own[method].assign(model="all"), "model").iloc[0]


def _name(label: str) -> str:
    return label if label == "base" else label.upper()


def accuracy_tests(res: CompareResult) -> dict[str, dict]:
    """McNemar's exact test (paired: the same problems) of each final model against the base and,
    where it started elsewhere, against its own initial model: ``{"<a> → <b>": mcnemar}``."""
    out = {}
    for m in res.methods:
        for ref in dict.fromkeys(("base", res.init[m])):
            if ref in res.correct and ref != m:
                out[f"{ref} → {m}"] = mcnemar(res.correct[ref], res.correct[m])
    return out


def _compare_lines(res: CompareResult, claims: list | None = None) -> list[str]:
    """One seed of notebook 05: per method accuracy (McNemar against base and own init), CKA,
    Δ RankMe,
    patching depth (fraction of the mean gap) and own update, then the published claims, each
    computed as its paper defines it (``alignkit.claims``)."""
    whole = {m: whole_model(res, m) for m in res.methods}
    base_acc = res.accuracy["base"]
    tests = accuracy_tests(res)
    lines = []
    for m in res.methods:
        a, c = res.accuracy[m], res.cka[m].point
        by_module = res.own_by_module()[m]
        lay = weights.summarize_drift(res.own[m], "layer")
        lay = lay[(lay.index >= 0) & (lay.index < res.own[m].attrs["n_layers"])]["rel_change"]
        sweep = res.patches[m]
        gap = float(np.mean(sweep.lp_donor - sweep.lp_receiver))
        frac = patch_fraction(sweep)
        first, _ = half_depth(frac)
        up, down = _sign_counts(res.rank_vs_base[m])
        start = "from the base" if res.init[m] == "base" else "from " + res.init[m].upper()
        paired = "; ".join(f"vs {_name(k.split(' → ')[0])} {100 * t['diff']:+.1f} points "
                           f"(McNemar p = {t['p']:.2g}, {t['only_b']} gained / {t['only_a']} lost)"
                           for k, t in tests.items() if k.endswith(f"→ {m}"))
        half = (f"**{first}** (fraction {frac.point[first]:.2f} [{frac.lo[first]:.2f}, "
                f"{frac.hi[first]:.2f}])" if first is not None else "— (never)")
        lines.append(
            f"- **{m.upper()}** ({start}): accuracy {100 * a['accuracy']:.1f} % (95 % CI "
            f"{100 * a['acc_lo']:.1f}–{100 * a['acc_hi']:.1f}) vs base "
            f"{100 * base_acc['accuracy']:.1f} %; paired: {paired}. CKA vs base lowest at layer "
            f"**{res.labels[int(np.argmin(c))]}** ({c.min():.3f}; mean {c.mean():.3f}). Δ RankMe "
            f"vs base: mean {np.mean(res.rank_vs_base[m].point):+.2f}, interval above 0 at {up} "
            f"and below 0 at {down} of {len(res.labels)} hook points. Resid denoise recovers half "
            f"of its {gap:+.2f}-nat mean gap (mean Δ / mean gap) from layer {half}. Own update: "
            f"whole-model ‖ΔW‖/‖W‖ {whole[m]['rel_change']:.2e}; largest in module "
            f"**{by_module.idxmax()}** ({by_module.max():.2e}) and layer **{int(lay.idxmax())}** "
            f"({lay.max():.2e}).")
    most = max(res.methods, key=lambda m: whole[m]["rel_change"])
    lowest = min(res.methods, key=lambda m: res.cka[m].point.mean())
    lines.append(f"- Largest own weight update: **{most.upper()}** "
                 f"({whole[most]['rel_change']:.2e} of ‖W‖); lowest mean CKA vs base: "
                 f"**{lowest.upper()}**. Layer-wise differences between methods are one training "
                 "seed each: not findings until they hold across seeds.")
    lines += ["", "**Published claims, each with its paper's own quantity** (items: value [95 % "
              "interval]; a verdict needs every seed's interval on one side of 0, and ≥ 2 seeds):",
              ""]
    claims = res.claims if claims is None else claims
    lines += [f"{i}. " + v.sentence() for i, v in enumerate(claims, 1)] or [
        "None tested: each claim is about a named stage; label the models sft, dpo or grpo."]
    return lines


# ---- across training seeds: what the notebooks and the README state ----------------------------

def k_of_n(k: int, n: int) -> str:
    """``"in all 3 seeds"``, ``"in 2 of 3 seeds"`` (``"in the one seed"`` when n is 1)."""
    if n == 1:
        return "in the one seed"
    return f"in all {n} seeds" if k == n else f"in {k} of {n} seeds"


def mode_sentence(values: Sequence, fmt=str) -> str:
    """The most common of the seeds' ``values`` in bold with how many seeds give it, and the
    other seeds' values: ``"**11** in 2 of 3 seeds (other seeds: 4)"`` (ties: the first seen)."""
    values = list(values)
    counts = Counter(values)
    top = max(counts, key=lambda v: (counts[v], -values.index(v)))
    others = [fmt(v) for v in values if v != top]
    return f"**{fmt(top)}** {k_of_n(counts[top], len(values))}" + (
        f" (other seeds: {', '.join(others)})" if others else "")


def seed_values(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``"0.52 (seeds: 0.48, 0.55, 0.53)"``: the mean over seeds and every seed's value."""
    values = [float(v) for v in values]
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(np.mean(values))} (mean of {len(values)} seeds: "
            + ", ".join(fmt.format(v) for v in values) + ")")


def _each_seed(results: Sequence, one, **kw) -> list[str]:
    """Every seed's own summary in a collapsed HTML block under the across-seed lines."""
    out = ["", "<details><summary>Each seed on its own</summary>", ""]
    for i, r in enumerate(results):
        out += [f"**Training seed {i + 1}**", "", *one(r, **kw), ""]
    return out + ["</details>"]


def _summary(results, one, across, smoke: bool, **kw) -> str:
    rs = list(results) if isinstance(results, (list, tuple)) else [results]
    if not rs:
        raise ValueError("nothing to summarise: no results given")
    lines = one(rs[0], **kw) if len(rs) == 1 else across(rs, **kw) + _each_seed(rs, one, **kw)
    return _lines(lines, smoke)


def _sft_seeds(rs: Sequence[RunResults]) -> list[str]:
    n, first = len(rs), rs[0].summary()[0]
    finals = [r.summary()[-1] for r in rs]
    acc = [100 * f["accuracy"] for f in finals]
    tests = [mcnemar(r.evals[0].correct, r.evals[-1].correct) for r in rs]
    up = sum(t["p"] < 0.05 and t["diff"] > 0 for t in tests)
    down = sum(t["p"] < 0.05 and t["diff"] < 0 for t in tests)
    same_base = len({r.evals[0].weights_hash for r in rs}) == 1
    return [
        f"- Base accuracy **{100 * first['accuracy']:.1f} %** (95 % CI "
        f"{100 * first['acc_lo']:.1f}–{100 * first['acc_hi']:.1f}) on {rs[0].evals[0].n} held-out "
        "problems" + (" (the same base for every seed)" if same_base else
                      " (seed 1's base: the seeds start from different bases)") + f"; after "
        f"{finals[0]['step']} SFT steps **{seed_values(acc, '{:.1f} %')}"
        f"**, from {100 * min(f['accuracy'] for f in finals):.1f} to "
        f"{100 * max(f['accuracy'] for f in finals):.1f} % across {n} training seeds.",
        f"- Above the base by McNemar's paired test (p < 0.05) {k_of_n(up, n)}"
        + (f", below it {k_of_n(down, n)}" if down else "") + "; p per seed: "
        + ", ".join(f"{t['p']:.2g}" for t in tests) + ".",
        "- Best checkpoint: step " + mode_sentence([max(r.summary(), key=lambda x: x["accuracy"])
                                                    ["step"] for r in rs]) + ".",
        f"- Mean answer log-prob moved from {first['answer_logprob']:.2f} to "
        f"{seed_values([f['answer_logprob'] for f in finals])} nats.",
        "- Flips per seed: " + ", ".join(str(len(r.table.flips)) for r in rs) + "; controls: "
        + ", ".join(str(len(r.table.controls)) for r in rs) + " (each seed's `flips.json`)."]


def summarize_sft(res: RunResults | Sequence[RunResults], smoke: bool = False) -> str:
    """Notebook 01: base and final accuracy, best checkpoint, answer log-prob, flips; across
    seeds (a list) what holds in how many, each seed's own lines collapsed below."""
    return _summary(res, _sft_lines, _sft_seeds, smoke)


def _cka_seeds(rs: Sequence[CKAResult]) -> list[str]:
    labels = rs[0].labels
    final = [r.classic[r.steps[-1]].point for r in rs]
    beyond = [int(sum(v < 1 - hw for v, hw in zip(f, r.noise_classic))) for f, r in zip(final, rs)]
    first_ckpt = [int(sum(0 <= d <= r.steps[1] for d in r.departure)) for r in rs]
    lines = [
        f"- **Largest drift at the final checkpoint** ({rs[0].pooling} pooling, classic CKA): "
        f"layer {mode_sentence([labels[int(np.argmin(f))] for f in final])}; lowest CKA "
        f"{seed_values([f.min() for f in final], '{:.3f}')}. Hook points beyond the noise floor "
        f"per seed: {', '.join(map(str, beyond))} of {len(labels)}.",
        "- **Transition** (steepest drop in layerwise CKA): into layer "
        + mode_sentence([labels[r.transition[0]] for r in rs]) + ".",
        f"- **Remapping index** {seed_values([r.remap for r in rs])}; base layers whose best tuned "
        "match is another layer, per seed: "
        + ", ".join(str(sum(int(b) != i for i, b in enumerate(r.best))) for r in rs)
        + f" of {len(labels)}."]
    if labels[0] == "embed":
        lines.append("- Base layers whose best tuned match is the **embedding**, per seed: "
                     + ", ".join(str(sum(int(b) == 0 for b in r.best[1:])) for r in rs)
                     + f" of {len(labels) - 1} decoder layers.")
    lines += [
        f"- **Over training**: hook points outside the noise band by the first checkpoint after "
        f"the base (step {rs[0].steps[1]}), per seed: {', '.join(map(str, first_ckpt))}.",
        f"- With **{rs[0].alt_pooling}** pooling the final layerwise CKA is lowest at layer "
        + mode_sentence([r.alt_labels[int(np.argmin(r.alt_curve))] for r in rs])
        + f"; lowest CKA {seed_values([r.alt_curve.min() for r in rs], '{:.3f}')}."]
    return lines


def summarize_cka(res: CKAResult | Sequence[CKAResult], smoke: bool = False) -> str:
    """Notebook 02: drift at the final checkpoint, transition, remapping, departures (across
    seeds when given a list)."""
    return _summary(res, _cka_lines, _cka_seeds, smoke)


def _spectral_seeds(rs: Sequence[SpectralResult]) -> list[str]:
    n, labels = len(rs), rs[0].labels
    half = len(labels) // 2
    deltas = [r.delta("rankme", r.steps[-1]) for r in rs]
    up = np.array([d.lo > 0 for d in deltas])
    down = np.array([d.hi < 0 for d in deltas])
    all_down = ", ".join(lab for i, lab in enumerate(labels) if down[:, i].all())
    both = [lab for i, lab in enumerate(labels) if up[:, i].any() and down[:, i].any()]
    lines = [
        f"- **RankMe, base → final** (mean over layers): {rs[0].band('rankme', 0).point.mean():.2f}"
        f" → {seed_values([r.band('rankme', r.steps[-1]).point.mean() for r in rs])}.",
        "- Paired Δ RankMe interval above 0 in every seed at "
        f"{', '.join(lab for i, lab in enumerate(labels) if up[:, i].all()) or 'no layer'}; below "
        f"0 in every seed at {all_down or 'no layer'}; "
        f"above in one seed and below in another at {', '.join(both) or 'no layer'}. Layers "
        "above 0 "
        f"per seed: {', '.join(str(int(u.sum())) for u in up)}; below: "
        f"{', '.join(str(int(d.sum())) for d in down)} of {len(labels)}.",
        "- Mean Δ RankMe, upper half of the stack: "
        f"{seed_values([d.point[half:].mean() for d in deltas], '{:+.2f}')}"
        f", positive {k_of_n(sum(d.point[half:].mean() > 0 for d in deltas), n)}; lower half: "
        f"{seed_values([d.point[:half].mean() for d in deltas], '{:+.2f}')} (the study's "
        "hypothesis: a rise in mid-to-late layers)."]
    for alpha in rs[0].alphas:
        key = spectral.metric_key(alpha)
        upper = [r.delta(key, r.steps[-1]).point[half:].mean() for r in rs]
        lines.append(f"- Rényi α = {alpha:g}, upper half: mean Δ {seed_values(upper, '{:+.2f}')}, "
                     f"positive {k_of_n(sum(u > 0 for u in upper), n)}.")
    lines.append(f"- Δ sign at smaller probe sizes equals the full-size sign in "
                 f"{seed_values([100 * rank_stability(r) for r in rs], '{:.0f} %')} of (n, layer) "
                 f"cells; Spearman correlation of CKA drift with Δ RankMe across layers "
                 f"{seed_values([rank_drift_correlation(r) for r in rs])}.")
    return lines


def summarize_spectral(res: SpectralResult | Sequence[SpectralResult], smoke: bool = False) -> str:
    """Notebook 03: RankMe base → final, separated layers, halves, Rényi deltas, stability
    (across seeds when given a list)."""
    return _summary(res, _spectral_lines, _spectral_seeds, smoke)


def _peak_layer(delta: np.ndarray) -> int:
    """The layer of the largest |mean Δ| over examples (a selected maximum)."""
    return int(np.nanargmax(np.abs(np.nanmean(delta, 0))))


def _patching_seeds(rs: Sequence[PatchingResult], n_boot: int = 1000, seed: int = 0,
                    min_gap: float = 0.1) -> list[str]:
    sweeps = [r.sweep("flips", "resid", "denoise") for r in rs]
    fracs = [patch_fraction(s, n_boot, seed) for s in sweeps]
    depth = [half_depth(f) for f in fracs]
    lines = [
        "- **Sets** per seed: "
        + "; ".join(f"{len(r.sets['flips'])} {r.labels['flips']}" for r in rs)
        + f". Mean gap (tuned − base answer log-prob on the flips): "
        f"{seed_values([np.mean(s.lp_donor - s.lp_receiver) for s in sweeps], '{:.3f}')} nats.",
        "- **Sufficiency depth** (first layer where the resid denoise patch recovers half the mean "
        "gap, mean Δ / mean gap as plotted): layer "
        + mode_sentence([d[0] if d[0] is not None else "never" for d in depth])
        + "; its fraction per seed: " + ", ".join(
            f"{f.point[d[0]]:.2f} [{f.lo[d[0]]:.2f}, {f.hi[d[0]]:.2f}]" if d[0] is not None else "—"
            for f, d in zip(fracs, depth))
        + "; first layer whose interval lies above one half: "
        + ", ".join(str(d[1]) if d[1] is not None else "none" for d in depth) + "."]
    components = sorted({k.split("/")[1] for k in rs[0].sweeps}, key=["resid", "attn", "mlp"].index)
    for direction in ("denoise", "noise"):
        parts = []
        for comp in components:
            peaks = [_peak_layer(r.sweep("flips", comp, direction).delta) for r in rs]
            parts.append(f"{comp} at layer {mode_sentence(peaks)}")
        lines.append(f"- **{direction}**: the layer of the largest mean |Δ| on the flips — "
                     + "; ".join(parts) + " (maxima over layers: selected, not corrected).")
    ratio = [np.nanmean(np.abs(r.sweep("flips", "resid", "denoise").delta))
             / np.nanmean(np.abs(r.sweep("controls", "resid", "denoise").delta)) for r in rs]
    lines.append(f"- **Specificity**: mean |Δ| of the resid denoise sweep, flips / controls "
                 f"{seed_values(ratio)}.")
    own = []
    for r in rs:
        _, ties = best_donors(r, "flips", n_boot, seed)
        own.append(f"{int(np.diag(ties).sum())} of {len(ties)}")
    lines.append("- **Cross-layer**: base layers whose own tuned layer is among the donors tied "
                 "with the best one, per seed: " + ", ".join(own) + ".")
    rev = [_peak_layer(r.ablation["flips/revert"].delta) for r in rs]
    gr = [_peak_layer(r.ablation["flips/graft"].delta) for r in rs]
    lines.append(f"- **Weights**: reverting one layer changes the tuned model's answer log-prob "
                 f"most at layer {mode_sentence(rev)}; grafting one tuned layer into the base at "
                 f"layer {mode_sentence(gr)}.")
    ablations = [mean_ablation(r) for r in rs]
    for q in ablations[0]:
        share = [100 * a[q][2] / a[q][1] if abs(a[q][1]) > 1e-12 else float("nan")
                 for a in ablations]
        rows = "all rows, one global mean" if q == "all" else f"the {POSITION_NAMES[q]} only"
        full = [a[q][1] for a in ablations]
        lines.append(f"- **Mean-ablated difference** ({rows}): at the layer where removing the "
                     "difference there matters most (a change of "
                     f"{seed_values(full, '{:+.2f}')} nats), keeping only its mean still changes "
                     f"the answer log-prob by {seed_values(share, '{:.0f} %')} of that (near 0 %: "
                     "a constant shift carries the change; a ratio of small changes is noisy).")
    return lines


def summarize_patching(res: PatchingResult | Sequence[PatchingResult], n_boot: int = 1000,
                       seed: int = 0, min_gap: float = 0.1, smoke: bool = False) -> str:
    """Notebook 04: gap, peaks per component, sufficiency depth, specificity, cross-layer,
    weight ablation and the mean-ablated difference (across seeds when given a list)."""
    return _summary(res, _patching_lines, _patching_seeds, smoke, n_boot=n_boot, seed=seed,
                    min_gap=min_gap)


LENS_NAMES = {"first": "first tokens", "answer": "answer-predicting positions"}


def steering(res: LensResult, name: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """The steering curves of one position set as gap fractions (mean Δ / mean gap, paired
    bootstrap): ``steer``, ``control`` (shuffled) and ``excess`` (steer - control, one resample),
    Bands over the steered layers; ``layers``, those decoder layers (every one unless the lens
    was run with ``steer_layers``); ``at``, the index into the Bands where steering carries the
    most, and ``peak``, that decoder layer."""
    s, c = res.steer[name], res.control[name]
    gap = s.lp_donor - s.lp_receiver
    out = {k: gap_fraction(d, gap, n_boot, seed) for k, d in
           (("steer", s.delta), ("control", c.delta), ("excess", s.delta - c.delta))}
    out["layers"] = np.asarray(s.meta.get("layers", range(s.delta.shape[1])), dtype=int)
    out["at"] = int(np.nanargmax(out["steer"].point))
    out["peak"] = int(out["layers"][out["at"]])
    return out


def kl_split(res: LensResult) -> tuple[float, float]:
    """Mean per-token KL (nats) over the prompt tokens and over the solution tokens, pooled."""
    prompt = np.concatenate([k[:n] for k, n in zip(res.token_kl, res.n_prompt)])
    solution = np.concatenate([k[n:] for k, n in zip(res.token_kl, res.n_prompt)])
    return float(prompt.mean()), float(solution.mean())


def _tokens(items, n: int = 5) -> str:
    return ", ".join(f"`{t!r}`" for t, _ in items[:n])


def _lens_lines(res: LensResult, n_boot: int = 1000, seed: int = 0) -> list[str]:
    """One seed of notebook 04's difference lens and per-token KL."""
    lines = [f"- Examples: the {res.label} ({len(res.steer['answer'].lp_receiver)}); the mean "
             "tuned − base difference added to the base at the positions it was measured on."]
    for name in res.positions:
        st = steering(res, name, n_boot, seed)
        i = st["at"]
        tops = res.tokens[name]["base"][st["peak"]]
        lines.append(
            f"- **Steering at the {LENS_NAMES[name]}**: largest at layer {st['peak']}, "
            f"{st['steer'].point[i]:.2f} of the gap (95 % CI {st['steer'].lo[i]:.2f}–"
            f"{st['steer'].hi[i]:.2f}; the maximum over layers, not corrected); the shuffled "
            f"control {st['control'].point[i]:.2f} there; steer − control "
            f"{st['excess'].point[i]:.2f} ({st['excess'].lo[i]:.2f}–{st['excess'].hi[i]:.2f}); "
            f"above 0 at {int((st['excess'].lo > 0).sum())} of {len(st['excess'].point)} layers, "
            f"below at {int((st['excess'].hi < 0).sum())}. "
            f"Read through the base's head there it promotes {_tokens(tops['promoted'])} and "
            f"suppresses {_tokens(tops['suppressed'])}.")
    p, s = kl_split(res)
    top = res.ranked[:5]
    lines.append(f"- **Per-token KL** (tuned ‖ base) on {len(res.texts)} texts: mean {p:.3f} nats "
                 f"on the prompt tokens, {s:.3f} on the solution tokens; the largest at "
                 + "; ".join(f"`{r['token']!r}` before `{r['next']!r}` ({r['kl']:.2f})"
                             for r in top) + ".")
    return lines


def _lens_seeds(rs: Sequence[LensResult], n_boot: int = 1000, seed: int = 0) -> list[str]:
    n = len(rs)
    lines = [f"- Examples: the {rs[0].label}, per seed; the mean tuned − base difference added to "
             "the base at the positions it was measured on, against the same vector with its "
             "coordinates shuffled."]
    for name in rs[0].positions:
        sts = [steering(r, name, n_boot, seed) for r in rs]
        peaks = [st["peak"] for st in sts]
        above = sum(st["excess"].lo[st["at"]] > 0 for st in sts)
        promoted = [{t for t, _ in r.tokens[name]["base"][st["peak"]]["promoted"]}
                    for r, st in zip(rs, sts)]
        common = sorted(set.intersection(*promoted))
        lines.append(
            f"- **Steering at the {LENS_NAMES[name]}**: largest at layer {mode_sentence(peaks)}, "
            f"carrying {seed_values([st['steer'].point[st['at']] for st in sts])} of the gap "
            f"(maxima over layers, not corrected; the shuffled control "
            f"{seed_values([st['control'].point[st['at']] for st in sts])}); steer − control "
            f"{seed_values([st['excess'].point[st['at']] for st in sts], '{:.3f}')}, its "
            f"interval above 0 {k_of_n(above, n)}. Over all layers (no selection), the layers "
            "where steer − control lies above / below 0, per seed: "
            + ", ".join(f"{int((st['excess'].lo > 0).sum())} / "
                        f"{int((st['excess'].hi < 0).sum())} of {len(st['excess'].point)}"
                        for st in sts) + ". Tokens among the top 10 promoted there "
            f"(base's head) {k_of_n(n, n)}: "
            + (", ".join(f"`{t!r}`" for t in common) if common else "none") + ".")
    splits = [kl_split(r) for r in rs]
    more = sum(s > p for p, s in splits)
    lines.append(f"- **Per-token KL** (tuned ‖ base): mean "
                 f"{seed_values([s for _, s in splits], '{:.3f}')} nats on the solution tokens "
                 f"against {seed_values([p for p, _ in splits], '{:.3f}')} on the prompt tokens; "
                 f"higher on the solution {k_of_n(more, n)}.")
    return lines


def summarize_lens(res: LensResult | Sequence[LensResult], n_boot: int = 1000, seed: int = 0,
                   smoke: bool = False) -> str:
    """Notebook 04, what changed: steering with the mean difference against its shuffled
    control, the tokens it promotes, and where the per-token KL is (across seeds when given a
    list)."""
    return _summary(res, _lens_lines, _lens_seeds, smoke, n_boot=n_boot, seed=seed)


def _compare_seeds(rs: Sequence[CompareResult], claims: list | None = None) -> list[str]:
    n, methods, fmt = len(rs), rs[0].methods, "{:+.2f}"
    whole = [{m: whole_model(r, m) for m in methods} for r in rs]
    same = len({r.accuracy["base"]["accuracy"] for r in rs}) == 1
    lines = [f"- Base accuracy {100 * rs[0].accuracy['base']['accuracy']:.1f} % ("
             + ("the same base in every seed)." if same else "the first seed's: the seeds' bases "
                "differ, so the vs-base comparisons do not share a reference).")]
    for m in methods:
        tests = [accuracy_tests(r) for r in rs]
        sig = []
        for key in tests[0]:
            if not key.endswith(f"→ {m}"):
                continue
            ts = [t[key] for t in tests]
            hi = sum(t["p"] < 0.05 and t["diff"] > 0 for t in ts)
            lo = sum(t["p"] < 0.05 and t["diff"] < 0 for t in ts)
            sig.append(f"vs {_name(key.split(' → ')[0])} higher {k_of_n(hi, n)}, lower "
                       f"{k_of_n(lo, n)}")
        depth = [half_depth(patch_fraction(r.patches[m]))[0] for r in rs]
        lines.append(
            f"- **{m.upper()}** (from {rs[0].init[m]}): accuracy "
            f"{seed_values([100 * r.accuracy[m]['accuracy'] for r in rs], '{:.1f} %')}; McNemar "
            f"p < 0.05 " + "; ".join(sig) + ". CKA vs base lowest at layer "
            + mode_sentence([r.labels[int(np.argmin(r.cka[m].point))] for r in rs])
            + f"; mean CKA {seed_values([r.cka[m].point.mean() for r in rs], '{:.3f}')}. Mean Δ "
            f"RankMe vs base {seed_values([r.rank_vs_base[m].point.mean() for r in rs], fmt)}."
            " Resid denoise reaches half the mean gap at layer "
            + mode_sentence([d if d is not None else "never" for d in depth])
            + f". Own update ‖ΔW‖/‖W‖ {seed_values([w[m]['rel_change'] for w in whole], '{:.2e}')}"
            "; largest in module "
            + mode_sentence([r.own_by_module()[m].idxmax() for r in rs]) + ".")
    lines.append("- Largest own weight update: " + mode_sentence(
        [max(methods, key=lambda m: w[m]["rel_change"]).upper() for w in whole])
        + "; lowest mean CKA vs base: " + mode_sentence(
        [min(methods, key=lambda m: r.cka[m].point.mean()).upper() for r in rs]) + ".")
    lines += ["", f"**Published claims, each with its paper's own quantity**, over {n} training "
              "seeds (items: the mean over seeds [the lowest and the highest bound of the seeds' "
              "95 % intervals]; a verdict needs every seed's interval on one side of 0 for every "
              "item; the numbers after the items frame the test without entering it):", ""]
    lines += [f"{i}. " + v.sentence() for i, v in enumerate(claims or [], 1)]
    return lines


def summarize_compare(res: CompareResult | Sequence[CompareResult], claims: list | None = None,
                      smoke: bool = False) -> str:
    """Notebook 05: per method accuracy (McNemar against base and own init), CKA, Δ RankMe,
    patching depth (fraction of the mean gap) and own update, then the published claims, each
    computed as its paper defines it (``alignkit.claims``). Given a list (one result per seed),
    pass ``claims`` from ``stages.claims_over_seeds``; one result states its own one-seed claims."""
    return _summary(res, _compare_lines, _compare_seeds, smoke, claims=claims)


def summarize_cross(res: CrossCKAResult) -> str:
    """``stages.ensure_models_cka`` in sentences: per model, its depth against the reference's,
    the reference layers tied for the best match of its first, middle and last layer, CKA of the
    two last layers with its interval, and how many cells reach the chance level."""
    ref = res.labels["base"]
    lines = []
    for m in res.models:
        labels, ties, mat = res.labels[m], res.ties[m], res.cka[m]
        shape = (f"differs from the reference in {', '.join(res.shape[m])}" if res.shape[m]
                 else "the reference's shape")
        picks = sorted({0, len(labels) // 2, len(labels) - 1})
        matched = "; ".join(
            f"{labels[j]} → {{{', '.join(ref[i] for i in np.nonzero(ties[:, j])[0])}}}"
            for j in picks)
        at_chance = int((res.lo[m] <= res.chance[m]).sum())
        lines.append(
            f"- **{m}** ({len(labels)} hook points against the reference's {len(ref)}; {shape}): "
            f"best-matching reference layers, ties included (its layer → reference layers): "
            f"{matched}. CKA of the last layers {mat[-1, -1]:.3f} "
            f"[{res.lo[m][-1, -1]:.3f}, {res.hi[m][-1, -1]:.3f}]; {at_chance} of {mat.size} "
            f"cells have an interval reaching the shuffled-rows chance level (max chance "
            f"{res.chance[m].max():.3f}).")
    return "\n".join([f"Cross-layer CKA on {res.n_probes} probes ({res.pooling} pooling), "
                      "bootstrap 95 % intervals:", *lines])


# ---- the README quotes the summaries, never types them -----------------------------------------

SUMMARY_BLOCK = re.compile(r"(<!-- summary: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /summary -->)",
                           re.S)


def save_summary(text: str, name: str, out_dir: str | Path) -> Path:
    """Write a notebook's closing summary as ``<out_dir>/<name>.md`` (atomically), beside its
    figures: what the README's results section quotes (``fill_readme``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    os.replace(tmp, path)
    return path


def fill_readme(text: str, root: str | Path) -> str:
    """``text`` with every ``<!-- summary: PATH -->`` … ``<!-- /summary -->`` block holding the
    file at ``root/PATH`` (written by ``save_summary``); FileNotFoundError naming a missing one.
    ``make readme`` runs it; ``tests/test_readme.py`` fails when the README differs."""
    root = Path(root)

    def body(m: re.Match) -> str:
        path = root / m["path"]
        if not path.is_file():
            raise FileNotFoundError(f"the README quotes {m['path']}, which does not exist: run "
                                    "make reproduce (the default run writes images/*.md)")
        return m.group(1) + path.read_text() + m.group(4)

    return SUMMARY_BLOCK.sub(body, text)
