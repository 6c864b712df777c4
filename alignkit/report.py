"""The sentences under each notebook: ``summarize_*`` turns a stage's result into Markdown, so
every number in a closing cell comes from tested code (``tests/test_report.py``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from alignkit import spectral, weights
from alignkit.layers import alignment_path, best_match
from alignkit.results import CKAResult, CompareResult, PatchingResult, RunResults, SpectralResult
from alignkit.stats import Band, bootstrap_mean, gap_fraction, mcnemar, near_best

SMOKE_NOTE = "- *Smoke mode: tiny sizes, the numbers mean nothing.*"


def _lines(lines: list[str], smoke: bool) -> str:
    return "\n".join(lines + ([SMOKE_NOTE] if smoke else []))


def summarize_sft(res: RunResults, smoke: bool = False) -> str:
    """Notebook 01: base and final accuracy, best checkpoint, answer log-prob, flips."""
    rows = res.summary()
    first, last = rows[0], rows[-1]
    best = max(rows, key=lambda r: r["accuracy"])
    return _lines([
        f"- Base accuracy **{100 * first['accuracy']:.1f} %** (95 % CI {100 * first['acc_lo']:.1f}"
        f"–{100 * first['acc_hi']:.1f}) on {res.evals[0].n} held-out problems; after "
        f"{last['step']} steps **{100 * last['accuracy']:.1f} %** ({100 * last['acc_lo']:.1f}–"
        f"{100 * last['acc_hi']:.1f}), a change of "
        f"{100 * (last['accuracy'] - first['accuracy']):+.1f} points; best checkpoint: step "
        f"{best['step']}.",
        f"- Mean answer log-prob moved from {first['answer_logprob']:.2f} to "
        f"{last['answer_logprob']:.2f} nats.",
        f"- {len(res.table.flips)} flip examples and {len(res.table.controls)} controls were saved "
        f"to `{res.run_dir.name}/flips.json` for notebooks 02–04."], smoke)


def summarize_cka(res: CKAResult, smoke: bool = False) -> str:
    """Notebook 02: drift at the final checkpoint, transition, remapping, departures."""
    final = res.steps[-1]
    lw, lw_deb = res.classic[final].point, res.debiased[final].point
    above = [lab for lab, v, hw in zip(res.labels, lw, res.noise_classic) if v < 1 - hw]
    least = int(np.argmin(lw))
    point, lo, hi = res.transition
    alt = res.alt_curve
    return _lines([
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
        f"{res.alt_labels[int(np.argmin(alt))]})."], smoke)


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


def summarize_spectral(res: SpectralResult, smoke: bool = False) -> str:
    """Notebook 03: RankMe base → final, separated layers, halves, Rényi deltas, stability."""
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
    return _lines(lines, smoke)


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


def summarize_patching(res: PatchingResult, n_boot: int = 1000, seed: int = 0,
                       min_gap: float = 0.1, smoke: bool = False) -> str:
    """Notebook 04: gap, peaks per component, sufficiency depth, specificity, cross-layer,
    weight ablation and the mean-ablated difference."""
    def peak(values):
        c = curve(values, n_boot, seed)
        i = int(np.nanargmax(np.abs(c.point)))
        return i, c.point[i], c.lo[i], c.hi[i]

    res_d, res_n = res.sweep("flips", "resid", "denoise"), res.sweep("flips", "resid", "noise")
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
    md = curve(res.ablation["flips/mean_diff"].delta, n_boot, seed).point
    full = curve(res_n.delta, n_boot, seed).point
    j = int(np.nanargmax(np.abs(full)))
    lines.append(
        f"- **Mean-ablated difference**: at layer {j}, where removing the tuned − base residual "
        f"difference changes the tuned model's answer log-prob most ({full[j]:+.3f} nats), keeping "
        f"only its mean changes it by {md[j]:+.3f} nats ({100 * md[j] / full[j]:.0f} % of the full "
        "effect)." if abs(full[j]) > 1e-12 else
        "- **Mean-ablated difference**: removing the residual difference changes nothing here.")
    return _lines(lines, smoke)


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


def summarize_compare(res: CompareResult, smoke: bool = False) -> str:
    """Notebook 05: per method accuracy (McNemar against base and own init), CKA, Δ RankMe,
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
    lines += [f"{i}. " + v.sentence() for i, v in enumerate(res.claims, 1)]
    return _lines(lines, smoke)
