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
