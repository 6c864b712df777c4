"""Figures only: every helper takes ``ax=`` (or ``axes=``) and returns the Figure; nothing computes a measure."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

logger = logging.getLogger(__name__)

IMAGES = Path(__file__).resolve().parent.parent / "images"
DPI = 150

sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
matplotlib.rcParams.update({"figure.dpi": 100, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def _ax(ax=None, figsize=(5, 3.6)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    return ax.figure, ax


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
        steps, values = zip(*loss)
        ax.plot(steps, values, color="C0", lw=1.2, label="train loss (completion tokens)")
    for s in checkpoint_steps:
        ax.axvline(s, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("SFT step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Training loss")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_accuracy(rows: Sequence[dict], ax=None):
    """Greedy exact-match accuracy per checkpoint with its 95 % Wilson interval; base as a dashed line."""
    fig, ax = _ax(ax)
    steps = np.array([r["step"] for r in rows])
    acc = np.array([r["accuracy"] for r in rows]) * 100
    lo = np.array([r["acc_lo"] for r in rows]) * 100
    hi = np.array([r["acc_hi"] for r in rows]) * 100
    ax.fill_between(steps, lo, hi, color="C1", alpha=0.25, label="95 % Wilson interval")
    ax.plot(steps, acc, "o-", color="C1", label="accuracy")
    ax.axhline(acc[0], color="0.3", ls="--", lw=1, label=f"base ({acc[0]:.1f} %)")
    ax.set_xlabel("SFT step")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Held-out accuracy")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_answer_logprob(rows: Sequence[dict], ax=None):
    """Mean teacher-forced log-prob of the gold final answer per checkpoint, ± 1.96 standard errors."""
    fig, ax = _ax(ax)
    steps = np.array([r["step"] for r in rows])
    m = np.array([r["answer_logprob"] for r in rows])
    se = np.array([r["answer_logprob_se"] for r in rows])
    ax.fill_between(steps, m - 1.96 * se, m + 1.96 * se, color="C2", alpha=0.25, label="95 % interval of the mean")
    ax.plot(steps, m, "o-", color="C2", label="mean log P(answer)")
    ax.axhline(m[0], color="0.3", ls="--", lw=1, label="base")
    ax.set_xlabel("SFT step")
    ax.set_ylabel("log-prob of gold answer (nats)")
    ax.set_title("Answer log-prob")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_sft_training(rows: Sequence[dict], loss: Sequence[tuple[int, float]], axes=None):
    """Three panels: training loss, accuracy and answer log-prob against SFT step."""
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    plot_loss(loss, ax=axes[0], checkpoint_steps=[r["step"] for r in rows])
    plot_accuracy(rows, ax=axes[1])
    plot_answer_logprob(rows, ax=axes[2])
    fig = axes[0].figure
    fig.tight_layout()
    return fig


def _layer_labels(n: int, has_embed: bool = True) -> list[str]:
    return (["emb"] if has_embed else []) + [str(i) for i in range(n - (1 if has_embed else 0))]


def plot_layer_curves(curves: dict, ax=None, ylabel: str = "", title: str = "", band: dict | None = None,
                      band_label: str = "noise floor", has_embed: bool = True, cmap: str = "viridis"):
    """One line per entry of ``curves`` ({label: {"point", "lo", "hi"}} over layers) with its interval.

    Args:
        curves: ordered mapping label -> dict with arrays ``point`` and optionally ``lo``, ``hi`` [L].
        band: optional control band {"lo", "hi"} [L] drawn in grey (e.g. CKA's noise floor).
        has_embed: whether index 0 is the embedding output (labelled "emb").
    """
    fig, ax = _ax(ax, figsize=(7, 4))
    colors = sns.color_palette(cmap, n_colors=max(1, len(curves)))
    for (label, c), color in zip(curves.items(), colors):
        x = np.arange(len(c["point"]))
        if "lo" in c and "hi" in c:
            ax.fill_between(x, c["lo"], c["hi"], color=color, alpha=0.2, lw=0)
        ax.plot(x, c["point"], "o-", ms=3, color=color, label=label)
    if band is not None:
        x = np.arange(len(band["lo"]))
        ax.fill_between(x, band["lo"], band["hi"], color="0.5", alpha=0.25, hatch="//", lw=0, label=band_label)
    n = len(next(iter(curves.values()))["point"])
    ax.set_xticks(range(n))
    ax.set_xticklabels(_layer_labels(n, has_embed), fontsize=8)
    ax.set_xlabel("layer (residual stream after it)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_heatmap(mat: np.ndarray, ax=None, path=None, xlabel: str = "", ylabel: str = "", title: str = "",
                 cbar_label: str = "", vmin=None, vmax=None, has_embed: bool = True, cmap: str = "magma",
                 xticklabels=None, yticklabels=None):
    """A matrix as a heatmap, optionally with a path [(i, j), ...] overlaid (rows i, columns j)."""
    fig, ax = _ax(ax, figsize=(6, 5))
    im = ax.imshow(mat, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(cbar_label)
    if path is not None:
        ii, jj = zip(*path)
        ax.plot(jj, ii, color="cyan", lw=1.5, label="alignment path (DTW)")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_yticks(range(mat.shape[0]))
    ax.set_yticklabels(yticklabels or _layer_labels(mat.shape[0], has_embed), fontsize=7)
    ax.set_xticks(range(mat.shape[1]))
    ax.set_xticklabels(xticklabels or _layer_labels(mat.shape[1], has_embed), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def plot_scatter(x: np.ndarray, y: np.ndarray, ax=None, labels=None, xlabel: str = "", ylabel: str = "",
                 title: str = "", xerr=None, yerr=None):
    """Per-layer scatter (e.g. ΔCKA vs Δ effective rank) with optional error bars and point labels."""
    fig, ax = _ax(ax)
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=4, color="C0", ecolor="0.6", elinewidth=0.8)
    for xi, yi, lab in zip(x, y, labels or []):
        ax.annotate(lab, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.axvline(0, color="0.4", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


# weight-space drift (alignkit.weights): metric -> (axis label, control column or constant, control label, log y)
_DRIFT_METRICS = {
    "rel_change": ("‖ΔW‖ / ‖W‖ (relative change)", 2.0 ** -24, "float32 round-off (2⁻²⁴)", True),
    "frac_changed": ("share of entries with |ΔW| > tol", "frac_changed_dense", "dense Gaussian update, same RMS", False),
    "frac_mass": ("share of entries holding 90 % of ‖ΔW‖²", "frac_mass_dense", "dense Gaussian update", False),
    "eff_rank": ("effective rank of ΔW (RankMe)", "eff_rank_dense", "Gaussian matrix, same shape", False),
    "overlap_left": ("top-k overlap with W, output space (mean cos²)", "chance_left", "chance k / d_out", False),
    "overlap_right": ("top-k overlap with W, input space (mean cos²)", "chance_right", "chance k / d_in", False),
}


def plot_weight_drift(df, metric: str = "rel_change", ax=None, modules: Sequence[str] | None = None,
                      title: str = ""):
    """One line per module type of a ``weights.weight_drift`` table against layer, with its control.

    Embedding (layer −1) and parameters after the stack (final norm, untied head; layer L) are
    drawn as single markers at the ends. Controls (dashed, same colour, or grey when one value):
    float32 round-off for ``rel_change`` (log axis), a dense Gaussian update for ``frac_changed``,
    ``frac_mass`` and ``eff_rank``, and the chance level k/d for the overlaps.

    Args:
        df: a ``weight_drift`` table (columns ``layer``, ``module`` and the metric's).
        metric: one of ``rel_change, frac_changed, frac_mass, eff_rank, overlap_left, overlap_right``.
        modules: module types to draw (default: all with a finite value, projections first).
    """
    if metric not in _DRIFT_METRICS:
        raise ValueError(f"metric must be one of {sorted(_DRIFT_METRICS)}, got {metric!r}")
    ylabel, control, control_label, log = _DRIFT_METRICS[metric]
    fig, ax = _ax(ax, figsize=(7, 4))
    n_layers = int(df.attrs.get("n_layers", df["layer"].max()))
    order = ["q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_attn_norm", "q_norm", "k_norm",
             "embed", "final_norm", "lm_head"]
    present = [m for m in df.loc[df[metric].notna(), "module"].unique()]
    if modules is None:
        modules = sorted(present, key=lambda m: order.index(m) if m in order else len(order))
    colors = sns.color_palette("tab20", n_colors=max(1, len(modules)))
    per_module = isinstance(control, str) and df.loc[df[metric].notna(), control].nunique() > 1
    for module, color in zip(modules, colors):
        sub = df[(df["module"] == module) & df[metric].notna()].sort_values("layer")
        if sub.empty:
            continue
        style = "o-" if len(sub) > 1 else "D"
        ax.plot(sub["layer"], sub[metric], style, ms=4 if len(sub) > 1 else 6, lw=1.2, color=color, label=module)
        if per_module:
            x, c = sub["layer"].to_numpy(), sub[control].to_numpy()
            if len(sub) == 1:
                x, c = np.array([x[0] - 0.3, x[0] + 0.3]), np.repeat(c, 2)
            ax.plot(x, c, "--", lw=0.9, color=color, alpha=0.9)
    if isinstance(control, str):
        values = df.loc[df[metric].notna(), control]
        if not per_module:
            ax.axhline(float(values.iloc[0]), color="0.4", ls="--", lw=1, label=control_label)
        else:
            ax.plot([], [], "--", color="0.4", lw=0.8, label=f"{control_label} (dashed, per module)")
    else:
        ax.axhline(control, color="0.4", ls=":", lw=1, label=control_label)
    if log:
        ax.set_yscale("log")
    ticks = list(range(-1, n_layers + 1))
    ax.set_xticks(ticks)
    ax.set_xticklabels(["emb"] + [str(i) for i in range(n_layers)] + ["out"], fontsize=8)
    ax.set_xlabel("layer (emb: token embedding, out: final norm / untied head)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or metric)
    ax.legend(fontsize=7, ncol=2, loc="best")
    return fig


def plot_drift_layers(tables: dict, metric: str = "rel_change", ax=None, styles: dict | None = None, title: str = "",
                      colors: dict | None = None):
    """Per-layer pooled weight drift of several comparisons (one line each) with the metric's control.

    Args:
        tables: ``{label: weights.summarize_drift(df, "layer")}`` (index: layer, −1 = embedding,
            L = after the stack).
        metric: a column of those tables (see ``plot_weight_drift`` for the controls drawn).
        styles: optional ``{label: matplotlib format string}`` (e.g. ``"o--"``).
        colors: optional ``{label: colour}``; default: the colour cycle in order.
    """
    if metric not in _DRIFT_METRICS:
        raise ValueError(f"metric must be one of {sorted(_DRIFT_METRICS)}, got {metric!r}")
    ylabel, control, control_label, log = _DRIFT_METRICS[metric]
    fig, ax = _ax(ax, figsize=(7, 4))
    n_layers = 0
    for i, (label, t) in enumerate(tables.items()):
        t = t[t[metric].notna()]
        layers = np.asarray(t.index, dtype=float)
        n_layers = max(n_layers, int(layers.max()))
        color = (colors or {}).get(label, f"C{i}")
        ax.plot(layers, t[metric], (styles or {}).get(label, "o-"), ms=3, lw=1.2, color=color, label=label)
        if isinstance(control, str):
            ax.plot(layers, t[control], ":", lw=0.9, color=color, alpha=0.8)
    if isinstance(control, str):
        ax.plot([], [], ":", color="0.4", label=f"{control_label} (dotted)")
    else:
        ax.axhline(control, color="0.4", ls=":", lw=1, label=control_label)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(-1, n_layers + 1))
    ax.set_xticklabels(["emb"] + [str(i) for i in range(n_layers)] + ["out"], fontsize=8)
    ax.set_xlabel("layer (emb: embedding, out: final norm)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or metric)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_grouped_bars(values: dict, ax=None, ylabel: str = "", title: str = "", controls: dict | None = None,
                      control_label: str = "control", ylim=None):
    """Bars grouped on the x axis, one colour per series, with interval whiskers and a control per group.

    Args:
        values: ``{group: {series: {"point", "lo", "hi"}}}`` (``lo``/``hi`` optional).
        controls: optional ``{group: value}`` drawn as a black bar across the group (chance level,
            a dense-noise value, the base model's score ...).
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
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    return fig
