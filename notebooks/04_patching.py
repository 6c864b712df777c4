# %% [markdown]
# # 04 · Causal localisation: where does SFT's gain live?
#
# Notebooks 02 and 03 show *where representations move*. Moving is not mattering: this notebook
# asks which layers **cause** the tuned model's better answers. Every patch is scored by a
# teacher-forced log-prob of some tokens of the gold solution, summed over them; which tokens is
# `cfg.patching.metric` (section 2 compares them):
#
# * **computed** (the default): the results the solution computes, each `<<expr=value>>`'s value
#   given everything before it — what needs the model to do the arithmetic — except a value already
#   written earlier (it could be copied);
# * **answer**: the final answer after `#### ` given the whole gold solution (notebook 01's answer
#   log-prob): the answer is already written in the solution, so this is mostly format and copying;
# * **copy** (a control): the final answer after the solution's last computed result is corrupted
#   (carried into the `#### ` line): only a copy, never a solution.
#
# Base and tuned model read the same token ids, so every activation of one can be put into the
# other at the same position (**activation patching**):
#
# * **denoise** (tuned → base): run the base with one site (a layer's residual stream, attention
#   output or MLP output) taken from the tuned model. A large gain means that site's tuned
#   activation is *sufficient* to carry SFT's improvement from there on.
# * **noise** (base → tuned): run the tuned model with the base's activation at one site. A large
#   loss means the tuned activation there is *necessary*.
#
# Each patch is summarised per example by Δ = LP(patched) − LP(receiver), by the normalised effect
# NPE = Δ / (LP(donor) − LP(receiver)) (0: nothing, 1: the whole gap; masked where the gap is
# below `cfg.patching.min_gap` nats, where the ratio means nothing) and by the KL divergence from the donor's
# next-token distributions at the scored positions. Every curve is a mean over examples with a
# bootstrap 95 % interval, computed on the **flips** (wrong before SFT, right after) and on the
# **controls** (right in both): an effect that is as large on the controls is not about what SFT
# fixed.
#
# Then two checks of how the layers relate: **cross-layer patching** (tuned layer *j*'s output
# into base layer *i*) tests causally the layer remapping that notebook 02's CKA heatmap suggests;
# **weight ablation** reverts one layer's weights to the base inside the tuned model (necessity),
# grafts one tuned layer into the base (sufficiency), and replaces the tuned − base residual
# difference by its mean (is the change a constant shift or input-specific?). Last, **what**
# changed: the mean activation difference read as tokens (the difference lens), added back to the
# base as a steering vector, and the per-token KL between the two models on whole texts.

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
# every knob is a config field: e.g. {"patching.n_examples": 32, "lens.steer_layers": (0, 4, 8)}
# (cfg.patching and cfg.lens below); the lens takes its examples, batch and min_gap from cfg.patching
OVERRIDES: dict = {}
N_SEEDS = None  # training seeds; None: the preset's (tiny 3, smoke 2, real presets 1)

# %%
import logging
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from transformers import AutoTokenizer

from alignkit import figures, plots
from alignkit import patching as measures
from alignkit.analyses import behaviour, cka, lens, patching, spectral, summaries
from alignkit.analyses.common import from_run, over_seeds
from alignkit.analyses.patching import curve
from alignkit.config import get_config
from alignkit.layers import alignment_path, best_match
from alignkit.lens import token_text

# %%
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
cfg = get_config(PRESET, smoke=SMOKE, overrides=OVERRIDES | ({"n_seeds": N_SEEDS} if N_SEEDS else {}))
N_BOOT, SEED = cfg.patching.n_boot, cfg.patching.seed  # the curves' bootstrap
cfg.patching, cfg.lens

# %% [markdown]
# ## 1 · Models, examples and every sweep
# The base is the first checkpoint (step 0), the tuned model the last. Flips and controls come from
# notebook 01's flip table. When a set is (nearly) empty — a smoke run's models solve nothing — it
# is replaced by held-out problems ranked by how much SFT raised their answer log-prob (top of the
# ranking for flips, smallest change for controls), and labelled as a substitute.
# `patching.ensure` runs every sweep of this notebook once (sections 2–5; donor activations are
# captured once per batch and a patch at layer *l* reruns only layers *l+1…L−1*) and caches the
# result in the run's `analysis/` (`python -m alignkit patching` writes the same file). Every
# training seed has its own tuned model, flips and sweeps (`over_seeds`; notebook 01 says why);
# the table and the single examples are the first seed's.

# %%
run = behaviour.ensure(cfg, from_run(cfg, "sft"))  # builds notebook 01's artifacts if missing
pats = over_seeds(patching.ensure, cfg, "sft")
pat = pats[0]
sets, labels, L = pat.sets, pat.labels, pat.cka_matrix.shape[0]
print(f"{len(pats)} training seeds; flips patched per seed: {[len(p.sets['flips']) for p in pats]}")
lp = {k: np.array(e.answer_logprob) for k, e in (("base", run.evals[0]), ("tuned", run.evals[-1]))}
pd.DataFrame([{"set": labels[k], "n patched": len(sets[k]), "n in flip table": len(getattr(run.table, k)),
               **{f"mean LP {m}": lp[m][[r["index"] for r in sets[k]]].mean() for m in lp}}
              for k in sets]).round(3)

# %% [markdown]
# ## 2 · Activation patching, layer by layer
# **How to read the figure.** Rows: denoise (tuned → base; up is good: the patch *adds* log-prob
# to the base) and noise (base → tuned; down means the tuned model *loses* log-prob). Columns:
# the residual stream after layer *l*, the attention output and the MLP output of layer *l*.
# Lines: mean Δ scored log-prob over examples with bootstrap 95 % intervals, flips and controls;
# dashed: the full gap LP(donor) − LP(receiver) of the flips, which a resid patch at the last layer
# reaches when the two models share the head. Where the resid curve of the flips rises (denoise)
# is where the tuned model's advantage has been written into the residual stream; a component
# whose curve stands out names which sublayer wrote it. Thick: the first training seed; thin: the
# others (each with its own flips and gap).

# %%
fig = figures.plot_patching_sweeps(pats, N_BOOT, SEED)
plots.save_figure(fig, "activation_patching", plots.figure_dir(cfg))

# %% [markdown]
# The same sweeps as the **fraction of the mean gap** they recover, mean Δ / mean gap (what the
# curves above show against the dashed gap; 1 = the whole gap, 0 = nothing), with a paired
# bootstrap interval (`analyses.patching.fraction`). This is the summary every sentence of this
# project uses. The mean of per-example ratios (NPE, masked where a gap is below `min_gap`) is
# heavy-tailed where gaps are small; its median is shown beside it for the resid denoise sweep.
# One block of columns per training seed.

# %%
def fraction_table(p):
    frac = {f"{comp} {d}": patching.fraction(p.sweep("flips", comp, d), N_BOOT, SEED)
            for comp in p.components() for d in ("denoise", "noise")}
    table = pd.DataFrame({k: [f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in zip(b.point, b.lo, b.hi)]
                          for k, b in frac.items()})
    table["resid denoise, median NPE"] = np.nanmedian(p.sweep("flips", "resid", "denoise").npe, 0).round(2)
    return table


print("NPE masked per seed: " + ", ".join(
    f"{p.sweep('flips', 'resid', 'denoise').meta['n_npe_masked']} of {len(p.sets['flips'])} flips" for p in pats)
      + f" (|gap| < {cfg.patching.min_gap} nats)")
pd.concat({f"seed {k + 1}": fraction_table(p) for k, p in enumerate(pats)}, axis=1).rename_axis("layer")

# %% [markdown]
# **What each metric measures.** The resid denoise sweep under each metric, on the flips and on the
# controls (problems both models solve), with each set's full gap dashed. A metric whose controls
# show the flips' gap (the controls' share near 1, in the titles) scores something SFT improved on
# every problem alike — the format, copying the answer from the solution — not what made the
# flips right; the copy control shows how large a pure copy's gap is. The sweeps above use the
# metric named "battery"; the summary's first line gives each metric's gaps and shares per seed.

# %%
fig = figures.plot_patching_metrics(pats, N_BOOT, SEED)
plots.save_figure(fig, "patching_metrics", plots.figure_dir(cfg))

# %% [markdown]
# ## 3 · Which positions? (resid, flips)
# The same resid sweep restricted to the prompt's tokens or to the positions predicting the scored tokens
# (the inputs whose outputs are the logits the metric reads: for `answer`, the last token of `#### `
# up to the answer's second-to-last token; for `computed`, the token before each computed result
# and those inside it). If the prompt positions alone carry the effect in early layers
# and the answer positions in late ones, the information moves from the question to the answer
# position across depth. Thick: the first training seed; thin: the others.

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.2))
plots.plot_layer_curves({f"{q} positions": [curve(p.by_pos[q].delta, N_BOOT, SEED) for p in pats] for q in pat.by_pos}, ax=ax,
                  has_embed=False, ylabel="Δ scored log-prob (nats)", cmap="tab10",
                  title=f"Resid denoise by patched positions ({labels['flips']})")
ax.axhline(0, color="0.4", lw=0.8)
fig.tight_layout()

# %% [markdown]
# ## 4 · Cross-layer patching vs the CKA alignment
# Tuned layer *j*'s residual output replaces base layer *i*'s, then the base's layers *i+1…* run
# (`cross_layer_sweep`, denoise). The diagonal is the resid curve of section 2. If SFT only
# *shifted* computations across depth (the remapping an off-diagonal CKA ridge suggests), the base
# should make best use of a tuned layer *j ≠ i*. "Best" is chosen on noisy data, so it comes with
# how sure it is: the white dots mark, for each base layer *i*, the tuned layer that is best most
# often over bootstrap resamples of the examples (size: that frequency,
# `stats.argmax_frequencies`), and the small black dots every donor whose gain over the base
# layer's *own* tuned layer is above 0 with intervals simultaneous over the row's donors
# (`stats.versus_reference`: a remapping beyond chance, corrected for trying every donor). The
# cyan line is the CKA alignment path (dynamic time warping on 1 − CKA, question-pooled prompt
# states, as in notebook 02). Best donors on the cyan line: the causal and the representational
# correspondence agree. Rows: flips and controls; one column per training seed; the table below
# is the first seed's.

# %%
if pat.cross:  # patching.n_cross=0 (the real model's preset): not run, L x L patches per example
    fig = figures.plot_cross_layer(pats, N_BOOT, SEED)
    plots.save_figure(fig, "cross_layer_patching", plots.figure_dir(cfg))
    cka_path = alignment_path(pat.cka_matrix)
    freq, beats = pat.best_donors("flips", N_BOOT, SEED)
    display(pd.DataFrame({"most frequent best tuned donor (flips)": freq.argmax(1),
                          "its bootstrap frequency": freq.max(1).round(2),
                          "donors beating the own layer": [np.flatnonzero(b).tolist() for b in beats],
                          "best tuned match (CKA)": best_match(pat.cka_matrix),
                          "CKA path partner(s)": [sorted({j for i2, j in cka_path if i2 == i})
                                                  for i in range(L)]},
                         index=pd.Index(range(L), name="base layer")))
else:
    print("cross-layer patching not run (patching.n_cross=0)")

# %% [markdown]
# ## 5 · Weight ablation
# Per decoder layer (`weight_sweep`; no model is modified: the other model's layer module runs
# on the cached input):
#
# * **revert** (necessity): the tuned model with that layer's weights put back to the base's. A
#   drop means SFT's change *in this layer's weights* is needed.
# * **graft** (sufficiency): the base with that one tuned layer. A rise means this layer's new
#   weights alone carry part of the gain (in a base context).
# * **mean-ablated difference**: the tuned model with its residual after layer *l* replaced by the
#   base's plus the *mean* tuned − base difference, against the full noise patch (the base's
#   residual, difference removed entirely) at the same rows. Close to 0: a constant shift (a
#   steering vector) carries the change; close to the full noise patch: the change is
#   input-specific. Three versions (right): one global mean over every token of the set (template
#   tokens included), and position-specific means over the prompt rows only and over the
#   rows predicting the scored tokens only, each put back at its own rows.
#
# Intervals: bootstrap 95 % over examples; flips and controls. Thick: the first training seed;
# thin: the others.

# %%
if pat.ablation:  # patching.extras without "ablation" (the real model's preset): not run
    fig = figures.plot_weight_ablation(pats, N_BOOT, SEED)
    plots.save_figure(fig, "weight_ablation", plots.figure_dir(cfg))

# %% [markdown]
# ## 6 · Browse single examples
# With a live kernel the dropdown picks a flip of the first training seed: its prompt, the tokens
# the metric scores,
# and its per-layer Δ for every component in both directions (grey: the flip set's resid
# interval, for scale). Without a frontend (CI, a static export) the first flip is drawn once.

# %%
tokenizer = AutoTokenizer.from_pretrained(run.evals[0].checkpoint)
examples = measures.examples_from_table(sets["flips"], tokenizer, chat=cfg.chat, metric=pat.metric)
spans = measures.tokenize_examples(tokenizer, examples, pat.metric)  # the flips the sweeps scored


def show_example(k=0):
    span, denoise = spans[k], pat.sweep("flips", "resid", "denoise")
    answer = tokenizer.convert_ids_to_tokens([span["input_ids"][p] for p in span["answer_positions"]])
    display(Markdown(f"**Problem {examples[k]['index']}** — scored tokens {answer} at positions "
                     f"{span['answer_positions']}; LP base {denoise.lp_receiver[k]:.3f}, LP tuned "
                     f"{denoise.lp_donor[k]:.3f} nats.\n\n```\n{textwrap.fill(examples[k]['prompt'], 110)}\n```"))
    for ax, direction in zip(plt.subplots(1, 2, figsize=(13, 4))[1], ("denoise", "noise")):
        plots.plot_layer_curves({comp: {"point": pat.sweep("flips", comp, direction).delta[k]} for comp in pat.components()},
                          ax=ax, ylabel="Δ scored log-prob (nats)", title=f"Example {k}: {direction}",
                          has_embed=False, band=curve(pat.sweep("flips", "resid", direction).delta, N_BOOT, SEED),
                          band_label="flip-set resid 95 % interval", cmap="tab10")
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_xlabel("layer")
    plt.show()


# %%
if INTERACTIVE:
    import ipywidgets as widgets

    widgets.interact(show_example, k=widgets.Dropdown(
        options=[(f"{k}: problem {r['index']}", k) for k, r in enumerate(examples)], value=0))
else:
    show_example(0)

# %% [markdown]
# ## 7 · What changed: the difference lens and per-token KL
# Sections 2–5 say *where* the gain lives; this one asks *what* SFT wrote there (after Minder et
# al. 2025, who read narrow fine-tuning off the mean activation difference at the first tokens).
# `lens.ensure` takes the flips and, per decoder layer, the **mean tuned − base residual
# difference** at two position sets: the first `cfg.lens.n_first` tokens of every example (the `Question:`
# template, the same tokens in every example) and the positions predicting the scored tokens. Each mean is:
#
# * **read** through the base's final norm and LM head (the logit lens applied to the
#   difference; RMSNorm makes it scale-free): the tokens it promotes and suppresses, as z-scores
#   within the vocabulary. Held out: the summary gives how many of their top `cfg.lens.k` promoted
#   tokens the two halves' differences share, against the same overlap for the random directions
#   below (a head that promotes some tokens whatever it reads would show them there too);
# * **added back** to the base at the same positions (a steering vector) and scored like a patch:
#   the fraction of the base → tuned gap in scored log-prob it carries. Cross-fitted: each half
#   of the flips is steered with the mean difference of the other half, so the vector is never
#   scored on the examples it was fitted on. The **control** is a distribution:
#   `cfg.lens.n_random` random directions of the same norm at every layer (shaded: their 2.5–97.5
#   % range); the dotted line is the 95th percentile of their *maximum over layers*, so a layer
#   whose steering lies above it is above chance with the choice of layer corrected (the
#   max-statistic; the summary gives its p-value).
#
# The **per-token KL**, KL(P_tuned ‖ P_base) of the next-token distributions at every position of
# a prompt + gold solution, shows where in a text the two models disagree (a bar marks where the
# prompt ends). Curves: every training seed (thick: the first); the token table and the texts are
# the first seed's.

# %%
lenses = over_seeds(lens.ensure, cfg, "sft")
fig, axes = plt.subplots(1, 2, figsize=(15, 4.4), sharey=True)
for ax, name in zip(axes, ("first", "answer")):
    plots.plot_steering([r.steering(name, cfg.lens.n_boot, cfg.lens.seed) for r in lenses], ax=ax,
                  title=f"Steering base with the mean difference at the {lens.NAMES[name]}")
    ax.set_xlabel("decoder layer where the vector is added")
fig.tight_layout()
plots.save_figure(fig, "difference_lens", plots.figure_dir(cfg))

# %%
fig, axes = plt.subplots(1, 2, figsize=(18, 0.32 * L + 1.2))
for ax, name in zip(axes, ("first", "answer")):
    plots.plot_lens_tokens(lenses[0].tokens[name]["base"], ax=ax,
                     title=f"Mean difference at the {name} positions, read by the base's head (seed 1)")
fig.tight_layout()
plots.save_figure(fig, "difference_lens_tokens", plots.figure_dir(cfg))

# %%
lz = lenses[0]
ids = tokenizer(lz.texts[0], add_special_tokens=False)["input_ids"]
fig = plots.plot_token_kl([token_text(tokenizer, t) for t in ids], lz.token_kl[0], n_prompt=lz.n_prompt[0],
                    title="Per-token KL(tuned ‖ base) on one flip (seed 1)")
plots.save_figure(fig, "token_kl", plots.figure_dir(cfg))
pd.DataFrame(lz.ranked[:10]).round(3)

# %% [markdown]
# ## 8 · What these runs show
# Computed from the results above by `alignkit.analyses.patching.summarize` and
# `lens.summarize`: what holds in how many training seeds, each seed's own numbers below it.

# %%
display(Markdown(summaries.publish("04_patching", pats, cfg, plots.figure_dir(cfg), SMOKE)))
display(Markdown(summaries.publish("04_patching_seeds", pats, cfg, plots.figure_dir(cfg), SMOKE)))

# %%
display(Markdown(summaries.publish("04_lens", lenses, cfg, plots.figure_dir(cfg), SMOKE)))
display(Markdown(summaries.publish("04_lens_seeds", lenses, cfg, plots.figure_dir(cfg), SMOKE)))

# %% [markdown]
# ## 9 · The seed study's four observations
# Each observation of the study this project grew from (early-stable / mid-transition / late CKA
# drift; cross-layer remapping; a late effective-rank rise; late-layer patching with a mid-layer
# dip) split into items with a claimed sign, computed per training seed from notebooks 02, 03 and
# this one (cached results) and decided with the seed as the unit
# (`alignkit.analyses.observations`; definitions: docs/measures.md#observations). The README's
# Results section opens with this table.

# %%
display(Markdown(summaries.publish("00_observations", (over_seeds(cka.ensure, cfg, "sft"),
                                                       over_seeds(spectral.ensure, cfg, "sft"), pats),
                                   cfg, plots.figure_dir(cfg), SMOKE)))
