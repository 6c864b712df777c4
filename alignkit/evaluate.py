"""Generation, accuracy, answer log-prob (defined once, in ``answer_logprob``; patching measures
its change) and flip examples, cached per checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from accelerate.utils import find_executable_batch_size
from tqdm.auto import tqdm

from alignkit import data, models, runs
from alignkit.config import Config

logger = logging.getLogger(__name__)
T = TypeVar("T")


END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")  # ChatML, Llama 3


def end_tokens(model, tokenizer) -> list[int]:
    """The ids that end a completion: the model's own (``generation_config.eos_token_id``), the
    tokenizer's end-of-sequence token, and every ``END_TOKENS`` entry the vocabulary holds as a
    special token (a base model's generation config may list ``<|endoftext|>`` only, while its
    completions after a chat-tuned SFT end with ``<|im_end|>``)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    special = set(getattr(tokenizer, "all_special_tokens", ())) | {
        str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
        if getattr(t, "special", False)}
    named = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS
                                        if t in special]
    ids.extend(i for i in dict.fromkeys(named) if i is not None and i not in ids)
    return ids


MAX_EVAL_BATCH = 256  # beyond this a 0.6B model's decoding step grows and stragglers cost more
CPU_EVAL_BATCH = 64


def batched(cfg: Config, model, n: int, fn: Callable[[int], T],
            per_prompt: int = 1) -> tuple[T, int]:
    """``(fn(batch), batch)`` at ``cfg.eval.batch_size``, or for 0 at a batch fitted to the device
    for ``n`` prompts of ``per_prompt`` sequences each, shrunk on out-of-memory
    (docs/real-path.md); ValueError for a negative batch size or ``n == 0``."""
    if cfg.eval.batch_size < 0:
        raise ValueError(f"eval.batch_size must be >= 0 (0: fit the GPU), got "
                         f"{cfg.eval.batch_size}")
    if n == 0:
        raise ValueError("evaluation needs at least one prompt, got none")
    if cfg.eval.batch_size:
        return fn(cfg.eval.batch_size), cfg.eval.batch_size
    cap = MAX_EVAL_BATCH if models.input_device(model).type == "cuda" else CPU_EVAL_BATCH
    cap = max(1, cap // per_prompt)
    used: list[int] = []

    @find_executable_batch_size(starting_batch_size=-(-n // -(-n // cap)))
    def attempt(batch: int) -> T:
        used.append(batch)
        if len(used) > 1:
            logger.warning("out of memory at batch %d: retrying at batch %d", used[-2], batch)
        return fn(batch)

    return attempt(), used[-1]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128,
             batch_size: int = 32, stop: Sequence[str] = ("\nQuestion:",), desc: str = "generate",
             num_samples: int = 1, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Completions of ``prompts``, ended by ``end_tokens`` or cut at the first stop string. Greedy,
    or with ``temperature > 0`` ``num_samples`` per prompt, prompt-major (sample ``j`` of prompt
    ``i`` at ``i * num_samples + j``), reproducible for one seed, batch size and device."""
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt, got an empty list")
    if temperature < 0 or (temperature == 0 and num_samples != 1) or num_samples < 1:
        raise ValueError(f"greedy decoding gives one completion per prompt; got num_samples="
                         f"{num_samples} with temperature={temperature} (use temperature > 0 to "
                         "sample several)")
    options = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=end_tokens(model, tokenizer), do_sample=temperature > 0)
    if temperature > 0:
        options.update(temperature=temperature, top_k=0, top_p=1.0,
                       num_return_sequences=num_samples)
        torch.manual_seed(seed)
    if stop:
        options.update(stop_strings=list(stop), tokenizer=tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = models.input_device(model)
    outs: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, **options)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :],
                                           skip_special_tokens=True)
            outs.extend(data.cut_at_stop(t, stop) for t in texts)
    finally:
        tokenizer.padding_side = side
    return outs


TARGETS = ("answer", "computed", "copy")  # what answer_spans scores (docs/measures.md)


def answer_spans(tokenizer, prompts: Sequence[str], answers: Sequence[str],
                 chat: bool = False, targets: str = "answer") -> list[dict]:
    """Per example, ``input_ids`` of prompt + gold solution (``format_completion``) and
    ``answer_positions``, the scored tokens (docs/real-path.md): ``targets="answer"``, those
    overlapping the final answer's characters; ``"computed"``, those overlapping the solution's
    computed results (``data.computed_spans``); ``"copy"``, the final answer's after the last
    computed result is corrupted (``data.copy_corrupted``: the answer is then only a copy).
    ValueError when a gold answer is empty, or nothing of the targets follows the prompt."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    out = []
    for k, (prompt, answer) in enumerate(zip(prompts, answers)):
        if targets == "copy":
            corrupted = data.copy_corrupted(answer)
            if corrupted is None:
                raise ValueError(f"example {k}: the copy control needs a <<expr=value>> "
                                 "annotation whose value can be changed; the solution has none")
            answer = corrupted
        prefix, final = data.split_solution(answer)
        if not final:
            raise ValueError(f"example {k}: the gold solution has nothing after '####'")
        text_prefix = prompt + data.format_completion(prefix, chat) + prefix[len(prefix.rstrip()):]
        text = text_prefix + final
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if targets == "computed":  # the solution's characters sit after the completion's space
            shift = len(prompt) + len(data.format_completion("x", chat)) - 1 \
                - (len(answer) - len(answer.lstrip()))
            chars = [(a + shift, b + shift) for a, b in data.computed_spans(prefix, prompt)]
            if not chars:
                raise ValueError(f"example {k}: the solution computes nothing that is not "
                                 "already written before it (no <<expr=value>> to score)")
        else:
            chars = [(len(text_prefix), len(text))]
        pos = sorted({i for i, (a, b) in enumerate(enc["offset_mapping"])
                      for start, end in chars if a < end and b > start})
        if not pos or pos[0] == 0:
            raise ValueError(f"example {k}: no token of the {targets} target follows the "
                             "prompt (is the tokenizer's offset mapping broken?)")
        out.append({"input_ids": enc["input_ids"], "answer_positions": pos})
    return out


def scorable(prompts: Sequence[str], answers: Sequence[str], targets: str) -> list[bool]:
    """Per example, whether ``answer_spans`` finds something to score for ``targets`` (the
    analyses drop the others and say how many)."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if targets == "computed":
        return [bool(data.computed_spans(data.split_solution(a)[0], p))
                for p, a in zip(prompts, answers)]
    if targets == "copy":
        return [data.copy_corrupted(a) is not None for a in answers]
    return [True] * len(answers)


def answer_logp(model, hidden: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                normed: bool = True) -> torch.Tensor:
    """The one answer scorer: ``[k, vocab]`` float64 log-probs of the next token at ``(rows[i],
    pos[i])`` of ``hidden [b, T, d]``, the final norm's output (``normed``) or the last residual."""
    dev = hidden.device  # the last layer's (a model spread over GPUs)
    h = hidden[rows.to(dev), pos.to(dev)]
    logits = models.head_logits(model, h) if normed else models.unembed(model, h)
    return torch.log_softmax(logits.double(), -1)


@torch.no_grad()
def answer_logprob(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = 32, chat: bool = False) -> np.ndarray:
    """Teacher-forced log P(gold final answer | prompt + gold solution up to ``"#### "``), natural
    log summed over the answer's tokens (``answer_spans``): ``[n_examples]`` float64."""
    if len(prompts) == 0:
        raise ValueError("answer_logprob needs at least one example, got none")
    spans = answer_spans(tokenizer, prompts, answers, chat)
    device = models.input_device(model)
    models.part(model, "head")  # a bare decoder (no LM head) cannot be scored
    result = np.zeros(len(spans), dtype=np.float64)
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        ids, mask = models.pad([s["input_ids"] for s in chunk], models.pad_id(tokenizer))
        hidden = models.decoder(model)(input_ids=ids.to(device), use_cache=False,  # final-normed
                                       attention_mask=mask.long().to(device)).last_hidden_state
        rows = torch.tensor([r for r, s in enumerate(chunk) for _ in s["answer_positions"]])
        pos = torch.tensor([p for s in chunk for p in s["answer_positions"]])
        logp = answer_logp(model, hidden, rows, pos - 1)
        tok = logp.gather(1, ids[rows, pos].to(logp.device)[:, None])[:, 0].cpu()
        result[i : i + len(chunk)] = torch.zeros(len(chunk), dtype=torch.float64).index_add_(
            0, rows, tok).numpy()
    return result


@dataclasses.dataclass
class CheckpointEval:
    """One checkpoint's evaluation on ``n`` held-out problems (``evaluate_checkpoint``);
    ``correct``, ``predictions``, ``outputs``, ``answer_logprob``: ``[n]``, evaluation-set order."""

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
    batch_size: int | None = None  # the batch generation and scoring ran at (``batched``)


def eval_key(cfg: Config, ds) -> dict:
    """What an evaluation's numbers depend on besides the weights: the protocol, the set and the
    dtype the model runs in (bf16 greedy outputs differ from float32 ones)."""
    return {"eval": cfg.eval, "source": cfg.eval_source or cfg.data_source,
            "generator": cfg.generator, "chat": cfg.chat, "data": data.dataset_hash(ds),
            "dtype": models.analysis_dtype(cfg)}


def evaluate_checkpoint(ckpt: str | Path, cfg: Config, ds=None) -> CheckpointEval:
    """Accuracy, outputs and answer log-probs of one checkpoint, cached by its weights, its
    tokenizer and generation config (``runs.decoding_hash``) and ``eval_key`` (the same weights
    are evaluated once), scored on reading (``scored``), with its manifest's step and train loss."""
    ckpt = Path(ckpt)
    ds = ds if ds is not None else data.eval_set(cfg)
    whash = runs.weights_hash(ckpt)
    manifest_path = ckpt / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    key = {"weights": whash, "decoding": runs.decoding_hash(ckpt), "ends": END_TOKENS,
           **eval_key(cfg, ds)}

    def compute() -> CheckpointEval:
        model, tokenizer = models.load_model(ckpt, dtype=cfg.dtype, **models.placement(cfg))
        prompts = data.prompts_for(cfg, tokenizer, ds["question"], few_shot=True)
        (outputs, lp), batch = batched(cfg, model, len(prompts), lambda b: (
            generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, b, cfg.eval.stop,
                     desc=f"generate {ckpt.name}"),
            answer_logprob(model, tokenizer, prompts, ds["answer"], b, cfg.chat)))
        return scored(CheckpointEval(
            checkpoint=str(ckpt), step=None, weights_hash=whash, key=runs.hash_obj(key),
            accuracy=math.nan, n=len(outputs), correct=[], predictions=[], outputs=outputs,
            answer_logprob=lp.tolist(), mean_answer_logprob=float(lp.mean()), batch_size=batch),
            ds)

    res = runs.cached(cfg.run_root / "evals" / f"eval-{runs.hash_obj(key)}", key, compute)
    return dataclasses.replace(scored(res, ds), checkpoint=str(ckpt), step=manifest.get("step"),
                               train_loss=manifest.get("train_loss"))


def scored(res: CheckpointEval, ds) -> CheckpointEval:
    """``res`` with its predictions, correctness and accuracy from its outputs by today's
    ``data.extract_answer`` (redone on every read: the cache holds what the model wrote, so a
    corrected extractor rescores without generating again)."""
    preds = [data.extract_answer(o) for o in res.outputs]
    correct = [p is not None and p == g for p, g in zip(preds, ds["final_answer"])]
    return dataclasses.replace(res, predictions=preds, correct=correct,
                               accuracy=float(np.mean(correct)))


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n (95 % by default)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass
class FlipTable:
    """Flips (wrong at the first checkpoint, right at the last) and controls (right in both), rows
    of ``index`` (into the evaluation set), ``question``, ``answer``, ``final_answer``,
    ``base_output``, ``tuned_output``, ``base_answer_logprob`` and ``tuned_answer_logprob``."""

    flips: list[dict]
    controls: list[dict]


def flip_table(results: list[CheckpointEval], cfg: Config, ds=None) -> FlipTable:
    """The flips and controls between the first and the last of ``results``."""
    ds = ds if ds is not None else data.eval_set(cfg)
    first, last = results[0], results[-1]
    if len(first.correct) != len(ds) or len(last.correct) != len(ds):
        raise ValueError("evaluation results do not match the evaluation set")
    table = FlipTable([], [])
    for i, (a, b) in enumerate(zip(first.correct, last.correct)):
        if b:  # right at the last: a control if right at the first too, else a flip
            (table.controls if a else table.flips).append({
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
