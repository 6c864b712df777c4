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
# Published work disagrees in interesting ways, and the last section checks three claims on this
# model: **(1)** SFT and DPO raise the effective rank of representations while RL with verifiable
# rewards lowers it; **(2)** RL updates are sparse; **(3)** RL updates avoid the principal
# directions of the pretrained weights. Claims (2) and (3) are about a stage's *own* update, so for
# DPO and GRPO the weights are also compared with the checkpoint they started from (their step 0).

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
METHODS = ("sft", "dpo", "grpo")
POOLING = "mean"  # probe pooling, as in notebooks 02 and 03
N_BOOT = 20 if SMOKE else 200  # CKA and effective-rank bootstraps
N_SPLITS = 20  # split halves for the CKA noise floor
N_EXAMPLES = 8 if SMOKE else 128  # SFT flips patched, at most
MIN_SET = 2  # fewer flips than this: substitute examples (smoke runs have none), as in notebook 04
BATCH_SIZE = 8 if SMOKE else 32
MIN_GAP = 0.1  # nats: NPE masked where |LP(donor) - LP(receiver)| is smaller
N_BOOT_PATCH = 50 if SMOKE else 1000
TOL = 1e-5  # |ΔW| above which an entry counts as changed (absolute; float32 round-off of |w| <= 1 is <= 6e-8)
K = 8  # top singular directions of W and ΔW compared
SEED = 0

# %%
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

from alignkit import cache, cka, patching, pipeline, spectral, weights
from alignkit.activations import capture_cached, probe_texts, varying_points
from alignkit.config import get_config
from alignkit.evaluate import ensure_results, summary
from alignkit.plots import (plot_drift_layers, plot_grouped_bars, plot_heatmap, plot_layer_curves,
                            plot_weight_drift, save_figure)
from alignkit.tiny import load_model

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
cfg = get_config(PRESET, smoke=SMOKE, overrides=OVERRIDES)
device = "cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
# (run_dir, per-checkpoint results, flip table) of each method; trains and evaluates what is missing
runs = {m: ensure_results(cfg, m) for m in METHODS}
COLORS = {m: f"C{i}" for i, m in enumerate(METHODS)}  # one colour per method in every figure

# %% [markdown]
# ## 0 · The models
# `base` is the SFT run's step 0; each method's final checkpoint is compared with it. A method's
# *init* is its own step 0 (for DPO and GRPO the final SFT checkpoint): it is identified by weight
# hash, so a run started elsewhere would show up here.

# %%
paths = {"base": Path(runs["sft"][1][0]["checkpoint"])}
paths |= {m: Path(runs[m][1][-1]["checkpoint"]) for m in METHODS}
run_of = {"base": runs["sft"][0]} | {m: runs[m][0] for m in METHODS}  # whose activation cache a capture uses
hashes = {k: cache.weights_hash(p) for k, p in paths.items()}
init = {}  # method -> label of the model it started from ("base", "sft", ...)
for m in METHODS:
    start = Path(runs[m][1][0]["checkpoint"])
    h = cache.weights_hash(start)
    init[m] = next((k for k, v in hashes.items() if v == h), f"{m} init")
    if init[m] == f"{m} init":
        paths[init[m]], run_of[init[m]], hashes[init[m]] = start, runs[m][0], h
pd.DataFrame([{"method": m, "starts from": init[m], "init step": runs[m][1][0]["step"],
               "final step": runs[m][1][-1]["step"], "final checkpoint": str(paths[m])} for m in METHODS])

# %% [markdown]
# ## 1 · Accuracy
# Greedy exact-match accuracy on the held-out problems with 95 % Wilson intervals; the dashed line
# is the base.

# %%
acc = {"base": summary(runs["sft"][1][:1])[0]} | {m: summary(runs[m][1])[-1] for m in METHODS}
acc_table = pd.DataFrame([{"model": k, "step": r["step"], "accuracy %": 100 * r["accuracy"],
                           "95 % CI": f"{100 * r['acc_lo']:.1f}–{100 * r['acc_hi']:.1f}",
                           "answer log-prob": r["answer_logprob"]} for k, r in acc.items()])
n_eval = runs["sft"][1][0]["n"]


def acc_bars(ax=None):
    vals = {"held-out accuracy": {m: {"point": 100 * acc[m]["accuracy"], "lo": 100 * acc[m]["acc_lo"],
                                      "hi": 100 * acc[m]["acc_hi"]} for m in METHODS}}
    fig = plot_grouped_bars(vals, ax=ax, ylabel="exact-match accuracy (%)", title=f"Accuracy (n = {n_eval})",
                            controls={"held-out accuracy": 100 * acc["base"]["accuracy"]},
                            control_label=f"base ({100 * acc['base']['accuracy']:.1f} %)")
    return fig


acc_bars()
acc_table.round(3)

# %% [markdown]
# ## 2 · Representations: layerwise CKA against the base
# The residual stream after every layer (and the embedding output), pooled over each probe prompt
# (`POOLING`), through the project's one cached capture path. Hook points constant across prompts
# (zero variance) are dropped and named. One curve per method: CKA(base layer *l*, final layer *l*)
# with its bootstrap 95 % band; hatched grey: the split-half noise floor (the widest of the three
# comparisons) — drift inside it cannot be told from the choice of probe prompts.

# %%
texts = probe_texts(cfg)
caps = {k: capture_cached(p, None, texts, pooling=POOLING, cache_dir=Path(run_of[k]) / "activations")
        for k, p in paths.items()}
keep, labels, skip = varying_points(caps.values())
has_embed = labels[0] == "embed"
acts = {k: a.acts[keep] for k, a in caps.items()}
print(f"{len(texts)} probe prompts × {len(labels)} hook points × width {acts['base'].shape[-1]}"
      + (f"; dropped (zero variance across prompts): {skip}" if skip else ""))

cka_curves = {m: cka.bootstrap_layerwise_cka(acts["base"], acts[m], n_boot=N_BOOT, seed=SEED) for m in METHODS}
floors = {m: cka.noise_floor(acts["base"], acts[m], n_splits=N_SPLITS, seed=SEED) for m in METHODS}
floor_hw = np.max([f["half_width"] for f in floors.values()], axis=0)


def cka_panel(ax=None):
    return plot_layer_curves(cka_curves, ax=ax, ylabel="linear CKA (base, final)", cmap=list(COLORS.values()),
                             title=f"Layerwise CKA vs base ({POOLING} pooling)", has_embed=has_embed,
                             band={"lo": 1 - floor_hw, "hi": np.ones(len(labels))},
                             band_label="noise floor (split-half, 95 %)")


cka_panel()
pd.DataFrame({m: c["point"] for m, c in cka_curves.items()}, index=labels).round(3).T

# %% [markdown]
# ## 3 · Effective rank: change of RankMe per layer
# RankMe (notebook 03) of every model's probe activations, with the same 80 % row subsamples for all
# models, so each difference has a paired interval. Left: final − base. Right: final − the method's
# own init (for SFT the two are the same comparison): the change made by the stage itself.

# %%
boot = {k: spectral.bootstrap_layer_metrics(a, n_boot=N_BOOT, seed=SEED) for k, a in acts.items()}
d_base = {m: spectral.paired_delta(boot[m], boot["base"])["rankme"] for m in METHODS}
d_own = {m: spectral.paired_delta(boot[m], boot[init[m]])["rankme"] for m in METHODS}


def rank_panel(deltas, ax=None, title="Δ RankMe, final − base"):
    fig = plot_layer_curves(deltas, ax=ax, ylabel="Δ effective rank (RankMe)", title=title, cmap=list(COLORS.values()),
                            has_embed=has_embed)
    (ax or fig.axes[0]).axhline(0, color="0.3", lw=1, ls="--", label="no change")
    return fig


fig, axes = plt.subplots(1, 2, figsize=(14, 4.2), sharey=True)
rank_panel(d_base, ax=axes[0])
rank_panel({f"{m} (vs {init[m]})": d for m, d in d_own.items()}, ax=axes[1], title="Δ RankMe, final − own init")
fig.tight_layout()

# %% [markdown]
# ## 4 · Causal localisation: resid denoise on SFT's flips
# The examples SFT fixed (wrong in the base, right after SFT; notebook 04's flip table — smoke runs
# substitute the problems whose answer log-prob rose most). For each method, the base runs with the
# residual stream after layer *l* taken from that method's final model (`denoise`, all positions):
# Δ answer log-prob with bootstrap 95 % intervals; dashed: each method's full gap LP(final) − LP(base)
# on these examples. Where a curve reaches its gap is where that method's advantage has been written
# into the residual stream.

# %%
sets, set_labels = pipeline.patching_sets(cfg, runs["sft"][1], runs["sft"][2], N_EXAMPLES, MIN_SET)
base_model, tokenizer = load_model(paths["base"], dtype=cfg.dtype, device=device)
examples = patching.examples_from_table(sets["flips"], tokenizer, chat=cfg.chat)
sweeps = {}
for m in METHODS:
    tuned, _ = load_model(paths[m], dtype=cfg.dtype, device=device)
    sweeps[m] = patching.layer_sweep(base_model, tuned, tokenizer, examples, component="resid", positions="all",
                                     direction="denoise", batch_size=BATCH_SIZE, min_gap=MIN_GAP)
    del tuned
patch_curves = {m: patching.bootstrap_mean(r.delta, n_boot=N_BOOT_PATCH, seed=SEED) for m, r in sweeps.items()}
gaps = {m: float(np.mean(r.lp_donor - r.lp_receiver)) for m, r in sweeps.items()}


def patch_panel(ax=None):
    fig = plot_layer_curves(patch_curves, ax=ax, ylabel="Δ answer log-prob (nats)", has_embed=False,
                            cmap=list(COLORS.values()),
                            title=f"Resid denoise (final → base) on SFT's {set_labels['flips']} (n={len(examples)})")
    ax = ax or fig.axes[0]
    for m in METHODS:
        ax.axhline(gaps[m], color=COLORS[m], ls="--", lw=1)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.plot([], [], "--", color="0.4", label="full gap of each method")
    ax.legend(fontsize=8, loc="best")
    return fig


patch_panel()
npe = pd.DataFrame({m: np.nanmean(r.npe, 0) for m, r in sweeps.items()})
npe.index.name = "layer"
npe.round(2).T  # mean normalised patching effect per layer (1 = the whole gap)

# %% [markdown]
# ## 5 · Weights: how far, how sparsely, in which directions
# `alignkit.weights.weight_drift` per parameter tensor (float64): relative change ‖ΔW‖/‖W‖;
# share of entries with |ΔW| > `TOL`; the share of entries holding 90 % of ‖ΔW‖² (scale-free
# sparsity; a dense Gaussian update gives 0.44); RankMe of ΔW; and the overlap (mean squared
# cosine of principal angles) of ΔW's top-`K` singular subspaces with W's, with its chance level
# K/d. Two comparisons per method: **vs base** (what the notebook compares everywhere) and **own
# update** (final − own init: what claims about a stage's update are about).

# %%
drift, own = {}, {}
for m in METHODS:
    tuned, _ = load_model(paths[m], dtype=cfg.dtype, device=device)
    drift[m] = weights.weight_drift(base_model, tuned, tol=TOL, k=K)
    if init[m] == "base":
        own[m] = drift[m]
    else:
        start, _ = load_model(paths[init[m]], dtype=cfg.dtype, device=device)
        own[m] = weights.weight_drift(start, tuned, tol=TOL, k=K)
        del start
    del tuned
by_module = {m: weights.summarize_drift(own[m], "module") for m in METHODS}
by_layer = {f"{m} vs base": weights.summarize_drift(drift[m], "layer") for m in METHODS}
by_layer |= {f"{m} own update": weights.summarize_drift(own[m], "layer") for m in METHODS if init[m] != "base"}
layer_style = {"styles": {k: ("o--" if "own" in k else "o-") for k in by_layer},
               "colors": {k: COLORS[k.split()[0]] for k in by_layer}}
whole = {m: weights.summarize_drift(own[m].assign(model="all"), "model").iloc[0] for m in METHODS}
pd.DataFrame({m: t["rel_change"] for m, t in by_module.items()}).style.format("{:.2e}").set_caption(
    "relative change ‖ΔW‖/‖W‖ of each method's own update, pooled per module type")

# %%
modules = [m for m in ["embed", "q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_attn_norm", "q_norm",
                       "k_norm", "final_norm", "lm_head"] if m in by_module["sft"].index]
mat = np.stack([by_module[m].loc[modules, "rel_change"].to_numpy() for m in METHODS], 1)
fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [1, 2]})
plot_heatmap(np.log10(np.where(mat > 0, mat, np.nan)), ax=axes[0], xticklabels=[f"{m} (vs {init[m]})" for m in METHODS],
             yticklabels=modules, cmap="viridis", cbar_label="log10 ‖ΔW‖/‖W‖ (own update)",
             title="Relative change per module type")
axes[0].set_xlabel("method")
axes[0].set_ylabel("module")
plot_drift_layers(by_layer, "rel_change", ax=axes[1], title="Relative change per layer (pooled over modules)",
                  **layer_style)
fig.tight_layout()

# %%
fig, axes = plt.subplots(2, len(METHODS), figsize=(6.5 * len(METHODS), 8.5), squeeze=False)
for j, m in enumerate(METHODS):
    plot_weight_drift(own[m], "frac_mass", ax=axes[0, j], title=f"{m}: 90 %-mass share of its own update")
    plot_weight_drift(own[m], "overlap_right", ax=axes[1, j], title=f"{m}: overlap with W's top-{K}, input space")
fig.tight_layout()


# %%
def structure_values():
    """Per method (own update), mean over 2-D matrices with a bootstrap interval over matrices."""
    groups = {"90 %-mass share": "frac_mass", "overlap, output space": "overlap_left",
              "overlap, input space": "overlap_right", f"share |ΔW| > {TOL:g}": "frac_changed"}
    vals, controls = {}, {}
    control_col = {"frac_mass": "frac_mass_dense", "overlap_left": "chance_left", "overlap_right": "chance_right",
                   "frac_changed": "frac_changed_dense"}
    for g, col in groups.items():
        vals[g] = {}
        for m in METHODS:
            mats = own[m][own[m]["eff_rank"].notna()]
            b = patching.bootstrap_mean(mats[col].to_numpy(), n_boot=N_BOOT_PATCH, seed=SEED)
            vals[g][m] = {"point": float(b["point"]), "lo": float(b["lo"]), "hi": float(b["hi"])}
        controls[g] = float(own[METHODS[0]].loc[own[METHODS[0]]["eff_rank"].notna(), control_col[col]].mean())
    return vals, controls


struct, struct_controls = structure_values()


def structure_panel(ax=None):
    return plot_grouped_bars(struct, ax=ax, ylabel="mean over weight matrices", controls=struct_controls,
                             control_label="dense Gaussian update / chance k/d", ylim=(0, 1.05),
                             title="Own update: sparsity and alignment with W")


structure_panel()
pd.DataFrame({g: {m: v["point"] for m, v in d.items()} for g, d in struct.items()}).round(4)

# %% [markdown]
# ## 6 · The atlas
# One figure, one panel per measure, one colour per method, every panel with its interval or
# control: (a) accuracy with Wilson intervals, base dashed; (b) layerwise CKA vs base with bootstrap
# bands and the noise floor; (c) Δ RankMe vs base with paired intervals; (d) resid denoise patching
# on SFT's flips with bootstrap intervals and each method's full gap; (e) relative weight change
# per layer vs base (solid) and of the own update (dashed), float32 round-off dotted; (f) structure
# of each method's own update against a dense Gaussian update and chance.

# %%
fig, axes = plt.subplots(2, 3, figsize=(21, 10))
acc_bars(ax=axes[0, 0])
cka_panel(ax=axes[0, 1])
rank_panel(d_base, ax=axes[0, 2])
patch_panel(ax=axes[1, 0])
plot_drift_layers(by_layer, "rel_change", ax=axes[1, 1], title="Weight change per layer", **layer_style)
structure_panel(ax=axes[1, 2])
for ax, letter in zip(axes.ravel(), "abcdef"):
    title = ax.get_title()
    ax.set_title("")
    ax.set_title(f"({letter}) {title}", loc="left")
fig.suptitle(f"Post-training atlas: SFT, DPO and GRPO against one base ({cfg.preset} preset"
             + (", smoke sizes" if SMOKE else "") + ")", y=1.0)
fig.tight_layout()
if not SMOKE:
    save_figure(fig, "post_training_atlas")

# %% [markdown]
# ## 7 · Explore: one method, one weight metric
# With a live kernel, pick a method, a comparison and a metric; without one the default is drawn.

# %%
def show(method=METHODS[-1], comparison="own update", metric="rel_change"):
    df = own[method] if comparison == "own update" else drift[method]
    plot_weight_drift(df, metric, title=f"{method}, {comparison}: {metric}")
    plt.show()


if INTERACTIVE:
    import ipywidgets as widgets

    widgets.interact(show, method=list(METHODS), comparison=["own update", "vs base"],
                     metric=["rel_change", "frac_changed", "frac_mass", "eff_rank", "overlap_left", "overlap_right"])
else:
    show()

# %% [markdown]
# ## 8 · What this run shows
# Computed from the values above.

# %%
def sign_counts(d):
    """Layers whose paired interval lies entirely above / below zero."""
    return int((d["lo"] > 0).sum()), int((d["hi"] < 0).sum())


def rank_verdict(d, claimed):
    up, down = sign_counts(d)
    mean = float(np.mean(d["point"]))
    agree = (mean > 0 and up > down) if claimed > 0 else (mean < 0 and down > up)
    disagree = (mean < 0 and down > up) if claimed > 0 else (mean > 0 and up > down)
    return "agrees" if agree else ("disagrees" if disagree else "is inconclusive")


lines = []
for m in METHODS:
    a = acc[m]
    c = cka_curves[m]["point"]
    lo_layer = labels[int(np.argmin(c))]
    mod = by_module[m]["rel_change"].idxmax()
    lay = weights.summarize_drift(own[m], "layer")
    lay = lay[(lay.index >= 0) & (lay.index < own[m].attrs["n_layers"])]["rel_change"]
    half = np.where(np.nanmean(sweeps[m].npe, 0) >= 0.5)[0]
    up, down = sign_counts(d_base[m])
    lines.append(
        f"- **{m.upper()}** ({'from the base' if init[m] == 'base' else 'from ' + init[m].upper()}): accuracy "
        f"{100 * a['accuracy']:.1f} % (95 % CI {100 * a['acc_lo']:.1f}–{100 * a['acc_hi']:.1f}) vs base "
        f"{100 * acc['base']['accuracy']:.1f} %. CKA vs base lowest at layer **{lo_layer}** ({c.min():.3f}; "
        f"mean {c.mean():.3f}). Δ RankMe vs base: mean {np.mean(d_base[m]['point']):+.2f}, interval above 0 at "
        f"{up} and below 0 at {down} of {len(labels)} hook points. Resid denoise recovers half of its "
        f"{gaps[m]:+.2f}-nat gap from layer {('**' + str(int(half[0])) + '**') if len(half) else '— (never)'}. "
        f"Own update: whole-model ‖ΔW‖/‖W‖ {whole[m]['rel_change']:.2e}; largest in module **{mod}** "
        f"({by_module[m].loc[mod, 'rel_change']:.2e}) and layer **{int(lay.idxmax())}** ({lay.max():.2e}).")
most = max(METHODS, key=lambda m: whole[m]["rel_change"])
lines.append(f"- Largest own weight update: **{most.upper()}** ({whole[most]['rel_change']:.2e} of ‖W‖); lowest "
             f"mean CKA vs base: **{min(METHODS, key=lambda m: cka_curves[m]['point'].mean()).upper()}**.")

rl = "grpo"
others = [m for m in METHODS if m != rl]
claims = []
for m, claimed in (("sft", +1), ("dpo", +1), ("grpo", -1)):
    claims.append(f"{m.upper()} (claimed {'rise' if claimed > 0 else 'fall'}): vs base mean "
                  f"{np.mean(d_base[m]['point']):+.2f} — {rank_verdict(d_base[m], claimed)}; own update mean "
                  f"{np.mean(d_own[m]['point']):+.2f} — {rank_verdict(d_own[m], claimed)}")
sparse_tol = {m: whole[m]["frac_changed"] for m in METHODS}
moved = whole[rl]["rel_change"] > 0  # a zero update is neither sparse nor misaligned: nothing to test


def rl_lowest(group):
    """Is GRPO's mean (over matrices) below SFT's and DPO's, with intervals that do not overlap?"""
    g = struct[group]
    if not moved:
        return "cannot be tested (GRPO did not change the weights)"
    if all(g[rl]["hi"] < g[m]["lo"] for m in others):
        return "**agrees** (GRPO lowest, intervals separate)"
    if all(g[rl]["point"] < g[m]["point"] for m in others):
        return "is **inconclusive** (GRPO lowest, intervals overlap)"
    return "**disagrees** (GRPO not lowest)"


def with_ci(group, m, scale=1.0):
    v = struct[group][m]
    return f"{m.upper()} {v['point'] / scale:.3f} [{v['lo'] / scale:.3f}, {v['hi'] / scale:.3f}]"


out_c, in_c = struct_controls["overlap, output space"], struct_controls["overlap, input space"]
lines += [
    "",
    "**Published claims on this model** (own updates; means over weight matrices with 95 % bootstrap "
    "intervals over matrices):",
    "",
    "1. *SFT and DPO raise effective rank, RLVR lowers it* — " + "; ".join(claims) + ".",
    f"2. *RL updates are sparse* — share of entries holding 90 % of ‖ΔW‖² (dense Gaussian update: "
    f"{struct_controls['90 %-mass share']:.3f}): " + ", ".join(with_ci("90 %-mass share", m) for m in METHODS)
    + f"; share of entries changed by more than {TOL:g}: "
    + ", ".join(f"{m.upper()} {100 * sparse_tol[m]:.1f} %" for m in METHODS)
    + f". The claim {rl_lowest('90 %-mass share')} here"
    + (" — and nearly every entry moves: a float32 optimizer step changes every weight that gets a gradient."
       if sparse_tol[rl] > 0.9 else "."),
    f"3. *RL updates avoid the principal directions* — overlap of the own update's top-{K} singular subspaces "
    f"with W's, as a multiple of chance (output space, chance {out_c:.3f}): "
    + ", ".join(with_ci("overlap, output space", m, out_c) for m in METHODS)
    + f"; input space (chance {in_c:.3f}): " + ", ".join(with_ci("overlap, input space", m, in_c) for m in METHODS)
    + f". Output space: the claim {rl_lowest('overlap, output space')}; input space: "
    f"{rl_lowest('overlap, input space')}"
    + (". Every update is more aligned with W's principal directions than chance."
       if all(struct["overlap, output space"][m]["lo"] > out_c and struct["overlap, input space"][m]["lo"] > in_c
              for m in METHODS) else "."),
]
if SMOKE:
    lines.append("\n*Smoke mode: tiny sizes and a few training steps — the numbers mean nothing.*")
display(Markdown("\n".join(lines)))
