"""Post-training through TRL (SFT, DPO, GRPO) with one checkpoint schedule, manifests and resume.

Layout of a run directory (``run_dir(cfg, method)``)::

    checkpoints/step-000000/   the starting model itself (step 0), from_pretrained-loadable
    checkpoints/step-000015/   ... one directory per scheduled step, each with manifest.json
    trainer/checkpoint-15/     TRL/transformers state (optimizer, RNG) used only to resume
    train_log.json             the training-loss history (and the method's own metrics)

Step 0 of SFT is the base; step 0 of DPO and GRPO is their init: the final SFT checkpoint
(``init="sft"``, the usual pipeline) or the base (``init="base"``). A checkpoint directory is
written under a temporary name and renamed when complete; its manifest records the weights' hash.
Rerunning after an interruption resumes from the last complete checkpoint and never redoes
finished work. The three trainers share this machinery (``_train_scheduled``); they differ only in
the data they build and the TRL trainer they hand it to.

GRPO's reward is ``correctness_reward`` (1 when ``extract_answer`` of the completion equals the
gold answer, else 0) plus ``format_reward`` (1 when the completion ends with a ``#### N`` line)
weighted by ``cfg.grpo.format_reward``. Completions are cut at the evaluation's stop strings
(``cfg.eval.stop``) before either is computed, so training rewards what evaluation scores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import datasets
import torch
from transformers import TrainerCallback

from alignkit import cache
from alignkit.config import Config, EvalConfig
from alignkit.data import (
    dataset_hash,
    extract_answer,
    format_completion,
    format_prompt,
    has_final_line,
    load_gsm8k,
    normalize_number,
    preference_pairs,
)
from alignkit.tiny import ensure_base, load_model

logger = logging.getLogger(__name__)

METHODS = ("sft", "dpo", "grpo")
INITS = ("sft", "base")
POST_TRAINING_STREAM = 3  # generator stream of DPO pairs and GRPO prompts (SFT: 0, pretraining: 1)


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


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def run_key(cfg: Config, method: str) -> str:
    """Cache key of a run: everything that determines it, including the SFT run it starts from.

    The SFT key is ``sft_key`` (unchanged); a DPO/GRPO key covers the base, the data, the method's
    knobs, its init (the SFT key when ``init="sft"``) and, for GRPO, the stop strings that cut
    completions before the reward.
    """
    _check_method(method)
    if method == "sft":
        return sft_key(cfg)
    knobs = getattr(cfg, method)
    obj = {"method": method, "model": cfg.model, "tiny": cfg.tiny if cfg.model == "tiny" else None,
           "data": cfg.data_source, "generator": cfg.generator, method: knobs, "chat": cfg.chat, "dtype": cfg.dtype,
           "init": sft_key(cfg) if knobs.init == "sft" else "base", "stream": POST_TRAINING_STREAM}
    if method == "grpo":
        obj["stop"] = cfg.eval.stop
    return cache.hash_obj(obj)


def run_dir(cfg: Config, method: str) -> Path:
    """``<root>/<method>/<preset>[-smoke]-<run_key>``: where ``train(cfg, method)`` writes."""
    return cfg.run_root / method / f"{cfg.preset}{'-smoke' if cfg.smoke else ''}-{run_key(cfg, method)}"


def sft_dir(cfg: Config) -> Path:
    return run_dir(cfg, "sft")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def is_complete(ckpt: Path) -> bool:
    """A checkpoint is complete when its manifest exists and its weights match the recorded hash."""
    return cache.manifest_matches(ckpt)


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
    """Save at scheduled steps and export each save as a clean, atomically written checkpoint.

    ``metrics`` names logged values besides the loss (e.g. DPO's ``rewards/accuracies``, GRPO's
    ``reward``) whose recent mean goes into each manifest and whose history goes into
    ``train_log.json``.
    """

    def __init__(self, run_dir: Path, steps: list[int], tokenizer, base_manifest: dict, t0: float,
                 metrics: Sequence[str] = ()):
        self.run_dir, self.steps, self.tokenizer = run_dir, set(steps), tokenizer
        self.base_manifest, self.t0, self.metrics = base_manifest, t0, tuple(metrics)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:  # several processes (accelerate launch): one writes
            return control
        step = state.global_step
        window = max(1, args.logging_steps * 5)
        history = {key: [(h["step"], h[key]) for h in state.log_history if key in h] for key in ("loss",) + self.metrics}
        recent = {key: [v for s, v in hist if s > step - window] for key, hist in history.items()}
        manifest = dict(
            self.base_manifest, step=step, fraction=step / state.max_steps,
            train_loss=float(sum(recent["loss"]) / len(recent["loss"])) if recent["loss"] else None,
            wall_time_s=time.time() - self.t0,  # since this (possibly resumed) training process started
        )
        if self.metrics:
            manifest["metrics"] = {k: float(sum(v) / len(v)) if v else None for k, v in recent.items() if k != "loss"}
        _export(model, self.tokenizer, checkpoint_dir(self.run_dir, step), manifest)
        cache.write_json_atomic(self.run_dir / "train_log.json", history)
        return control


def sft_dataset(cfg: Config, tokenizer=None, ds=None):
    """Prompt/completion rows for SFT (TRL trains on the completion only) from GSM8K rows ``ds``."""
    if ds is None:
        ds = load_gsm8k(cfg.data_source, split="train", n=cfg.sft.n_train, generator=cfg.generator)

    def to_pc(row):
        return {"prompt": format_prompt(row["question"], tokenizer, chat=cfg.chat),
                "completion": format_completion(row["answer"])}

    return ds.map(to_pc, remove_columns=ds.column_names)


def _device(cfg: Config) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


@dataclasses.dataclass
class _Job:
    """What one method contributes to ``_train_scheduled``: its starting model, data and trainer."""

    model: object
    tokenizer: object
    manifest: dict  # method-specific manifest fields (start model, data hashes)
    make_trainer: Callable  # (common TrainingArguments kwargs, callbacks) -> a TRL trainer
    metrics: tuple[str, ...] = ()


def _train_scheduled(cfg: Config, method: str, prepare: Callable[[str], _Job]) -> Path:
    """The one driver of all three trainers: lock, skip if done, export step 0, resume, train, tidy.

    Args:
        cfg: the run's config; ``getattr(cfg, method)`` holds the method's knobs.
        method: ``"sft"``, ``"dpo"`` or ``"grpo"``.
        prepare: called with the device only when training is needed; loads the starting model and
            builds the data (so a finished run returns at once).

    Returns:
        The run directory.
    """
    rdir = run_dir(cfg, method)
    knobs = getattr(cfg, method)
    steps = schedule_steps(knobs.max_steps, knobs.schedule)
    rank, world = _distributed()
    if rank == 0:
        cache.ensure_writable(rdir.parent)
    # under `accelerate launch` every process runs this; a file lock held by one would block the
    # others' process-group rendezvous, so a distributed run relies on being launched once
    with cache.build_lock(rdir) if world == 1 else contextlib.nullcontext():
        done = dict(list_checkpoints(rdir))
        if all(s in done for s in steps):
            logger.info("%s run complete: %s", method.upper(), rdir)
            return rdir
        missing = [s for s in steps if s not in done and s <= max(done, default=0)]
        if missing:  # damaged or deleted after a later one was written: retrain to rebuild them
            logger.warning("%s run %s lacks complete checkpoints %s: rebuilding", method.upper(), rdir, missing)
        device = _device(cfg)
        job = prepare(device)
        base_manifest = dict(
            job.manifest, kind=method, run_key=run_key(cfg, method), config_hash=cache.hash_obj(knobs),
            max_steps=knobs.max_steps, schedule=steps, **{method: dataclasses.asdict(knobs)},
        )
        t0 = time.time()
        if 0 not in done and rank == 0:
            _export(job.model, job.tokenizer, checkpoint_dir(rdir, 0),
                    dict(base_manifest, step=0, fraction=0.0, train_loss=None, wall_time_s=0.0))
        resume = _resume_point(rdir, done if not missing else {})
        if resume is not None:
            logger.info("resuming %s from %s", method.upper(), resume)
        common = dict(
            output_dir=str(rdir / "trainer"),
            max_steps=knobs.max_steps,
            per_device_train_batch_size=knobs.batch_size,
            learning_rate=knobs.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, round(knobs.warmup_ratio * knobs.max_steps)),
            weight_decay=knobs.weight_decay,
            logging_steps=max(1, knobs.max_steps // 50),
            save_strategy="no",  # the schedule callback decides
            save_total_limit=2,
            report_to="none",
            bf16=cfg.dtype == "bfloat16",
            use_cpu=device == "cpu",
            dataloader_pin_memory=False,
            activation_checkpointing=False,
            seed=knobs.seed,
        )
        callback = _ScheduleCallback(rdir, steps, job.tokenizer, base_manifest, t0, job.metrics)
        trainer = job.make_trainer(common, [callback])
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if rank == 0:
            shutil.rmtree(rdir / "trainer", ignore_errors=True)  # resume state no longer needed
        logger.info("%s run finished in %.0f s: %s", method.upper(), time.time() - t0, rdir)
        return rdir


def _distributed() -> tuple[int, int]:
    """(rank, world size) of this process under ``accelerate launch`` / torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train_sft(cfg: Config) -> Path:
    """Fine-tune the base with TRL's SFTTrainer on the schedule; return the run directory.

    Idempotent: a finished run returns at once; an interrupted one resumes from its last complete
    checkpoint (weights, optimizer and RNG state restored by the trainer).
    """
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    def prepare(device: str) -> _Job:
        base_path = ensure_base(cfg)
        model, tokenizer = load_model(base_path, dtype=cfg.dtype, device=device)
        rows = load_gsm8k(cfg.data_source, split="train", n=cfg.sft.n_train, generator=cfg.generator)
        train_ds = sft_dataset(cfg, tokenizer, rows)

        def make_trainer(common: dict, callbacks: list) -> SFTTrainer:
            args = TRLSFTConfig(**common, max_length=cfg.sft.max_length, completion_only_loss=True)
            return SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                              callbacks=callbacks)

        return _Job(model, tokenizer, {"base": str(base_path), "data_hash": dataset_hash(rows)}, make_trainer)

    return _train_scheduled(cfg, "sft", prepare)


def _check_post_training(cfg: Config, method: str) -> None:
    """Reject bad DPO/GRPO knobs before anything is built, naming the offending value."""
    knobs = getattr(cfg, method)
    if knobs.init not in INITS:
        raise ValueError(f"{method}.init must be one of {INITS}, got {knobs.init!r}")
    schedule_steps(knobs.max_steps, knobs.schedule)
    if knobs.batch_size < 1:
        raise ValueError(f"{method}.batch_size must be >= 1, got {knobs.batch_size}")
    if method == "dpo":
        if knobs.n_pairs < 1:
            raise ValueError(f"dpo.n_pairs must be >= 1 (DPO needs preference pairs), got {knobs.n_pairs}")
        if knobs.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {knobs.beta}")
        if not 0.0 <= knobs.wrong_final_share <= 1.0:
            raise ValueError(f"dpo.wrong_final_share must lie in [0, 1], got {knobs.wrong_final_share}")
        if knobs.rejected not in ("corrupt", "sampled"):
            raise ValueError(f"dpo.rejected must be 'corrupt' or 'sampled', got {knobs.rejected!r}")
        if knobs.rejected == "sampled" and (knobs.n_samples < 1 or knobs.sample_temperature <= 0):
            raise ValueError(f"dpo.rejected='sampled' needs n_samples >= 1 and sample_temperature > 0, got "
                             f"{knobs.n_samples} and {knobs.sample_temperature}")
    else:
        if knobs.n_prompts < 1:
            raise ValueError(f"grpo.n_prompts must be >= 1 (GRPO needs prompts), got {knobs.n_prompts}")
        if knobs.num_generations < 2:
            raise ValueError(f"grpo.num_generations must be >= 2 (advantages compare completions within a group), "
                             f"got {knobs.num_generations}")
        if knobs.batch_size % knobs.num_generations:
            raise ValueError(f"grpo.batch_size ({knobs.batch_size}) must be divisible by grpo.num_generations "
                             f"({knobs.num_generations}): each step takes whole groups of completions")
        if knobs.beta < 0:
            raise ValueError(f"grpo.beta must be >= 0, got {knobs.beta}")
        if knobs.max_completion_length < 1:
            raise ValueError(f"grpo.max_completion_length must be >= 1, got {knobs.max_completion_length}")


def init_checkpoint(cfg: Config, method: str) -> Path:
    """The model a DPO/GRPO run starts from: the final SFT checkpoint (trained if missing) or the base."""
    knobs = getattr(cfg, method)
    if knobs.init == "base":
        return ensure_base(cfg)
    return list_checkpoints(train_sft(cfg))[-1][1]


def _post_training_rows(cfg: Config, n: int) -> datasets.Dataset:
    """Train-split rows for DPO/GRPO: a generator stream of their own, or the first ``n`` rows of a file."""
    return load_gsm8k(cfg.data_source, split="train", n=n, generator=cfg.generator, stream=POST_TRAINING_STREAM)


def _start(cfg: Config, method: str, device: str):
    init_path = init_checkpoint(cfg, method)
    model, tokenizer = load_model(init_path, dtype=cfg.dtype, device=device)
    # TRL rebuilds a GRPO reference (beta > 0) from this path: it must be the init, unchanged on disk
    model.config._name_or_path = str(init_path)
    manifest = {"init": str(init_path), "init_weights_hash": cache.weights_hash(init_path)}
    if getattr(cfg, method).init == "sft":
        manifest["sft_key"] = sft_key(cfg)
    return model, tokenizer, manifest


def dpo_dataset(cfg: Config, tokenizer=None, rows=None, model=None) -> datasets.Dataset:
    """Preference pairs (prompt, chosen, rejected) for DPO from ``_post_training_rows``.

    With ``cfg.dpo.rejected == "sampled"`` (the real path's default) ``model`` (the init) samples
    the rejected solutions: see ``sampled_preference_pairs``.
    """
    rows = rows if rows is not None else _post_training_rows(cfg, cfg.dpo.n_pairs)
    pairs = preference_pairs(rows, seed=cfg.dpo.seed, tokenizer=tokenizer, chat=cfg.chat,
                             p_final=cfg.dpo.wrong_final_share)
    if cfg.dpo.rejected == "sampled":
        if model is None:
            raise ValueError("dpo.rejected='sampled' needs the init model to sample rejected solutions")
        pairs = sampled_preference_pairs(model, tokenizer, rows, pairs, cfg)
    return datasets.Dataset.from_list(pairs)


def sampled_preference_pairs(model, tokenizer, rows, fallback: list[dict], cfg: Config) -> list[dict]:
    """Replace each pair's rejected solution by the model's own wrong answer, where it makes one.

    For every row the model samples ``cfg.dpo.n_samples`` solutions at ``cfg.dpo.sample_temperature``
    (cut like evaluation cuts them); the first whose extracted answer is a number other than the
    gold one becomes the rejected solution. Rows where every sample is right (or none has a
    number) keep the ``fallback`` pair (the gold solution made wrong). How many pairs were sampled
    is logged.

    Returns:
        ``[{"prompt", "chosen", "rejected", "rejected_source"}]`` with ``rejected_source`` in
        ``{"sampled", "corrupt"}``.
    """
    from alignkit.evaluate import generate

    k = cfg.dpo.n_samples
    outs = generate(model, tokenizer, [p["prompt"] for p in fallback], cfg.eval.max_new_tokens, cfg.eval.batch_size,
                    cfg.eval.stop, desc="sample rejected", num_samples=k, temperature=cfg.dpo.sample_temperature,
                    seed=cfg.dpo.seed)
    pairs = []
    for i, (row, pair) in enumerate(zip(rows, fallback)):
        gold = normalize_number(str(row["final_answer"]))
        wrong = [o for o in outs[i * k : (i + 1) * k] if o.strip() and extract_answer(o) not in (None, gold)]
        if wrong:
            pairs.append(dict(pair, rejected=format_completion(wrong[0]), rejected_source="sampled"))
        else:
            pairs.append(dict(pair, rejected_source="corrupt"))
    n = sum(p["rejected_source"] == "sampled" for p in pairs)
    logger.info("DPO pairs: %d of %d rejected solutions sampled from the model, %d corrupted gold", n, len(pairs),
                len(pairs) - n)
    return pairs


def train_dpo(cfg: Config) -> Path:
    """Direct preference optimisation with TRL's DPOTrainer on generated pairs; return the run directory.

    Pairs: chosen = the gold solution, rejected = the same solution with one arithmetic slip carried
    through later steps, or with a wrong ``#### N`` line (``preference_pairs``). The reference is a
    frozen copy of the init (``cfg.dpo.init``). Same schedule, manifests, idempotence and resume as
    ``train_sft``.
    """
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    _check_post_training(cfg, "dpo")

    def prepare(device: str) -> _Job:
        model, tokenizer, manifest = _start(cfg, "dpo", device)
        rows = _post_training_rows(cfg, cfg.dpo.n_pairs)
        train_ds = dpo_dataset(cfg, tokenizer, rows, model=model)
        manifest.update(data_hash=dataset_hash(rows), pairs_hash=cache.hash_obj(train_ds.to_list()))
        if "rejected_source" in train_ds.column_names:
            manifest["n_sampled_rejected"] = sum(s == "sampled" for s in train_ds["rejected_source"])
            train_ds = train_ds.remove_columns("rejected_source")

        def make_trainer(common: dict, callbacks: list) -> DPOTrainer:
            args = TRLDPOConfig(**common, beta=cfg.dpo.beta, max_length=cfg.dpo.max_length)
            # an explicit frozen copy: with ref_model=None TRL reloads the reference from _name_or_path
            return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=train_ds,
                              processing_class=tokenizer, callbacks=callbacks)

        return _Job(model, tokenizer, manifest, make_trainer,
                    metrics=("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"))

    return _train_scheduled(cfg, "dpo", prepare)


# ----------------------------------------------------------------------------- GRPO rewards

def _completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):  # conversational
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def correctness_reward(completions: Sequence, final_answer: Sequence, stop: Sequence[str] = EvalConfig.stop,
                       **kwargs) -> list[float]:
    """1.0 where ``extract_answer`` of the completion (cut at ``stop``) equals the gold answer, else 0.0.

    Args:
        completions: ``[n]`` generated texts (or message lists), as TRL passes them.
        final_answer: ``[n]`` gold answers (the dataset column of that name, one per completion).
        stop: the evaluation's stop strings.
        **kwargs: other dataset columns and TRL arguments (ignored).

    Returns:
        ``[n]`` rewards.
    """
    from alignkit.evaluate import cut_at_stop

    if len(completions) != len(final_answer):
        raise ValueError(f"got {len(completions)} completions but {len(final_answer)} gold answers")
    out = []
    for c, gold in zip(completions, final_answer):
        g = normalize_number(str(gold))
        if g is None:
            raise ValueError(f"gold answer {gold!r} is not a number")
        pred = extract_answer(cut_at_stop(_completion_text(c), stop))
        out.append(1.0 if pred is not None and pred == g else 0.0)
    return out


def format_reward(completions: Sequence, stop: Sequence[str] = EvalConfig.stop, **kwargs) -> list[float]:
    """1.0 where the completion (cut at ``stop``) ends with a ``#### N`` line, else 0.0.

    Args:
        completions: ``[n]`` generated texts (or message lists).
        stop: the evaluation's stop strings.
        **kwargs: dataset columns and TRL arguments (ignored).

    Returns:
        ``[n]`` rewards (weighted by ``cfg.grpo.format_reward`` in training).
    """
    from alignkit.evaluate import cut_at_stop

    return [1.0 if has_final_line(cut_at_stop(_completion_text(c), stop)) else 0.0 for c in completions]


def _bind_stop(fn: Callable, stop: Sequence[str], name: str) -> Callable:
    """``fn`` with the run's stop strings, named ``name`` (TRL logs ``rewards/<name>/mean``)."""
    def bound(completions, **kwargs):
        return fn(completions, stop=tuple(stop), **kwargs)

    bound.__name__ = name
    return bound


def grpo_dataset(cfg: Config, tokenizer=None, rows=None) -> datasets.Dataset:
    """GRPO prompts with the gold answer as a column (``final_answer``) for the reward."""
    rows = rows if rows is not None else _post_training_rows(cfg, cfg.grpo.n_prompts)
    return datasets.Dataset.from_dict({
        "prompt": [format_prompt(q, tokenizer, chat=cfg.chat) for q in rows["question"]],
        "final_answer": list(rows["final_answer"]),
    })


def train_grpo(cfg: Config) -> Path:
    """Group relative policy optimisation with TRL's GRPOTrainer; return the run directory.

    Each step samples ``cfg.grpo.num_generations`` completions for each of
    ``batch_size / num_generations`` prompts at ``temperature``, scores them with
    ``correctness_reward + format_reward * cfg.grpo.format_reward`` and pushes the policy towards
    completions better than their group's mean, with a KL penalty ``beta`` to the init. Same
    schedule, manifests, idempotence and resume as ``train_sft``.
    """
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    _check_post_training(cfg, "grpo")
    g = cfg.grpo

    def prepare(device: str) -> _Job:
        model, tokenizer, manifest = _start(cfg, "grpo", device)
        rows = _post_training_rows(cfg, g.n_prompts)
        train_ds = grpo_dataset(cfg, tokenizer, rows)
        manifest.update(data_hash=dataset_hash(rows), stop=list(cfg.eval.stop))
        # looked up at call time, so a test can swap a reward in
        rewards = [_bind_stop(correctness_reward, cfg.eval.stop, "correctness_reward"),
                   _bind_stop(format_reward, cfg.eval.stop, "format_reward")]

        def make_trainer(common: dict, callbacks: list) -> GRPOTrainer:
            args = TRLGRPOConfig(
                **common, num_generations=g.num_generations, generation_batch_size=g.batch_size,
                max_completion_length=g.max_completion_length, beta=g.beta, temperature=g.temperature,
                reward_weights=[1.0, g.format_reward], log_completions=False,
            )
            # no ref_model argument: with beta > 0 TRL loads the reference from _name_or_path (the init dir)
            return GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=train_ds,
                               processing_class=tokenizer, callbacks=callbacks)

        return _Job(model, tokenizer, manifest, make_trainer,
                    metrics=("reward", "rewards/correctness_reward/mean", "rewards/format_reward/mean", "kl",
                             "completions/mean_length"))

    return _train_scheduled(cfg, "grpo", prepare)


TRAINERS = {"sft": train_sft, "dpo": train_dpo, "grpo": train_grpo}


def train(cfg: Config, method: str) -> Path:
    """Train (or find cached) the run of ``method`` and whatever it starts from; return its directory."""
    _check_method(method)
    return TRAINERS[method](cfg)

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
