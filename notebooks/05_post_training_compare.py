# %% [markdown]
# # 05 · SFT, DPO and GRPO from one base: the post-training atlas
#
# align-drift exists to compare post-training methods. Here three runs share one pretrained base
# and one probe set: **SFT** (supervised fine-tuning on worked solutions), **DPO** (preference
# pairs: correct vs plausible wrong solution) and **GRPO** (reinforcement learning with a
# verifiable reward: exact match of the final answer plus a small format reward). DPO and GRPO
# start from the final SFT checkpoint (the usual pipeline). Every final model is compared with the
# **same base** — the SFT run's step-0 checkpoint, the pretrained model — on each measure of
# notebooks 01–04 and on the weights themselves:
#
# | measure | package | interval / control |
# | --- | --- | --- |
# | held-out accuracy | `alignkit.evaluate.summary` | 95 % Wilson interval; base as the reference line |
# | layerwise CKA (base, final) | `alignkit.cka` | bootstrap 95 % band; split-half noise floor |
# | Δ effective rank (RankMe) vs base | `alignkit.spectral.paired_delta` | paired 80 %-subsampling bootstrap |
# | resid denoise patching on SFT's flips | `alignkit.patching.layer_sweep` | bootstrap 95 % interval; full gap |
# | weight drift per layer and module | `alignkit.weights.weight_drift` | dense-Gaussian and chance-level controls |
#
# Published work disagrees in interesting ways, and the last section tests three claims on this
# model, each with the quantity its paper uses (`alignkit.claims`): **(1)** SFT and DPO raise the
# effective rank of the final hidden state (after the final norm) at the last token while RL
# with verifiable rewards lowers it (Li et al. 2025; RankMe and α-ReQ); **(2)** RL updates, DPO's
# included, leave most parameters unchanged in bf16 at the paper's tolerance (most: over one half)
# while SFT's do not (Mukherjee et al. 2025); **(3)** RLVR updates avoid the principal directions
# of the pretrained weights and preserve its spectrum, SFT's do not (Zhu et al. 2025; overlap /
# chance, rotation of W's top subspace, spectrum drift per matrix). All three are about what a
# stage does, so each is measured against the model the stage started from (DPO and GRPO: the
# final SFT checkpoint). The seed is the unit of the decision: an item agrees when the Student-t
# interval of the seeds' estimates lies on the claimed side of 0 (docs/measures.md#claims-and-
# the-verdict-rule); this notebook runs `cfg.n_seeds` training seeds (3 on the embedded model;
# each seed retrains SFT, DPO and GRPO), and every figure draws each of them.
#
# **Any checkpoints instead**: set `MODELS` (below) to `{"base": dir or hub id, "sft": ..., ...}`,
# the first the reference, and the same atlas is drawn for those models without training
# (`compare.ensure` on `common.from_models`, as `python -m alignkit compare --models ...`): each model's own
# init is the one listed before it (`INITS = "series"`, a published series such as SFT → DPO →
# RL) or the reference (`"reference"`); one "seed", so the verdicts are inconclusive, and a claim is
# tested only for models labelled `sft`, `dpo` or `grpo` (the stages it names). Section 8 then adds
# each model's cross-layer CKA against the reference and its difference lens (notebook 04 §7).

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
# every knob is a config field: e.g. {"compare.n_boot": 500, "weights.tol": 1e-6} (cfg.compare and
# cfg.weights below; the flips, batch and min_gap are cfg.patching's, the lens of section 8 cfg.lens's)
OVERRIDES: dict = {}
N_SEEDS = None  # training seeds; None: the preset's (tiny 3, smoke 2, real presets 1)
METHODS = ("sft", "dpo", "grpo")
MODELS: dict | None = None  # {"base": dir or hub id, "sft": ...}: compare these instead of our runs
INITS = "series"  # with MODELS: each model's init is the one before it ("series") or "reference"

# %%
import logging

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display
from transformers import AutoTokenizer

from alignkit import figures, plots
from alignkit.analyses import cka, compare, lens, summaries
from alignkit.analyses.common import from_models, over_seeds
from alignkit.analyses.patching import fraction
from alignkit.config import get_config
from alignkit.lens import token_text

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
cfg = get_config(PRESET, smoke=SMOKE, overrides=OVERRIDES | ({"n_seeds": N_SEEDS} if N_SEEDS else {}))
cfg.compare, cfg.weights

# %%
# trains and evaluates what is missing, then every measure below, cached (`python -m alignkit compare`),
# once per training seed; the verdicts pool the seeds. With MODELS: any checkpoints, no training.
if MODELS:
    results = [compare.ensure(cfg, from_models(cfg, MODELS, inits=INITS))]
else:
    results = over_seeds(compare.ensure, cfg, METHODS)
res = results[0]
METHODS = tuple(res.methods)  # with MODELS: the given models' labels
K = cfg.weights.k

# %% [markdown]
# ## 0 · The models
# `base` is the SFT run's step 0; each method's final checkpoint is compared with it. A method's
# *init* is its own step 0 (for DPO and GRPO the final SFT checkpoint): it is identified by weight
# hash, so a run started elsewhere would show up here.

# %%
pd.DataFrame([{"method": m, "starts from": res.init[m], "final step": res.accuracy[m]["step"]}
              for m in res.methods])

# %% [markdown]
# ## 1 · Accuracy
# Greedy exact-match accuracy on the held-out problems: bars the mean over training seeds, dots each
# seed, whiskers spanning every seed's 95 % Wilson interval; the dashed line is the base.

# %%
figures.plot_compare_accuracy(results)
pd.DataFrame({f"seed {k + 1}": {m: r.accuracy[m]["accuracy"] for m in ("base", *r.methods)}
              for k, r in enumerate(results)}).round(3)

# %% [markdown]
# ## 2 · Representations: layerwise CKA against the base
# The residual stream after every layer (and the embedding output), pooled over each probe prompt
# (`POOLING`), through the project's one cached capture path. Hook points constant across prompts
# (zero variance) are dropped and named. One curve per method: CKA(base layer *l*, final layer *l*)
# with its bootstrap 95 % band; hatched grey: the split-half noise floor (the widest of the three
# comparisons and seeds) — drift inside it cannot be told from the choice of probe prompts. Thick:
# the first training seed; thin: the others.

# %%
print(f"{len(res.labels)} hook points" + (f"; dropped (zero variance): {res.dropped}" if res.dropped else ""))
figures.plot_compare_cka(results)
pd.concat({f"seed {k + 1}": pd.DataFrame({m: c.point for m, c in r.cka.items()}, index=r.labels).T
           for k, r in enumerate(results)}).round(3)

# %% [markdown]
# ## 3 · Effective rank: change of RankMe per layer
# RankMe (notebook 03) of every model's probe activations, with the same 80 % row subsamples for all
# models, so each difference has a paired interval. Left: final − base. Right: final − the method's
# own init (for SFT the two are the same comparison): the change made by the stage itself. Thick:
# the first training seed; thin: the others.

# %%
fig, axes = plt.subplots(1, 2, figsize=(14, 4.2), sharey=True)
figures.plot_compare_rank(results, ax=axes[0])
figures.plot_compare_rank(results, ax=axes[1], own=True)
fig.tight_layout()

# %% [markdown]
# ## 4 · Causal localisation: resid denoise on SFT's flips
# The examples SFT fixed (wrong in the base, right after SFT; notebook 04's flip table — smoke runs
# substitute the problems whose answer log-prob rose most). For each method, the base runs with the
# residual stream after layer *l* taken from that method's final model (`denoise`, all positions):
# Δ answer log-prob with bootstrap 95 % intervals; dashed: each method's full gap LP(final) − LP(base)
# on these examples. Where a curve reaches its gap is where that method's advantage has been written
# into the residual stream. The table: the fraction of each method's mean gap recovered per layer,
# mean Δ / mean gap (1 = the whole gap; `analyses.patching.fraction`, as in notebook 04). Every training
# seed has its own SFT flips (thick: the first seed; thin: the others).

# %%
figures.plot_compare_patching(results)
pd.concat({f"seed {k + 1}": pd.DataFrame({m: fraction(p).point for m, p in r.patches.items()}).T
           for k, r in enumerate(results)}).round(2)

# %% [markdown]
# ## 5 · Weights: how far, how sparsely, in which directions
# `alignkit.weights.weight_drift` per parameter tensor (float64): relative change ‖ΔW‖/‖W‖;
# share of entries with |ΔW| > `TOL`; the share of entries holding 90 % of ‖ΔW‖² (scale-free
# sparsity; a dense Gaussian update gives 0.44); RankMe of ΔW; and the overlap (mean squared
# cosine of principal angles) of ΔW's top-`K` singular subspaces with W's, with its chance level
# K/d. Two comparisons per method: **vs base** (what the notebook compares everywhere) and **own
# update** (final − own init: what claims about a stage's update are about). Every training seed
# drawn: a heatmap column each, thin lines, dots on the bars.

# %%
fig, axes = plt.subplots(1, 2, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
figures.plot_drift_modules(results, ax=axes[0])
figures.plot_compare_drift(results, ax=axes[1])
fig.tight_layout()

# %% [markdown]
# Per tensor, for the first training seed (the module-level figure above shows every seed):

# %%
fig, axes = plt.subplots(2, len(res.methods), figsize=(6.5 * len(res.methods), 8.5), squeeze=False)
for j, m in enumerate(res.methods):
    plots.plot_weight_drift(res.weights.own[m], "frac_mass", ax=axes[0, j],
                            title=f"{m}: 90 %-mass share of its own update, seed 1")
    plots.plot_weight_drift(res.weights.own[m], "overlap_right", ax=axes[1, j],
                            title=f"{m}: overlap with W's top-{K}, input space, seed 1")
fig.tight_layout()

# %%
figures.plot_compare_structure(results)
pd.concat({f"seed {k + 1}": pd.DataFrame({g: {m: float(v.point) for m, v in d.items()}
                                          for g, d in r.weights.structure.items()}) for k, r in enumerate(results)}).round(4)

# %% [markdown]
# ## 6 · The atlas
# One figure, one panel per measure, one colour per method, every panel with its interval or
# control: (a) accuracy with Wilson intervals, base dashed; (b) layerwise CKA vs base with bootstrap
# bands and the noise floor; (c) Δ RankMe vs base with paired intervals; (d) resid denoise patching
# on SFT's flips with bootstrap intervals and each method's full gap; (e) relative weight change
# per layer vs base (solid) and of the own update (dashed), float32 round-off dotted; (f) structure
# of each method's own update against a dense Gaussian update and chance. Every training seed is in
# every panel (thin lines, dots).

# %%
fig = figures.plot_atlas(results, title=f"Post-training atlas: SFT, DPO and GRPO against one base "
                                  f"({cfg.preset} preset, {len(results)} training seeds{', smoke sizes' if SMOKE else ''})")
plots.save_figure(fig, "post_training_atlas", plots.figure_dir(cfg))

# %% [markdown]
# ## 7 · Explore: one method, one weight metric
# With a live kernel, pick a method, a comparison and a metric (first training seed); without one
# the default is drawn.

# %%
def show(method=METHODS[-1], comparison="own update", metric="rel_change"):
    df = res.weights.own[method] if comparison == "own update" else res.weights.drift[method]
    plots.plot_weight_drift(df, metric, title=f"{method}, {comparison}: {metric}")
    plt.show()


if INTERACTIVE:
    import ipywidgets as widgets

    widgets.interact(show, method=list(METHODS), comparison=["own update", "vs base"],
                     metric=["rel_change", "frac_changed", "frac_mass", "eff_rank", "overlap_left", "overlap_right"])
else:
    show()

# %% [markdown]
# ## 8 · Any checkpoints: cross-layer CKA and what changed
# With `MODELS` set, two views this project's own runs get from notebooks 02 and 04:
#
# * **cross-layer CKA** of every model against the reference (`analyses.cka.ensure_cross`): each
#   reference layer (rows) against each of the model's layers (columns), white dots the reference
#   layers tied for a column's best match (bootstrap over probes), grey crosses the cells whose
#   interval reaches the shuffled-rows chance level. It needs one tokenizer, not one shape:
#   `python -m alignkit compare --models` runs it for models of other depths or families too,
#   where the same-layer measures above cannot run;
# * **what changed** (`analyses.lens.ensure` of each model against the reference, notebook 04 §7):
#   steering the reference with the mean residual difference at the first tokens and at the
#   positions predicting the scored tokens (cross-fitted) against random directions of its norm,
#   and the per-token KL(model ‖
#   reference) on one text (a bar where the prompt ends).
#
# Without `MODELS` this section draws nothing: notebook 02 has SFT's cross-layer CKA, notebook 04
# its difference lens.

# %%
if MODELS:
    given = from_models(cfg, MODELS, inits=INITS)
    cross = cka.ensure_cross(cfg, given)
    fig, axes = plt.subplots(1, len(cross.models), figsize=(6.5 * len(cross.models), 5.2), squeeze=False)
    for ax, m in zip(axes[0], cross.models):
        plots.plot_cross_cka(cross, m, ax=ax)
    fig.tight_layout()
    display(Markdown(cka.summarize_cross(cross)))
else:
    print("our own runs: notebook 02 draws SFT's cross-layer CKA, notebook 04 its difference lens")

# %%
for m in given.labels[1:] if MODELS else ():
    lz, reference = lens.ensure(cfg, given.pair(m)), AutoTokenizer.from_pretrained(str(given.paths["base"]))
    fig, axes = plt.subplots(1, 3, figsize=(20, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for ax, name in zip(axes[:2], ("first", "answer")):
        plots.plot_steering([lz.steering(name, cfg.lens.n_boot, cfg.lens.seed)], ax=ax,
                            title=f"{m}: steering with the mean difference, {name} positions")
    ids = reference(lz.texts[0], add_special_tokens=False)["input_ids"]
    plots.plot_token_kl([token_text(reference, t) for t in ids], lz.token_kl[0], ax=axes[2],
                        n_prompt=lz.n_prompt[0], width=8, title=f"Per-token KL({m} ‖ reference)")
    fig.tight_layout()
    display(Markdown(f"**{m}**\n\n" + lens.summarize([lz], cfg)))

# %% [markdown]
# ## 9 · What these runs show
# Computed from the results above by `alignkit.analyses.compare.summarize` (per method what holds
# in how many training seeds, then the three published claims with their verdicts over the seeds,
# `compare.claims_over_seeds`; each seed's own numbers below).

# %%
display(Markdown(summaries.publish("05_post_training_compare", results, cfg, plots.figure_dir(cfg), SMOKE)))
display(Markdown(summaries.publish("05_post_training_compare_seeds", results, cfg, plots.figure_dir(cfg), SMOKE)))
