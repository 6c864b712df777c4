"""Notebook figures over training seeds, composed of ``alignkit.plots``' primitives: a list of
results in (one per seed, the first drawn thick), a Figure out; the numbers are the results'."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from alignkit import plots
from alignkit.analyses.compare import CompareResult
from alignkit.analyses.patching import PatchingResult, curve
from alignkit.evaluate import TARGETS
from alignkit.layers import alignment_path
from alignkit.plots import plot_heatmap, plot_layer_curves

NATS = "Δ log-prob of the scored tokens (nats)"


def plot_patching_sweeps(rs: Sequence[PatchingResult], n_boot: int = 1000, seed: int = 0):
    """Notebook 04 section 2: rows denoise (tuned → base) and noise (base → tuned), a column per
    component; mean Δ with bootstrap intervals on each set, each seed's full gap dashed."""
    comps = rs[0].components()
    fig, axes = plt.subplots(2, len(comps), figsize=(6 * len(comps), 8.5), squeeze=False)
    for row, (direction, arrow) in enumerate((("denoise", "tuned → base"),
                                              ("noise", "base → tuned"))):
        for col, comp in enumerate(comps):
            ax = axes[row, col]
            curves = {rs[0].labels[s]: [curve(r.sweep(s, comp, direction).delta, n_boot, seed)
                                        for r in rs] for s in rs[0].sets}
            plot_layer_curves(curves, ax=ax, ylabel=NATS, has_embed=False, cmap="tab10",
                              title=f"{direction} ({arrow}): {comp}")
            for k, r in enumerate(rs):
                sw = r.sweep("flips", comp, direction)
                ax.axhline(np.mean(sw.lp_donor - sw.lp_receiver), color="C0", ls="--",
                           lw=1 if k == 0 else 0.6, label="full gap (flips)" if k == 0 else None)
            ax.axhline(0, color="0.4", lw=0.8)
            ax.set_xlabel("layer (residual stream after it)" if comp == "resid"
                          else f"layer ({comp} output)")
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_patching_metrics(rs: Sequence[PatchingResult], n_boot: int = 1000, seed: int = 0):
    """Notebook 04 section 2: what each metric measures. Per metric (columns), the resid denoise
    sweep on the flips and on the controls (mean Δ, bootstrap intervals), each set's full gap
    dashed; the title gives the controls' share of the flips' gap (first seed). Last, when run:
    the share of flips and controls the reference solves with the tuned residual held there."""
    metrics = [m for m in TARGETS if f"{m}/flips" in rs[0].checks]
    gen = bool(rs[0].generation)
    n = len(metrics) + gen
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.4), squeeze=False)
    if gen:  # the last panel: solving with the patch held
        ax = axes[0, -1]
        plot_layer_curves({rs[0].labels[s]: [curve(r.generation[s].correct.astype(float), n_boot,
                                                   seed) for r in rs] for s in rs[0].generation},
                          ax=ax, ylabel="share solved by the reference", has_embed=False,
                          cmap="tab10", title="solving with the tuned residual held")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("layer (residual stream after it)")
    for ax, m in zip(axes[0], metrics):
        sets = [s for s in rs[0].sets if f"{m}/{s}" in rs[0].checks]
        curves = {rs[0].labels[s]: [curve(r.checks[f"{m}/{s}"].delta, n_boot, seed) for r in rs]
                  for s in sets}
        share = rs[0].carried(m, n_boot, seed) if len(sets) == 2 else None
        title = f"{m}{' (battery)' if m == rs[0].metric else ''}" + (
            f": controls carry {share.point[0]:.2f} [{share.lo[0]:.2f}, {share.hi[0]:.2f}]"
            if share is not None else "")
        plot_layer_curves(curves, ax=ax, ylabel=f"Δ log-prob of the {m} tokens (nats)",
                          has_embed=False, cmap="tab10", title=title)
        for c, s in enumerate(sets):
            for k, r in enumerate(rs):
                sw = r.checks[f"{m}/{s}"]
                ax.axhline(np.mean(sw.lp_donor - sw.lp_receiver), color=f"C{c}", ls="--",
                           lw=1 if k == 0 else 0.6,
                           label=f"full gap ({rs[0].labels[s]})" if k == 0 else None)
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_xlabel("layer (residual stream after it)")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_cross_layer(rs: Sequence[PatchingResult], n_boot: int = 1000, seed: int = 0):
    """Notebook 04 section 4: per seed (columns) and set (rows), the mean Δ of tuned layer j's
    residual patched into base layer i, the CKA alignment path, the most frequent best donor over
    bootstrap resamples and the donors beating the own layer (simultaneous intervals)."""
    sets = list(rs[0].cross)
    means = [[curve(r.cross[s].delta, n_boot, seed).point for s in sets] for r in rs]
    vmax = max(float(np.nanmax(np.abs(m))) for ms in means for m in ms)
    fig, axes = plt.subplots(len(sets), len(rs), figsize=(6.5 * len(rs), 5.2 * len(sets)),
                             squeeze=False)
    for k, r in enumerate(rs):
        for row, s in enumerate(sets):
            ax = axes[row, k]
            plot_heatmap(means[k][row], ax=ax, path=alignment_path(r.cka_matrix), has_embed=False,
                         xlabel=f"tuned layer j (donor, step {r.final_step})",
                         ylabel="base layer i (receiver)", cbar_label="mean " + NATS, vmin=-vmax,
                         vmax=vmax, cmap="RdBu_r", title=f"Cross-layer Δ, {r.labels[s]} "
                         f"(n={r.cross[s].lp_patched.shape[0]}), seed {k + 1}")
            freq, beats = r.best_donors(s, n_boot, seed)
            bi, bj = np.nonzero(beats)
            ax.plot(bj, bi, ".", color="black", ms=4,
                    label="beats the own layer (simultaneous 95 %)")
            ax.scatter(freq.argmax(1), np.arange(len(freq)), s=60 * freq.max(1), color="white",
                       edgecolors="black", label="most frequent best donor (size: frequency)")
            ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_weight_ablation(rs: Sequence[PatchingResult], n_boot: int = 1000, seed: int = 0):
    """Notebook 04 section 5: revert one layer (necessity), graft one layer (sufficiency), and
    the residual difference removed or its mean kept (all, prompt and answer-predicting rows)."""
    def c(key):  # "noise": the flips' resid noising sweep (the difference removed everywhere)
        res = [r.ablation[key] if "/" in key else r.sweep("flips", "resid", "noise") for r in rs]
        return [curve(x.delta, n_boot, seed) for x in res]

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    for ax, kind, title in ((axes[0], "revert", "Revert one layer to base, in tuned (necessity)"),
                            (axes[1], "graft", "Graft one tuned layer into base (sufficiency)")):
        plot_layer_curves({rs[0].labels[s]: c(f"{s}/{kind}") for s in rs[0].sets}, ax=ax,
                          ylabel=NATS, title=title, has_embed=False, cmap="tab10")
        ax.set_xlabel("decoder layer whose weights are swapped")
    curves = {"all rows: mean kept": c("flips/mean_diff"),
              "all rows: difference removed": c("noise")}
    curves |= {f"{q} rows: {what}": c(f"flips/{key}@{q}") for q in ("prompt", "answer")
               for what, key in (("mean kept", "mean_diff"), ("difference removed", "noise"))
               if f"flips/{key}@{q}" in rs[0].ablation}
    plot_layer_curves(curves, ax=axes[2], ylabel=NATS, has_embed=False, cmap="tab10",
                      title=f"Residual difference ablated, {rs[0].labels['flips']}")
    for ax in axes:
        ax.axhline(0, color="0.4", lw=0.8)
    fig.tight_layout()
    return fig


def plot_compare_accuracy(rs: Sequence[CompareResult], ax=None):
    """Accuracy of each method's final model with its Wilson interval per seed; base the control."""
    vals = {"held-out accuracy": {m: [{k: 100 * r.accuracy[m][f] for k, f in (
        ("point", "accuracy"), ("lo", "acc_lo"), ("hi", "acc_hi"))} for r in rs]
        for m in rs[0].methods}}
    base = 100 * rs[0].accuracy["base"]["accuracy"]
    return plots.plot_grouped_bars(vals, ax=ax, ylabel="exact-match accuracy (%)",
                                   title=f"Accuracy (n = {rs[0].n_eval})",
                                   controls={"held-out accuracy": base},
                                   control_label=f"base ({base:.1f} %)")


def plot_compare_cka(rs: Sequence[CompareResult], ax=None):
    """CKA(base, final) per layer for each method (a line per training seed), bootstrap bands,
    the widest noise floor."""
    floor = np.max([r.cka_floor for r in rs], axis=0)
    return plot_layer_curves({m: [r.cka[m] for r in rs] for m in rs[0].methods}, ax=ax,
                             ylabel="linear CKA (base, final)", cmap="deep",
                             title=f"Layerwise CKA vs base ({rs[0].pooling} pooling)",
                             has_embed=rs[0].labels[0] == "embed",
                             band={"lo": 1 - floor, "hi": np.ones(len(rs[0].labels))},
                             band_label="noise floor (split-half, 95 %)")


def plot_compare_rank(rs: Sequence[CompareResult], ax=None, own: bool = False):
    """Paired Δ RankMe per layer and seed: final − base, or final − own init (``own``)."""
    r0 = rs[0]
    deltas = ({f"{m} (vs {r0.init[m]})": [r.rank_vs_init[m] for r in rs] for m in r0.methods}
              if own else {m: [r.rank_vs_base[m] for r in rs] for m in r0.methods})
    fig = plot_layer_curves(deltas, ax=ax, ylabel="Δ effective rank (RankMe)", cmap="deep",
                            title="Δ RankMe, final − " + ("own init" if own else "base"),
                            has_embed=r0.labels[0] == "embed")
    (ax or fig.axes[0]).axhline(0, color="0.3", lw=1, ls="--", label="no change")
    return fig


def plot_compare_patching(rs: Sequence[CompareResult], ax=None):
    """Resid denoise (final → base) on SFT's flips: mean Δ with intervals, each method's gap
    (a line each per training seed: every seed has its own flips)."""
    n = [r.patches[r.methods[0]].delta.shape[0] for r in rs]
    fig = plot_layer_curves({m: [r.patch_curves[m] for r in rs] for m in rs[0].methods}, ax=ax,
                            ylabel="Δ answer log-prob (nats)", has_embed=False, cmap="deep",
                            title=f"Resid denoise (final → base) on SFT's {rs[0].patch_set} "
                                  f"(n={', '.join(map(str, n))})")
    ax = ax or fig.axes[0]
    for k, r in enumerate(rs):
        for i, m in enumerate(r.methods):
            ax.axhline(r.gap(m), color=sns.color_palette("deep")[i], ls="--",
                       lw=1 if k == 0 else 0.6)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.plot([], [], "--", color="0.4", label="full gap of each method")
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_compare_drift(rs: Sequence[CompareResult], ax=None, metric: str = "rel_change"):
    """Per-layer weight drift vs base (solid) and of each own update (dashed), a line per seed."""
    by_seed = [r.weights.drift_by_layer() for r in rs]
    tables = {k: [t[k] for t in by_seed] for k in by_seed[0]}
    colors = {k: f"C{rs[0].methods.index(k.split()[0])}" for k in tables}
    styles = {k: ("o--" if "own" in k else "o-") for k in tables}
    return plots.plot_drift_layers(tables, metric, ax=ax, styles=styles, colors=colors,
                                   title="Weight change per layer")


def plot_drift_modules(rs: Sequence[CompareResult], ax=None):
    """Heatmap of log10 ‖ΔW‖/‖W‖ of each own update per module type (a column per method, seed)."""
    tables = [r.weights.own_by_module() for r in rs]
    index = [m for m in plots._MODULE_ORDER if m in tables[0].index]
    cols = [(m, k) for m in rs[0].methods for k in range(len(rs))]
    mat = np.array([[tables[k].loc[i, m] for m, k in cols] for i in index], dtype=float)
    seed = (lambda k: f", seed {k + 1}") if len(rs) > 1 else (lambda k: "")
    fig = plot_heatmap(np.log10(np.where(mat > 0, mat, np.nan)), ax=ax, cmap="viridis",
                       xticklabels=[f"{m} (vs {rs[0].init[m]}){seed(k)}" for m, k in cols],
                       yticklabels=index, cbar_label="log10 ‖ΔW‖/‖W‖ (own update)",
                       title="Relative change per module type")
    ax = ax or fig.axes[0]
    ax.set(xlabel="method", ylabel="module")
    ax.tick_params(axis="x", labelrotation=45 if len(rs) > 1 else 0)
    return fig


def plot_compare_structure(rs: Sequence[CompareResult], ax=None):
    """Own-update sparsity and alignment with W against a dense Gaussian update and chance."""
    values = {g: {m: [r.weights.structure[g][m] for r in rs] for m in rs[0].weights.structure[g]}
              for g in rs[0].weights.structure}
    return plots.plot_grouped_bars(values, ax=ax, ylabel="mean over weight matrices",
                                   controls=rs[0].weights.structure_controls, ylim=(0, 1.05),
                                   control_label="dense Gaussian update / chance k/d",
                                   title="Own update: sparsity and alignment with W")


def plot_atlas(rs: Sequence[CompareResult], axes=None, title: str = ""):
    """The six panels (a)-(f) of notebook 05 in one figure (every training seed in each)."""
    if axes is None:
        fig, axes = plt.subplots(2, 3, figsize=(21, 10))
    panels = (plot_compare_accuracy, plot_compare_cka, plot_compare_rank, plot_compare_patching,
              plot_compare_drift, plot_compare_structure)
    for ax, panel, letter in zip(np.ravel(axes), panels, "abcdef"):
        panel(rs, ax=ax)
        ax.set_title(f"({letter}) {ax.get_title()}", loc="left")
        ax.set_title("")
    fig = np.ravel(axes)[0].figure
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return fig
