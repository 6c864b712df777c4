"""Batched capture of hook-point activations, pooled per text, with an on-disk cache.

This is the only capture path: CKA, spectral and patching all read activations through it.
``acts: [n_points, n_rows, d_model]`` where rows are texts (``"last"``, ``"mean"`` pooling) or
tokens (``"tokens"``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignkit import cache
from alignkit.hooks import hook_points as all_hook_points
from alignkit.hooks import record

logger = logging.getLogger(__name__)

POOLINGS = ("last", "mean", "tokens")


@dataclasses.dataclass
class Activations:
    """Captured activations.

    Attributes:
        acts: ``[n_points, n_rows, d_model]`` in hook-point order.
        hook_points: names of the stacked points.
        pooling: ``"last"``, ``"mean"`` or ``"tokens"``.
        meta: probe hash, model class, vocabulary size, ``constant_points`` (points whose rows are
            all identical, e.g. the embedding under last-token pooling), ``row_text`` for tokens.
    """

    acts: torch.Tensor
    hook_points: list[str]
    pooling: str
    meta: dict


def _texts_hash(texts: Sequence[str]) -> str:
    return cache.hash_obj(list(texts))


@torch.no_grad()
def capture(model, tokenizer, texts: Sequence[str], hook_points: Sequence[str] | None = None, pooling: str = "mean",
            batch_size: int = 32, max_rows: int | None = None, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> Activations:
    """Run ``model`` on ``texts`` and pool each hook point's output per text (or per token).

    Args:
        texts: probe texts (no special tokens are added).
        hook_points: names (default: ``embed`` and every ``layers.{l}.resid``).
        pooling: ``"last"`` (last token of each text), ``"mean"`` (mean over its tokens) or
            ``"tokens"`` (every token a row, at most ``max_rows`` rows chosen with ``seed``; the
            same rows whatever the batch size).
        dtype: storage dtype; means are accumulated in float64 first.

    Returns:
        ``Activations`` with ``acts: [n_points, n_rows, d_model]``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if len(texts) == 0:
        raise ValueError("capture needs at least one text, got an empty list")
    names = list(hook_points) if hook_points is not None else all_hook_points(model)
    enc_all = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for i, ids in enumerate(enc_all):
        if not ids:
            raise ValueError(f"text {i} tokenizes to zero tokens: {texts[i]!r}")
    keep: dict[int, list[int]] | None = None
    if pooling == "tokens":
        flat = [(i, p) for i, ids in enumerate(enc_all) for p in range(len(ids))]
        if max_rows is not None and len(flat) > max_rows:
            flat = sorted(random.Random(seed).sample(flat, max_rows))
        keep = {}
        for i, p in flat:
            keep.setdefault(i, []).append(p)
    device = next(model.parameters()).device
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    row_text: list[int] = []
    for start in tqdm(range(0, len(texts), batch_size), desc="capture", leave=False):
        batch = enc_all[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, seq in enumerate(batch):  # right padding: real tokens keep positions 0..len-1
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        lengths = mask.sum(1)

        def reduce(name, t, lengths=lengths, mask=mask, batch_start=start, n=len(batch)):
            t = t.double()
            if pooling == "last":
                return t[torch.arange(n), lengths.to(t.device) - 1]
            if pooling == "mean":
                m = mask.to(t.device, t.dtype).unsqueeze(-1)
                return (t * m).sum(1) / m.sum(1)
            rows = [t[r, keep[batch_start + r]] for r in range(n) if (batch_start + r) in keep]
            return torch.cat(rows) if rows else t.new_zeros((0, t.shape[-1]))

        with record(model, names, reduce=reduce) as store:
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
        for n in names:
            out[n].append(store[n].to("cpu", dtype))
        if pooling == "tokens":
            row_text += [start + r for r in range(len(batch)) for _ in keep.get(start + r, [])]
    acts = torch.stack([torch.cat(out[n]) for n in names])
    bad = ~torch.isfinite(acts)
    if bad.any():
        point = names[int(bad.flatten(1).any(1).nonzero()[0])]
        raise ValueError(f"NaN or Inf in {point} activations: the model produced non-finite values")
    constant = [n for n, a in zip(names, acts) if a.shape[0] > 1 and bool((a == a[0]).all())]
    meta = {"probe_hash": _texts_hash(texts), "n_texts": len(texts), "model_class": type(model).__name__,
            "vocab_size": len(tokenizer), "d_model": acts.shape[-1], "constant_points": constant}
    if pooling == "tokens":
        meta["row_text"] = row_text
    return Activations(acts=acts, hook_points=names, pooling=pooling, meta=meta)


def capture_cached(model_dir: str | Path, texts: Sequence[str], hook_points: Sequence[str] | None = None,
                   pooling: str = "mean", cache_dir: str | Path | None = None, batch_size: int = 32,
                   max_rows: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> Activations:
    """``capture`` for a saved model directory, cached as safetensors keyed by content.

    The key combines the weights' content hash, the probe texts' hash, hook points, pooling,
    ``max_rows``, ``seed`` and ``dtype``; the model is loaded only on a miss. A cache file whose
    recorded size or checksum does not match is rebuilt (with a warning), never read.
    """
    from alignkit.tiny import load_model  # a measure never loads a model; the capture path does

    model_dir = Path(model_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else model_dir / "activations"
    key_obj = {"weights": cache.weights_hash(model_dir), "probe": _texts_hash(texts),
               "points": list(hook_points) if hook_points is not None else "all-resid", "pooling": pooling,
               "max_rows": max_rows, "seed": seed, "dtype": str(dtype), "v": 1}
    key = cache.hash_obj(key_obj)
    path, sidecar = cache_dir / f"acts-{key}.safetensors", cache_dir / f"acts-{key}.json"
    with cache.build_lock(path):
        if path.is_file() and sidecar.is_file():
            try:
                info = json.loads(sidecar.read_text())
                if info["key"] == key and info["size"] == path.stat().st_size and info["sha256"] == cache.sha256_file(path):
                    t = load_file(str(path))
                    return Activations(acts=t["acts"], hook_points=info["hook_points"], pooling=pooling, meta=info["meta"])
            except (ValueError, KeyError, OSError) as e:
                logger.warning("activation cache %s unreadable (%s): rebuilding", path, e)
            logger.warning("activation cache %s does not match its record: rebuilding", path)
        model, tokenizer = load_model(model_dir)
        a = capture(model, tokenizer, texts, hook_points, pooling, batch_size, max_rows, seed, dtype)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"acts": a.acts.contiguous()}, str(tmp))
        os.replace(tmp, path)
        cache.write_json_atomic(sidecar, {"key": key, "key_obj": key_obj, "size": path.stat().st_size,
                                          "sha256": cache.sha256_file(path), "hook_points": a.hook_points, "meta": a.meta})
        return a


def capture_run(run_dir: str | Path, texts: Sequence[str], pooling: str = "mean",
                hook_points: Sequence[str] | None = None, **kw) -> dict[int, Activations]:
    """Activations of every complete checkpoint of a run, ``{step: Activations}`` (cached)."""
    from alignkit.train import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"no complete checkpoints in {run_dir}")
    out = {step: capture_cached(d, texts, hook_points, pooling, cache_dir=Path(run_dir) / "activations", **kw)
           for step, d in tqdm(ckpts, desc=f"capture ({pooling})")}
    first = out[ckpts[0][0]]
    for a in out.values():
        check_comparable(first, a)
    return out


def probe_texts(cfg, n: int | None = None) -> list[str]:
    """The probe set: prompts of the held-out evaluation problems (as the models see them)."""
    from alignkit.data import format_prompt
    from alignkit.evaluate import eval_set

    ds = eval_set(cfg)
    qs = ds["question"][: n or len(ds)]
    return [format_prompt(q) for q in qs]


def check_comparable(a: Activations, b: Activations, same_width: bool = True) -> None:
    """Raise ValueError when two captures cannot be compared row by row."""
    if len(a.hook_points) != len(b.hook_points):
        raise ValueError(f"cannot compare: a has {len(a.hook_points)} hook points, b has {len(b.hook_points)}")
    if a.pooling != b.pooling:
        raise ValueError(f"cannot compare: pooling {a.pooling!r} vs {b.pooling!r}")
    if a.meta.get("probe_hash") != b.meta.get("probe_hash"):
        raise ValueError("cannot compare: the two captures used different probe texts")
    if a.acts.shape[1] != b.acts.shape[1]:
        raise ValueError(f"cannot compare: a has {a.acts.shape[1]} rows, b has {b.acts.shape[1]}")
    if same_width and a.acts.shape[2] != b.acts.shape[2]:
        raise ValueError(f"cannot compare: width {a.acts.shape[2]} vs {b.acts.shape[2]}")
    if a.meta.get("vocab_size") != b.meta.get("vocab_size"):
        raise ValueError(f"cannot compare: vocabularies of {a.meta.get('vocab_size')} and {b.meta.get('vocab_size')} tokens")


def check_same_tokenizer(tok_a, tok_b) -> None:
    """Raise ValueError unless two tokenizers have the same vocabulary and special tokens."""
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError(f"tokenizers differ: vocabularies of {len(tok_a)} and {len(tok_b)} tokens do not match")
    if tok_a.all_special_tokens != tok_b.all_special_tokens:
        raise ValueError(f"tokenizers differ in special tokens: {tok_a.all_special_tokens} vs {tok_b.all_special_tokens}")
