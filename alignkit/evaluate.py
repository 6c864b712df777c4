"""Generation, accuracy, answer log-prob and flip examples, cached per checkpoint.

"Answer log-prob" is defined once, here: the teacher-forced log-probability (natural log, summed
over tokens) of the gold final answer's tokens, given the prompt and the gold solution up to and
including ``"#### "``. Patching measures its change.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit import cache
from alignkit.config import Config
from alignkit.data import dataset_hash, extract_answer, format_prompt, load_gsm8k, split_solution
from alignkit.tiny import load_model

logger = logging.getLogger(__name__)


def cut_at_stop(text: str, stop: Sequence[str] = ("\nQuestion:",)) -> str:
    """``text`` up to the first occurrence of any stop string: how evaluation (and GRPO's reward) cuts completions."""
    for s in stop:
        text = text.split(s)[0]
    return text


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 32,
             stop: Sequence[str] = ("\nQuestion:",), desc: str = "generate", num_samples: int = 1,
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Completions of ``prompts`` (batched, left padding), cut at the first stop string.

    Greedy by default. With ``temperature > 0``: ``num_samples`` sampled completions per prompt,
    prompt-major (``out[i * num_samples + j]`` is sample ``j`` of prompt ``i``), reproducible for
    a given ``seed``, batch size and device.
    """
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt, got an empty list")
    if temperature < 0 or (temperature == 0 and num_samples != 1) or num_samples < 1:
        raise ValueError(f"greedy decoding gives one completion per prompt; got num_samples={num_samples} "
                         f"with temperature={temperature} (use temperature > 0 to sample several)")
    sampling = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_return_sequences": num_samples}
    if temperature > 0:
        torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outs: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, **sampling,
            )
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            outs.extend(cut_at_stop(t, stop) for t in texts)
    finally:
        tokenizer.padding_side = side
    return outs


def answer_spans(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """Tokenise prompt + gold solution and locate the final answer's tokens.

    Returns, per example, ``input_ids`` (list[int]) and ``answer_positions`` (token indices of the
    final answer). Raises ValueError when the answer's characters do not fall on token boundaries.
    """
    out = []
    for k, (prompt, answer) in enumerate(zip(prompts, answers)):
        prefix, final = split_solution(answer)
        text_prefix = prompt + " " + prefix.lstrip()  # as format_completion, keeping "#### "
        text = text_prefix + final
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start, end = len(text_prefix), len(text)
        pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
        if not pos or enc["offset_mapping"][pos[0]][0] != start or enc["offset_mapping"][pos[-1]][1] != end:
            raise ValueError(
                f"example {k}: gold answer {final!r} cannot be located in the tokenisation "
                "(it does not start and end on token boundaries)"
            )
        out.append({"input_ids": enc["input_ids"], "answer_positions": pos})
    return out


@torch.no_grad()
def answer_logprob(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Teacher-forced log P(gold final answer | prompt + gold solution prefix), summed over tokens.

    Args:
        prompts: formatted prompts (``format_prompt``).
        answers: gold solutions ending with ``#### N``.

    Returns:
        ``[n_examples]`` float64 array of summed natural-log probabilities.
    """
    if len(prompts) == 0:
        raise ValueError("answer_logprob needs at least one example, got none")
    spans = answer_spans(tokenizer, prompts, answers)
    device = next(model.parameters()).device
    result = np.zeros(len(spans), dtype=np.float64)
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        width = max(len(s["input_ids"]) for s in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):  # right padding: positions of real tokens are unchanged
            ids[r, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
            mask[r, : len(s["input_ids"])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.double(), dim=-1)
        for r, s in enumerate(chunk):
            pos = torch.tensor(s["answer_positions"])
            targets = ids[r, pos].to(device)
            result[i + r] = logp[r, pos - 1, targets].sum().item()
    return result


def eval_key(cfg: Config) -> dict:
    return {"eval": cfg.eval, "source": cfg.eval_source or cfg.data_source, "generator": cfg.generator,
            "chat": cfg.chat}


def eval_set(cfg: Config):
    """The held-out problems of a config (never seen in pretraining or SFT)."""
    return load_gsm8k(cfg.eval_source or cfg.data_source, split="test", n=cfg.eval.n_eval, generator=cfg.generator)


def evaluate_checkpoint(ckpt: str | Path, cfg: Config, ds=None) -> dict:
    """Accuracy, per-example outputs and answer log-probs of one checkpoint, cached beside it.

    The cache file ``eval-<key>.json`` is keyed by the evaluation settings and the eval set; it
    records the checkpoint's weights hash and is recomputed if the weights changed.
    """
    ckpt = Path(ckpt)
    ds = ds if ds is not None else eval_set(cfg)
    key = cache.hash_obj(dict(eval_key(cfg), data=dataset_hash(ds)))
    path = ckpt / f"eval-{key}.json"
    whash = cache.weights_hash(ckpt)
    if path.is_file():
        try:
            res = json.loads(path.read_text())
            if res.get("weights_hash") == whash and len(res["correct"]) == len(ds):
                return res
        except (ValueError, KeyError):
            pass
        logger.warning("stale or damaged evaluation cache %s: recomputing", path)
    device = "cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
    model, tokenizer = load_model(ckpt, dtype=cfg.dtype, device=device)
    prompts = [format_prompt(q, tokenizer, chat=cfg.chat) for q in ds["question"]]
    outputs = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.stop,
                       desc=f"generate {ckpt.name}")
    preds = [extract_answer(o) for o in outputs]
    correct = [p is not None and p == g for p, g in zip(preds, ds["final_answer"])]
    lp = answer_logprob(model, tokenizer, prompts, ds["answer"], cfg.eval.batch_size)
    manifest = json.loads((ckpt / "manifest.json").read_text()) if (ckpt / "manifest.json").is_file() else {}
    res = {
        "checkpoint": str(ckpt), "step": manifest.get("step"), "weights_hash": whash, "key": key,
        "accuracy": float(np.mean(correct)), "n": len(correct), "correct": correct, "predictions": preds,
        "outputs": outputs, "answer_logprob": lp.tolist(), "mean_answer_logprob": float(lp.mean()),
        "train_loss": manifest.get("train_loss"),
    }
    cache.write_json_atomic(path, res)
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


def evaluate_run(run_dir: str | Path, cfg: Config, ds=None) -> list[dict]:
    """Evaluate every complete checkpoint of a run (cached), ordered by step, on ``eval_set(cfg)``."""
    from alignkit.train import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"no complete checkpoints in {run_dir}")
    ds = ds if ds is not None else eval_set(cfg)
    return [evaluate_checkpoint(d, cfg, ds) for _, d in tqdm(ckpts, desc="checkpoints")]


def flip_table(results: list[dict], cfg: Config, ds=None) -> dict[str, list[dict]]:
    """Flip examples (wrong in the first checkpoint, right in the last) and controls (right in both).

    Returns:
        ``{"flips": [...], "controls": [...]}``; each row has the eval index, question, gold
        solution, final answer and both models' outputs.
    """
    ds = ds if ds is not None else eval_set(cfg)
    first, last = results[0], results[-1]
    if len(first["correct"]) != len(ds) or len(last["correct"]) != len(ds):
        raise ValueError("evaluation results do not match the evaluation set")
    table: dict[str, list[dict]] = {"flips": [], "controls": []}
    for i, (a, b) in enumerate(zip(first["correct"], last["correct"])):
        kind = "flips" if (not a and b) else "controls" if (a and b) else None
        if kind:
            table[kind].append({
                "index": i, "question": ds[i]["question"], "answer": ds[i]["answer"],
                "final_answer": ds[i]["final_answer"], "base_output": first["outputs"][i],
                "tuned_output": last["outputs"][i],
                "base_answer_logprob": first["answer_logprob"][i], "tuned_answer_logprob": last["answer_logprob"][i],
            })
    return table


def save_flip_table(run_dir: str | Path, table: dict) -> Path:
    path = Path(run_dir) / "flips.json"
    cache.write_json_atomic(path, table)
    return path


def summary(results: list[dict]) -> list[dict]:
    """One row per checkpoint: step, accuracy with its Wilson interval, mean answer log-prob ± s.e."""
    rows = []
    for r in results:
        k, n = int(sum(r["correct"])), r["n"]
        lo, hi = wilson_interval(k, n)
        lp = np.asarray(r["answer_logprob"], dtype=np.float64)
        rows.append({"step": r["step"], "accuracy": k / n, "acc_lo": lo, "acc_hi": hi,
                     "answer_logprob": float(lp.mean()), "answer_logprob_se": float(lp.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
                     "train_loss": r.get("train_loss")})
    return rows



def ensure_results(cfg: Config, method: str = "sft") -> tuple[Path, list[dict], dict[str, list[dict]]]:
    """A method's run, the evaluation of every checkpoint and the flip table, each built only if missing.

    Trains (cached) the run of ``method`` and whatever it starts from (DPO and GRPO start from the
    final SFT checkpoint by default), evaluates every checkpoint on ``eval_set(cfg)`` with the
    per-checkpoint cache, and compares the last checkpoint with the run's step 0 (the base for
    SFT, the init for DPO/GRPO). Later notebooks call it so that any of them runs first.

    Args:
        cfg: the config.
        method: ``"sft"``, ``"dpo"`` or ``"grpo"``.

    Returns:
        ``(run_dir, results, table)`` with results ordered by step and ``table`` as ``flip_table``.
    """
    from alignkit.train import train

    run_dir = train(cfg, method)
    ds = eval_set(cfg)
    results = evaluate_run(run_dir, cfg, ds)
    table = flip_table(results, cfg, ds)
    save_flip_table(run_dir, table)
    return run_dir, results, table


def ensure_sft_results(cfg: Config) -> tuple[Path, list[dict], dict[str, list[dict]]]:
    """``ensure_results(cfg, "sft")``: base, SFT checkpoints, their evaluations and the flip table (notebook 01)."""
    return ensure_results(cfg, "sft")


__all__ = [
    "generate", "answer_spans", "answer_logprob", "evaluate_checkpoint", "evaluate_run", "flip_table",
    "save_flip_table", "summary", "wilson_interval", "eval_set", "ensure_results", "ensure_sft_results", "cut_at_stop",
]
