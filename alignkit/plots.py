"""Figures only: every helper takes ``ax=`` (or ``axes=``) and returns the Figure; none
computes a measure (the analyses' results and their methods do). Results over training seeds
come as lists, one entry per seed: the first drawn thick, the others thin."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from alignkit.analyses.cka import CrossCKAResult
from alignkit.config import PUBLISHED, Config, get_config
from alignkit.runs import hash_obj

logger = logging.getLogger(__name__)

DPI = 150

sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
matplotlib.rcParams.update({"figure.dpi": 100, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def _ax(ax=None, figsize=(5, 3.6)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    return ax.figure, ax


def figure_dir(cfg: Config) -> Path:
    """Where a run's figures and summaries go: ``<root>/images/<folder>`` for a run the README
    publishes (``config.PUBLISHED``: the tiny preset, or the real model's, at full size with no
    override but ``root``; ``make publish`` copies them into the repository's ``images/``), else
    ``<root>/reports/<preset>[-smoke]-<config hash>/images``."""
    key = dataclasses.replace(cfg, root="")
    for preset, folder in PUBLISHED.items():
        if key == get_config(preset):
            return cfg.run_root / "images" / folder if folder else cfg.run_root / "images"
    tag = f"{cfg.preset}{'-smoke' if cfg.smoke else ''}-{hash_obj(key)}"
    return cfg.run_root / "reports" / tag / "images"


def save_figure(fig, name: str, out_dir: str | Path) -> Path:
    """Write ``fig`` as ``<out_dir>/<name>.png`` at a fixed dpi (``figure_dir(cfg)``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=DPI)
    logger.info("saved %s", path)
    return path


def _seed_legend(ax, n: int) -> None:
    if n > 1:
        which = "training seed 2" if n == 2 else f"training seeds 2–{n}"
        ax.plot([], [], "-", color="0.4", lw=0.9, label=f"thin: {which}")


def _seeds(x) -> list:
    """Results per training seed: a list or tuple as given, anything else the list of one."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _curve_x(curve) -> np.ndarray:
    """Where a curve's points lie: its ``"x"`` (layers it was measured at), else 0, 1, ..."""
    return np.asarray(curve["x"]) if "x" in curve else np.arange(len(curve["point"]))


def _column(rows: list, field: str) -> np.ndarray:
    return np.array([r[field] for r in rows])


def _draw_seeds(ax, curves: list, color, label: str, ms: float = 3, alpha=(0.2, 0.07),
                band_label: str | None = None, **band_kw) -> None:
    """One curve ``{"point", "lo"?, "hi"?, "x"?}`` per seed with its band: the first thick."""
    for k, c in enumerate(curves):
        x, first = _curve_x(c), k == 0
        if "lo" in c and "hi" in c:
            ax.fill_between(x, c["lo"], c["hi"], color=color, alpha=alpha[0 if first else 1],
                            label=band_label if first else None, **band_kw)
        ax.plot(x, c["point"], "-", color=color, ms=ms, label=label if first else None,
                marker="o" if first else None, lw=1.6 if first else 0.9,
                alpha=1.0 if first else 0.8)


def plot_loss(seeds: Sequence[list], ax=None, checkpoint_steps: Sequence[int] = ()):
    """Training loss per seed (``[(step, value)]``) against step, checkpoint steps marked."""
    fig, ax = _ax(ax)
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


def plot_accuracy(seeds: Sequence[list], ax=None):
    """Greedy exact-match accuracy per checkpoint with its 95 % Wilson interval (per training
    seed, ``BehaviourResult.summary()``: a line and interval each); the base dashed."""
    fig, ax = _ax(ax)
    curves = [{"x": _column(one, "step"), "point": 100 * _column(one, "accuracy"),
               "lo": 100 * _column(one, "acc_lo"), "hi": 100 * _column(one, "acc_hi")}
              for one in seeds]
    _draw_seeds(ax, curves, "C1", "accuracy", ms=4, alpha=(0.25, 0.08),
                band_label="95 % Wilson interval")
    _seed_legend(ax, len(seeds))
    base = 100 * seeds[0][0]["accuracy"]
    ax.axhline(base, color="0.3", ls="--", lw=1, label=f"base ({base:.1f} %)")
    ax.set(xlabel="SFT step", ylabel="exact-match accuracy (%)", ylim=(0, 100),
           title="Held-out accuracy")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_answer_logprob(seeds: Sequence[list], ax=None):
    """Mean log-prob of the gold final answer per checkpoint, ± 1.96 standard errors (a line per
    training seed, ``summary()`` rows each)."""
    fig, ax = _ax(ax)
    curves = []
    for one in seeds:
        m, se = _column(one, "answer_logprob"), _column(one, "answer_logprob_se")
        curves.append({"x": _column(one, "step"), "point": m, "lo": m - 1.96 * se,
                       "hi": m + 1.96 * se})
    _draw_seeds(ax, curves, "C2", "mean log P(answer)", ms=4, alpha=(0.25, 0.08),
                band_label="95 % interval of the mean")
    _seed_legend(ax, len(seeds))
    ax.axhline(seeds[0][0]["answer_logprob"], color="0.3", ls="--", lw=1, label="base")
    ax.set(xlabel="SFT step", ylabel="log-prob of gold answer (nats)", title="Answer log-prob")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_sft_training(rows: Sequence[list], loss: Sequence[list], axes=None):
    """Three panels: training loss, accuracy and answer log-prob against SFT step, per seed."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(15, 4))
    plot_loss(loss, ax=axes[0], checkpoint_steps=[r["step"] for r in rows[0]])
    plot_accuracy(rows, ax=axes[1])
    plot_answer_logprob(rows, ax=axes[2])
    axes[0].figure.tight_layout()
    return axes[0].figure


def _layer_labels(n: int, has_embed: bool = True) -> list[str]:
    return (["emb"] if has_embed else []) + [str(i) for i in range(n - (1 if has_embed else 0))]


def plot_layer_curves(curves: dict, ax=None, ylabel: str = "", title: str = "",
                      band: dict | None = None, band_label: str = "noise floor",
                      has_embed: bool = True, cmap: str = "viridis"):
    """One line per entry of ``curves`` (``{label: {"point", "lo"?, "hi"?}}`` over layers, e.g. a
    ``Band``, or a list of such curves, one per training seed) with its interval; a curve measured
    at some layers only carries them as ``"x"``. ``band``: an optional grey control (``{"lo",
    "hi"}``, e.g. CKA's noise floor); ``has_embed``: index 0 is the embedding."""
    fig, ax = _ax(ax, figsize=(7, 4))
    curves = {label: _seeds(c) for label, c in curves.items()}
    colors = sns.color_palette(cmap, n_colors=max(1, len(curves)))
    for (label, seeds), color in zip(curves.items(), colors):
        _draw_seeds(ax, seeds, color, label, lw=0)
    _seed_legend(ax, max(map(len, curves.values())))
    if band is not None:
        ax.fill_between(np.arange(len(band["lo"])), band["lo"], band["hi"], color="0.5",
                        alpha=0.25, hatch="//", lw=0, label=band_label)
    n = max(int(_curve_x(c)[-1]) + 1 for seeds in curves.values() for c in seeds)
    ax.set_xticks(range(n), _layer_labels(n, has_embed), fontsize=8)
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
    rows, cols = mat.shape[:2]
    ax.set_yticks(range(rows), yticklabels or _layer_labels(rows, has_embed), fontsize=7)
    ax.set_xticks(range(cols), xticklabels or _layer_labels(cols, has_embed), fontsize=7)
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


def _drift_metric(metric: str) -> tuple:
    """``metric``'s entry of ``_DRIFT_METRICS``; ValueError for an unknown one."""
    if metric not in _DRIFT_METRICS:
        raise ValueError(f"metric must be one of {sorted(_DRIFT_METRICS)}, got {metric!r}")
    return _DRIFT_METRICS[metric]


def _drift_axis(ax, metric: str, n_layers: int, title: str, **legend_kw) -> None:
    """Layer ticks (emb, 0 ... L-1, out), labels, a constant control and the legend."""
    ylabel, control, control_label, log = _DRIFT_METRICS[metric]
    if not isinstance(control, str):
        ax.axhline(control, color="0.4", ls=":", lw=1, label=control_label)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(-1, n_layers + 1), _layer_labels(n_layers + 1) + ["out"], fontsize=8)
    ax.set(xlabel="layer (emb: token embedding, out: final norm / untied head)", ylabel=ylabel,
           title=title or metric)
    ax.legend(fontsize=7, loc="best", **legend_kw)


def plot_weight_drift(df, metric: str = "rel_change", ax=None, modules: Sequence[str] | None = None,
                      title: str = ""):
    """One line per module type of a ``weights.weight_drift`` table against layer, with the
    metric's control (``_DRIFT_METRICS``: dashed per module, or one grey line); the embedding
    (layer −1) and what follows the stack (layer L) are single markers."""
    _, control, control_label, _ = _drift_metric(metric)
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
    _drift_axis(ax, metric, int(df.attrs.get("n_layers", df["layer"].max())), title, ncol=2)
    return fig


def plot_drift_layers(tables: dict, metric: str = "rel_change", ax=None, styles: dict | None = None,
                      title: str = "", colors: dict | None = None):
    """Per-layer pooled weight drift of several comparisons, one line each, with the control:
    ``tables`` is ``{label: weights.summarize_drift(df, "layer")}`` (index: layer, −1 = embedding,
    L = after the stack) or, per label, a list of them per seed (the first with its control)."""
    _, control, control_label, _ = _drift_metric(metric)
    fig, ax = _ax(ax, figsize=(7, 4))
    tables = {label: _seeds(t) for label, t in tables.items()}
    n_layers = 0
    for i, (label, seeds) in enumerate(tables.items()):
        color, style = (colors or {}).get(label, f"C{i}"), (styles or {}).get(label, "o-")
        for k, t in enumerate(seeds):
            t = t[t[metric].notna()]
            layers = np.asarray(t.index, dtype=float)
            n_layers = max(n_layers, int(layers.max()))
            ax.plot(layers, t[metric], style if k == 0 else style.replace("o", ""), ms=3,
                    lw=1.2 if k == 0 else 0.7, alpha=1 if k == 0 else 0.7, color=color,
                    label=label if k == 0 else None)
            if isinstance(control, str) and k == 0:
                ax.plot(layers, t[control], ":", lw=0.9, color=color, alpha=0.8)
    _seed_legend(ax, max(map(len, tables.values())))
    if isinstance(control, str):
        ax.plot([], [], ":", color="0.4", label=f"{control_label} (dotted)")
    _drift_axis(ax, metric, n_layers, title)
    return fig


def plot_grouped_bars(values: dict, ax=None, ylabel: str = "", title: str = "",
                      controls: dict | None = None, control_label: str = "control", ylim=None):
    """Bars ``values[group][series] = {"point", "lo"?, "hi"?}``, a colour per series, with interval
    whiskers (a list per seed: the bar their mean, a dot per seed, the whisker all intervals);
    ``controls`` (optional ``{group: value}``, e.g. chance) dashed across each group."""
    fig, ax = _ax(ax, figsize=(6, 4))
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    width = 0.8 / max(1, len(series))
    n_seeds = 1

    def field(p, f):
        return np.array([q.get(f, q.get("point", np.nan)) for q in p], dtype=float)

    for j, s in enumerate(series):
        x = np.arange(len(groups)) - 0.4 + width * (j + 0.5)
        pts = [_seeds(values[g].get(s, {})) for g in groups]
        n_seeds = max(n_seeds, *(len(p) for p in pts))
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
    drawn = [(i, controls[g]) for i, g in enumerate(groups)
             if controls and controls.get(g) is not None]
    for n, (i, value) in enumerate(drawn):
        ax.hlines(value, i - 0.45, i + 0.45, color="k", lw=1.6, ls="--",
                  label=None if n else control_label)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set(ylabel=ylabel, title=title, **({"ylim": ylim} if ylim is not None else {}))
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_cross_cka(res: CrossCKAResult, model: str, ax=None, title: str = ""):
    """Cross-layer CKA of ``model``'s layers (columns) against the reference's (rows), any
    depths: white dots mark the layers tied for each column's best match (bootstrap), the ring
    its best, grey crosses the cells whose interval reaches shuffled-rows chance."""
    mat, ties, best = res.cka[model], res.ties[model], res.best[model]
    other = f" (differs in {', '.join(res.shape[model])})" if res.shape[model] else ""
    fig = plot_heatmap(mat, ax=ax, xlabel=f"{model} layer{other}", ylabel="reference layer",
                       cbar_label="CKA (biased)", vmin=0, vmax=1, xticklabels=res.labels[model],
                       yticklabels=res.labels["base"],
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
    """Steering with the held-out mean activation difference against random directions of its
    norm, as fractions of the gap over layers: ``curves`` holds one ``LensResult.steering`` dict
    per training seed (``steer``: a Band; ``control``: the random directions' median and 2.5–97.5
    % range; ``threshold``: the 95th percentile of their maximum over layers, dotted)."""
    curves = list(curves)
    names = {"steer": "mean difference (other half) added to base",
             "control": f"{curves[0].get('n_random', '')} random directions, same norm".strip()}
    fig = plot_layer_curves({name: [{**c[key], "x": c["layers"]} for c in curves]
                             for key, name in names.items()}, ax=ax, title=title,
                            ylabel="fraction of the gap (mean Δ / mean gap)", has_embed=False,
                            cmap="deep")
    ax = ax or fig.axes[0]
    for k, c in enumerate(curves):
        ax.axhline(c["threshold"], color="0.3", ls=":", lw=1 if k == 0 else 0.6,
                   label="random max over layers, 95th pct" if k == 0 else None)
    ax.axhline(1, color="0.4", ls="--", lw=0.8)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_lens_tokens(tokens: Sequence[dict], ax=None, k: int = 5, title: str = ""):
    """The difference lens as a table: per layer (rows), the ``k`` tokens the mean difference
    promotes (left) and suppresses (right), coloured by their z-score (``lens.top_tokens``)."""
    fig, ax = _ax(ax, figsize=(10, 0.32 * len(tokens) + 1))
    cmap = plt.get_cmap("RdBu_r")
    for layer, row in enumerate(tokens):
        for side, sign, x0 in (("promoted", 1, 0), ("suppressed", -1, k + 0.5)):
            for j, (tok, z) in enumerate(row[side][:k]):
                face = cmap(0.5 + sign * min(abs(z), 8) / 16)
                ax.text(x0 + j, layer, repr(tok)[1:-1][:10], ha="center", va="center", fontsize=7,
                        family="monospace",
                        bbox=dict(boxstyle="round,pad=0.2", lw=0, facecolor=face))
    ax.set(xlim=(-0.6, 2 * k + 0.1), ylim=(len(tokens) - 0.5, -0.5), title=title)
    ax.set_yticks(range(len(tokens)), [f"layer {i}" for i in range(len(tokens))], fontsize=8)
    ax.set_xticks([(k - 1) / 2, k + 0.5 + (k - 1) / 2],
                  ["promoted (red: higher z)", "suppressed (blue)"], fontsize=8)
    ax.grid(False)
    return fig


def plot_token_kl(tokens: Sequence[str], kl: Sequence[float], ax=None, n_prompt: int | None = None,
                  width: float = 10.0, vmax: float | None = None, title: str = ""):
    """A text as tokens shaded by the per-token KL at their position (how differently the two
    models predict the *next* token), white 0 to dark red ``vmax``; newlines drawn as ``⏎``; a
    bar where the prompt ends (``n_prompt``). ``width``: the line length in inches."""
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
