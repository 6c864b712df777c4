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
from alignkit.results import CompareResult
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


def plot_loss(loss: Sequence[tuple[int, float]], ax=None, checkpoint_steps: Sequence[int] = ()):
    """Training loss against step, with checkpoint steps marked."""
    fig, ax = _ax(ax)
    if loss:
        ax.plot(*zip(*loss), color="C0", lw=1.2, label="train loss (completion tokens)")
    for s in checkpoint_steps:
        ax.axvline(s, color="0.6", lw=0.8, ls=":")
    ax.set(xlabel="SFT step", ylabel="cross-entropy (nats / token)", title="Training loss")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_accuracy(rows: Sequence[dict], ax=None):
    """Greedy exact-match accuracy per checkpoint with its 95 % Wilson interval; base dashed."""
    fig, ax = _ax(ax)
    steps = [r["step"] for r in rows]
    acc, lo, hi = (100 * np.array([r[k] for r in rows]) for k in ("accuracy", "acc_lo", "acc_hi"))
    ax.fill_between(steps, lo, hi, color="C1", alpha=0.25, label="95 % Wilson interval")
    ax.plot(steps, acc, "o-", color="C1", label="accuracy")
    ax.axhline(acc[0], color="0.3", ls="--", lw=1, label=f"base ({acc[0]:.1f} %)")
    ax.set(xlabel="SFT step", ylabel="exact-match accuracy (%)", ylim=(0, 100),
           title="Held-out accuracy")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_answer_logprob(rows: Sequence[dict], ax=None):
    """Mean log-prob of the gold final answer per checkpoint, ± 1.96 standard errors."""
    fig, ax = _ax(ax)
    steps = [r["step"] for r in rows]
    m, se = (np.array([r[k] for r in rows]) for k in ("answer_logprob", "answer_logprob_se"))
    ax.fill_between(steps, m - 1.96 * se, m + 1.96 * se, color="C2", alpha=0.25,
                    label="95 % interval of the mean")
    ax.plot(steps, m, "o-", color="C2", label="mean log P(answer)")
    ax.axhline(m[0], color="0.3", ls="--", lw=1, label="base")
    ax.set(xlabel="SFT step", ylabel="log-prob of gold answer (nats)", title="Answer log-prob")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_sft_training(rows: Sequence[dict], loss: Sequence[tuple[int, float]], axes=None):
    """Three panels: training loss, accuracy and answer log-prob against SFT step."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(15, 4))
    plot_loss(loss, ax=axes[0], checkpoint_steps=[r["step"] for r in rows])
    plot_accuracy(rows, ax=axes[1])
    plot_answer_logprob(rows, ax=axes[2])
    axes[0].figure.tight_layout()
    return axes[0].figure


def _layer_labels(n: int, has_embed: bool = True) -> list[str]:
    return (["emb"] if has_embed else []) + [str(i) for i in range(n - (1 if has_embed else 0))]


def plot_layer_curves(curves: dict, ax=None, ylabel: str = "", title: str = "",
                      band: dict | None = None, band_label: str = "noise floor",
                      has_embed: bool = True, cmap: str = "viridis"):
    """One line per entry of ``curves`` (``{label: {"point", "lo"?, "hi"?}}`` over layers, e.g.
    a ``Band`` or a bootstrap dict) with its interval, and an optional grey control ``band``
    (``{"lo", "hi"}``, e.g. CKA's noise floor); ``has_embed``: index 0 is the embedding."""
    fig, ax = _ax(ax, figsize=(7, 4))
    colors = sns.color_palette(cmap, n_colors=max(1, len(curves)))
    for (label, c), color in zip(curves.items(), colors):
        x = np.arange(len(c["point"]))
        if "lo" in c and "hi" in c:
            ax.fill_between(x, c["lo"], c["hi"], color=color, alpha=0.2, lw=0)
        ax.plot(x, c["point"], "o-", ms=3, color=color, label=label)
    if band is not None:
        ax.fill_between(np.arange(len(band["lo"])), band["lo"], band["hi"], color="0.5",
                        alpha=0.25, hatch="//", lw=0, label=band_label)
    n = len(next(iter(curves.values()))["point"])
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
                 ylabel: str = "", title: str = "", xerr=None, yerr=None):
    """Per-layer scatter (e.g. ΔCKA vs Δ effective rank) with optional error bars and labels."""
    fig, ax = _ax(ax)
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=4, color="C0", ecolor="0.6",
                elinewidth=0.8)
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
            L = after the stack).
        styles, colors: optional ``{label: format string}`` and ``{label: colour}``.
    """
    _check_metric(metric)
    control, control_label = _DRIFT_METRICS[metric][1:3]
    fig, ax = _ax(ax, figsize=(7, 4))
    n_layers = 0
    for i, (label, t) in enumerate(tables.items()):
        t = t[t[metric].notna()]
        layers = np.asarray(t.index, dtype=float)
        n_layers = max(n_layers, int(layers.max()))
        color = (colors or {}).get(label, f"C{i}")
        ax.plot(layers, t[metric], (styles or {}).get(label, "o-"), ms=3, lw=1.2, color=color,
                label=label)
        if isinstance(control, str):
            ax.plot(layers, t[control], ":", lw=0.9, color=color, alpha=0.8)
    if isinstance(control, str):
        ax.plot([], [], ":", color="0.4", label=f"{control_label} (dotted)")
    _drift_axis(ax, metric, n_layers, title)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_grouped_bars(values: dict, ax=None, ylabel: str = "", title: str = "",
                      controls: dict | None = None, control_label: str = "control", ylim=None):
    """Bars grouped on the x axis, one colour per series, with interval whiskers.

    Args:
        values: ``{group: {series: {"point", "lo"?, "hi"?}}}``.
        controls: optional ``{group: value}`` drawn as a dashed bar across the group (chance
            level, a dense-noise value, the base model's score ...).
    """
    fig, ax = _ax(ax, figsize=(6, 4))
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        x = np.arange(len(groups)) - 0.4 + width * (j + 0.5)
        pts = [values[g].get(s, {}) for g in groups]
        y = np.array([p.get("point", np.nan) for p in pts], dtype=float)
        lo = np.array([p.get("lo", p.get("point", np.nan)) for p in pts], dtype=float)
        hi = np.array([p.get("hi", p.get("point", np.nan)) for p in pts], dtype=float)
        ax.bar(x, y, width=width * 0.92, color=f"C{j}", alpha=0.85, label=s)
        ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="none", ecolor="0.2", elinewidth=1, capsize=2)
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


def plot_compare_accuracy(res: CompareResult, ax=None):
    """Accuracy of each method's final model with its Wilson interval; the base as the control."""
    acc = res.accuracy
    vals = {"held-out accuracy": {m: {k: 100 * acc[m][f] for k, f in (
        ("point", "accuracy"), ("lo", "acc_lo"), ("hi", "acc_hi"))} for m in res.methods}}
    base = 100 * acc["base"]["accuracy"]
    return plot_grouped_bars(vals, ax=ax, ylabel="exact-match accuracy (%)",
                             title=f"Accuracy (n = {res.n_eval})",
                             controls={"held-out accuracy": base},
                             control_label=f"base ({base:.1f} %)")


def plot_compare_cka(res: CompareResult, ax=None):
    """CKA(base, final) per layer for each method, bootstrap bands, the widest noise floor."""
    return plot_layer_curves(res.cka, ax=ax, ylabel="linear CKA (base, final)", cmap="deep",
                             title=f"Layerwise CKA vs base ({res.pooling} pooling)",
                             has_embed=res.labels[0] == "embed",
                             band={"lo": 1 - res.cka_floor, "hi": np.ones(len(res.labels))},
                             band_label="noise floor (split-half, 95 %)")


def plot_compare_rank(res: CompareResult, ax=None, own: bool = False):
    """Paired Δ RankMe per layer: final − base, or final − the method's own init (``own``)."""
    deltas = ({f"{m} (vs {res.init[m]})": d for m, d in res.rank_vs_init.items()} if own
              else res.rank_vs_base)
    fig = plot_layer_curves(deltas, ax=ax, ylabel="Δ effective rank (RankMe)", cmap="deep",
                            title="Δ RankMe, final − " + ("own init" if own else "base"),
                            has_embed=res.labels[0] == "embed")
    (ax or fig.axes[0]).axhline(0, color="0.3", lw=1, ls="--", label="no change")
    return fig


def plot_compare_patching(res: CompareResult, ax=None):
    """Resid denoise (final → base) on SFT's flips: mean Δ with intervals, each method's gap."""
    n = res.patches[res.methods[0]].delta.shape[0]
    fig = plot_layer_curves(res.patch_curves, ax=ax, ylabel="Δ answer log-prob (nats)",
                            has_embed=False, cmap="deep",
                            title=f"Resid denoise (final → base) on SFT's {res.patch_set} (n={n})")
    ax = ax or fig.axes[0]
    for i, m in enumerate(res.methods):
        ax.axhline(res.gap(m), color=f"C{i}", ls="--", lw=1)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.plot([], [], "--", color="0.4", label="full gap of each method")
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_compare_drift(res: CompareResult, ax=None, metric: str = "rel_change"):
    """Per-layer weight drift vs base (solid) and of each own update (dashed)."""
    tables = res.drift_by_layer()
    colors = {k: f"C{res.methods.index(k.split()[0])}" for k in tables}
    styles = {k: ("o--" if "own" in k else "o-") for k in tables}
    return plot_drift_layers(tables, metric, ax=ax, styles=styles, colors=colors,
                             title="Weight change per layer")


def plot_drift_modules(res: CompareResult, ax=None):
    """Heatmap of log10 ‖ΔW‖/‖W‖ of each method's own update per module type."""
    table = res.own_by_module()
    table = table.loc[[m for m in _MODULE_ORDER if m in table.index]]
    mat = table.to_numpy(dtype=float)
    fig = plot_heatmap(np.log10(np.where(mat > 0, mat, np.nan)), ax=ax, cmap="viridis",
                       xticklabels=[f"{m} (vs {res.init[m]})" for m in res.methods],
                       yticklabels=list(table.index), cbar_label="log10 ‖ΔW‖/‖W‖ (own update)",
                       title="Relative change per module type")
    (ax or fig.axes[0]).set(xlabel="method", ylabel="module")
    return fig


def plot_compare_structure(res: CompareResult, ax=None):
    """Own-update sparsity and alignment with W against a dense Gaussian update and chance."""
    return plot_grouped_bars(res.structure, ax=ax, ylabel="mean over weight matrices",
                             controls=res.structure_controls, ylim=(0, 1.05),
                             control_label="dense Gaussian update / chance k/d",
                             title="Own update: sparsity and alignment with W")


def plot_atlas(res: CompareResult, axes=None, title: str = ""):
    """The six panels (a)-(f) of notebook 05 in one figure."""
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
