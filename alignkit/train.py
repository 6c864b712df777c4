"""Post-training through TRL (SFT, DPO, GRPO): one driver, checkpoint schedule, manifests and
resume (docs/post-training.md); step 0 is the base (SFT) or the init (DPO, GRPO)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

import datasets
import torch
import trl
from accelerate import PartialState
from transformers import AutoConfig, TrainerCallback, TrainingArguments
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from alignkit import data, runs
from alignkit.config import Config, EvalConfig
from alignkit.evaluate import batched, end_tokens, generate
from alignkit.models import device_for, dims, load_model, pad_id, preflight, training_precision
from alignkit.runs import checkpoint_dir, list_checkpoints, run_dir, run_key
from alignkit.tiny import ensure_base

logger = logging.getLogger(__name__)

INITS = ("sft", "base")


class _ScheduleCallback(TrainerCallback):
    """Export the scheduled steps with the recent mean loss and ``metrics`` in their manifests."""

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
        history = {key: [(h["step"], h[key]) for h in state.log_history if key in h]
                   for key in ("loss",) + self.metrics}
        recent = {key: [v for s, v in hist if s > step - window] for key, hist in history.items()}
        means = {key: float(sum(v) / len(v)) if v else None for key, v in recent.items()}
        manifest = dict(self.base_manifest, step=step, fraction=step / state.max_steps,
                        train_loss=means.pop("loss"), wall_time_s=time.time() - self.t0)
        if self.metrics:
            manifest["metrics"] = means
        runs.export_checkpoint(model, self.tokenizer, checkpoint_dir(self.run_dir, step), manifest)
        runs.write_json_atomic(self.run_dir / "train_log.json", history)
        return control


class LossScaleCheck(TrainerCallback):
    """fp16 training (loss scaling): stop with an error when the scaler skipped most optimizer
    steps (gradients overflowed: reported for Qwen in fp16), checked once ``after`` steps have run
    and at every step after, or when training ended with the weights where they started."""

    def __init__(self, after: int = 20, most: float = 0.5):
        self.after, self.most = after, most
        self.steps = self.skipped = 0
        self.start: list[float] | None = None

    @staticmethod
    def _norms(model) -> list[float]:
        return [float(p.detach().double().norm()) for p in model.parameters() if p.requires_grad]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = self._norms(model)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.steps += 1
        self.skipped += bool(getattr(optimizer, "step_was_skipped", False))
        if self.steps >= self.after and self.skipped > self.most * self.steps:
            raise RuntimeError(
                f"fp16 training: the loss scaler skipped {self.skipped} of the first {self.steps} "
                "optimizer steps (gradients overflowed in fp16), so the weights barely move; train "
                "in precision=fp32, or bf16 on a GPU that has it (docs/real-path.md)")
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.start is not None and self.steps and self._norms(model) == self.start:
            raise RuntimeError(
                f"fp16 training: the weights did not move in {self.steps} steps ({self.skipped} "
                "skipped by the loss scaler); train in precision=fp32 or bf16")
        return control


def sft_dataset(cfg: Config, tokenizer=None, ds=None):
    """Prompt/completion rows for SFT (TRL trains on the completion only) from GSM8K rows ``ds``."""
    if ds is None:
        ds = data.load_gsm8k(cfg.data_source, "train", cfg.sft.n_train, cfg.generator)
    prompts = data.prompts_for(cfg, tokenizer, ds["question"])
    completions = [data.format_completion(a, cfg.chat) for a in ds["answer"]]
    return datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})


def checkpointing_argument(on: bool) -> dict[str, bool]:
    """TrainingArguments' activation-checkpointing switch under the installed transformers' name:
    ``activation_checkpointing`` from 5.23 (``gradient_checkpointing`` is its deprecated alias
    there), ``gradient_checkpointing`` before (5.17 takes no ``activation_checkpointing``)."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names
            else "gradient_checkpointing": on}


def batch_plan(method: str, batch_size: int, micro_batch_size: int, world: int) -> tuple[int, int]:
    """``(per-process micro-batch, accumulation steps)`` giving ``batch_size`` sequences per
    optimizer step over ``world`` processes; ValueError naming the knob when it does not divide."""
    if batch_size % world:
        raise ValueError(f"{method}.batch_size ({batch_size}) must be divisible by the number of "
                         f"processes ({world})")
    micro = micro_batch_size or batch_size // world
    if micro < 1 or (batch_size // world) % micro:
        raise ValueError(f"{method}.micro_batch_size ({micro_batch_size}) must divide the "
                         f"per-process batch {method}.batch_size / processes = "
                         f"{batch_size // world}")
    return micro, batch_size // world // micro


def generation_batch(batch_size: int, micro: int, world: int, num_generations: int) -> int:
    """GRPO's completions generated at once (all processes): the smallest multiple of
    ``micro * world`` holding whole groups that divides ``batch_size``; ValueError if none."""
    step = micro * world
    for n in range(step, batch_size + 1, step):
        if n % num_generations == 0 and batch_size % n == 0:
            return n
    raise ValueError(f"grpo.batch_size ({batch_size}) has no generation batch that is a multiple "
                     f"of micro_batch_size x processes ({step}) and of num_generations "
                     f"({num_generations})")


def memory_estimate(cfg: Config, method: str, model_config, world: int = 1,
                    precision: str = "bf16", micro: int | None = None) -> dict[str, float]:
    """Estimated peak GPU memory (GiB) of one training process by part, and their ``"total"``
    (the parts and margins: docs/real-path.md)."""
    c = dims(model_config)
    d, L, f, v = c["d"], c["layers"], c["ffn"], c["vocab"]
    heads, kv, hd = c["heads"], c["kv"], c["head_dim"]
    n_params = v * d * (1 if getattr(model_config, "tie_word_embeddings", False) else 2) + L * (
        d * hd * (heads * 2 + kv * 2) + 3 * d * f + 4 * d)
    k = getattr(cfg, method)
    micro, _ = batch_plan(method, k.batch_size, micro or k.micro_batch_size, world)
    act = 4 if precision == "fp32" else 2
    parts = {"weights, gradients, AdamW": 16 * n_params / GiB,
             "autocast copies": 0 if precision == "fp32" else 2 * n_params / GiB}
    if method != "grpo":  # DPO holds chosen and rejected
        seqs, length, logit_len = (2 if method == "dpo" else 1) * micro, k.max_length, k.max_length
    else:  # prompts taken as 256 tokens
        seqs, length, logit_len = micro, 256 + k.max_completion_length, k.max_completion_length
        gen = generation_batch(k.batch_size, micro, world, k.num_generations) // world
        parts["generation KV cache"] = gen * length * L * 2 * kv * hd * 4 / GiB
    if method == "dpo" or (method == "grpo" and k.beta > 0):
        parts["reference model"] = 4 * n_params / GiB
    tokens = seqs * length
    per_layer = tokens * (4 * d + act * (8 * d + 3 * f))
    checkpointing = cfg.gradient_checkpointing in (True, "auto")  # "auto" unresolved: counts as on
    parts["activations"] = (L * tokens * 4 * d + per_layer if checkpointing
                            else L * per_layer) / GiB
    parts["logits"] = seqs * logit_len * v * (act + 4 + 4) / GiB
    parts["total"] = 1.15 * sum(parts.values()) + 0.5
    return {key: round(val, 2) for key, val in parts.items()}


def fit_micro_batch(cfg: Config, method: str, model_config, world: int, precision: str,
                    have_gib: float) -> int:
    """``{method}.micro_batch_size`` when set, else the largest divisor of the per-process batch
    whose ``memory_estimate`` fits ``have_gib`` (1 when none fits)."""
    k = getattr(cfg, method)
    if k.micro_batch_size:
        return k.micro_batch_size
    share = batch_plan(method, k.batch_size, 0, world)[0]
    for micro in (m for m in range(share, 0, -1) if share % m == 0):
        if memory_estimate(cfg, method, model_config, world, precision, micro)["total"] <= have_gib:
            return micro
    return 1


GiB = 2**30
ROOM_WITHOUT_CHECKPOINTING = 0.7  # "auto" turns recomputation off only with this much headroom


def resolve_checkpointing(cfg: Config, method: str, model_config, world: int, precision: str,
                          have_gib: float | None) -> bool:
    """``cfg.gradient_checkpointing`` as a bool (ValueError unless true, false or ``"auto"``);
    ``"auto"`` (docs/real-path.md) is on for the CPU, ``have_gib=None``."""
    g = cfg.gradient_checkpointing
    if not (g is True or g is False or g == "auto"):
        raise ValueError(f"gradient_checkpointing must be true, false or 'auto', got {g!r}")
    if g != "auto":
        return g
    if have_gib is None:
        return True
    k = getattr(cfg, method)
    micro = k.micro_batch_size or batch_plan(method, k.batch_size, 0, world)[0]
    off = memory_estimate(dataclasses.replace(cfg, gradient_checkpointing=False), method,
                          model_config, world, precision, micro)
    return off["total"] > ROOM_WITHOUT_CHECKPOINTING * have_gib


def fit_plan(cfg: Config, method: str, model_config, world: int, precision: str,
             have_gib: float) -> tuple[int, bool, dict[str, float]]:
    """``(micro-batch, gradient checkpointing, memory_estimate at them)`` for a GPU of ``have_gib``:
    ``resolve_checkpointing``, then ``fit_micro_batch`` with that choice."""
    checkpointing = resolve_checkpointing(cfg, method, model_config, world, precision, have_gib)
    cfg = dataclasses.replace(cfg, gradient_checkpointing=checkpointing)
    micro = fit_micro_batch(cfg, method, model_config, world, precision, have_gib)
    return micro, checkpointing, memory_estimate(cfg, method, model_config, world, precision, micro)


def plan_memory(cfg: Config, method: str, model_path, device: torch.device, world: int,
                precision: str) -> tuple[int, bool]:
    """``(micro-batch, gradient checkpointing)`` of one process (``fit_plan`` against the GPU's
    free memory, ``torch.cuda.mem_get_info``; the CPU: the whole share); RuntimeError with the
    estimate when even micro-batch 1 does not fit. Runs before any sampling (DPO's rejections)."""
    k = getattr(cfg, method)
    if device.type != "cuda":
        return (batch_plan(method, k.batch_size, k.micro_batch_size, world)[0],
                resolve_checkpointing(cfg, method, None, world, precision, None))
    config = AutoConfig.from_pretrained(str(model_path))
    have, total = (x / GiB for x in torch.cuda.mem_get_info(device))  # what is free now counts
    micro, checkpointing, est = fit_plan(cfg, method, config, world, precision, have)
    if est["total"] > have:
        detail = ", ".join(f"{key} {val:g}" for key, val in est.items() if key != "total")
        raise RuntimeError(
            f"{method.upper()} needs an estimated {est['total']:.1f} GiB per GPU at micro-batch "
            f"{micro} ({detail}) but {torch.cuda.get_device_name(device)} has {have:.1f} GiB "
            f"free (of {total:.1f}): lower {method}.micro_batch_size or {method}.max_length / "
            "max_completion_length, set gradient_checkpointing=true, or free the GPU")
    logger.info("%s: micro-batch %d per process, gradient checkpointing %s, estimated peak %.1f "
                "GiB of %.1f", method.upper(), micro, "on" if checkpointing else "off",
                est["total"], have)
    return micro, checkpointing


@dataclasses.dataclass
class _Job:
    """What one method contributes to ``_train_scheduled``: its starting model, data and trainer."""

    model: object
    tokenizer: object
    manifest: dict  # method-specific manifest fields (start model, data hashes)
    make_trainer: Callable  # (common TrainingArguments kwargs, callbacks) -> a TRL trainer
    metrics: tuple[str, ...] = ()


def _train_scheduled(cfg: Config, method: str, start: Callable[[], Path],
                     prepare: Callable[[object, Path], _Job]) -> Path:
    """The one driver of the trainers: lock, skip if done, export step 0, resume, train, tidy."""
    rdir = run_dir(cfg, method)
    knobs = getattr(cfg, method)
    steps = runs.schedule_steps(knobs.max_steps, knobs.schedule)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # the process group first, with our timeout (NCCL's default is 10 minutes)
        PartialState(timeout=timedelta(minutes=cfg.dist_timeout_min))
    if rank == 0:
        runs.ensure_writable(rdir.parent)
    # no lock under `accelerate launch`: one process holding it would block the others' rendezvous
    with runs.build_lock(rdir) if world == 1 else contextlib.nullcontext():
        done = dict(list_checkpoints(rdir))
        if all(s in done for s in steps):
            logger.info("%s run complete: %s", method.upper(), rdir)
            return rdir
        runs.check_computable(f"the {method.upper()} run {rdir}")
        missing = [s for s in steps if done and s not in done and s <= max(done)]
        if missing:  # damaged or deleted after a later one was written: retrain to rebuild them
            logger.warning("%s run %s lacks complete checkpoints %s: rebuilding",
                           method.upper(), rdir, missing)
        device = device_for(cfg)
        precision = training_precision(cfg, device)
        start_path = start()  # the checkpoint training starts from (its config sizes the plan)
        # the memory plan before prepare(), where DPO may sample for minutes
        micro, checkpointing = plan_memory(cfg, method, start_path, device, world, precision)
        job = prepare(device, start_path)
        micro, accumulation = batch_plan(method, knobs.batch_size, micro, world)
        base_manifest = dict(job.manifest, kind=method, run_key=run_key(cfg, method),
                             config_hash=runs.hash_obj(knobs), max_steps=knobs.max_steps,
                             schedule=steps, **{method: dataclasses.asdict(knobs)})
        t0 = time.time()
        if 0 not in done and rank == 0:
            start = dict(base_manifest, step=0, fraction=0.0, train_loss=None, wall_time_s=0.0)
            runs.export_checkpoint(job.model, job.tokenizer, checkpoint_dir(rdir, 0), start)
        resume = _resume_point(rdir, done if not missing else {})
        if resume is not None:
            logger.info("resuming %s from %s", method.upper(), resume)
        common = dict(  # TrainingArguments of every method; the schedule callback decides saves
            output_dir=str(rdir / "trainer"), max_steps=knobs.max_steps, seed=knobs.seed,
            per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
            learning_rate=knobs.learning_rate, lr_scheduler_type="cosine",
            weight_decay=knobs.weight_decay,
            warmup_steps=max(1, round(knobs.warmup_ratio * knobs.max_steps)),
            logging_steps=max(1, knobs.max_steps // 50), save_strategy="no", save_total_limit=2,
            report_to="none", bf16=precision == "bf16", fp16=precision == "fp16",
            use_cpu=device.type == "cpu", dataloader_pin_memory=False,
            ddp_timeout=cfg.dist_timeout_min * 60, **checkpointing_argument(checkpointing))
        callback = _ScheduleCallback(rdir, steps, job.tokenizer, base_manifest, t0, job.metrics)
        checks = [LossScaleCheck()] if precision == "fp16" else []
        trainer = job.make_trainer(common, [callback, *checks])
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if rank == 0:
            shutil.rmtree(rdir / "trainer", ignore_errors=True)  # resume state no longer needed
        logger.info("%s run finished in %.0f s: %s", method.upper(), time.time() - t0, rdir)
        return rdir


def _resume_point(run_dir: Path, done: dict[int, Path]) -> Path | None:
    """The newest trainer state with a complete exported checkpoint; drop newer, unmatched ones."""
    best = None
    states = (run_dir / "trainer").glob("checkpoint-*")  # nothing when the directory is missing
    for d in sorted(states, key=lambda p: int(p.name.split("-")[1])):
        if int(d.name.split("-")[1]) in done and (d / "trainer_state.json").is_file():
            best = d
        else:
            shutil.rmtree(d, ignore_errors=True)
    return best


def train_sft(cfg: Config) -> Path:
    """Fine-tune the base with TRL's SFTTrainer on the schedule (resumable); the run directory."""

    def start() -> Path:
        base_path = ensure_base(cfg)
        preflight(base_path, cfg.chat)
        return base_path

    def prepare(device: str, base_path: Path) -> _Job:
        model, tokenizer = load_model(base_path, dtype="float32", device=device)  # fp32 master
        rows = data.load_gsm8k(cfg.data_source, "train", cfg.sft.n_train, cfg.generator)
        train_ds = sft_dataset(cfg, tokenizer, rows)

        def make_trainer(common: dict, callbacks: list) -> SFTTrainer:
            args = trl.SFTConfig(**common, max_length=cfg.sft.max_length, completion_only_loss=True)
            return SFTTrainer(model=model, args=args, train_dataset=train_ds,
                              processing_class=tokenizer, callbacks=callbacks)

        manifest = {"base": str(base_path), "data_hash": data.dataset_hash(rows)}
        return _Job(model, tokenizer, manifest, make_trainer)

    return _train_scheduled(cfg, "sft", start, prepare)


def _check_post_training(cfg: Config, method: str) -> None:
    """Reject bad DPO/GRPO knobs before anything is built, naming the offending value."""
    k = getattr(cfg, method)
    if k.init not in INITS:
        raise ValueError(f"{method}.init must be one of {INITS}, got {k.init!r}")
    runs.schedule_steps(k.max_steps, k.schedule)
    if k.batch_size < 1:
        raise ValueError(f"{method}.batch_size must be >= 1, got {k.batch_size}")
    if method == "grpo":
        if k.n_prompts < 1:
            raise ValueError(f"grpo.n_prompts must be >= 1 (GRPO needs prompts), got {k.n_prompts}")
        if k.num_generations < 2:
            raise ValueError("grpo.num_generations must be >= 2 (advantages compare completions "
                             f"within a group), got {k.num_generations}")
        if k.batch_size % k.num_generations:
            raise ValueError(f"grpo.batch_size ({k.batch_size}) must be divisible by "
                             f"grpo.num_generations ({k.num_generations}): each step takes "
                             "whole groups of completions")
        if k.beta < 0:
            raise ValueError(f"grpo.beta must be >= 0, got {k.beta}")
        if k.max_completion_length < 1:
            raise ValueError(
                f"grpo.max_completion_length must be >= 1, got {k.max_completion_length}")
        return
    if k.n_pairs < 1:
        raise ValueError(f"dpo.n_pairs must be >= 1 (DPO needs preference pairs), got {k.n_pairs}")
    if k.beta <= 0:
        raise ValueError(f"dpo.beta must be > 0, got {k.beta}")
    if not 0.0 <= k.wrong_final_share <= 1.0:
        raise ValueError(f"dpo.wrong_final_share must lie in [0, 1], got {k.wrong_final_share}")
    if k.rejected not in ("corrupt", "sampled"):
        raise ValueError(f"dpo.rejected must be 'corrupt' or 'sampled', got {k.rejected!r}")
    if k.rejected == "sampled" and (k.n_samples < 1 or k.sample_temperature <= 0):
        raise ValueError("dpo.rejected='sampled' needs n_samples >= 1 and sample_temperature > 0, "
                         f"got {k.n_samples} and {k.sample_temperature}")


def init_checkpoint(cfg: Config, method: str) -> Path:
    """Where a DPO/GRPO run starts: the base or the final SFT checkpoint (trained if missing)."""
    if getattr(cfg, method).init == "base":
        return ensure_base(cfg)
    return list_checkpoints(train_sft(cfg))[-1][1]


def _post_training_rows(cfg: Config, n: int) -> datasets.Dataset:
    """Train-split rows for DPO/GRPO: a generator stream of their own, or a file's first ``n``."""
    return data.load_gsm8k(cfg.data_source, "train", n, cfg.generator, data.POST_TRAINING_STREAM)


def _start(cfg: Config, method: str, device: str, init_path: Path):
    model, tokenizer = load_model(init_path, dtype="float32", device=device)  # fp32 master
    # TRL rebuilds a GRPO reference (beta > 0) from this path: it must be the unchanged init
    model.config._name_or_path = str(init_path)
    manifest = {"init": str(init_path), "init_weights_hash": runs.weights_hash(init_path)}
    if getattr(cfg, method).init == "sft":
        manifest["sft_key"] = run_key(cfg, "sft")
    return model, tokenizer, manifest


def dpo_dataset(cfg: Config, tokenizer=None, rows=None, model=None,
                cache_dir: Path | None = None, model_hash: str = "") -> datasets.Dataset:
    """DPO pairs (prompt, chosen, rejected) from ``_post_training_rows``; with ``cfg.dpo.rejected ==
    "sampled"`` ``model`` (the init) samples the rejected ones (``sampled_preference_pairs``)."""
    rows = rows if rows is not None else _post_training_rows(cfg, cfg.dpo.n_pairs)
    pairs = data.preference_pairs(rows, seed=cfg.dpo.seed, tokenizer=tokenizer, chat=cfg.chat,
                                  p_final=cfg.dpo.wrong_final_share)
    if cfg.dpo.rejected == "sampled" and model is None:
        raise ValueError("dpo.rejected='sampled' needs the init model to sample rejected solutions")
    if cfg.dpo.rejected == "sampled":
        pairs = sampled_preference_pairs(model, tokenizer, rows, pairs, cfg, cache_dir, model_hash)
    return datasets.Dataset.from_list(pairs)


def sharded(items: list, compute: Callable[[list], list]) -> list:
    """``compute(items)`` split across the processes of a multi-process launch: each computes its
    contiguous share (``compute`` returns a list per share, in order), gathered once, so every
    process gets the whole result in ``items``' order; one process: ``compute(items)``. No
    process waits in a collective while another does all the work (DPO's sampling)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return compute(list(items))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    bounds = [len(items) * r // world for r in range(world + 1)]
    mine = compute(list(items[bounds[rank]: bounds[rank + 1]]))
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return [x for part in parts for x in part]


def sampled_preference_pairs(model, tokenizer, rows, fallback: list[dict], cfg: Config,
                             cache_dir: Path | None = None, model_hash: str = "") -> list[dict]:
    """``fallback`` with the model's own wrong answer as the rejected solution where one of its
    ``cfg.dpo.n_samples`` samples has one; each pair gains ``rejected_source``: "sampled" or
    "corrupt". ``cache_dir``: samples cached there (``runs.cached``, keyed by ``model_hash``)."""
    k = cfg.dpo.n_samples
    prompts = [p["prompt"] for p in fallback]

    def sample(share: list[str]) -> list[str]:  # k completions per prompt, prompt by prompt
        if not share:
            return []
        return batched(cfg, model, len(share), lambda b: generate(
            model, tokenizer, share, cfg.eval.max_new_tokens, b, cfg.eval.stop,
            desc="sample rejected", num_samples=k, temperature=cfg.dpo.sample_temperature,
            seed=cfg.dpo.seed), per_prompt=k)[0]

    def cached_sample(share: list[str]) -> list[str]:  # one process: the whole list, as before
        key = {"prompts": share, "weights": model_hash, "k": k, "t": cfg.dpo.sample_temperature,
               "seed": cfg.dpo.seed, "eval": [cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                               list(cfg.eval.stop)]}
        return runs.cached(Path(cache_dir) / f"sampled-{runs.hash_obj(key)}", key,
                           lambda: sample(share))

    outs = sharded(prompts, sample if cache_dir is None else cached_sample)
    pairs = []
    for i, (row, pair) in enumerate(zip(rows, fallback)):
        gold = data.normalize_number(str(row["final_answer"]))
        wrong = [o for o in outs[i * k : (i + 1) * k]
                 if o.strip() and data.extract_answer(o) not in (None, gold)]
        if wrong:
            pair = dict(pair, rejected=data.format_completion(wrong[0], cfg.chat))
        pairs.append(dict(pair, rejected_source="sampled" if wrong else "corrupt"))
    n = sum(p["rejected_source"] == "sampled" for p in pairs)
    logger.info("DPO pairs: %d of %d rejected solutions sampled from the model, %d corrupted gold",
                n, len(pairs), len(pairs) - n)
    return pairs


def train_dpo(cfg: Config) -> Path:
    """DPO (TRL's DPOTrainer) on ``dpo_dataset`` against a frozen copy of the init, else as SFT."""
    _check_post_training(cfg, "dpo")

    def prepare(device: str, init_path: Path) -> _Job:
        model, tokenizer, manifest = _start(cfg, "dpo", device, init_path)
        rows = _post_training_rows(cfg, cfg.dpo.n_pairs)
        train_ds = dpo_dataset(cfg, tokenizer, rows, model=model, cache_dir=run_dir(cfg, "dpo"),
                               model_hash=manifest["init_weights_hash"])
        manifest.update(data_hash=data.dataset_hash(rows),
                        pairs_hash=runs.hash_obj(train_ds.to_list()))
        if "rejected_source" in train_ds.column_names:
            manifest["n_sampled_rejected"] = list(train_ds["rejected_source"]).count("sampled")
            train_ds = train_ds.remove_columns("rejected_source")

        def make_trainer(common: dict, callbacks: list) -> DPOTrainer:
            args = trl.DPOConfig(**common, beta=cfg.dpo.beta, max_length=cfg.dpo.max_length)
            return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                              train_dataset=train_ds, processing_class=tokenizer,
                              callbacks=callbacks)

        metrics = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
        return _Job(model, tokenizer, manifest, make_trainer, metrics)

    return _train_scheduled(cfg, "dpo", lambda: init_checkpoint(cfg, "dpo"), prepare)


def _completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))  # conversational: the last message
    raise TypeError("a completion must be a string or a list of messages, "
                    f"got {type(completion).__name__}")


def correctness_reward(completions: Sequence, final_answer: Sequence,
                       stop: Sequence[str] = EvalConfig.stop, **kwargs) -> list[float]:
    """``[n]`` rewards: 1.0 where ``extract_answer`` of the completion (a text or messages, cut at
    ``stop``) equals the gold ``final_answer``, else 0.0; other TRL arguments are ignored."""
    if len(completions) != len(final_answer):
        raise ValueError(f"got {len(completions)} completions but {len(final_answer)} gold answers")
    out = []
    for c, gold in zip(completions, final_answer):
        g = data.normalize_number(str(gold))
        if g is None:
            raise ValueError(f"gold answer {gold!r} is not a number")
        pred = data.extract_answer(data.cut_at_stop(_completion_text(c), stop))
        out.append(1.0 if pred is not None and pred == g else 0.0)
    return out


def format_reward(completions: Sequence, stop: Sequence[str] = EvalConfig.stop,
                  **kwargs) -> list[float]:
    """``[n]`` rewards: 1.0 where the completion (cut at ``stop``) ends with a ``#### N`` line."""
    return [1.0 if data.has_final_line(data.cut_at_stop(_completion_text(c), stop)) else 0.0
            for c in completions]


def cut_rollouts(model, tokenizer, stop: Sequence[str]) -> dict:
    """Make GRPO's rollouts end where evaluation's completions do; returns GRPOConfig's
    ``generation_kwargs``. The model's generation config lists every ``end_tokens`` id and the
    pad token (TRL masks the loss after the first of its end ids, so the pad filling a row that
    stopped early is masked too); ``stop`` goes to generate as ``stop_strings``, with the
    tokenizer they need bound to ``model.generate`` (TRL calls it without one). A completion cut
    by a stop string ends with that string's tokens, as evaluation's generate returns them."""
    ends = end_tokens(model, tokenizer)
    model.generation_config.eos_token_id = ends + [p for p in [pad_id(tokenizer)] if p not in ends]
    if not stop:
        return {}
    model.generate = functools.partial(type(model).generate, model, tokenizer=tokenizer)
    return {"stop_strings": list(stop)}


def _bind_stop(fn: Callable, stop: Sequence[str], name: str) -> Callable:
    """``fn`` with the run's stop strings, named ``name`` (TRL logs ``rewards/<name>/mean``)."""
    def bound(completions, **kwargs):
        return fn(completions, stop=tuple(stop), **kwargs)

    bound.__name__ = name
    return bound


def grpo_dataset(cfg: Config, tokenizer=None, rows=None) -> datasets.Dataset:
    """GRPO prompts with the gold answer as a column (``final_answer``) for the reward."""
    rows = rows if rows is not None else _post_training_rows(cfg, cfg.grpo.n_prompts)
    prompts = data.prompts_for(cfg, tokenizer, rows["question"])
    answers = list(rows["final_answer"])
    return datasets.Dataset.from_dict({"prompt": prompts, "final_answer": answers})


def train_grpo(cfg: Config) -> Path:
    """GRPO (TRL's GRPOTrainer) with ``correctness_reward`` + ``cfg.grpo.format_reward`` *
    ``format_reward`` and a KL penalty ``beta`` to the init, otherwise as ``train_sft``."""
    _check_post_training(cfg, "grpo")
    g = cfg.grpo

    def prepare(device: str, init_path: Path) -> _Job:
        model, tokenizer, manifest = _start(cfg, "grpo", device, init_path)
        rows = _post_training_rows(cfg, g.n_prompts)
        train_ds = grpo_dataset(cfg, tokenizer, rows)
        manifest.update(data_hash=data.dataset_hash(rows), stop=list(cfg.eval.stop))
        # looked up at call time, so a test can swap a reward in
        rewards = [_bind_stop(correctness_reward, cfg.eval.stop, "correctness_reward"),
                   _bind_stop(format_reward, cfg.eval.stop, "format_reward")]

        def make_trainer(common: dict, callbacks: list) -> GRPOTrainer:
            gen = generation_batch(g.batch_size, common["per_device_train_batch_size"],
                                   int(os.environ.get("WORLD_SIZE", 1)), g.num_generations)
            args = trl.GRPOConfig(
                **common, num_generations=g.num_generations, generation_batch_size=gen,
                max_completion_length=g.max_completion_length, beta=g.beta, log_completions=False,
                temperature=g.temperature, reward_weights=[1.0, g.format_reward],
                generation_kwargs=cut_rollouts(model, tokenizer, cfg.eval.stop))
            return GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=train_ds,
                               processing_class=tokenizer, callbacks=callbacks)

        metrics = ("reward", "rewards/correctness_reward/mean", "rewards/format_reward/mean", "kl",
                   "completions/mean_length")
        return _Job(model, tokenizer, manifest, make_trainer, metrics)

    return _train_scheduled(cfg, "grpo", lambda: init_checkpoint(cfg, "grpo"), prepare)


TRAINERS = {"sft": train_sft, "dpo": train_dpo, "grpo": train_grpo}


def train(cfg: Config, method: str) -> Path:
    """Train (or find cached) the run of ``method`` and whatever it starts from; its directory."""
    runs.check_method(method)
    return TRAINERS[method](cfg)
