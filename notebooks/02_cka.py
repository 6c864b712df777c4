# %% [markdown]
# # 02 · Representation drift: layerwise and cross-layer CKA
#
# Where does SFT move the model's internal representations? For each held-out prompt we take the
# residual stream after every layer (pooled over the question's own tokens) in the base and in every
# SFT checkpoint, and compare the two with **linear CKA** (centred kernel alignment; Kornblith et
# al. 2019): 1 means the two layers hold the same representation up to rotation and scale.
#
# * **Layerwise CKA**: base layer *l* vs checkpoint layer *l*, one curve per checkpoint.
#   The study this project grew from reports stable early layers, a mid-depth break and growing
#   late drift — a hypothesis to test here, not a result to copy.
# * **Cross-layer heatmap**: base layer *i* vs tuned layer *j*. A bright diagonal means layers
#   stay plug-compatible; off-diagonal bands mean remapping.
#
# Controls: bootstrap intervals over prompts; a **noise floor** (how much CKA moves when the probe
# set is split in halves — a drift smaller than this cannot be told from the probe choice);
# **debiased** CKA beside the classic estimator (the classic one has a high floor when the width
# is not small next to the number of prompts); a **permutation baseline** (rows shuffled) for the
# heatmap.

# %%
# Colab only: fetch align-drift and install what Colab lacks; anywhere else this cell does nothing.
import os
import subprocess
import sys

if "google.colab" in sys.modules:
    if not os.path.isdir("/content/align-drift"):
        REPO = os.environ.get("ALIGNKIT_REPO", "")  # the git URL of align-drift (your fork or clone)
        if not REPO:
            raise RuntimeError("set os.environ['ALIGNKIT_REPO'] to align-drift's git URL, then rerun this cell")
        subprocess.run(["git", "clone", "-q", REPO, "/content/align-drift"], check=True)
        # requirements.txt holds ranges: Colab's own torch satisfies them and is kept
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "/content/align-drift/requirements.txt",
                        "-e", "/content/align-drift"], check=True)
    sys.path.insert(0, "/content/align-drift")
    os.chdir("/content/align-drift/notebooks")

# %% tags=["parameters"]
import os

PRESET = "tiny"
SMOKE = os.environ.get("ALIGNKIT_SMOKE") == "1"
# headless runs (make test / make reproduce) set ALIGNKIT_STATIC=1: no frontend, so no live widgets
# (nbclient can hang on widget output, jupyter/nbclient#312)
INTERACTIVE = os.environ.get("ALIGNKIT_STATIC") != "1"
# every knob is a config field: e.g. {"cka.pooling": "mean", "cka.n_boot": 500} (cfg.cka below);
# "question" pooling: the mean over the question's own tokens, the template every probe shares left
# out; "mean" (every prompt token, template included; cka.old_pooling) is what section 5 compares
OVERRIDES: dict = {}
N_SEEDS = None  # training seeds; None: the preset's (tiny 3, smoke 2, real presets 1)

# %%
import logging

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from alignkit.analyses import cka, summaries
from alignkit.analyses.common import over_seeds
from alignkit.config import get_config
from alignkit.plots import figure_dir, plot_heatmap, plot_layer_curves, save_figure

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
cfg = get_config(PRESET, smoke=SMOKE, overrides=OVERRIDES | ({"n_seeds": N_SEEDS} if N_SEEDS else {}))
cfg.cka

# %% [markdown]
# ## 1 · Activations and every CKA result
# The project's one capture path (`alignkit.capture`), cached on disk by checkpoint content hash,
# probe set, hook points and pooling (`over_seeds` trains what is missing, so this notebook runs
# first in a fresh clone too). Hook points whose rows are identical for every
# prompt (the embedding output under last-token pooling: every prompt ends with the same token)
# have zero variance, where CKA is undefined: they are dropped and named. `cka.ensure` computes
# every result of this notebook once and caches it in the run's `analysis/` (`python -m alignkit
# cka` writes the same file), for each training seed (`over_seeds`; notebook 01 says why).

# %%
results = over_seeds(cka.ensure, cfg, "sft")
res = results[0]
steps, labels, has_embed = res.steps, res.labels, res.labels[0] == "embed"
print(f"{len(results)} training seeds, {len(labels)} hook points, checkpoints at steps {steps}"
      + (f"; dropped (zero variance across prompts): {res.dropped}" if res.dropped else ""))

# %% [markdown]
# ## 2 · Layerwise CKA, base vs every checkpoint
# Left: classic (biased) CKA; right: debiased CKA. Shaded: bootstrap 95 % intervals over prompts.
# Grey hatched: the noise floor of the base-vs-final comparison (1.96 standard errors from
# split-half resampling, the widest over seeds, drawn below 1): drift inside it cannot be told
# apart from the probe set. Thick lines: the first training seed; thin: the others.

# %%
fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
for ax, kind in zip(axes, ("classic", "debiased")):
    noise = np.max([getattr(r, f"noise_{kind}") for r in results], axis=0)
    plot_layer_curves({f"step {s}": [getattr(r, kind)[s] for r in results] for s in steps[1:]}, ax=ax,
                      has_embed=has_embed, ylabel=f"{kind} linear CKA (base, checkpoint)",
                      title=f"{kind.capitalize()} CKA per layer ({res.pooling} pooling)",
                      band={"lo": 1 - noise, "hi": np.ones(len(labels))},
                      band_label="noise floor (split-half, 95 %)")
fig.tight_layout()
save_figure(fig, "layerwise_CKA", figure_dir(cfg))

# %% [markdown]
# ## 3 · Cross-layer CKA, base × final checkpoint
# Top: CKA between base layer *i* (rows) and final-checkpoint layer *j* (columns), with the
# monotone alignment path (dynamic time warping on 1 − CKA). Bottom: the same minus the
# permutation baseline (rows of the tuned model shuffled; the chance level of each cell). One
# column per training seed.

# %%
fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 9), squeeze=False)
xlabel = f"SFT layer (step {steps[-1]})"
for k, r in enumerate(results):
    plot_heatmap(r.matrix, ax=axes[0, k], path=r.path, xlabel=xlabel, ylabel="base layer",
                 title=f"Cross-layer CKA, seed {k + 1}", cbar_label="linear CKA", vmin=0, vmax=1,
                 has_embed=has_embed)
    plot_heatmap(r.matrix - r.chance, ax=axes[1, k], xlabel=xlabel, ylabel="base layer",
                 title=f"Above chance (− permutation baseline), seed {k + 1}",
                 cbar_label="CKA − shuffled CKA", has_embed=has_embed, cmap="viridis")
fig.tight_layout()
save_figure(fig, "CKA_heatmap", figure_dir(cfg))

# %% [markdown]
# ## 4 · Layer correspondence and the transition
# For each base layer, the tuned layer it matches best; the remapping index is the mean distance
# of that match from the diagonal (0 = every layer still matches itself). The transition layer is
# the layer after the steepest drop in layerwise CKA, with a bootstrap interval. One column per
# training seed.

# %%
pd.concat({f"seed {k + 1}": pd.DataFrame({
    "best tuned layer": [labels[j] for j in r.best], "CKA same layer": r.classic[steps[-1]].point.round(3),
    "debiased": r.debiased[steps[-1]].point.round(3), "noise half-width": r.noise_classic.round(4)},
    index=pd.Index(labels, name="base layer")) for k, r in enumerate(results)}, axis=1)

# %% [markdown]
# ## 5 · Does the flat heatmap survive without the template?
# Mean pooling over every prompt token includes the fixed `Question:` … `Answer:` template,
# weighted by 1/length: a length-driven direction every layer shares, which could make the
# cross-layer heatmap flat and the embedding the best match of many layers. Top: the question
# pooling used above; bottom: the old mean pooling; each minus its permutation baseline, one
# column per training seed. The table counts, per seed and pooling, the decoder layers whose best
# tuned match is the embedding and the heatmap's contrast (mean diagonal CKA minus the mean CKA
# of cells three or more layers off it; 0 = flat).

# %%
old = over_seeds(cka.ensure_old_pooling, cfg, "sft")
fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 9), squeeze=False)
for row, rs in enumerate((results, old)):
    for k, r in enumerate(rs):
        plot_heatmap(r.matrix - r.chance, ax=axes[row, k], xlabel=xlabel, ylabel="base layer", vmin=0, vmax=1,
                     title=f"{r.pooling} pooling, seed {k + 1}", cbar_label="CKA − shuffled CKA",
                     has_embed=r.labels[0] == "embed", cmap="viridis")
fig.tight_layout()
save_figure(fig, "CKA_pooling", figure_dir(cfg))
pd.DataFrame([r.pooling_effect() | {"pooling": r.pooling, "seed": k + 1}
              for rs in (results, old) for k, r in enumerate(rs)]).set_index(["pooling", "seed"]).round(3)

# %%
display(Markdown(summaries.publish("02_cka_pooling", (results, old), cfg, figure_dir(cfg), SMOKE)))

# %% [markdown]
# ## 6 · Drift over training
# Layerwise CKA (base, checkpoint) for every checkpoint step; a dot marks, for each layer, the
# first checkpoint at which its CKA leaves the noise band. One panel per training seed, on one
# colour scale.

# %%
low = min(float(r.by_step().min()) for r in results)
fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
for k, (ax, r) in enumerate(zip(axes[0], results)):
    plot_heatmap(r.by_step().T, ax=ax, xlabel="SFT step", ylabel="layer", vmin=low, vmax=1,
                 title=f"Layerwise CKA over training, seed {k + 1}", cmap="magma",
                 cbar_label="linear CKA (base, checkpoint)", xticklabels=[str(s) for s in steps],
                 yticklabels=labels)
    for layer, s in enumerate(r.departure):
        if s >= 0:
            ax.plot(steps.index(int(s)), layer, "o", color="cyan", ms=5)
    ax.plot([], [], "o", color="cyan", label="first step outside the noise band")
    ax.legend(loc="upper right", fontsize=8)
fig.tight_layout()
save_figure(fig, "cka_over_training", figure_dir(cfg))

# %% [markdown]
# ## 7 · Explore: checkpoint and pooling
# With a live kernel, the dropdowns redraw the layerwise curve of one checkpoint of the first
# training seed under either pooling (from the cached results above: nothing is recomputed), beside
# the cross-layer heatmap of the final checkpoint; without one (CI, a static export) the figure
# below is drawn once with the defaults.

# %%
by_pooling = {r.pooling: r for r in (results[0], old[0])}


def show(step=steps[-1], pooling=res.pooling):
    r, axes = by_pooling[pooling], plt.subplots(1, 2, figsize=(13, 4.5))[1]
    plot_layer_curves({f"step {step}": r.classic[step]}, ax=axes[0], ylabel="linear CKA",
                      has_embed=r.labels[0] == "embed", title=f"Layerwise CKA, {pooling} pooling")
    plot_heatmap(r.matrix, ax=axes[1], vmin=0, vmax=1, cbar_label="CKA", has_embed=r.labels[0] == "embed",
                 xlabel=f"SFT layer (step {steps[-1]})", ylabel="base layer", title="Cross-layer CKA")
    plt.show()


if INTERACTIVE:
    import ipywidgets as widgets

    widgets.interact(show, step=widgets.Dropdown(options=steps[1:], value=steps[-1]),
                     pooling=widgets.Dropdown(options=list(by_pooling), value=res.pooling))
else:
    show()

# %% [markdown]
# ## 8 · What these runs show
# Computed from the results above by `alignkit.analyses.cka.summarize`: what holds in how many
# training seeds, each seed's own numbers below it.

# %%
display(Markdown(summaries.publish("02_cka", results, cfg, figure_dir(cfg), SMOKE)))
display(Markdown(summaries.publish("02_cka_seeds", results, cfg, figure_dir(cfg), SMOKE)))
