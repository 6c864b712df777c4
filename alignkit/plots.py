"""Figures only: every helper takes ``ax=`` (or ``axes=``) and returns the Figure; none
computes a measure (the results classes and ``alignkit.report`` do)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from alignkit.config import Config, get_config
from alignkit.results import CompareResult, CrossCKAResult
from alignkit.runs import hash_obj

logger = logging.getLogger(__name__)

IMAGES = Path(__file__).resolve().parent.parent / "images"
DPI = 150

sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
matplotlib.rcParams.update({"figure.dpi": 100, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def _ax(ax=None, figsize=(5, 3.6)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    return ax.figure, ax


def figure_dir(cfg: Config) -> Path:
    """Where a run's figures go: ``images/`` (the README's) for the default run only, the tiny
    preset at full size with no override but ``root``; every other run (smoke, real presets,
    overrides) under ``<root>/reports/<preset>[-smoke]-<hash of its config>/images``."""
    if dataclasses.replace(cfg, root="") == get_config("tiny"):
        return IMAGES
    tag = f"{cfg.preset}{'-smoke' if cfg.smoke else ''}"
    return cfg.run_root / "reports" / f"{tag}-{hash_obj(dataclasses.replace(cfg, root=''))}" / \
        "images"


def save_figure(fig, name: str, out_dir: str | Path | None = None) -> Path:
    """Write ``fig`` as ``<out_dir>/<name>.png`` at a fixed dpi (``images/`` by default)."""
    out = Path(out_dir) if out_dir is not None else IMAGES
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=DPI)
    logger.info("saved %s", path)
    return path


def _per_seed(x: Sequence) -> list:
    """``x`` as a list of per-seed entries: a list of lists stays, one seed's list is wrapped."""
    return list(x) if x and isinstance(x[0], list) else [x]


def _seed_style(k: int) -> dict:
    """Training seed ``k``'s line: the first thick with markers, the others thin."""
    return {"marker": "o" if k == 0 else None, "lw": 1.6 if k == 0 else 0.9,
            "alpha": 1.0 if k == 0 else 0.8}


def _seed_legend(ax, n: int) -> None:
    if n > 1:
        ax.plot([], [], "-", color="0.4", lw=0.9, label=f"thin: training seeds 2–{n}")


def plot_loss(loss: Sequence, ax=None, checkpoint_steps: Sequence[int] = ()):
    """Training loss against step (``loss``: ``[(step, value)]``, or one such list per training
    seed), with checkpoint steps marked."""
    fig, ax = _ax(ax)
    seeds = _per_seed(list(loss))
    for k, one in enumerate(seeds):
        if one:
            ax.plot(*zip(*one), color="C0", lw=1.2 if k == 0 else 0.7, alpha=1 if k == 0 else 0.6,
                    label="train loss (completion tokens)" if k == 0 else None)
    _seed_legend(ax, len(seeds))
    for s in checkpoint_steps:
        ax.axvline(s, color="0.6", lw=0.8, ls=":")
    ax.set(xlabel="SFT step", ylabel="cross-entropy (nats / token)", title="Training loss")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_accuracy(rows: Sequence, ax=None):
    """Greedy exact-match accuracy per checkpoint with its 95 % Wilson interval (``rows``: one
    seed's ``RunResults.summary()``, or one per training seed: a line and interval each); the
    base dashed."""
    fig, ax = _ax(ax)
    seeds = _per_seed(list(rows))
    for k, one in enumerate(seeds):
        steps = [r["step"] for r in one]
        acc, lo, hi = (100 * np.array([r[f] for r in one])
                       for f in ("accuracy", "acc_lo", "acc_hi"))
        ax.fill_between(steps, lo, hi, color="C1", alpha=0.25 if k == 0 else 0.08,
                        label="95 % Wilson interval" if k == 0 else None)
        ax.plot(steps, acc, "-", color="C1", ms=4, label="accuracy" if k == 0 else None,
                **_seed_style(k))
    _seed_legend(ax, len(seeds))
    base = 100 * seeds[0][0]["accuracy"]
    ax.axhline(base, color="0.3", ls="--", lw=1, label=f"base ({base:.1f} %)")
    ax.set(xlabel="SFT step", ylabel="exact-match accuracy (%)", ylim=(0, 100),
           title="Held-out accuracy")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_answer_logprob(rows: Sequence, ax=None):
    """Mean log-prob of the gold final answer per checkpoint, ± 1.96 standard errors (one line
    per training seed when given one ``summary()`` per seed)."""
    fig, ax = _ax(ax)
    seeds = _per_seed(list(rows))
    for k, one in enumerate(seeds):
        steps = [r["step"] for r in one]
        m, se = (np.array([r[f] for r in one]) for f in ("answer_logprob", "answer_logprob_se"))
        ax.fill_between(steps, m - 1.96 * se, m + 1.96 * se, color="C2",
                        alpha=0.25 if k == 0 else 0.08,
                        label="95 % interval of the mean" if k == 0 else None)
        ax.plot(steps, m, "-", color="C2", ms=4, label="mean log P(answer)" if k == 0 else None,
                **_seed_style(k))
    _seed_legend(ax, len(seeds))
    ax.axhline(seeds[0][0]["answer_logprob"], color="0.3", ls="--", lw=1, label="base")
    ax.set(xlabel="SFT step", ylabel="log-prob of gold answer (nats)", title="Answer log-prob")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_sft_training(rows: Sequence, loss: Sequence, axes=None):
    """Three panels: training loss, accuracy and answer log-prob against SFT step; ``rows`` and
    ``loss`` are one seed's or lists with one entry per training seed."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(15, 4))
    plot_loss(loss, ax=axes[0], checkpoint_steps=[r["step"] for r in _per_seed(list(rows))[0]])
    plot_accuracy(rows, ax=axes[1])
    plot_answer_logprob(rows, ax=axes[2])
    axes[0].figure.tight_layout()
    return axes[0].figure


def _layer_labels(n: int, has_embed: bool = True) -> list[str]:
    return (["emb"] if has_embed else []) + [str(i) for i in range(n - (1 if has_embed else 0))]


def _curve_x(curve) -> np.ndarray:
    """Where a curve's points lie: its ``"x"`` (layers it was measured at), else 0, 1, ..."""
    return np.asarray(curve["x"]) if "x" in curve else np.arange(len(curve["point"]))


def plot_layer_curves(curves: dict, ax=None, ylabel: str = "", title: str = "",
                      band: dict | None = None, band_label: str = "noise floor",
                      has_embed: bool = True, cmap: str = "viridis"):
    """One line per entry of ``curves`` (``{label: {"point", "lo"?, "hi"?}}`` over layers, e.g.
    a ``Band`` or a bootstrap dict) with its interval, and an optional grey control ``band``
    (``{"lo", "hi"}``, e.g. CKA's noise floor); ``has_embed``: index 0 is the embedding. A
    curve measured at some layers only carries them as ``"x"`` (its points drawn there, joined).

    An entry may be a list of such curves, one per training seed: the first drawn thick with
    markers, the others thin in the same colour, each with its own (lighter) interval."""
    fig, ax = _ax(ax, figsize=(7, 4))
    colors = sns.color_palette(cmap, n_colors=max(1, len(curves)))
    n_seeds = 1
    for (label, c), color in zip(curves.items(), colors):
        seeds = list(c) if isinstance(c, (list, tuple)) else [c]
        n_seeds = max(n_seeds, len(seeds))
        for k, ci in enumerate(seeds):
            x = _curve_x(ci)
            if "lo" in ci and "hi" in ci:
                ax.fill_between(x, ci["lo"], ci["hi"], color=color, alpha=0.2 if k == 0 else 0.07,
                                lw=0)
            ax.plot(x, ci["point"], "-", ms=3, color=color, label=label if k == 0 else None,
                    **_seed_style(k))
    _seed_legend(ax, n_seeds)
    if band is not None:
        ax.fill_between(np.arange(len(band["lo"])), band["lo"], band["hi"], color="0.5",
                        alpha=0.25, hatch="//", lw=0, label=band_label)
    n = max(int(_curve_x(ci)[-1]) + 1 for c in curves.values()
            for ci in (c if isinstance(c, (list, tuple)) else [c]))
    ax.set_xticks(range(n))
    ax.set_xticklabels(_layer_labels(n, has_embed), fontsize=8)
    ax.set(xlabel="layer (residual stream after it)", ylabel=ylabel, title=title)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_heatmap(mat: np.ndarray, ax=None, path=None, xlabel: str = "", ylabel: str = "",
                 title: str = "", cbar_label: str = "", vmin=None, vmax=None,
                 has_embed: bool = True, cmap: str = "magma", xticklabels=None, yticklabels=None):
    """A matrix as a heatmap, optionally with a path ``[(i, j), ...]`` (rows i, columns j)."""
    fig, ax = _ax(ax, figsize=(6, 5))
    im = ax.imshow(mat, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax).set_label(cbar_label)
    if path is not None:
        ii, jj = zip(*path)
        ax.plot(jj, ii, color="cyan", lw=1.5, label="alignment path (DTW)")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_yticks(range(mat.shape[0]))
    ax.set_yticklabels(yticklabels or _layer_labels(mat.shape[0], has_embed), fontsize=7)
    ax.set_xticks(range(mat.shape[1]))
    ax.set_xticklabels(xticklabels or _layer_labels(mat.shape[1], has_embed), fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return fig


def plot_scatter(x: np.ndarray, y: np.ndarray, ax=None, labels=None, xlabel: str = "",
                 ylabel: str = "", title: str = "", xerr=None, yerr=None, color: str = "C0",
                 label: str | None = None):
    """Per-layer scatter (e.g. ΔCKA vs Δ effective rank) with optional error bars and point
    labels; ``label`` names the series in a legend (one call per training seed)."""
    fig, ax = _ax(ax)
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=4, color=color, ecolor="0.6",
                elinewidth=0.8, label=label)
    for xi, yi, lab in zip(x, y, labels or []):
        ax.annotate(lab, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.axvline(0, color="0.4", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return fig


# weight drift (alignkit.weights): metric -> (axis label, control column or value, its label, log y)
_DRIFT_METRICS = {
    "rel_change": ("‖ΔW‖ / ‖W‖ (relative change)", 2.0 ** -24, "float32 round-off (2⁻²⁴)", True),
    "frac_changed": ("share of entries with |ΔW| > tol", "frac_changed_dense",
                     "dense Gaussian update, same RMS", False),
    "frac_mass": ("share of entries holding 90 % of ‖ΔW‖²", "frac_mass_dense",
                  "dense Gaussian update", False),
    "eff_rank": ("effective rank of ΔW (RankMe)", "eff_rank_dense", "Gaussian matrix, same shape",
                 False),
    "overlap_left": ("top-k overlap with W, output space (mean cos²)", "chance_left",
                     "chance k / d_out", False),
    "overlap_right": ("top-k overlap with W, input space (mean cos²)", "chance_right",
                      "chance k / d_in", False),
}
_MODULE_ORDER = ["embed", "q", "k", "v", "o", "gate", "up", "down", "input_norm",
                 "post_attn_norm", "q_norm", "k_norm", "final_norm", "lm_head"]


def _drift_axis(ax, metric: str, n_layers: int, title: str) -> None:
    ylabel, control, control_label, log = _DRIFT_METRICS[metric]
    if not isinstance(control, str):
        ax.axhline(control, color="0.4", ls=":", lw=1, label=control_label)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(-1, n_layers + 1))
    ax.set_xticklabels(["emb"] + [str(i) for i in range(n_layers)] + ["out"], fontsize=8)
    ax.set(xlabel="layer (emb: token embedding, out: final norm / untied head)", ylabel=ylabel,
           title=title or metric)


def _check_metric(metric: str) -> None:
    if metric not in _DRIFT_METRICS:
        raise ValueError(f"metric must be one of {sorted(_DRIFT_METRICS)}, got {metric!r}")


def plot_weight_drift(df, metric: str = "rel_change", ax=None, modules: Sequence[str] | None = None,
                      title: str = ""):
    """One line per module type of a ``weights.weight_drift`` table against layer, with its control.

    The embedding (layer −1) and what follows the stack (final norm, untied head; layer L) are
    single markers at the ends. Controls (dashed; grey when one value): float32 round-off for
    ``rel_change`` (log axis), a dense Gaussian update for ``frac_changed``, ``frac_mass`` and
    ``eff_rank``, the chance level k/d for the overlaps. ``modules``: default all with a value.
    """
    _check_metric(metric)
    control, control_label = _DRIFT_METRICS[metric][1:3]
    fig, ax = _ax(ax, figsize=(7, 4))
    rows = df[df[metric].notna()]
    if modules is None:
        modules = sorted(rows["module"].unique(), key=lambda m: _MODULE_ORDER.index(m)
                         if m in _MODULE_ORDER else len(_MODULE_ORDER))
    per_module = isinstance(control, str) and rows[control].nunique() > 1
    for module, color in zip(modules, sns.color_palette("tab20", n_colors=max(1, len(modules)))):
        sub = rows[rows["module"] == module].sort_values("layer")
        if sub.empty:
            continue
        single = len(sub) == 1
        ax.plot(sub["layer"], sub[metric], "D" if single else "o-", ms=6 if single else 4, lw=1.2,
                color=color, label=module)
        if per_module:
            x, c = sub["layer"].to_numpy(), sub[control].to_numpy()
            if single:
                x, c = np.array([x[0] - 0.3, x[0] + 0.3]), np.repeat(c, 2)
            ax.plot(x, c, "--", lw=0.9, color=color, alpha=0.9)
    if per_module:
        ax.plot([], [], "--", color="0.4", lw=0.8, label=f"{control_label} (dashed, per module)")
    elif isinstance(control, str):
        ax.axhline(float(rows[control].iloc[0]), color="0.4", ls="--", lw=1, label=control_label)
    _drift_axis(ax, metric, int(df.attrs.get("n_layers", df["layer"].max())), title)
    ax.legend(fontsize=7, ncol=2, loc="best")
    return fig


def plot_drift_layers(tables: dict, metric: str = "rel_change", ax=None, styles: dict | None = None,
                      title: str = "", colors: dict | None = None):
    """Per-layer pooled weight drift of several comparisons, one line each, with the control.

    Args:
        tables: ``{label: weights.summarize_drift(df, "layer")}`` (index: layer, −1 = embedding,
            L = after the stack), or a list of such tables per label, one per training seed
            (the first thick with its control, the others thin).
        styles, colors: optional ``{label: format string}`` and ``{label: colour}``.
    """
    _check_metric(metric)
    control, control_label = _DRIFT_METRICS[metric][1:3]
    fig, ax = _ax(ax, figsize=(7, 4))
    n_layers = 0
    n_seeds = 1
    for i, (label, seeds) in enumerate(tables.items()):
        seeds = list(seeds) if isinstance(seeds, (list, tuple)) else [seeds]
        n_seeds = max(n_seeds, len(seeds))
        color = (colors or {}).get(label, f"C{i}")
        for k, t in enumerate(seeds):
            t = t[t[metric].notna()]
            layers = np.asarray(t.index, dtype=float)
            n_layers = max(n_layers, int(layers.max()))
            style = (styles or {}).get(label, "o-")
            ax.plot(layers, t[metric], style if k == 0 else style.replace("o", ""), ms=3,
                    lw=1.2 if k == 0 else 0.7, alpha=1 if k == 0 else 0.7, color=color,
                    label=label if k == 0 else None)
            if isinstance(control, str) and k == 0:
                ax.plot(layers, t[control], ":", lw=0.9, color=color, alpha=0.8)
    _seed_legend(ax, n_seeds)
    if isinstance(control, str):
        ax.plot([], [], ":", color="0.4", label=f"{control_label} (dotted)")
    _drift_axis(ax, metric, n_layers, title)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_grouped_bars(values: dict, ax=None, ylabel: str = "", title: str = "",
                      controls: dict | None = None, control_label: str = "control", ylim=None):
    """Bars grouped on the x axis, one colour per series, with interval whiskers.

    Args:
        values: ``{group: {series: {"point", "lo"?, "hi"?}}}``; a series' entry may be a list
            of such dicts, one per training seed: the bar is their mean, a dot marks each seed
            and the whisker spans every seed's interval.
        controls: optional ``{group: value}`` drawn as a dashed bar across the group (chance
            level, a dense-noise value, the base model's score ...).
    """
    fig, ax = _ax(ax, figsize=(6, 4))
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    width = 0.8 / max(1, len(series))
    n_seeds = 1
    for j, s in enumerate(series):
        x = np.arange(len(groups)) - 0.4 + width * (j + 0.5)
        pts = [values[g].get(s, {}) for g in groups]
        pts = [list(p) if isinstance(p, (list, tuple)) else [p] for p in pts]
        n_seeds = max(n_seeds, *(len(p) for p in pts))

        def field(p, f):
            return np.array([q.get(f, q.get("point", np.nan)) for q in p], dtype=float)

        y = np.array([np.mean(field(p, "point")) for p in pts])
        lo = np.array([np.min(field(p, "lo")) for p in pts])
        hi = np.array([np.max(field(p, "hi")) for p in pts])
        ax.bar(x, y, width=width * 0.92, color=f"C{j}", alpha=0.85, label=s)
        ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="none", ecolor="0.2", elinewidth=1, capsize=2)
        if n_seeds > 1:
            for xi, p in zip(x, pts):
                ax.plot([xi] * len(p), field(p, "point"), "o", ms=3, color="k", zorder=3)
    if n_seeds > 1:
        ax.plot([], [], "o", ms=3, color="k", label=f"each of {n_seeds} training seeds (bar: "
                "mean; whisker: all seeds' intervals)")
    labelled = False
    for i, g in enumerate(groups):
        if controls and controls.get(g) is not None:
            ax.hlines(controls[g], i - 0.45, i + 0.45, color="k", lw=1.6, ls="--",
                      label=None if labelled else control_label)
            labelled = True
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set(ylabel=ylabel, title=title, **({"ylim": ylim} if ylim is not None else {}))
    ax.legend(fontsize=7, loc="best")
    return fig


def _seeds(res) -> list[CompareResult]:
    return list(res) if isinstance(res, (list, tuple)) else [res]


def plot_compare_accuracy(res: CompareResult | Sequence[CompareResult], ax=None):
    """Accuracy of each method's final model with its Wilson interval (one per training seed
    when given a list); the base as the control."""
    rs = _seeds(res)
    vals = {"held-out accuracy": {m: [{k: 100 * r.accuracy[m][f] for k, f in (
        ("point", "accuracy"), ("lo", "acc_lo"), ("hi", "acc_hi"))} for r in rs]
        for m in rs[0].methods}}
    base = 100 * rs[0].accuracy["base"]["accuracy"]
    return plot_grouped_bars(vals, ax=ax, ylabel="exact-match accuracy (%)",
                             title=f"Accuracy (n = {rs[0].n_eval})",
                             controls={"held-out accuracy": base},
                             control_label=f"base ({base:.1f} %)")


def plot_compare_cka(res: CompareResult | Sequence[CompareResult], ax=None):
    """CKA(base, final) per layer for each method (a line per training seed), bootstrap bands,
    the widest noise floor."""
    rs = _seeds(res)
    floor = np.max([r.cka_floor for r in rs], axis=0)
    return plot_layer_curves({m: [r.cka[m] for r in rs] for m in rs[0].methods}, ax=ax,
                             ylabel="linear CKA (base, final)", cmap="deep",
                             title=f"Layerwise CKA vs base ({rs[0].pooling} pooling)",
                             has_embed=rs[0].labels[0] == "embed",
                             band={"lo": 1 - floor, "hi": np.ones(len(rs[0].labels))},
                             band_label="noise floor (split-half, 95 %)")


def plot_compare_rank(res: CompareResult | Sequence[CompareResult], ax=None, own: bool = False):
    """Paired Δ RankMe per layer (a line per training seed): final − base, or final − the
    method's own init (``own``)."""
    rs = _seeds(res)
    r0 = rs[0]
    deltas = ({f"{m} (vs {r0.init[m]})": [r.rank_vs_init[m] for r in rs] for m in r0.methods}
              if own else {m: [r.rank_vs_base[m] for r in rs] for m in r0.methods})
    fig = plot_layer_curves(deltas, ax=ax, ylabel="Δ effective rank (RankMe)", cmap="deep",
                            title="Δ RankMe, final − " + ("own init" if own else "base"),
                            has_embed=r0.labels[0] == "embed")
    (ax or fig.axes[0]).axhline(0, color="0.3", lw=1, ls="--", label="no change")
    return fig


def plot_compare_patching(res: CompareResult | Sequence[CompareResult], ax=None):
    """Resid denoise (final → base) on SFT's flips: mean Δ with intervals, each method's gap
    (a line each per training seed: every seed has its own flips)."""
    rs = _seeds(res)
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


def plot_compare_drift(res: CompareResult | Sequence[CompareResult], ax=None,
                       metric: str = "rel_change"):
    """Per-layer weight drift vs base (solid) and of each own update (dashed), a line per
    training seed."""
    rs = _seeds(res)
    by_seed = [r.drift_by_layer() for r in rs]
    tables = {k: [t[k] for t in by_seed] for k in by_seed[0]}
    colors = {k: f"C{rs[0].methods.index(k.split()[0])}" for k in tables}
    styles = {k: ("o--" if "own" in k else "o-") for k in tables}
    return plot_drift_layers(tables, metric, ax=ax, styles=styles, colors=colors,
                             title="Weight change per layer")


def plot_drift_modules(res: CompareResult | Sequence[CompareResult], ax=None):
    """Heatmap of log10 ‖ΔW‖/‖W‖ of each method's own update per module type (a column per
    method and training seed)."""
    rs = _seeds(res)
    tables = [r.own_by_module() for r in rs]
    index = [m for m in _MODULE_ORDER if m in tables[0].index]
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


def plot_compare_structure(res: CompareResult | Sequence[CompareResult], ax=None):
    """Own-update sparsity and alignment with W against a dense Gaussian update and chance (a
    dot per training seed)."""
    rs = _seeds(res)
    values = {g: {m: [r.structure[g][m] for r in rs] for m in rs[0].structure[g]}
              for g in rs[0].structure}
    return plot_grouped_bars(values, ax=ax, ylabel="mean over weight matrices",
                             controls=rs[0].structure_controls, ylim=(0, 1.05),
                             control_label="dense Gaussian update / chance k/d",
                             title="Own update: sparsity and alignment with W")


def plot_atlas(res: CompareResult | Sequence[CompareResult], axes=None, title: str = ""):
    """The six panels (a)-(f) of notebook 05 in one figure (every training seed in each)."""
    if axes is None:
        fig, axes = plt.subplots(2, 3, figsize=(21, 10))
    panels = (plot_compare_accuracy, plot_compare_cka, plot_compare_rank, plot_compare_patching,
              plot_compare_drift, plot_compare_structure)
    for ax, panel, letter in zip(np.ravel(axes), panels, "abcdef"):
        panel(res, ax=ax)
        ax.set_title(f"({letter}) {ax.get_title()}", loc="left")
        ax.set_title("")
    fig = np.ravel(axes)[0].figure
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return fig


def plot_cross_cka(res: CrossCKAResult, model: str, ax=None, title: str = ""):
    """Cross-layer CKA of ``model``'s layers (columns) against the reference's (rows), any
    depths: white dots mark the reference layers tied for each column's best match (bootstrap),
    the ring its best; grey crosses the cells whose bootstrap interval reaches the shuffled-rows
    chance level (not told apart from unrelated examples)."""
    mat, ties, best = res.cka[model], res.ties[model], res.best[model]
    other = f" (differs in {', '.join(res.shape[model])})" if res.shape[model] else ""
    fig = plot_heatmap(mat, ax=ax, xlabel=f"{model} layer{other}",
                       ylabel="reference layer", cbar_label="CKA (biased)", vmin=0, vmax=1,
                       xticklabels=res.labels[model], yticklabels=res.labels["base"],
                       title=title or f"{model} against the reference: cross-layer CKA")
    ax = ax or fig.axes[0]
    ii, jj = np.nonzero(ties)
    ax.scatter(jj, ii, s=14, color="white", edgecolor="k", lw=0.5, label="tied for best match")
    ax.scatter(np.arange(len(best)), best, s=70, facecolor="none", edgecolor="cyan", lw=1.5,
               label="best match")
    ci, cj = np.nonzero(res.lo[model] <= res.chance[model])
    if len(ci):
        ax.scatter(cj, ci, marker="x", s=14, color="0.6", lw=0.8,
                   label="interval reaches chance (shuffled rows)")
    ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
    return fig


def plot_steering(curves: Sequence[dict], ax=None, title: str = ""):
    """Steering with the mean activation difference against its shuffled control, as fractions
    of the gap over layers: ``curves`` holds one ``report.steering`` dict per training seed
    (``{"steer", "control"}`` Bands over its ``layers``)."""
    curves = list(curves)

    def at_layers(c, key):
        return {**c[key], "x": c["layers"]}

    fig = plot_layer_curves({"mean difference added to base": [at_layers(c, "steer")
                                                               for c in curves],
                             "same vector, coordinates shuffled": [at_layers(c, "control")
                                                                   for c in curves]},
                            ax=ax, ylabel="fraction of the gap (mean Δ / mean gap)",
                            title=title, has_embed=False, cmap="deep")
    ax = ax or fig.axes[0]
    ax.axhline(1, color="0.4", ls="--", lw=0.8)
    ax.axhline(0, color="0.4", lw=0.8)
    return fig


def plot_lens_tokens(tokens: Sequence[dict], ax=None, k: int = 5, title: str = ""):
    """The difference lens as a table: per layer (rows), the ``k`` tokens the mean difference
    promotes (left) and suppresses (right), coloured by their z-score (``lens.top_tokens``)."""
    fig, ax = _ax(ax, figsize=(10, 0.32 * len(tokens) + 1))
    cmap = plt.get_cmap("RdBu_r")
    for layer, row in enumerate(tokens):
        for side, sign, x0 in (("promoted", 1, 0), ("suppressed", -1, k + 0.5)):
            for j, (tok, z) in enumerate(row[side][:k]):
                ax.text(x0 + j, layer, repr(tok)[1:-1][:10], ha="center", va="center", fontsize=7,
                        family="monospace", bbox=dict(boxstyle="round,pad=0.2", lw=0,
                                                      facecolor=cmap(0.5 + sign * min(abs(z), 8)
                                                                     / 16)))
    ax.set(xlim=(-0.6, 2 * k + 0.1), ylim=(len(tokens) - 0.5, -0.5), title=title)
    ax.set_yticks(range(len(tokens)))
    ax.set_yticklabels([f"layer {i}" for i in range(len(tokens))], fontsize=8)
    ax.set_xticks([(k - 1) / 2, k + 0.5 + (k - 1) / 2])
    ax.set_xticklabels(["promoted (red: higher z)", "suppressed (blue)"], fontsize=8)
    ax.grid(False)
    return fig


def plot_token_kl(tokens: Sequence[str], kl: Sequence[float], ax=None, n_prompt: int | None = None,
                  width: float = 10.0, vmax: float | None = None, title: str = ""):
    """A text as highlighted tokens: each token's background is the per-token KL at its position
    (how differently the two models predict the *next* token there), white 0 to dark red
    ``vmax``; newlines are drawn as ``⏎`` and break the line; a bar marks where the prompt ends
    (``n_prompt``). ``width``: the line length in inches."""
    kl = np.asarray(kl, dtype=np.float64)
    if len(tokens) != len(kl):
        raise ValueError(f"{len(tokens)} tokens but {len(kl)} KL values")
    vmax = float(vmax if vmax is not None else max(kl.max(), 1e-12))
    cmap = plt.get_cmap("Reds")
    n_lines = 1 + sum("\n" in t for t in tokens) + sum(len(t) for t in tokens) // 90
    fig, ax = _ax(ax, figsize=(width + 1.2, 0.28 * n_lines + 0.8))
    ax.set(xlim=(0, width), ylim=(n_lines + 0.5, -0.7), title=title)
    ax.axis("off")
    renderer = fig.canvas.get_renderer()
    to_data = ax.transData.inverted()
    x, y, line_h = 0.0, 0.0, 1.0
    for i, tok in enumerate(tokens):
        shade = min(kl[i] / vmax, 1.0)
        t = ax.text(x, y, tok.replace("\n", "⏎"), family="monospace", fontsize=8, va="center",
                    ha="left", color="white" if shade > 0.6 else "black",
                    bbox=dict(boxstyle="square,pad=0.05", lw=0, facecolor=cmap(shade)))
        right = to_data.transform(t.get_window_extent(renderer).get_points())[1, 0]
        if right > width and x > 0:  # wrap: move the token to the next line
            x, y = 0.0, y + line_h
            t.set_position((x, y))
            right = to_data.transform(t.get_window_extent(renderer).get_points())[1, 0]
        if n_prompt is not None and i == n_prompt:
            ax.plot([x, x], [y - 0.45, y + 0.45], color="k", lw=1.5)
        x = right
        if "\n" in tok:
            x, y = 0.0, y + line_h
    ax.set_ylim(y + 0.7, -0.7)
    sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, vmax))
    fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.01, label="KL(tuned ‖ base), nats")
    return fig
