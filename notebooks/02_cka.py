# %% [markdown]
# # 02 · Representation drift: layerwise and cross-layer CKA
#
# Where does SFT move the model's internal representations? For each held-out prompt we take the
# residual stream after every layer (pooled over the prompt's tokens) in the base and in every
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
OVERRIDES: dict = {}
POOLINGS = ("mean", "last")  # the first is used for the saved figures
N_BOOT = 20 if SMOKE else 200
N_PERM = 5 if SMOKE else 50

# %%
import logging

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from alignkit import cka, pipeline
from alignkit.activations import capture_run, probe_texts, varying_points
from alignkit.config import get_config
from alignkit.evaluate import ensure_sft_results
from alignkit.plots import plot_heatmap, plot_layer_curves, save_figure

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
cfg = get_config(PRESET, smoke=SMOKE, overrides=OVERRIDES)
run_dir, results, flips = ensure_sft_results(cfg)  # builds notebook 01's artifacts if missing

# %% [markdown]
# ## 1 · Activations
# The project's one capture path (`alignkit.activations`), cached on disk by checkpoint content
# hash, probe set, hook points and pooling. Hook points whose rows are identical for every prompt
# (the embedding output under last-token pooling: every prompt ends with the same token) have
# zero variance, where CKA is undefined: they are dropped and named.

# %%
texts = probe_texts(cfg)
captures = {p: capture_run(run_dir, texts, pooling=p) for p in POOLINGS}
steps = sorted(captures[POOLINGS[0]])
base_step, final_step = steps[0], steps[-1]


def stacks(pooling):
    """{step: [L, n, d] float tensor} without zero-variance hook points, and the kept labels."""
    caps = captures[pooling]
    keep, labels, dropped = varying_points(caps.values())
    if dropped:
        print(f"[{pooling}] dropped (zero variance across prompts): {dropped}")
    return {s: caps[s].acts[keep] for s in steps}, labels


acts, labels = stacks(POOLINGS[0])
has_embed = labels[0] == "embed"
print(f"{len(texts)} probe prompts × {len(labels)} hook points × width {acts[base_step].shape[-1]}, "
      f"checkpoints at steps {steps}")

# %% [markdown]
# ## 2 · Layerwise CKA, base vs every checkpoint
# Left: classic (biased) CKA; right: debiased CKA. Shaded: bootstrap 95 % intervals over prompts.
# Grey hatched: the noise floor of the base-vs-final comparison (1.96 standard errors from
# split-half resampling, drawn below 1): drift inside it cannot be told apart from the probe set.

# %%
# every CKA result of this notebook, computed once and cached in run_dir/analysis (`python -m alignkit cka`
# writes the same file)
res = pipeline.ensure_cka(cfg, "sft", pooling=POOLINGS[0], n_boot=N_BOOT, n_perm=N_PERM)
curves, noise = res["curves"], res["noise"]  # bootstrap per step and debiased flag; split-half noise floors
fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=False)
for ax, d in zip(axes, (False, True)):
    plot_layer_curves({f"step {s}": c for s, c in curves[d].items()}, ax=ax,
                      ylabel=("debiased " if d else "") + "linear CKA (base, checkpoint)",
                      title=("Debiased" if d else "Classic") + f" CKA per layer ({POOLINGS[0]} pooling)",
                      band={"lo": 1 - noise[d]["half_width"], "hi": np.ones(len(labels))},
                      band_label="noise floor (split-half, 95 %)", has_embed=has_embed)
fig.tight_layout()
if not SMOKE:
    save_figure(fig, "layerwise_CKA")

# %% [markdown]
# ## 3 · Cross-layer CKA, base × final checkpoint
# Left: CKA between base layer *i* (rows) and final-checkpoint layer *j* (columns), with the
# monotone alignment path (dynamic time warping on 1 − CKA). Right: the same minus the
# permutation baseline (rows of the tuned model shuffled; the chance level of each cell).

# %%
mat, chance, path = res["matrix"], res["chance"], res["path"]
fig, axes = plt.subplots(1, 2, figsize=(13, 5))
plot_heatmap(mat, ax=axes[0], path=path, xlabel=f"SFT layer (step {final_step})", ylabel="base layer",
             title="Cross-layer CKA", cbar_label="linear CKA", vmin=0, vmax=1, has_embed=has_embed)
plot_heatmap(mat - chance, ax=axes[1], xlabel=f"SFT layer (step {final_step})", ylabel="base layer",
             title="CKA above chance (− permutation baseline)", cbar_label="CKA − shuffled CKA",
             has_embed=has_embed, cmap="viridis")
fig.tight_layout()
if not SMOKE:
    save_figure(fig, "CKA_heatmap")

# %% [markdown]
# ## 4 · Layer correspondence and the transition
# For each base layer, the tuned layer it matches best; the remapping index is the mean distance
# of that match from the diagonal (0 = every layer still matches itself). The transition layer is
# the layer after the steepest drop in layerwise CKA, with a bootstrap interval.

# %%
best, remap, trans = res["best"], res["remap"], res["transition"]
lw_final = curves[False][final_step]["point"]
lw_final_deb = curves[True][final_step]["point"]
corr = pd.DataFrame({"base layer": labels, "best tuned layer": [labels[j] for j in best],
                     "CKA same layer": lw_final.round(3), "debiased same layer": lw_final_deb.round(3),
                     "noise half-width": noise[False]["half_width"].round(4)})
corr

# %% [markdown]
# ## 5 · Drift over training
# Layerwise CKA (base, checkpoint) for every checkpoint step; a dot marks, for each layer, the
# first checkpoint at which its CKA leaves the noise band.

# %%
by_step = np.stack([np.ones(len(labels))] + [curves[False][s]["point"] for s in steps[1:]])
departure = res["departure"]  # cka.first_departure of these curves against the noise band
fig, ax = plt.subplots(figsize=(8, 4.5))
plot_heatmap(by_step.T, ax=ax, xlabel="SFT step", ylabel="layer", title="Layerwise CKA over training",
             cbar_label="linear CKA (base, checkpoint)", vmin=float(by_step.min()), vmax=1, cmap="magma",
             xticklabels=[str(s) for s in steps], yticklabels=labels)
for layer, s in enumerate(departure):
    if s >= 0:
        ax.plot(steps.index(int(s)), layer, "o", color="cyan", ms=5)
ax.plot([], [], "o", color="cyan", label="first step outside the noise band")
ax.legend(loc="upper right", fontsize=8)
if not SMOKE:
    save_figure(fig, "cka_over_training")

# %% [markdown]
# ## 6 · Explore: checkpoint and pooling
# With a live kernel, the dropdowns redraw the layerwise curve and the heatmap; without one (CI,
# a static export) the figure below is drawn once with the defaults.

# %%
def show(step=final_step, pooling=POOLINGS[0]):
    a, labs = stacks(pooling)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    b = cka.bootstrap_layerwise_cka(a[base_step], a[step], n_boot=N_BOOT, seed=0)
    plot_layer_curves({f"step {step}": b}, ax=axes[0], ylabel="linear CKA", has_embed=labs[0] == "embed",
                      title=f"Layerwise CKA, {pooling} pooling")
    plot_heatmap(cka.cka_matrix(a[base_step], a[step]), ax=axes[1], vmin=0, vmax=1, has_embed=labs[0] == "embed",
                 xlabel=f"SFT layer (step {step})", ylabel="base layer", title="Cross-layer CKA", cbar_label="CKA")
    fig.tight_layout()
    plt.show()


if INTERACTIVE:
    import ipywidgets as widgets

    widgets.interact(show, step=widgets.Dropdown(options=steps[1:], value=final_step),
                     pooling=widgets.Dropdown(options=list(POOLINGS), value=POOLINGS[0]))
else:
    show()

# %% [markdown]
# ## 7 · What this run shows
# Computed from the values above:

# %%
above = [labels[i] for i in range(len(labels)) if lw_final[i] < 1 - noise[False]["half_width"][i]]
least = int(np.argmin(lw_final))
last_pool, labs_p = {}, {}
for p in POOLINGS[1:]:
    a, labs_p[p] = stacks(p)
    last_pool[p] = cka.layerwise_cka(a[base_step], a[final_step])
display(Markdown(
    f"- **Drift at the final checkpoint (step {final_step})**, {POOLINGS[0]} pooling: classic CKA ranges from "
    f"{lw_final.max():.3f} to {lw_final.min():.3f}; the largest drift is at layer **{labels[least]}** "
    f"(CKA {lw_final[least]:.3f}, debiased {lw_final_deb[least]:.3f}). "
    f"{len(above)} of {len(labels)} hook points drift beyond the noise floor"
    + (f" (first: {above[0]})." if above else ".") + "\n"
    f"- **Transition**: the steepest drop in layerwise CKA is into layer **{labels[trans['point']]}** "
    f"(bootstrap 95 % interval: layers {labels[trans['lo']]}–{labels[trans['hi']]}).\n"
    f"- **Remapping index** {remap:.2f} (mean |best-matching tuned layer − own layer|); "
    f"{sum(int(b) != i for i, b in enumerate(best))} of {len(labels)} base layers match another tuned layer best.\n"
    f"- **Over training**: first departures from the noise band (step per layer): "
    + ", ".join(f"{l}: {int(s) if s >= 0 else '—'}" for l, s in zip(labels, departure)) + ".\n"
    + "".join(f"- With **{p}** pooling the final layerwise CKA runs from {v.max():.3f} (layer {labs_p[p][int(np.argmax(v))]}) "
              f"down to {v.min():.3f} (layer {labs_p[p][int(np.argmin(v))]}).\n" for p, v in last_pool.items())
    + ("- *Smoke mode: tiny sizes, the numbers mean nothing.*" if SMOKE else "")
))
