"""GPU check (``make gpu-check``): the real path on a CUDA GPU without weights or internet.

Builds the rehearsal inputs (``rehearsal.py``: Qwen3's exact tokenizer, a random ``Qwen3ForCausalLM``
of Qwen3-0.6B's shape saved and loaded by path, GSM8K-format data with GSM8K's quirks) and runs
every stage of both real presets through the package (``qwen3-0.6b-base``: plain prompts,
``qwen3-0.6b``: the chat template without thinking) at short schedules (SFT 20 steps, DPO 5, GRPO 3, 64 evaluation problems). Per stage it
records wall time, peak GPU memory (``torch.cuda.max_memory_allocated``) and a throughput, and,
after training, the share of weight entries that moved (pure-bf16 training rounds small updates
away). A stage that fails is recorded with its error and the check goes on where it can.

    python benchmarks/gpu_check.py --out gpu_check.json         # ~5-8 min on one H100/H200
    python benchmarks/gpu_check.py --layers 2 --quick --device cpu  # CPU dry run of the code path
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rehearsal  # noqa: E402

from alignkit import runs, weights  # noqa: E402
from alignkit.analyses import behaviour, cka, common, patching, spectral  # noqa: E402
from alignkit.config import (
    get_config,  # noqa: E402
    with_values,  # noqa: E402
)
from alignkit.data import eval_set, prompts_for  # noqa: E402
from alignkit.evaluate import batched, generate  # noqa: E402
from alignkit.models import load_model  # noqa: E402
from alignkit.train import train  # noqa: E402

logger = logging.getLogger("gpu_check")


def changed_share(a: Path, b: Path) -> float:
    """Share of weight entries that differ between two checkpoints (any bitwise change)."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    diff = sum(int((wa[k] != wb[k]).sum()) for k in wa)
    return diff / sum(v.numel() for v in wa.values())


class Recorder:
    def __init__(self, device: str):
        self.device, self.rows = device, []

    def run(self, variant: str, stage: str, fn, unit: str = "", count=None):
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        row = {"variant": variant, "stage": stage}
        try:
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - record the failure, go on
            out = None
            row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            logger.error("%s/%s failed:\n%s", variant, stage, traceback.format_exc())
        row["seconds"] = round(time.time() - t0, 1)
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if out is not None and count is not None:
            row["throughput"] = f"{count(out) / row['seconds']:.3g} {unit}/s"
        self.rows.append(row)
        logger.info("%s", row)
        return out


N_RATE = 256  # prompts of the generation-rate stage: one fitted batch on a large GPU


def generation_rate(cfg, ckpt, n: int) -> int:
    """Greedy generation of ``n`` prompts at the preset's fitted batch (a random model never ends
    early: every sequence decodes ``eval.max_new_tokens``), the worst case of the full split's
    evaluation; returns the batch."""
    model, tok = load_model(ckpt, cfg.dtype, cfg.device)
    prompts = prompts_for(cfg, tok, (list(eval_set(cfg)["question"]) * n)[:n])
    return batched(cfg, model, len(prompts), lambda b: generate(
        model, tok, prompts, cfg.eval.max_new_tokens, b, cfg.eval.stop))[1]


def check(variant: str, cfg, rec: Recorder, quick: bool) -> None:
    rec.run(variant, "train sft", lambda: train(cfg, "sft"), "steps",
            lambda _: cfg.sft.max_steps)
    res = rec.run(variant, "evaluate", lambda: behaviour.ensure(cfg, common.from_run(cfg)),
                  "problems", lambda r: len(r.evals) * r.evals[0].n)
    if res is not None:
        first, last = res.evals[0].checkpoint, res.evals[-1].checkpoint
        rec.rows[-1]["note"] = (f"batch {res.evals[-1].batch_size}; SFT moved "
                                f"{changed_share(Path(first), Path(last)):.1%} of entries")
        if variant == "qwen3-0.6b-base":  # the rate behind the full split's time estimate
            n = 16 if quick else N_RATE
            batch = rec.run(variant, f"generate {n} (fitted batch)", lambda: generation_rate(
                cfg, last, n), "problems", lambda _: n)
            rec.rows[-1]["note"] = f"batch {batch}, {cfg.eval.max_new_tokens} new tokens each"
    rec.run(variant, "capture", lambda: [common.captures(cfg, common.from_run(cfg), p)
                                         for p in ("question", "mean", "last")])
    rec.run(variant, "cka", lambda: cka.ensure(cfg, common.from_run(cfg)))
    rec.run(variant, "spectral", lambda: spectral.ensure(cfg, common.from_run(cfg)))
    small = with_values(cfg, {"patching.n_examples": 4 if quick else 8,
                              "patching.n_cross": 2 if quick else 4,
                              "patching.batch_size": 4 if quick else 8})
    rec.run(variant, "patching", lambda: patching.ensure(small, common.from_run(small)))
    if res is not None:
        def drift():
            device = rec.device if rec.device.startswith("cuda") else None
            a, _ = load_model(res.evals[0].checkpoint, "float32", rec.device)
            b, _ = load_model(res.evals[-1].checkpoint, "float32", rec.device)
            return weights.weight_drift(a, b, device=device, progress=False)
        rec.run(variant, "weight drift", drift)
    for method in ("dpo", "grpo"):
        run = rec.run(variant, f"train {method}", lambda m=method: train(cfg, m))
        if run is not None:
            ckpts = runs.list_checkpoints(run)
            rec.rows[-1]["note"] = (f"{method.upper()} moved "
                                    f"{changed_share(ckpts[0][1], ckpts[-1][1]):.1%} of entries")


def check_device(device: str) -> None:
    """SystemExit naming the torch build when ``device`` is CUDA and torch sees no GPU: the GPU
    check never falls back to the CPU silently (a CPU-only torch on a GPU machine, or a CUDA
    build the driver does not support)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"the GPU check needs a GPU, but torch {torch.__version__} (CUDA "
                         f"{torch.version.cuda or 'none: a CPU-only build'}) sees none: install "
                         "the CUDA build that matches the driver (nvidia-smi), or pass --device "
                         "cpu for a dry run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check")
    p.add_argument("--device", default="cuda",
                   help="cuda (default: fails unless torch sees a GPU) or cpu (a dry run)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 28, the real depth)")
    p.add_argument("--quick", action="store_true", help="smaller schedules and sets (CPU dry run)")
    p.add_argument("--variants", nargs="+", default=["qwen3-0.6b-base", "qwen3-0.6b"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    check_device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alignkit").setLevel(logging.WARNING)
    t0 = time.time()
    rec = Recorder(args.device)
    n_eval = 16 if args.quick else 64
    base = {"root": str(args.workdir / "runs"),
            "device": args.device, "sft.max_steps": 4 if args.quick else 20,
            "sft.schedule": (0.0, 1.0), "sft.n_train": 64 if args.quick else 200,
            "dpo.max_steps": 2 if args.quick else 5, "dpo.n_pairs": 8 if args.quick else 16,
            "dpo.schedule": (0.0, 1.0), "grpo.max_steps": 2 if args.quick else 3,
            "grpo.n_prompts": 8 if args.quick else 16, "grpo.schedule": (0.0, 1.0),
            "eval.n_eval": n_eval}  # eval.batch_size: the preset's 0, fitted to the GPU
    if args.quick:
        base.update({"eval.max_new_tokens": 16, "grpo.max_completion_length": 16,
                     "grpo.batch_size": 8, "grpo.num_generations": 4, "sft.batch_size": 4,
                     "dpo.batch_size": 4, "eval.batch_size": 8})
    if args.device == "cpu":
        base["dtype"] = "float32"
    for variant in args.variants:  # each preset with its own tokenizer (end token) and model
        paths = rec.run(variant, "build model and data", lambda v=variant: rehearsal.build(
            args.workdir / v, layers=args.layers, n_train=200, n_test=80,
            chat=v == "qwen3-0.6b"))
        if paths is None:
            continue
        cfg = get_config(variant, overrides=dict(
            base, model=str(paths["model"]), data_source=str(paths["train"]),
            eval_source=str(paths["test"])))
        check(variant, cfg, rec, args.quick)
    lines = ["| variant | stage | status | s | peak GiB | throughput | note |",
             "|---|---|---|---:|---:|---|---|"]
    for r in rec.rows:
        lines.append(f"| {r['variant']} | {r['stage']} | {r['status']} | {r['seconds']} | "
                     f"{r.get('peak_gib', '')} | {r.get('throughput', '')} | {r.get('note', '')} |")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    summary = (f"GPU check on {device}, torch {torch.__version__}, "
               f"{time.time() - t0:.0f} s in all\n\n" + "\n".join(lines))
    print(summary)
    if args.out:
        args.out.write_text(json.dumps({"device": device, "rows": rec.rows, "summary": summary},
                                       indent=2))


if __name__ == "__main__":
    main()
