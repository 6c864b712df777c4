"""Post-training through TRL with a checkpoint schedule, manifests and resume.

Layout of a run directory (``sft_dir(cfg)``)::

    checkpoints/step-000000/   the base itself (step 0), from_pretrained-loadable
    checkpoints/step-000015/   ... one directory per scheduled step, each with manifest.json
    trainer/checkpoint-15/     TRL/transformers state (optimizer, RNG) used only to resume
    train_log.json             the training-loss history

A checkpoint directory is written under a temporary name and renamed when complete; its manifest
records the weights' hash. Rerunning after an interruption resumes from the last complete
checkpoint and never redoes finished work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from alignkit import cache
from alignkit.config import Config
from alignkit.data import dataset_hash, format_completion, format_prompt, load_gsm8k
from alignkit.tiny import ensure_base, load_model

logger = logging.getLogger(__name__)


def schedule_steps(max_steps: int, fractions: tuple[float, ...]) -> list[int]:
    """Checkpoint steps from fractions of ``max_steps`` (0 is the base), sorted and distinct."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"schedule fractions must lie in [0, 1], got {fractions}")
    steps = sorted({round(f * max_steps) for f in fractions} | {0, max_steps})
    return steps


def sft_key(cfg: Config) -> str:
    """Cache key of an SFT run: the base, the data and every training knob."""
    return cache.hash_obj(
        {"model": cfg.model, "tiny": cfg.tiny if cfg.model == "tiny" else None, "data": cfg.data_source,
         "generator": cfg.generator, "sft": cfg.sft, "chat": cfg.chat, "dtype": cfg.dtype}
    )


def sft_dir(cfg: Config) -> Path:
    return cfg.run_root / "sft" / f"{cfg.preset}{'-smoke' if cfg.smoke else ''}-{sft_key(cfg)}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def is_complete(ckpt: Path) -> bool:
    """A checkpoint is complete when its manifest exists and its weights match the recorded hash."""
    manifest = Path(ckpt) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())["weights_hash"]
        return cache.weights_hash(ckpt) == recorded
    except (ValueError, KeyError, FileNotFoundError):
        return False


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, directory), by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.glob("step-*")):
        if d.is_dir() and is_complete(d):
            out.append((int(d.name.split("-")[1]), d))
    return out


def _export(model, tokenizer, ckpt: Path, manifest: dict) -> None:
    with cache.atomic_dir(ckpt) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = dict(manifest, weights_hash=cache.weights_hash(tmp))
        cache.write_json_atomic(tmp / "manifest.json", manifest)


class _ScheduleCallback(TrainerCallback):
    """Save at scheduled steps and export each save as a clean, atomically written checkpoint."""

    def __init__(self, run_dir: Path, steps: list[int], tokenizer, base_manifest: dict, t0: float):
        self.run_dir, self.steps, self.tokenizer = run_dir, set(steps), tokenizer
        self.base_manifest, self.t0 = base_manifest, t0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        losses = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
        recent = [l for s, l in losses if s > step - max(1, args.logging_steps * 5)]
        manifest = dict(
            self.base_manifest, step=step, fraction=step / state.max_steps,
            train_loss=float(sum(recent) / len(recent)) if recent else None,
            wall_time_s=time.time() - self.t0,  # since this (possibly resumed) training process started
        )
        _export(model, self.tokenizer, checkpoint_dir(self.run_dir, step), manifest)
        cache.write_json_atomic(self.run_dir / "train_log.json", {"loss": losses})
        return control


def sft_dataset(cfg: Config, tokenizer=None, ds=None):
    """Prompt/completion rows for SFT (TRL trains on the completion only) from GSM8K rows ``ds``."""
    if ds is None:
        ds = load_gsm8k(cfg.data_source, split="train", n=cfg.sft.n_train, generator=cfg.generator)

    def to_pc(row):
        return {"prompt": format_prompt(row["question"], tokenizer, chat=cfg.chat),
                "completion": format_completion(row["answer"])}

    return ds.map(to_pc, remove_columns=ds.column_names)


def train_sft(cfg: Config) -> Path:
    """Fine-tune the base with TRL's SFTTrainer on the schedule; return the run directory.

    Idempotent: a finished run returns at once; an interrupted one resumes from its last complete
    checkpoint (weights, optimizer and RNG state restored by the trainer).
    """
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    run_dir = sft_dir(cfg)
    steps = schedule_steps(cfg.sft.max_steps, cfg.sft.schedule)
    with cache.build_lock(run_dir):
        done = dict(list_checkpoints(run_dir))
        if steps[-1] in done:
            logger.info("SFT run complete: %s", run_dir)
            return run_dir
        base_path = ensure_base(cfg)
        device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else (
            "cpu" if cfg.device == "auto" else cfg.device)
        model, tokenizer = load_model(base_path, dtype=cfg.dtype, device=device)
        rows = load_gsm8k(cfg.data_source, split="train", n=cfg.sft.n_train, generator=cfg.generator)
        train_ds = sft_dataset(cfg, tokenizer, rows)
        base_manifest = {
            "kind": "sft", "run_key": sft_key(cfg), "base": str(base_path),
            "config_hash": cache.hash_obj(cfg.sft), "data_hash": dataset_hash(rows),
            "sft": dataclasses.asdict(cfg.sft), "max_steps": cfg.sft.max_steps, "schedule": steps,
        }
        t0 = time.time()
        if 0 not in done:
            _export(model, tokenizer, checkpoint_dir(run_dir, 0),
                    dict(base_manifest, step=0, fraction=0.0, train_loss=None, wall_time_s=0.0))
        resume = _resume_point(run_dir, done)
        if resume is not None:
            logger.info("resuming SFT from %s", resume)
        args = TRLSFTConfig(
            output_dir=str(run_dir / "trainer"),
            max_steps=cfg.sft.max_steps,
            per_device_train_batch_size=cfg.sft.batch_size,
            learning_rate=cfg.sft.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, round(cfg.sft.warmup_ratio * cfg.sft.max_steps)),
            weight_decay=cfg.sft.weight_decay,
            max_length=cfg.sft.max_length,
            logging_steps=max(1, cfg.sft.max_steps // 50),
            save_strategy="no",  # the schedule callback decides
            save_total_limit=2,
            report_to="none",
            bf16=cfg.dtype == "bfloat16",
            use_cpu=device == "cpu",
            dataloader_pin_memory=False,
            activation_checkpointing=False,
            seed=cfg.sft.seed,
            completion_only_loss=True,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
            callbacks=[_ScheduleCallback(run_dir, steps, tokenizer, base_manifest, t0)],
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        shutil.rmtree(run_dir / "trainer", ignore_errors=True)  # resume state no longer needed
        return run_dir


def _resume_point(run_dir: Path, done: dict[int, Path]) -> Path | None:
    """The newest trainer state whose exported checkpoint is complete; drop newer, unmatched ones."""
    tdir = run_dir / "trainer"
    if not tdir.is_dir():
        return None
    best = None
    for d in sorted(tdir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(d.name.split("-")[1])
        if step in done and (d / "trainer_state.json").is_file():
            best = d
        else:
            shutil.rmtree(d, ignore_errors=True)
    return best
