# %% [markdown]
# # 03 · Spectral drift: effective rank per layer and checkpoint
#
# Does SFT **collapse** representations onto a few directions, or **expand** the subspace they use?
# For every layer's residual stream (one row per probe prompt) we compute the spectrum of the
# centred activation matrix and two summaries of how many directions carry its variance:
#
# * **RankMe** (Garrido et al. 2023): exp of the Shannon entropy of the normalised singular values
#   p_k = σ_k / Σσ;
# * **α-Rényi effective rank**: exp(S_α) with p_k = λ_k / Σλ the covariance eigenvalues;
#   α = 0 counts the non-zero directions, α = 1 is the Shannon limit, α = 2 the participation
#   ratio, α = ∞ is 1 / (largest share).
#
# Effective rank is capped by the number of rows n (and by the width d): models are compared at
# the same n, and section 4 checks that the conclusion does not depend on n. Intervals come from
# an 80 % subsampling bootstrap over probe prompts.

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
# every knob is a config field: e.g. {"spectral.pooling": "mean", "spectral.n_boot": 500} (cfg.spectral
# below); pooling "question" (mean over the question's own tokens), "mean" (every prompt token), "last"
OVERRIDES: dict = {}
N_SEEDS = None  # training seeds; None: the preset's (tiny 3, smoke 2, real presets 1)

# %%
import logging

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from alignkit.analyses import spectral, summaries
from alignkit.analyses.common import over_seeds
from alignkit.config import get_config
from alignkit.plots import figure_dir, plot_layer_curves, plot_scatter, save_figure
from alignkit.spectral import metric_key

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
cfg = get_config(PRESET, smoke=SMOKE, overrides=OVERRIDES | ({"n_seeds": N_SEEDS} if N_SEEDS else {}))
ALPHAS = cfg.spectral.alphas
cfg.spectral

# %% [markdown]
# ## 1 · Activations and effective ranks
# One capture path for the whole project (`alignkit.capture`): the residual stream after every
# decoder layer (and the embedding output) for each held-out prompt, pooled per prompt (over the
# question's own tokens, the shared template left out: `cfg.spectral.pooling`), cached by
# checkpoint content hash, probe set, hook points and pooling. `spectral.ensure` computes every
# result of this notebook once (bootstrap metrics with the same subsamples for every checkpoint,
# rank vs probe size, the CKA drift per layer) and caches it in the run's `analysis/`
# (`python -m alignkit spectral` writes the same file); it trains what is missing. Once per
# training seed (`over_seeds`; notebook 01 says why); the table: RankMe of the base and of each
# seed's final checkpoint.

# %%
results = over_seeds(spectral.ensure, cfg, "sft")
res = results[0]
steps, labels, has_embed = res.steps, res.labels, res.labels[0] == "embed"
print(f"{len(results)} training seeds, {res.n} probe prompts, {len(steps)} checkpoints, hook points "
      f"kept: {len(labels)}"
      + (f"; skipped (constant across prompts, rank undefined): {res.dropped}" if res.dropped else ""))
pd.DataFrame({"base": res.band("rankme", 0).point}
             | {f"seed {k + 1}, step {steps[-1]}": r.band("rankme", steps[-1]).point
                for k, r in enumerate(results)}, index=labels).round(2)

# %% [markdown]
# ## 2 · RankMe per layer, base and every checkpoint
# A line per checkpoint with its 80 %-subsampling bootstrap interval (thick: the first training
# seed; thin: the others). Above the base line means the checkpoint spreads that layer's variance
# over more directions.

# %%
curves = {f"step {s}" + (" (base)" if s == 0 else ""): [r.band("rankme", s) for r in results] for s in steps}
fig = plot_layer_curves(curves, ylabel="RankMe (effective rank)", title="Effective rank per layer",
                        has_embed=has_embed)
save_figure(fig, "layerwise_effective_rank", figure_dir(cfg))

# %% [markdown]
# ## 3 · Δ Rényi effective rank vs base, α ∈ {0.5, 1, 2, ∞}
# One panel per α: checkpoint minus base per layer, with the bootstrap interval of the difference
# (the same resamples for both models, so the interval is of the paired difference). Positive:
# the checkpoint uses more directions than the base at that layer. Small α weighs the many weak
# directions, large α the few strongest. Thick: the first training seed; thin: the others.

# %%
fig, axes = plt.subplots(1, len(ALPHAS), figsize=(4.2 * len(ALPHAS), 4), sharex=True)
for ax, alpha in zip(np.atleast_1d(axes), ALPHAS):
    key = metric_key(alpha)
    plot_layer_curves({f"step {s}": [r.delta(key, s) for r in results] for s in steps[1:]}, ax=ax,
                      ylabel="Δ effective rank (checkpoint − base)", title=f"α = {alpha:g}",
                      has_embed=has_embed)
    ax.axhline(0, color="0.3", lw=1, ls="--")
    if ax is not np.atleast_1d(axes)[0]:
        ax.get_legend().remove()
fig.suptitle("Change of Rényi effective rank vs base", y=1.02)
fig.tight_layout()
save_figure(fig, "renyi_effective_rank", figure_dir(cfg))

# %% [markdown]
# ## 4 · Is the conclusion stable as n grows?
# Effective rank cannot exceed min(n − 1, d). RankMe of base and final checkpoint on nested
# subsets of the probe set: if the sign of the difference holds at every n, it is not an
# artefact of the probe size. One line per training seed for the final checkpoint.

# %%
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(res.ns, res.rank_vs_n[0].mean(axis=1), "--", marker="o", color="0.3", label="step 0 (base)")
for k, r in enumerate(results):
    ax.plot(r.ns, r.rank_vs_n[1].mean(axis=1), "-", marker="o", color="C0", lw=1.6 if k == 0 else 0.9,
            ms=4 if k == 0 else 2, label=f"step {steps[-1]}, seed {k + 1}")
ax.plot(res.ns, [min(n - 1, res.width) for n in res.ns], ":", color="0.5", label="cap min(n − 1, d)")
ax.set(xlabel="probe prompts n", ylabel="RankMe, mean over layers",
       title="Effective rank vs probe-set size")
ax.set_xscale("log", base=2)
ax.legend(fontsize=8)
print(f"share of (n, layer) cells whose Δ RankMe sign equals the sign at n = {res.ns[-1]}, per seed: "
      + ", ".join(f"{r.stability():.2f}" for r in results))

# %% [markdown]
# ## 5 · CKA and effective rank are different signals
# Per layer: drift in CKA (1 − CKA(base, final)) against the change of RankMe. If the two were
# the same signal the points would lie on one monotone curve. One colour per training seed.

# %%
fig, ax = plt.subplots(figsize=(6, 4.5))
for k, r in enumerate(results):
    plot_scatter(r.cka_drift, r.point["rankme"][-1] - r.point["rankme"][0], ax=ax,
                 labels=labels if k == 0 else None, ylabel="Δ RankMe (final − base)",
                 xlabel="1 − CKA(base, final)  (representation drift)", color=f"C{k}",
                 title="Drift vs change of effective rank per layer", label=f"seed {k + 1}")
ax.legend(fontsize=8)
print("Spearman correlation across layers, per seed: "
      + ", ".join(f"{r.drift_correlation():.2f}" for r in results))

# %% [markdown]
# ## 6 · Explore: α and checkpoint
# With a live kernel, the sliders redraw one α and one checkpoint of the first training seed
# against the base; without one the default is drawn once.

# %%
def show(step=steps[-1], alpha_index=1):
    key = metric_key(ALPHAS[alpha_index])
    plot_layer_curves({"base": res.band(key, steps[0]), f"step {step}": res.band(key, step)},
                      ylabel=f"Rényi effective rank, α = {ALPHAS[alpha_index]:g}",
                      has_embed=has_embed, title=f"Effective rank, base vs step {step}")
    plt.show()


if INTERACTIVE:
    import ipywidgets as widgets

    widgets.interact(show, step=widgets.SelectionSlider(options=steps[1:], value=steps[-1]),
                     alpha_index=widgets.IntSlider(min=0, max=len(ALPHAS) - 1, value=1))
else:
    show()

# %% [markdown]
# ## 7 · What these runs show
# Computed from the results above by `alignkit.analyses.spectral.summarize`: what holds in how many
# training seeds, each seed's own numbers below it.

# %%
display(Markdown(summaries.publish("03_spectral", results, cfg, figure_dir(cfg), SMOKE)))
display(Markdown(summaries.publish("03_spectral_seeds", results, cfg, figure_dir(cfg), SMOKE)))
