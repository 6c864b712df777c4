# %% [markdown]
# # 01 · Supervised fine-tuning on GSM8K-style math
#
# This notebook builds (or loads) a **base** model, fine-tunes it with TRL's `SFTTrainer` on
# GSM8K-format worked solutions, saves checkpoints on a schedule that is denser early
# (0, 5, 10, 25, 50, 100 % of the steps; step 0 is the base itself), and evaluates every
# checkpoint on held-out problems:
#
# * **accuracy**: greedy generation, final number extracted with `alignkit.data.extract_answer`
#   (GSM8K's `#### N` rule, else the last number), exact match, 95 % Wilson interval;
# * **answer log-prob**: teacher-forced log-probability of the gold final answer's tokens given the
#   prompt and the gold solution up to `#### ` — the quantity notebook 04 patches;
# * **flips**: problems the base gets wrong and the final checkpoint gets right, with **controls**
#   (right in both) for the later notebooks.
#
# With the default `tiny` preset everything is offline and runs on a laptop CPU: a GSM8K-format
# problem generator, a byte-level BPE tokenizer trained here, and a 12-layer Qwen3 (same module
# layout as Qwen/Qwen3-0.6B) pretrained from scratch on narratives, equations and
# question → answer lines — but never on worked solutions. SFT teaches the solution format.

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

PRESET = "tiny"  # "tiny" or "smollm2-135m" (a real model from PyPI), offline on a CPU; "qwen3-0.6b(-base)": GPU
SMOKE = os.environ.get("ALIGNKIT_SMOKE") == "1"  # CI: tiny sizes; figures go to figure_dir(cfg)
OVERRIDES: dict = {}  # e.g. {"model": "/data/Qwen3-0.6B", "data_source": "/data/gsm8k/train.jsonl"}
N_SEEDS = None  # training seeds; None: the preset's (tiny 3, smollm2-135m 2, smoke 2, Qwen3 1: GPU hours)
N_SHOWN = 5  # flip examples printed below

# %%
import json
import logging

import pandas as pd
from IPython.display import Markdown, display

from alignkit.analyses import behaviour, summaries
from alignkit.analyses.common import over_seeds
from alignkit.config import get_config
from alignkit.plots import figure_dir, plot_sft_training, save_figure
from alignkit.tiny import ensure_base

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
cfg = get_config(PRESET, smoke=SMOKE, overrides=OVERRIDES | ({"n_seeds": N_SEEDS} if N_SEEDS else {}))
cfg

# %% [markdown]
# ## 1 · The base model
# `ensure_base` builds the embedded base once and caches it under `runs/base/`, keyed by its
# config; it loads with `AutoModelForCausalLM.from_pretrained` like any hub checkpoint. On the real
# path it simply returns the hub id or local path.

# %%
base_path = ensure_base(cfg)
manifest_path = base_path / "manifest.json"
if manifest_path.is_file():
    base_manifest = json.loads(manifest_path.read_text())
    print(f"base: {base_path}")
    if "n_tokens" in base_manifest:  # the embedded base's pretraining record
        print(f"pretraining: {base_manifest['n_tokens']:,} tokens, final loss "
              f"{base_manifest['final_train_loss']:.3f}, {base_manifest['wall_time_s']:.0f} s to build")
    else:  # a converted real model (alignkit.pretrained): where its weights came from
        print(f"converted from {base_manifest.get('source')} ({base_manifest.get('gguf')})")

# %% [markdown]
# ## 2 · SFT with scheduled checkpoints, each evaluated, for every training seed
# Loss is on the solution only (TRL masks the prompt). `over_seeds` trains (resuming from the
# last complete checkpoint after an interruption; a finished run returns at once), then
# `behaviour.ensure` evaluates every checkpoint on held-out problems (cached under `runs/evals/`,
# keyed by the weights and the evaluation settings) and saves the flip table (a preset with
# `eval.intermediate=False`, the real model's, evaluates the start and the final checkpoint only;
# every checkpoint is still analysed in 02-04). One run is one sample of training noise (the
# same seed on another machine of the same kind gave other numbers), so `over_seeds` repeats it
# for `cfg.n_seeds` training seeds: the same base, data and knobs, another order of the training
# examples (`config.with_seed`). Every figure below draws each seed.

# %%
results = over_seeds(behaviour.ensure, cfg, "sft")
res = results[0]
print(f"{len(results)} training seeds; runs: {[r.run_dir.name for r in results]}\n"
      f"checkpoints evaluated at steps: {res.steps}")
pd.concat({f"seed {i + 1}": pd.DataFrame(r.summary()).set_index("step") for i, r in enumerate(results)},
          axis=1).round(3).filter(like="accuracy")

# %% [markdown]
# ### How to read the figure
# Left: training loss on solution tokens (dotted lines mark checkpoints). Middle: greedy
# exact-match accuracy with its 95 % Wilson interval; the dashed line is the base, the control
# every checkpoint is compared with. Right: mean log-probability of the gold final answer given the
# gold solution prefix, with a 95 % interval of the mean. The thick line is the first training
# seed, thin lines the others: the spread between them is training noise.

# %%
fig = plot_sft_training([r.summary() for r in results], [r.loss() for r in results])
save_figure(fig, "sft_training", figure_dir(cfg))

# %% [markdown]
# ## 3 · Flip examples
# Wrong in the base, right after SFT — the examples whose improvement notebook 04 localises
# (first seed shown). Controls are right in both.

# %%
print(f"{len(res.table.flips)} flips and {len(res.table.controls)} controls out of "
      f"{res.evals[0].n} held-out problems")
for row in res.table.flips[:N_SHOWN]:
    print("-" * 80)
    print("Q:", row["question"])
    print("base  :", row["base_output"].strip()[:200].replace("\n", " | "))
    print("tuned :", row["tuned_output"].strip()[:200].replace("\n", " | "))
    print("gold  :", row["final_answer"])

# %% [markdown]
# ## 4 · What these runs show
# Computed from the results above by `alignkit.analyses.behaviour.summarize` (not typed in): what
# holds in how many training seeds, each seed's own numbers below it.

# %%
display(Markdown(summaries.publish("01_sft_train", results, cfg, figure_dir(cfg), SMOKE)))
display(Markdown(summaries.publish("01_sft_train_seeds", results, cfg, figure_dir(cfg), SMOKE)))

# %% [markdown]
# ## The real path: Qwen3-0.6B on GSM8K
# Two presets. `PRESET = "qwen3-0.6b-base"` fine-tunes the pretrained `Qwen/Qwen3-0.6B-Base` on
# plain `Question: ...\nAnswer:` prompts: the base-vs-post-training study of this notebook.
# `PRESET = "qwen3-0.6b"` is the seed's model, `Qwen/Qwen3-0.6B`, which is already post-trained
# (a hybrid-thinking chat model): its chat template with thinking disabled (an empty
# `<think></think>` block) formats the SFT data, evaluation, probes and patching alike.
# Either needs hub access or local copies: `OVERRIDES = {"model": "/path/to/Qwen3-0.6B-Base",
# "data_source": "/path/to/gsm8k/train.jsonl", "eval_source": "/path/to/gsm8k/test.jsonl"}`
# (GSM8K's own jsonl), with `HF_HUB_OFFLINE=1` so a mistake fails fast.
#
# What is true for Qwen: its tokenizer makes `" -"` one piece, so `#### -10` does not start on a
# token boundary; the answer log-prob counts every token that overlaps the answer's characters.
# Training keeps fp32 master weights, gradients and AdamW states with bf16 autocast (fp16 with loss
# scaling on a GPU without native bf16, such as Colab's T4, which also analyses in float32),
# gradient checkpointing where the GPU needs it, and micro-batches fitted to the GPU by a memory
# estimate (a GPU that cannot hold micro-batch 1 gets an error with the estimate before training);
# checkpoints are saved in fp32, so weight drift sees every update. Evaluation runs the whole test
# split (1,319 problems) in batches fitted to the GPU's free memory, stops each sequence at the
# model's end tokens or the stop string, and scores answer log-probs in memory independent of the
# 151,936-token vocabulary. Zero-shot greedy accuracy is not the Qwen3 report's protocol
# (59.6 % for the -Base model, 4-shot chain of thought): set `{"eval.n_shot": 4}` to compare.
