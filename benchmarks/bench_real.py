"""Full-size rehearsal of the real path on this CPU: the ``qwen3-0.6b-base`` preset's own stages on
a random model of Qwen3-0.6B's exact shape (28 layers, vocabulary 151,936; ``rehearsal.py``) with a
tokenizer that splits like Qwen's and GSM8K-format data with negative, comma and decimal answers.

Unlike ``bench_scale.py`` (the analysis functions on two hand-built models), every stage here goes
through ``alignkit.analyses`` with the preset's config, as ``python -m alignkit`` runs it: SFT
(shortened to ``--steps`` optimizer steps at the preset's batch of 16, fp32 master weights,
gradient checkpointing, micro-batches of ``--micro`` with accumulation), evaluation scoring
(``answer_logprob`` at the preset's batch size; generation is GPU work and is left to the GPU
check), capture (mean and last pooling), CKA, spectral and patching at the preset's analysis
parameters, on ``--n-eval`` held-out problems. Each stage runs in its own process; its peak
resident memory is that process's ``VmHWM``. The report adds the training memory estimate of
``alignkit.train.memory_estimate`` for the real shape on 15 (T4), 24 and 80 GiB GPUs.

    flock /tmp/cpu.lock env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_real.py
    .venv/bin/python benchmarks/bench_real.py --layers 2 --n-eval 16 --no-write   # dry run

The full run writes benchmarks/RESULTS_real.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS_real.md"
STAGES = ("train", "score", "capture", "cka", "spectral", "patching", "analysis-full")
FULL_STEPS = (0, 50, 100, 250, 500, 1000)  # the preset's SFT schedule: 6 checkpoints


def synthetic_captures(n: int, layers: int, width: int = 1024, seed: int = 0):
    """``capture_run``'s output for the preset's 6 checkpoints on ``n`` probes: random activations
    of the real shape (low-rank structure plus noise, drifting with the step), for timing the
    CPU-side analyses at full size without running the model on 1,319 probes per checkpoint."""
    import torch

    from alignkit.capture import Activations

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 64, generator=g)
    mix = torch.randn(layers + 1, 64, width, generator=g) / 8
    out = {}
    for i, step in enumerate(FULL_STEPS):
        drift = 0.05 * i * torch.randn(layers + 1, 64, width, generator=g) / 8
        acts = torch.einsum("nk,lkd->lnd", z, mix + drift) + 0.1 * torch.randn(
            layers + 1, n, width, generator=g)
        names = ["embed"] + [f"layers.{j}.resid" for j in range(layers)]
        out[step] = Activations(acts.float(), names, "mean", {"n_texts": n, "constant_points": []})
    return out
GIB = 2**30


def config(workdir: Path, layers: int | None, n_eval: int, steps: int, micro: int):
    import rehearsal

    from alignkit.config import get_config

    paths = rehearsal.build(workdir / "inputs", layers=layers, n_train=200, n_test=max(n_eval, 80))
    return get_config("qwen3-0.6b-base", overrides={
        "model": str(paths["model"]), "data_source": str(paths["train"]),
        "eval_source": str(paths["test"]), "root": str(workdir / "runs"), "device": "cpu",
        "dtype": "float32", "eval.n_eval": n_eval, "sft.max_steps": steps,
        "sft.micro_batch_size": micro, "sft.schedule": (0.0, 1.0), "sft.n_train": 200})


def vmhwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def child(stage: str, args) -> dict:
    """One stage, in this (fresh) process: its work time and what it measured."""
    from alignkit import runs, spectral
    from alignkit.analyses import cka, common, patching
    from alignkit.analyses import spectral as spectral_analysis
    from alignkit.config import with_values
    from alignkit.data import eval_set, prompts_for
    from alignkit.evaluate import answer_logprob, batched
    from alignkit.models import load_model
    from alignkit.train import train

    cfg = config(args.workdir, args.layers, args.n_eval, args.steps, args.micro)
    t0 = time.perf_counter()
    out: dict = {}
    if stage == "train":
        run = train(cfg, "sft")
        out["checkpoints"] = [s for s, _ in runs.list_checkpoints(run)]
    elif stage == "score":
        last = runs.list_checkpoints(train(cfg, "sft"))[-1][1]
        model, tok = load_model(last, "float32", "cpu")
        ds = eval_set(cfg)
        prompts = prompts_for(cfg, tok, ds["question"])
        t0 = time.perf_counter()  # scoring alone, the model loaded; the preset's 0 is 64 on the CPU
        lp, _ = batched(cfg, model, len(prompts),
                        lambda b: answer_logprob(model, tok, prompts, ds["answer"], b, cfg.chat))
        out["finite"] = bool(all(v == v for v in lp))
        out["tokens"] = sum(len(tok(p + " " + a)["input_ids"]) for p, a in zip(prompts, ds["answer"]))
    elif stage == "capture":  # what notebooks 02-05 capture: three poolings of every checkpoint
        ckpts = common.from_run(cfg)
        caps = {p: common.captures(cfg, ckpts, p) for p in ("question", "mean", "last")}
        out["shape"] = list(next(iter(caps["mean"].values())).acts.shape)
    elif stage == "cka":
        out["transition"] = cka.ensure(cfg, common.from_run(cfg)).transition
    elif stage == "spectral":
        spectral_analysis.ensure(cfg, common.from_run(cfg))
    elif stage == "analysis-full":  # notebooks 02 and 03 at the preset's probe count
        n, layers = 1319, args.layers or 28
        caps = synthetic_captures(n, layers)
        fake = common.Checkpoints({str(s): args.workdir / f"synthetic-{s}" for s in FULL_STEPS},
                                  {str(s): s for s in FULL_STEPS}, {}, args.workdir / "full")
        cka.probes = lambda cfg, ckpts: [f"probe {i}" for i in range(n)]
        cka.captures = lambda cfg, ckpts, pooling, texts=None: {str(s): caps[s] for s in FULL_STEPS}
        common.Checkpoints.hashes = lambda self: dict(zip(self.paths, self.paths))
        t0 = time.perf_counter()
        cka_res = cka.ensure(cfg, fake)
        out["cka_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()  # spectral.ensure's bootstrap, of one checkpoint (x 6 in a run)
        spectral.bootstrap_layer_metrics(caps[0].acts, alphas=(0.5, 1.0, 2.0, float("inf")),
                                         n_boot=200, seed=0)
        out["spectral_one_s"] = time.perf_counter() - t1
        out["transition"] = cka_res.transition
    elif stage == "patching":
        small = with_values(cfg, {"patching.n_examples": args.n_patch, "patching.n_cross": 1,
                                  "patching.batch_size": args.n_patch})
        pat = patching.ensure(small, common.from_run(small))
        out["sweeps"] = len(pat.sweeps)
    out.update(work_s=time.perf_counter() - t0, peak_rss_gib=vmhwm_gib())
    return out


def run_stage(stage: str, args) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    out = args.workdir / "stages" / f"{stage}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--stage", stage, "--workdir", str(args.workdir),
           "--n-eval", str(args.n_eval), "--steps", str(args.steps), "--micro", str(args.micro),
           "--n-patch", str(args.n_patch)] + (["--layers", str(args.layers)] if args.layers else [])
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
    rec = json.loads(out.read_text())
    rec["wall_s"] = time.perf_counter() - t0
    print(f"{stage:10s} wall {rec['wall_s']:7.1f} s  work {rec['work_s']:7.1f} s  "
          f"peak RSS {rec['peak_rss_gib']:.2f} GiB", flush=True)
    return rec


def estimates() -> list[str]:
    import rehearsal
    from transformers import AutoConfig

    from alignkit import train
    from alignkit.config import get_config

    shape = AutoConfig.for_model("qwen3", **rehearsal.QWEN3_06B)
    lines = ["| GPU memory | method | precision | checkpointing | micro-batch | estimated peak GiB "
             "|",
             "|---|---|---|---|---:|---:|"]
    for have, precision in ((15.0, "fp16"), (24.0, "bf16"), (80.0, "bf16")):
        for method in ("sft", "dpo", "grpo"):
            micro, on, est = train.fit_plan(get_config("qwen3-0.6b-base"), method, shape, 1,
                                            precision, have)  # as plan_memory on such a GPU
            fits = "" if est["total"] <= have else " (does not fit)"
            lines.append(f"| {have:g} GiB | {method.upper()} | {precision} | "
                         f"{'on' if on else 'off'} | {micro} | {est['total']:.1f}{fits} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench_real")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 28)")
    p.add_argument("--n-eval", type=int, default=64, help="held-out problems (probes, scoring)")
    p.add_argument("--steps", type=int, default=1, help="SFT optimizer steps (batch 16)")
    p.add_argument("--micro", type=int, default=4, help="SFT micro-batch (accumulates to 16)")
    p.add_argument("--n-patch", type=int, default=1, help="patched examples per set")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.stage:
        out = child(args.stage, args)
        (args.workdir / "stages" / f"{args.stage}.json").write_text(json.dumps(out))
        return
    t0 = time.perf_counter()
    rows = {s: run_stage(s, args) for s in STAGES}
    import torch

    lines = [
        "# Full-size rehearsal of the real path on the CPU (`benchmarks/bench_real.py`)", "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, float32. Preset `qwen3-0.6b-base` on "
        f"a random Qwen3ForCausalLM of Qwen3-0.6B's shape ({args.layers or 28} layers, "
        "vocabulary 151,936) with Qwen3's exact tokenizer and quirky GSM8K-format data "
        f"(`rehearsal.py`); {args.n_eval} held-out problems; SFT {args.steps} step(s) of batch 16 "
        f"in micro-batches of {args.micro}; patching on {args.n_patch} examples per set (every "
        "sweep of notebook 04, cross-layer on 1). Each stage in its own process; peak RSS is its "
        "VmHWM (model weights included).", "",
        "| stage | what | wall s | work s | peak RSS GiB |", "|---|---|---:|---:|---:|"]
    what = {"train": "SFT, fp32 master weights, gradient checkpointing, 2 fp32 checkpoints",
            "score": f"answer log-prob of {args.n_eval} problems, batch 64",
            "capture": "mean + last pooling, 29 hook points, 2 checkpoints",
            "cka": "layerwise (200 bootstraps, noise floor) + 29 x 29 matrix, 50 permutations",
            "spectral": "RankMe + Rényi ranks, 200 bootstraps, 2 checkpoints",
            "patching": "all sweeps, positions, cross-layer, weight ablation",
            "analysis-full": "notebook 02's CKA at 1,319 probes x 6 checkpoints x 29 points, "
                             "and notebook 03's bootstrap of one checkpoint (random activations "
                             "of the real shape, preset parameters)"}
    for s, r in rows.items():
        lines.append(f"| {s} | {what[s]} | {r['wall_s']:.1f} | {r['work_s']:.1f} | "
                     f"{r['peak_rss_gib']:.2f} |")
    full = rows["analysis-full"]
    lines += ["", f"Whole run: {time.perf_counter() - t0:.0f} s. Scoring covered "
              f"{rows['score'].get('tokens')} tokens. At the preset's size the CPU-side analyses "
              f"take {full['cka_s']:.0f} s (CKA, every checkpoint) and "
              f"{full['spectral_one_s']:.0f} s per checkpoint for the spectral bootstrap "
              f"(x 6 checkpoints: {6 * full['spectral_one_s'] / 60:.0f} min).", "",
              "## Training memory estimate (`alignkit.train.memory_estimate`, real shape)", "",
              "Micro-batches fitted by `fit_micro_batch` (the presets' default, "
              "`micro_batch_size=0`), sequences at the preset's length limits:", ""]
    lines += estimates()
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
