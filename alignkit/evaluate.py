"""Generation, accuracy, answer log-prob and flip examples, cached per checkpoint.

"Answer log-prob" is defined once, here: the teacher-forced log-probability (natural log, summed
over tokens) of the gold final answer's tokens, given the prompt and the gold solution up to and
including ``"#### "``. Patching measures its change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit import runs
from alignkit.config import Config
from alignkit.data import (
    cut_at_stop,
    dataset_hash,
    eval_set,
    extract_answer,
    format_completion,
    prompts_for,
    split_solution,
)
from alignkit.models import (
    analysis_dtype,
    decoder,
    dims,
    head_logits,
    input_device,
    load_model,
    part,
    placement,
)

logger = logging.getLogger(__name__)


def end_tokens(model, tokenizer) -> list[int]:
    """The ids that end a completion: the model's own (``generation_config.eos_token_id``, e.g.
    Qwen3's ``<|im_end|>`` and ``<|endoftext|>``) and the tokenizer's end-of-sequence token."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


GiB = 2**30
MAX_EVAL_BATCH = 256  # beyond this a 0.6B model's decoding step grows and stragglers cost more
CPU_EVAL_BATCH = 64


def eval_memory(model_config, prompt_tokens: int, new_tokens: int, bytes_per_value: int,
                num_samples: int = 1) -> float:
    """Estimated GPU memory (bytes) that one prompt adds to a batch of ``generate`` and
    ``answer_logprob``: the key-value cache of ``num_samples`` sequences at the length limit, the
    prefill's and scoring's layer activations, decoding's float32 next-token logits (with the
    processors' copies) and scoring's ``[answer rows, vocab]`` slice (16 rows, model dtype plus
    its float64 log-softmax). Conservative: the parts are added, not overlapped."""
    c = dims(model_config)
    d, L, f, v, kv, hd = c["d"], c["layers"], c["ffn"], c["vocab"], c["kv"], c["head_dim"]
    length = prompt_tokens + new_tokens
    cache = num_samples * length * L * 2 * kv * hd * bytes_per_value
    layer = length * (4 * d + 3 * f) * bytes_per_value * max(1, num_samples)
    logits = num_samples * 3 * v * 4 + 16 * v * (bytes_per_value + 16)
    return float(cache + layer + logits)


def fit_eval_batch(cfg: Config, model, tokenizer, prompts: Sequence[str],
                   num_samples: int = 1) -> int:
    """The evaluation batch: ``cfg.eval.batch_size`` when set (> 0); else (0) on the CPU 64, and on
    a GPU the most prompts (at most ``MAX_EVAL_BATCH``) whose ``eval_memory`` at the longest
    prompt fits the device's free memory with 15 % and 1 GiB to spare, evened out over the
    batches (1,319 problems at a cap of 256: 6 batches of 220, not 5 of 256 and one of 39)."""
    if cfg.eval.batch_size > 0:
        return cfg.eval.batch_size
    if cfg.eval.batch_size < 0:
        raise ValueError(f"eval.batch_size must be >= 0 (0: fit the GPU), got "
                         f"{cfg.eval.batch_size}")
    n = len(prompts)
    if n == 0:
        raise ValueError("fit_eval_batch needs at least one prompt, got none")
    device = input_device(model)
    if device.type != "cuda":
        cap = CPU_EVAL_BATCH
    else:
        longest = max(len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)[
            "input_ids"])
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        per = eval_memory(model.config, longest, cfg.eval.max_new_tokens,
                          next(model.parameters()).element_size(), num_samples)
        cap = int(min(MAX_EVAL_BATCH, max(1.0, (free - GiB) / (1.15 * per))))
        logger.info("evaluation batch: up to %d prompts (%.2f GiB each at %d + %d tokens, %.1f "
                    "GiB free on %s)", cap, per / GiB, longest, cfg.eval.max_new_tokens,
                    free / GiB, device)
    n_batches = -(-n // cap)
    return max(1, -(-n // n_batches))


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128,
             batch_size: int = 32, stop: Sequence[str] = ("\nQuestion:",), desc: str = "generate",
             num_samples: int = 1, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Completions of ``prompts`` (batched, left padding), cut at the first stop string. Decoding
    of a sequence ends at the model's end tokens (``end_tokens``) or once it holds a stop string,
    so a batch runs only as long as its longest answer. Greedy, or with ``temperature > 0``
    ``num_samples`` samples per prompt, prompt-major (sample ``j`` of prompt ``i`` at
    ``i * num_samples + j``), reproducible for one seed, batch size and device."""
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt, got an empty list")
    if temperature < 0 or (temperature == 0 and num_samples != 1) or num_samples < 1:
        raise ValueError(f"greedy decoding gives one completion per prompt; got num_samples="
                         f"{num_samples} with temperature={temperature} (use temperature > 0 to "
                         "sample several)")
    sampling = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
        "num_return_sequences": num_samples}
    if stop:
        sampling.update(stop_strings=list(stop), tokenizer=tokenizer)
    if temperature > 0:
        torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = input_device(model)
    outs: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=end_tokens(model, tokenizer), **sampling)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :],
                                           skip_special_tokens=True)
            outs.extend(cut_at_stop(t, stop) for t in texts)
    finally:
        tokenizer.padding_side = side
    return outs


def answer_spans(tokenizer, prompts: Sequence[str], answers: Sequence[str],
                 chat: bool = False) -> list[dict]:
    """Per example, ``input_ids`` of prompt + gold solution (``format_completion``) and
    ``answer_positions``, the indices of the tokens that overlap the final answer's characters: a
    piece that holds the answer and text before it (Qwen's ``" -"`` of ``"#### -10"``) belongs to
    the answer, so every answer is located whatever the tokenizer's splits."""
    out = []
    for k, (prompt, answer) in enumerate(zip(prompts, answers)):
        prefix, final = split_solution(answer)
        if not final:
            raise ValueError(f"example {k}: the gold solution has nothing after '####'")
        text_prefix = prompt + format_completion(prefix, chat) + prefix[len(prefix.rstrip()):]
        text = text_prefix + final
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start, end = len(text_prefix), len(text)
        pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
        if not pos or pos[0] == 0:
            raise ValueError(f"example {k}: no token of the gold answer {final!r} follows the "
                             "prompt (is the tokenizer's offset mapping broken?)")
        out.append({"input_ids": enc["input_ids"], "answer_positions": pos})
    return out


@torch.no_grad()
def answer_logprob(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = 32, chat: bool = False) -> np.ndarray:
    """Teacher-forced log P(gold final answer | prompt + gold solution up to "#### "), summed over
    the answer's tokens (``answer_spans``): ``[n_examples]`` float64. The LM head runs only on the
    rows that predict answer tokens, so memory beyond the decoder is one ``[rows, vocab]`` slice
    (never ``[batch, width, vocab]``), upcast to float64 for the log-softmax."""
    if len(prompts) == 0:
        raise ValueError("answer_logprob needs at least one example, got none")
    spans = answer_spans(tokenizer, prompts, answers, chat)
    device = input_device(model)
    part(model, "head")  # a bare decoder (no LM head) cannot be scored
    result = np.zeros(len(spans), dtype=np.float64)
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        width = max(len(s["input_ids"]) for s in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):  # right padding: positions of real tokens are unchanged
            ids[r, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
            mask[r, : len(s["input_ids"])] = 1
        hidden = decoder(model)(input_ids=ids.to(device), attention_mask=mask.to(device),
                                use_cache=False).last_hidden_state  # after the final norm
        rows = torch.tensor([r for r, s in enumerate(chunk) for _ in s["answer_positions"]])
        pos = torch.tensor([p for s in chunk for p in s["answer_positions"]])
        dev = hidden.device  # the last layer's (a model spread over GPUs)
        logits = head_logits(model, hidden[rows.to(dev), (pos - 1).to(dev)])
        logp = torch.log_softmax(logits.double(), -1)
        tok = logp.gather(1, ids[rows, pos].to(logp.device)[:, None])[:, 0].cpu()
        result[i : i + len(chunk)] = torch.zeros(len(chunk), dtype=torch.float64).index_add_(
            0, rows, tok).numpy()
    return result


@dataclasses.dataclass
class CheckpointEval:
    """One checkpoint's evaluation on ``n`` held-out problems (``eval-<key>.json`` beside it);
    ``correct``, ``predictions``, ``outputs``, ``answer_logprob``: ``[n]``, evaluation-set order.
    Greedy outputs can differ in the last bits with the batch (padding) in half precision, so the
    batch used is recorded."""

    checkpoint: str
    step: int | None
    weights_hash: str
    key: str
    accuracy: float
    n: int
    correct: list[bool]
    predictions: list[str | None]
    outputs: list[str]
    answer_logprob: list[float]
    mean_answer_logprob: float
    train_loss: float | None = None
    batch_size: int | None = None  # the batch generation and scoring ran at (fit_eval_batch)

    def save(self, path: str | Path) -> None:
        runs.write_json_atomic(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> CheckpointEval:
        return cls(**json.loads(Path(path).read_text()))


def eval_key(cfg: Config, ds) -> str:
    """What an evaluation's numbers depend on besides the weights: the protocol, the set and the
    dtype the model runs in (bf16 greedy outputs differ from float32 ones)."""
    return runs.hash_obj({"eval": cfg.eval, "source": cfg.eval_source or cfg.data_source,
                          "generator": cfg.generator, "chat": cfg.chat, "data": dataset_hash(ds),
                          "dtype": analysis_dtype(cfg)})


def evaluate_checkpoint(ckpt: str | Path, cfg: Config, ds=None,
                        beside: bool = True) -> CheckpointEval:
    """Accuracy, outputs and answer log-probs of one checkpoint, cached beside it in
    ``eval-<key>.json`` (keyed by the evaluation settings and set; recomputed when the weights
    differ from the hash it records) and in ``<root>/evals/<weights hash>-<key>.json``, so the
    same weights in another run (every seed's step 0 is the base; DPO's and GRPO's step 0 is the
    final SFT model) are evaluated once. ``beside=False``: the shared store only (a published
    model's directory is left as it is)."""
    ckpt = Path(ckpt)
    ds = ds if ds is not None else eval_set(cfg)
    key = eval_key(cfg, ds)
    path = ckpt / f"eval-{key}.json"
    whash = runs.weights_hash(ckpt)
    manifest_path = ckpt / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    shared = cfg.run_root / "evals" / f"{whash}-{key}.json"
    for where in (path, shared) if beside else (shared,):
        if not where.is_file():
            continue
        try:
            res = CheckpointEval.load(where)
            if res.weights_hash == whash and len(res.correct) == len(ds) and res.key == key:
                if where == shared:  # the same weights evaluated in another run: this one's names
                    res = dataclasses.replace(res, checkpoint=str(ckpt), step=manifest.get("step"),
                                              train_loss=manifest.get("train_loss"))
                    if beside:
                        res.save(path)
                # where the checkpoint is now (a moved or copied run), not where it was evaluated
                return dataclasses.replace(res, checkpoint=str(ckpt))
        except (ValueError, KeyError, TypeError):
            pass
        logger.warning("stale or damaged evaluation cache %s: recomputing", where)
    model, tokenizer = load_model(ckpt, dtype=cfg.dtype, **placement(cfg))
    prompts = prompts_for(cfg, tokenizer, ds["question"], few_shot=True)
    batch = fit_eval_batch(cfg, model, tokenizer, prompts)
    while True:  # a fitted batch is an estimate: halve it if the GPU runs out after all
        try:
            outputs = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, batch,
                               cfg.eval.stop, desc=f"generate {ckpt.name}")
            lp = answer_logprob(model, tokenizer, prompts, ds["answer"], batch, cfg.chat)
            break
        except torch.cuda.OutOfMemoryError:
            if cfg.eval.batch_size or batch == 1:  # a batch the user chose is kept
                raise
            batch = max(1, batch // 2)
            torch.cuda.empty_cache()
            logger.warning("out of GPU memory evaluating %s: retrying at batch %d", ckpt, batch)
    preds = [extract_answer(o) for o in outputs]
    correct = [p is not None and p == g for p, g in zip(preds, ds["final_answer"])]
    res = CheckpointEval(
        checkpoint=str(ckpt), step=manifest.get("step"), weights_hash=whash, key=key,
        accuracy=float(np.mean(correct)), n=len(correct), correct=correct, predictions=preds,
        outputs=outputs, answer_logprob=lp.tolist(), mean_answer_logprob=float(lp.mean()),
        train_loss=manifest.get("train_loss"), batch_size=batch)
    if beside:
        res.save(path)
    res.save(shared)
    return res


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n (95 % by default)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_run(run_dir: str | Path, cfg: Config, ds=None) -> list[CheckpointEval]:
    """Evaluate every complete checkpoint of a run (cached), ordered by step."""
    ckpts = runs.list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"no complete checkpoints in {run_dir}")
    ds = ds if ds is not None else eval_set(cfg)
    return [evaluate_checkpoint(d, cfg, ds) for _, d in tqdm(ckpts, desc="checkpoints")]


@dataclasses.dataclass
class FlipTable:
    """Flips (wrong at the first checkpoint, right at the last) and controls (right in both), rows
    of ``index`` (into the evaluation set), ``question``, ``answer``, ``final_answer``,
    ``base_output``, ``tuned_output``, ``base_answer_logprob`` and ``tuned_answer_logprob``."""

    flips: list[dict]
    controls: list[dict]

    def save(self, path: str | Path) -> None:
        runs.write_json_atomic(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> FlipTable:
        return cls(**json.loads(Path(path).read_text()))


def flip_table(results: list[CheckpointEval], cfg: Config, ds=None) -> FlipTable:
    """The flips and controls between the first and the last of ``results``."""
    ds = ds if ds is not None else eval_set(cfg)
    first, last = results[0], results[-1]
    if len(first.correct) != len(ds) or len(last.correct) != len(ds):
        raise ValueError("evaluation results do not match the evaluation set")
    table = FlipTable([], [])
    for i, (a, b) in enumerate(zip(first.correct, last.correct)):
        rows = table.flips if (not a and b) else table.controls if (a and b) else None
        if rows is not None:
            rows.append({
                "index": i, "question": ds[i]["question"], "answer": ds[i]["answer"],
                "final_answer": ds[i]["final_answer"], "base_output": first.outputs[i],
                "tuned_output": last.outputs[i], "base_answer_logprob": first.answer_logprob[i],
                "tuned_answer_logprob": last.answer_logprob[i]})
    return table


def summary(results: list[CheckpointEval]) -> list[dict]:
    """One row per checkpoint: step, accuracy with its Wilson interval, answer log-prob ± s.e."""
    rows = []
    for r in results:
        k, n = int(sum(r.correct)), r.n
        lo, hi = wilson_interval(k, n)
        lp = np.asarray(r.answer_logprob, dtype=np.float64)
        se = float(lp.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        rows.append({"step": r.step, "accuracy": k / n, "acc_lo": lo, "acc_hi": hi,
                     "answer_logprob": float(lp.mean()), "answer_logprob_se": se,
                     "train_loss": r.train_loss})
    return rows
