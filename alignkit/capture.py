"""Batched capture of hook-point activations, pooled per text, with an on-disk cache: the one
capture path (CKA, spectral and patching read activations through it). Pooling happens in the
forward hooks, in float64, so full ``[batch, seq, d_model]`` outputs are never kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from alignkit import runs
from alignkit.hooks import hook_points as default_hook_points
from alignkit.hooks import record, select
from alignkit.models import decoder, input_device, load_model, n_layers, special_tokens

logger = logging.getLogger(__name__)

POOLINGS = ("last", "mean", "question", "tokens")
CACHE_VERSION = 1


@dataclasses.dataclass
class Activations:
    """Captured activations of one model on one probe set.

    ``acts: [n_points, n_rows, d_model]`` in ``hook_points`` order (e.g. ``["embed",
    "layers.0.resid", ...]``); a row is a text, or a token under ``pooling="tokens"``. ``meta`` is
    plain JSON: the arguments, sizes and hashes (``probe_hash`` of the texts, ``ids_hash`` of their
    token ids), the model and tokenizer, ``row_text`` and ``row_pos`` (each row's text and token
    position; no ``row_pos`` under ``"mean"``) and ``constant_points`` (points whose rows are all
    identical, e.g. ``embed`` under ``"last"`` pooling when every prompt ends with the same token).
    """

    acts: torch.Tensor
    hook_points: list[str]
    pooling: str
    meta: dict

    def __post_init__(self) -> None:
        if self.acts.ndim != 3 or self.acts.shape[0] != len(self.hook_points):
            raise ValueError(f"acts must be [n_points={len(self.hook_points)}, n_rows, d_model], "
                             f"got shape {tuple(self.acts.shape)}")


def texts_hash(texts: Sequence[str]) -> str:
    """Hash of a probe set (the texts, in order)."""
    return runs.hash_obj(list(texts))


def vocab_hash(tokenizer) -> str:
    """Hash of a tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    return runs.hash_obj({"vocab": vocab, "special": special_tokens(tokenizer)})


def tokenize(tokenizer, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text, unpadded, untruncated; raises on an empty list or an empty text."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got a single str")
    texts = list(texts)
    if not texts:
        raise ValueError("capture needs at least one text, got an empty list")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
    ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    for i, seq in enumerate(ids):
        if len(seq) == 0:
            raise ValueError(f"text {i} tokenizes to zero tokens: {texts[i]!r}")
    return [list(seq) for seq in ids]


def template_span(ids: Sequence[Sequence[int]]) -> tuple[int, int]:
    """``(prefix, suffix)``: how many tokens every text shares at its start and at its end, the
    prompt template (``"Question: "`` ... ``"\nAnswer:"``, a chat wrapper) that ``"question"``
    pooling leaves out. ValueError with fewer than 2 texts or when a text has nothing else."""
    ids = [list(s) for s in ids]
    if len(ids) < 2:
        raise ValueError("question pooling finds the template as what every probe shares, so it "
                         f"needs at least 2 texts, got {len(ids)}")
    shortest = min(len(s) for s in ids)
    pre = 0
    while pre < shortest and all(s[pre] == ids[0][pre] for s in ids):
        pre += 1
    suf = 0
    while suf < shortest - pre and all(s[-1 - suf] == ids[0][-1 - suf] for s in ids):
        suf += 1
    empty = [i for i, s in enumerate(ids) if len(s) - pre - suf <= 0]
    if empty:
        raise ValueError(f"text {empty[0]} has no token besides the shared template ({pre} "
                         f"prefix + {suf} suffix tokens): question pooling needs its own tokens")
    return pre, suf


def _check_args(pooling: str, batch_size: int, max_rows: int | None, dtype: torch.dtype) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_rows is not None and pooling != "tokens":
        raise ValueError(f"max_rows applies to pooling='tokens' only, got max_rows={max_rows} "
                         f"with pooling={pooling!r}")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")


def _rows(lengths: list[int], pooling: str, max_rows: int | None, seed: int) -> tuple:
    """``(row_text, row_pos)``: each row's text and token position, in text then position order.
    ``"tokens"``: at most ``max_rows``, drawn with ``seed`` from the lengths alone (never from the
    batching); else a row per text, at its last token (``"mean"`` reads the mask instead)."""
    if pooling != "tokens":
        return torch.arange(len(lengths)), torch.tensor(lengths) - 1
    total = sum(lengths)
    flat = torch.arange(total)
    if max_rows is not None and total > max_rows:
        g = torch.Generator().manual_seed(seed)
        flat = torch.randperm(total, generator=g)[:max_rows].sort().values
    ends = torch.tensor(lengths).cumsum(0)
    row_text = torch.searchsorted(ends, flat, right=True)
    row_pos = flat - (ends - torch.tensor(lengths))[row_text]
    return row_text, row_pos


@torch.no_grad()
def capture(model: torch.nn.Module, tokenizer, texts: Sequence[str],
            hook_points: Sequence[str] | Callable[[str], bool] | None = None, pooling: str = "last",
            batch_size: int = 32, max_rows: int | None = None, seed: int = 0,
            device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
            add_special_tokens: bool = False) -> Activations:
    """Run ``model`` on ``texts`` and pool each hook point's output per text (or per token).

    In eval mode (the previous mode is restored), without the LM head. Texts are batched by
    length and run with the attention mask and position ids counted from the first real token, so
    neither ``batch_size`` nor ``padding_side`` changes the result (tested against batch size 1).

    Args:
        hook_points: names or a ``names_filter`` predicate (default: ``embed`` and every
            ``layers.{i}.resid``).
        pooling: ``"last"`` (last real token), ``"mean"`` (over real tokens) or ``"question"``
            (over the tokens left when the template every text shares at its start and end is
            removed: ``template_span``): a row per text; ``"tokens"``: a row per real token, at
            most ``max_rows`` of them drawn with ``seed``.
        device: where the model is expected to be (default: where its parameters are).
        dtype: storage dtype of ``acts``; pooling is computed in float64 first.
    """
    _check_args(pooling, batch_size, max_rows, dtype)
    names = default_hook_points(model) if hook_points is None else select(model, hook_points)
    texts = texts if isinstance(texts, str) else list(texts)  # tokenize rejects a single str
    ids = tokenize(tokenizer, texts, add_special_tokens)
    lengths, n_texts = [len(s) for s in ids], len(texts)
    pre, suf = template_span(ids) if pooling == "question" else (0, 0)
    run_on = input_device(model)
    want = run_on if device is None else torch.device(device)
    if want.type != run_on.type or want.index not in (None, run_on.index):
        raise ValueError(f"the model is on {run_on} but device={str(want)!r}; move the model first")
    row_text, row_pos = _rows(lengths, pooling, max_rows, seed)
    n_rows = len(row_text)
    # the rows of acts that text i fills are starts[i] .. ends[i] - 1
    starts = torch.searchsorted(row_text, torch.arange(n_texts)).tolist()
    ends = torch.searchsorted(row_text, torch.arange(n_texts), right=True).tolist()
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    state: dict[str, torch.Tensor] = {}

    def pool(_name: str, t: torch.Tensor) -> torch.Tensor:  # [b, s, d] -> [rows, d] float64
        if pooling in ("mean", "question"):
            m = state["pool_mask"].unsqueeze(-1).to(t.device)  # (a layer on another GPU)
            return torch.where(m, t.double(), 0.0).sum(1) / m.sum(1)
        return t[state["batch_idx"].to(t.device), state["seq_idx"].to(t.device)].double()

    order = sorted(range(n_texts), key=lambda i: -lengths[i])  # longest first: little padding
    acts: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with record(model, names, reduce=pool) as store, \
                tqdm(total=n_texts, desc="capture", unit="text", leave=False) as bar:
            for start in range(0, n_texts, batch_size):
                batch = order[start : start + batch_size]
                dest = torch.cat([torch.arange(starts[i], ends[i]) for i in batch])
                if len(dest) == 0:  # no kept token in this batch
                    bar.update(len(batch))
                    continue
                width = max(lengths[i] for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.bool)
                pool_mask = torch.zeros_like(mask)
                for r, i in enumerate(batch):
                    first = width - lengths[i] if left else 0
                    input_ids[r, first : first + lengths[i]] = torch.tensor(ids[i])
                    mask[r, first : first + lengths[i]] = True
                    pool_mask[r, first + pre : first + lengths[i] - suf] = True
                offset = torch.tensor([width - lengths[i] if left else 0 for i in batch])
                counts = torch.tensor([ends[i] - starts[i] for i in batch])
                b_idx = torch.arange(len(batch)).repeat_interleave(counts)  # batch row of each
                state.update(batch_idx=b_idx.to(run_on), pool_mask=pool_mask.to(run_on),
                             seq_idx=(row_pos[dest] + offset[b_idx]).to(run_on))
                position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)  # real tokens at 0..len-1
                store.clear()
                decoder(model)(input_ids=input_ids.to(run_on), position_ids=position_ids.to(run_on),
                               attention_mask=mask.long().to(run_on), use_cache=False)
                for p, name in enumerate(names):
                    stored = _to_storage(name, store[name], row_text[dest], texts, dtype)
                    if acts is None:
                        acts = torch.empty((len(names), n_rows, stored.shape[-1]), dtype=dtype)
                    acts[p, dest] = stored
                bar.update(len(batch))
    finally:
        model.train(was_training)

    meta = {"n_texts": n_texts, "n_rows": n_rows, "n_tokens": sum(lengths),
            "probe_hash": texts_hash(texts), "ids_hash": runs.hash_obj(ids),
            "row_text": row_text.tolist(),
            "constant_points": [n for n, a in zip(names, acts) if bool((a == a[0]).all())],
            "model_class": type(model).__name__,
            "model_name": str(getattr(model.config, "_name_or_path", "")),
            "n_layers": n_layers(model), "d_model": int(acts.shape[-1]),
            "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": len(tokenizer), "vocab_hash": vocab_hash(tokenizer),
            "add_special_tokens": add_special_tokens, "max_rows": max_rows, "seed": seed,
            "dtype": str(dtype)}
    if pooling == "question":
        meta["template_tokens"] = [pre, suf]
    if pooling not in ("mean", "question"):
        meta["row_pos"] = row_pos.tolist()
    return Activations(acts=acts, hook_points=list(names), pooling=pooling, meta=meta)


def _to_storage(name: str, pooled: torch.Tensor, row_text: torch.Tensor, texts: list[str],
                dtype: torch.dtype) -> torch.Tensor:
    """``pooled: [rows, d]`` as ``dtype`` on the CPU; raises on a NaN/Inf or ``dtype`` overflow."""
    finite = torch.isfinite(pooled).all(-1)
    if not bool(finite.all()):
        r = int((~finite).nonzero()[0])
        kind = "NaN" if bool(torch.isnan(pooled[r]).any()) else "Inf"
        i = int(row_text[r])
        raise ValueError(f"{kind} in {name} activations (text {i}: {texts[i][:60]!r}): the model "
                         "produced non-finite values; check its weights and dtype")
    stored = pooled.to("cpu", dtype)
    if dtype != torch.float64 and not bool(torch.isfinite(stored).all()):
        raise ValueError(f"{name} activations overflow {dtype} (max |x| = "
                         f"{pooled.abs().max().item():.3g}); store them in float32 or bfloat16")
    return stored


def capture_cached(model: str | os.PathLike | torch.nn.Module, tokenizer, texts: Sequence[str],
                   hook_points: Sequence[str] | None = None, pooling: str = "last",
                   cache_dir: str | os.PathLike | None = None, *,
                   model_dir: str | os.PathLike | None = None, batch_size: int = 32,
                   max_rows: int | None = None, seed: int = 0,
                   device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                   add_special_tokens: bool = False, mmap: bool = False,
                   model_dtype: str = "float32",
                   device_map: str | dict | None = None) -> Activations:
    """``capture`` of a saved checkpoint, cached on disk as safetensors keyed by content.

    The key: the checkpoint's ``runs.weights_hash``, the model dtype, the texts and their token
    ids, and every argument that changes the result. A hit runs no model and returns what the miss
    that built it returned. ``acts-<key>.safetensors`` has a JSON record beside it (full key, size,
    sha256, meta); an entry that does not match its record is rebuilt with a logged warning. Builds
    are written to a temporary file and renamed, under an inter-process lock.

    Args:
        model: a model directory (loaded in ``model_dtype`` on a miss only), or a loaded model
            whose weights are still those of ``model_dir``; ``tokenizer`` None loads the
            directory's.
        cache_dir: where entries live (default: ``<model_dir>/activations``).
        device: where a model loaded here goes (default CPU); for a loaded one, as in ``capture``.
            Each batch's outputs are pooled in float64 there and moved to the CPU.
        device_map: a model loaded here is spread by it instead (``models.placement``).
        mmap: ``acts`` memory-mapped from the entry file, copy-on-write.
    """
    loaded = model if isinstance(model, torch.nn.Module) else None
    if loaded is None and model_dir is not None:
        raise ValueError("pass model_dir only together with a loaded model")
    if loaded is not None and model_dir is None:
        raise ValueError(f"capture_cached got a loaded {type(model).__name__} without model_dir: "
                         "pass the directory it was loaded from, whose weights key the cache")
    model_dir = Path(model if loaded is None else model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    if callable(hook_points) or isinstance(hook_points, str):
        raise TypeError("capture_cached needs hook_points as a list of names (or None), not "
                        f"{type(hook_points).__name__}")
    _check_args(pooling, batch_size, max_rows, dtype)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    ids = tokenize(tokenizer, texts, add_special_tokens)
    run_dtype = getattr(torch, model_dtype) if loaded is None else next(loaded.parameters()).dtype
    key = {"format": "alignkit-activations", "version": CACHE_VERSION,
           "weights": runs.weights_hash(model_dir), "model_dtype": str(run_dtype),
           "probe_hash": texts_hash(texts), "ids_hash": runs.hash_obj(ids),
           "hook_points": None if hook_points is None else list(hook_points), "pooling": pooling,
           "max_rows": max_rows, "seed": seed, "dtype": str(dtype),
           "add_special_tokens": add_special_tokens}
    digest = runs.hash_obj(key)
    cache_dir = Path(cache_dir) if cache_dir is not None else model_dir / "activations"
    path = cache_dir / f"acts-{digest}.safetensors"
    with runs.build_lock(path):
        hit = _read_entry(path, key, digest, mmap)
        if hit is not None:
            logger.info("activation cache hit %s", path)
            return hit
        if loaded is None:
            loaded, _ = load_model(model_dir, model_dtype, device if device is not None else "cpu",
                                   device_map=device_map)
        acts = capture(loaded, tokenizer, texts, hook_points, pooling, batch_size=batch_size,
                       max_rows=max_rows, seed=seed, device=device, dtype=dtype,
                       add_special_tokens=add_special_tokens)
        tmp = path.with_name(f".{path.name}.tmp")  # one writer at a time: under build_lock
        try:
            save_file({"acts": acts.acts.contiguous()}, tmp, metadata={"key": digest})
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        runs.write_json_atomic(path.with_suffix(".json"), {
            "key": key, "digest": digest, "size": path.stat().st_size,
            "sha256": runs.sha256_file(path), "hook_points": acts.hook_points,
            "pooling": acts.pooling, "meta": acts.meta})
        logger.info("activation cache built %s", path)
        return dataclasses.replace(acts, acts=mmap_tensor(path, "acts")) if mmap else acts


def _read_entry(path: Path, key: dict | None, digest: str | None, mmap: bool) -> Activations | None:
    """The entry at ``path`` (its record beside it, ``.json``), or None when absent or when it
    fails any check (logged as a warning). ``key`` and ``digest`` None: accept the recorded ones."""
    record_path = path.with_suffix(".json")
    if not path.exists() and not record_path.exists():
        return None
    try:
        info = json.loads(record_path.read_text())
        if key is None:
            key, digest = info["key"], info["digest"]
        if info.get("key") != key:
            raise ValueError("its recorded key does not match the request")
        size = path.stat().st_size
        if size != info["size"]:
            raise ValueError(f"size {size} bytes, recorded {info['size']} (truncated or rewritten)")
        if runs.sha256_file(path) != info["sha256"]:
            raise ValueError("sha256 does not match the record (corrupted or rewritten)")
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != digest:
                raise ValueError("the file's own key does not match")
            acts = mmap_tensor(path, "acts") if mmap else f.get_tensor("acts")
        return Activations(acts, info["hook_points"], info["pooling"], info["meta"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        logger.warning("activation cache entry %s is damaged or stale (%s); rebuilding it", path, e)
        return None


# safetensors dtype codes -> (numpy dtype of the raw bytes, torch dtype to view them as)
_SAFETENSORS_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (np.int16, torch.bfloat16),
                       "F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64)}


def mmap_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file, memory-mapped (copy-on-write) instead of read: the
    file is a little-endian u64 header length, a JSON header (each tensor's dtype, shape and byte
    offsets), then the raw bytes; the result is a CPU view of a ``numpy.memmap`` over them."""
    path = Path(path)
    with open(path, "rb") as f:
        (n_header,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n_header))
    if name not in header:
        names = sorted(k for k in header if k != "__metadata__")
        raise ValueError(f"{path} holds no tensor {name!r} (tensors: {names})")
    info = header[name]
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; memory-mapping "
                         f"supports {sorted(_SAFETENSORS_DTYPES)}")
    np_dtype, torch_dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    shape = tuple(int(s) for s in info["shape"])
    start, end = (int(o) for o in info["data_offsets"])
    offset = 8 + n_header + start
    if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize or \
            offset + (end - start) > path.stat().st_size:
        raise ValueError(f"{path}: the header's offsets for {name!r} do not fit its shape {shape} "
                         "or the file size")
    if end == start:
        return torch.empty(shape, dtype=torch_dtype)
    t = torch.from_numpy(np.memmap(path, dtype=np_dtype, mode="c", offset=offset, shape=shape))
    return t.view(torch_dtype) if t.dtype != torch_dtype else t


def load_activations(path: str | os.PathLike, mmap: bool = True) -> Activations:
    """The ``capture_cached`` entry ``acts-<key>.safetensors`` at ``path``, verified as a hit is,
    without reloading and rehashing the checkpoint (for a later stage or another process)."""
    path = Path(path)
    record_path = path.with_suffix(".json")
    if not path.is_file() or not record_path.is_file():
        raise ValueError(f"{path} is not an activation cache entry "
                         f"(need {path.name} and {record_path.name})")
    out = _read_entry(path, None, None, mmap)
    if out is None:
        raise ValueError(f"activation cache entry {path} failed verification "
                         "(see the warning logged above)")
    return out


def capture_run(run_dir: str | Path, texts: Sequence[str], pooling: str = "last",
                hook_points: Sequence[str] | None = None, **kw) -> dict[int, Activations]:
    """``{step: Activations}`` of every complete checkpoint of a run, each checked comparable
    with the first; cached in ``<run_dir>/activations``, ``kw`` goes to ``capture_cached``."""
    ckpts = runs.list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"no complete checkpoints in {run_dir}")
    cache_dir = Path(run_dir) / "activations"
    out = {step: capture_cached(d, None, texts, hook_points, pooling, cache_dir=cache_dir, **kw)
           for step, d in tqdm(ckpts, desc=f"capture ({pooling})")}
    for a in out.values():
        check_comparable(out[ckpts[0][0]], a)
    return out


def varying_points(captures: Sequence[Activations]) -> tuple[list[int], list[str], list[str]]:
    """Hook points no capture recorded as constant (zero variance: CKA and effective rank are
    undefined there), as ``(keep, labels, dropped)``: indices into ``hook_points``, short labels
    (``"embed"``, ``"0"``, ...) and the dropped names, sorted. Dropped, never turned into NaN."""
    captures = list(captures)
    if not captures:
        raise ValueError("varying_points needs at least one capture, got none")
    skip = set().union(*(set(a.meta.get("constant_points", [])) for a in captures))
    names = captures[0].hook_points
    keep = [i for i, n in enumerate(names) if n not in skip]
    return keep, [names[i].replace("layers.", "").replace(".resid", "") for i in keep], sorted(skip)


def check_comparable(a: Activations, b: Activations, same_width: bool = True,
                     same_tokenization: bool = True) -> None:
    """Raise ValueError unless two captures can be compared point by point and row by row:
    ``same_width`` False allows different ``d_model`` (CKA across architectures),
    ``same_tokenization`` False different token ids (always required under ``"tokens"``)."""
    ma, mb = a.meta, b.meta
    if a.hook_points != b.hook_points:
        la, lb = ma.get("n_layers"), mb.get("n_layers")
        if la is not None and lb is not None and la != lb:
            raise ValueError(f"cannot compare: a has {la} layers, b has {lb}")
        raise ValueError(f"cannot compare: hook points differ: a has {a.hook_points}, "
                         f"b has {b.hook_points}")
    if a.pooling != b.pooling:
        raise ValueError(f"cannot compare: a uses {a.pooling!r} pooling, b {b.pooling!r}")
    if ma.get("probe_hash") != mb.get("probe_hash"):
        raise ValueError(f"cannot compare: different probe sets (a: {ma.get('n_texts')} texts, "
                         f"hash {ma.get('probe_hash')}; b: {mb.get('n_texts')} texts, hash "
                         f"{mb.get('probe_hash')})")
    if a.acts.shape[1] != b.acts.shape[1]:
        raise ValueError(f"cannot compare: a has {a.acts.shape[1]} rows, b has {b.acts.shape[1]}")
    if same_width and a.acts.shape[2] != b.acts.shape[2]:
        raise ValueError(f"cannot compare: a has width {a.acts.shape[2]}, b has "
                         f"{b.acts.shape[2]} (pass same_width=False for measures that allow it)")
    if (same_tokenization or a.pooling == "tokens") and ma.get("ids_hash") != mb.get("ids_hash"):
        raise ValueError("cannot compare: the probe texts were tokenized differently "
                         "(different tokenizers or add_special_tokens)")
    if a.pooling == "tokens" and (ma.get("row_text") != mb.get("row_text")
                                  or ma.get("row_pos") != mb.get("row_pos")):
        raise ValueError("cannot compare: the rows are different tokens "
                         "(different max_rows or seed)")
