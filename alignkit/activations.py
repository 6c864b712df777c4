"""Batched capture of hook-point activations, pooled per text, with an on-disk cache.

This is the only capture path: CKA, spectral and patching all read activations through it.
``acts: [n_points, n_rows, d_model]`` where a row is a text (``"last"``, ``"mean"`` pooling) or a
token (``"tokens"``). Pooling happens inside the forward hooks, in float64, so full
``[batch, seq, d_model]`` outputs are never kept.

Padding never changes a result: texts are batched by length (longest first), padded on the
tokenizer's ``padding_side``, and run with the attention mask and position ids counted from the
first real token, so a padded text sees exactly what it sees alone (tested to 1e-5 against
batch size 1, both padding sides).

Cached entries (``capture_cached``) are safetensors files; with ``mmap=True`` (or
``load_activations``) ``acts`` is memory-mapped from the file instead of read, so a float16 cache
of a large probe set costs no resident memory until the measures touch it, layer by layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from alignkit import cache
from alignkit.hooks import decoder, hook_points as default_hook_points, n_layers, record, select

logger = logging.getLogger(__name__)

POOLINGS = ("last", "mean", "tokens")
CACHE_VERSION = 1


@dataclasses.dataclass
class Activations:
    """Captured activations of one model on one probe set.

    Attributes:
        acts: ``[n_points, n_rows, d_model]``, stacked in ``hook_points`` order.
        hook_points: names of the stacked points, e.g. ``["embed", "layers.0.resid", ...]``.
        pooling: ``"last"``, ``"mean"`` or ``"tokens"``.
        meta: plain-JSON facts about the capture: ``n_texts``, ``n_rows``, ``n_tokens``,
            ``probe_hash`` (texts), ``ids_hash`` (their token ids), ``row_text`` (row -> text index),
            ``row_pos`` (row -> token position in its text; ``"last"`` and ``"tokens"``),
            ``constant_points`` (points whose rows are all identical, e.g. ``embed`` under
            ``"last"`` pooling when every prompt ends with the same token: measures skip them),
            ``model_class``, ``model_name``, ``n_layers``, ``d_model``, ``tokenizer_name``,
            ``vocab_size``, ``vocab_hash``, ``add_special_tokens``, ``max_rows``, ``seed``, ``dtype``.
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
    return cache.hash_obj(list(texts))


def vocab_hash(tokenizer) -> str:
    """Hash of a tokenizer's vocabulary and special tokens (what ``check_same_tokenizer`` compares)."""
    return cache.hash_obj({"vocab": sorted(tokenizer.get_vocab().items()), "special": _special_tokens(tokenizer)})


def _special_tokens(tokenizer) -> dict[str, str]:
    return {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}


def tokenize(tokenizer, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text, unpadded, untruncated.

    Raises:
        ValueError: empty ``texts``, a non-string, or a text that tokenizes to zero tokens.
    """
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


def _check_args(pooling: str, batch_size: int, max_rows: int | None, dtype: torch.dtype) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_rows is not None:
        if pooling != "tokens":
            raise ValueError(f"max_rows applies to pooling='tokens' only, got max_rows={max_rows} "
                             f"with pooling={pooling!r}")
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")


def _token_rows(lengths: list[int], max_rows: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``"tokens"`` pooling as ``(row_text, row_pos)``, in text then position order.

    With ``max_rows`` below the number of tokens, a subset drawn with ``seed`` over the flat token
    index: it depends on the texts' lengths and the seed only, never on the batching.
    """
    total = sum(lengths)
    if max_rows is not None and total > max_rows:
        g = torch.Generator().manual_seed(seed)
        flat = torch.randperm(total, generator=g)[:max_rows].sort().values
    else:
        flat = torch.arange(total)
    ends = torch.tensor(lengths).cumsum(0)
    row_text = torch.searchsorted(ends, flat, right=True)
    row_pos = flat - (ends - torch.tensor(lengths))[row_text]
    return row_text, row_pos


def _model_device(model: torch.nn.Module, device) -> torch.device:
    current = next(model.parameters()).device
    if device is None:
        return current
    device = torch.device(device)
    if device.type != current.type or (device.index is not None and device.index != current.index):
        raise ValueError(f"the model is on {current} but device={str(device)!r}; move the model first")
    return current


@torch.no_grad()
def capture(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    hook_points: Sequence[str] | Callable[[str], bool] | None = None,
    pooling: str = "last",
    batch_size: int = 32,
    max_rows: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    add_special_tokens: bool = False,
) -> Activations:
    """Run ``model`` on ``texts`` and pool each hook point's output per text (or per token).

    The model runs in eval mode (its previous mode is restored afterwards) under ``no_grad``, with
    the attention mask; the LM head is not run.

    Args:
        model: a supported model (see ``alignkit.hooks.ARCHITECTURES``).
        tokenizer: its tokenizer; ``padding_side`` is honoured (the result does not depend on it).
        texts: the probe set, ``n_texts`` strings.
        hook_points: names or a ``names_filter`` predicate (default: ``embed`` and every
            ``layers.{l}.resid``).
        pooling: ``"last"`` (last real token of each text), ``"mean"`` (mean over its real
            tokens) or ``"tokens"`` (every real token a row).
        batch_size: texts per forward pass; does not change the result.
        max_rows: ``"tokens"`` pooling only: keep at most this many rows, a random subset drawn
            with ``seed`` (the same whatever the batch size), in text then position order.
        seed: seed of that subset.
        device: where the model is expected to be (default: where its parameters are).
        dtype: storage dtype of ``acts``; pooling is computed in float64 first.
        add_special_tokens: let the tokenizer add BOS/EOS (the project's prompts use ``False``).

    Returns:
        ``Activations`` with ``acts: [n_points, n_rows, d_model]``; ``n_rows`` is ``n_texts`` for
        ``"last"``/``"mean"`` and the number of (kept) tokens for ``"tokens"``.

    Raises:
        ValueError: empty ``texts``, a text with zero tokens, a bad argument, or a NaN/Inf in the
            pooled activations ("NaN in layers.3.resid activations (text 7: ...)").
    """
    _check_args(pooling, batch_size, max_rows, dtype)
    names = default_hook_points(model) if hook_points is None else select(model, hook_points)
    texts = list(texts) if not isinstance(texts, str) else texts
    ids = tokenize(tokenizer, texts, add_special_tokens)
    run_on = _model_device(model, device)
    lengths = [len(s) for s in ids]
    n_texts = len(texts)

    # rows each text contributes: (positions in the text, row indices in acts)
    if pooling == "tokens":
        row_text, row_pos = _token_rows(lengths, max_rows, seed)
        n_rows = len(row_text)
        starts = torch.searchsorted(row_text, torch.arange(n_texts))
        ends = torch.searchsorted(row_text, torch.arange(n_texts), right=True)
        rows_of = [(row_pos[s:e], torch.arange(s, e)) for s, e in zip(starts.tolist(), ends.tolist())]
    else:
        row_text = torch.arange(n_texts)
        row_pos = torch.tensor(lengths) - 1
        n_rows = n_texts

    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    state: dict[str, torch.Tensor] = {}

    def pool(_name: str, t: torch.Tensor) -> torch.Tensor:  # [b, s, d] -> [rows, d] float64
        if pooling == "last":
            return t[state["batch_idx"], state["last_idx"]].double()
        if pooling == "mean":
            m = state["mask"].unsqueeze(-1)
            return torch.where(m, t.double(), 0.0).sum(1) / m.sum(1)
        return t[state["batch_idx"], state["seq_idx"]].double()

    order = sorted(range(n_texts), key=lambda i: -lengths[i])  # longest first: little padding
    acts: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with record(model, names, reduce=pool) as store, tqdm(total=n_texts, desc="capture", unit="text",
                                                                leave=False) as bar:
            for start in range(0, n_texts, batch_size):
                batch = order[start : start + batch_size]
                width = max(lengths[i] for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.bool)
                for r, i in enumerate(batch):
                    sl = slice(width - lengths[i], width) if left else slice(0, lengths[i])
                    input_ids[r, sl] = torch.tensor(ids[i])
                    mask[r, sl] = True
                offset = torch.tensor([width - lengths[i] if left else 0 for i in batch])
                if pooling == "tokens":
                    if all(len(rows_of[i][0]) == 0 for i in batch):  # no kept token in this batch
                        bar.update(len(batch))
                        continue
                    b_idx = torch.cat([torch.full((len(rows_of[i][0]),), r) for r, i in enumerate(batch)])
                    s_idx = torch.cat([rows_of[i][0] + offset[r] for r, i in enumerate(batch)])
                    dest = torch.cat([rows_of[i][1] for i in batch])
                    batch_text = torch.tensor(batch)[b_idx]
                    state.update(batch_idx=b_idx.to(run_on), seq_idx=s_idx.to(run_on))
                else:
                    dest = batch_text = torch.tensor(batch)
                    state.update(batch_idx=torch.arange(len(batch), device=run_on),
                                 last_idx=(offset + torch.tensor([lengths[i] for i in batch]) - 1).to(run_on))
                state["mask"] = mask.to(run_on)
                position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)  # real tokens at 0..len-1
                store.clear()
                decoder(model)(input_ids=input_ids.to(run_on), attention_mask=mask.long().to(run_on),
                               position_ids=position_ids.to(run_on), use_cache=False)
                for p, name in enumerate(names):
                    pooled = store[name]
                    _check_finite(name, pooled, batch_text, texts)
                    stored = pooled.to("cpu", dtype)
                    if dtype != torch.float64 and not bool(torch.isfinite(stored).all()):
                        raise ValueError(f"{name} activations overflow {dtype} (max |x| = "
                                         f"{pooled.abs().max().item():.3g}); store them in float32 or bfloat16")
                    if acts is None:
                        acts = torch.empty((len(names), n_rows, pooled.shape[-1]), dtype=dtype)
                    acts[p, dest] = stored
                bar.update(len(batch))
    finally:
        model.train(was_training)

    constant = [n for n, a in zip(names, acts) if bool((a == a[0]).all())]
    meta = {
        "n_texts": n_texts,
        "n_rows": n_rows,
        "n_tokens": sum(lengths),
        "probe_hash": texts_hash(texts),
        "ids_hash": cache.hash_obj(ids),
        "row_text": row_text.tolist(),
        "constant_points": constant,
        "model_class": type(model).__name__,
        "model_name": str(getattr(model.config, "_name_or_path", "")),
        "n_layers": n_layers(model),
        "d_model": int(acts.shape[-1]),
        "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "vocab_hash": vocab_hash(tokenizer),
        "add_special_tokens": add_special_tokens,
        "max_rows": max_rows,
        "seed": seed,
        "dtype": str(dtype),
    }
    if pooling != "mean":
        meta["row_pos"] = row_pos.tolist()
    return Activations(acts=acts, hook_points=list(names), pooling=pooling, meta=meta)


def _check_finite(name: str, pooled: torch.Tensor, row_text: torch.Tensor, texts: list[str]) -> None:
    finite = torch.isfinite(pooled).all(-1)
    if bool(finite.all()):
        return
    r = int((~finite).nonzero()[0])
    kind = "NaN" if bool(torch.isnan(pooled[r]).any()) else "Inf"
    i = int(row_text[r])
    raise ValueError(f"{kind} in {name} activations (text {i}: {texts[i][:60]!r}): the model produced "
                     "non-finite values; check its weights and dtype")


def capture_cached(
    model: str | os.PathLike | torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    hook_points: Sequence[str] | None = None,
    pooling: str = "last",
    cache_dir: str | os.PathLike | None = None,
    *,
    model_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    max_rows: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    add_special_tokens: bool = False,
    mmap: bool = False,
) -> Activations:
    """``capture`` of a saved checkpoint, cached on disk as safetensors keyed by content.

    The key combines the checkpoint's content hash (``cache.weights_hash``), the model dtype, the
    probe texts and their token ids, the hook points, ``pooling``, ``max_rows``, ``seed``,
    ``dtype`` and ``add_special_tokens`` (not ``batch_size`` or the padding side, which do not
    change the result). A hit runs no model. Each entry is ``acts-<key>.safetensors`` plus a JSON
    record of its full key, size, sha256 and meta; an entry whose record is missing or does not
    match (truncated, edited, stale) is rebuilt with a logged warning, never read. Builds are
    written to a temporary file, renamed into place, under an inter-process lock.

    Args:
        model: a model directory (the model is loaded with
            ``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)`` on a miss only), or
            an already loaded model together with ``model_dir``, the directory it was loaded from
            (its weights must still be those on disk).
        tokenizer: the tokenizer, or None to load it from the directory.
        texts, hook_points, pooling, batch_size, max_rows, seed, dtype, add_special_tokens: as in
            ``capture``. ``hook_points`` must be a list of names (or None) here.
        cache_dir: where entries live (default: ``<model_dir>/activations``).
        model_dir: the directory of an already loaded ``model``.
        device: device a model loaded here is moved to (default CPU); for a loaded model, as in
            ``capture``.
        mmap: return ``acts`` memory-mapped from the cache file (copy-on-write: writing to the
            tensor never changes the file) instead of read into memory, on a hit and on a miss
            alike; pages are read from disk only when touched. With ``dtype=torch.float16`` a
            ``[29, 512, 1024]`` capture is 30 MB on disk. The file must not be rewritten in place
            while the tensor is alive (the cache itself only ever replaces files by renaming).

    Returns:
        ``Activations``, identical (acts and meta) on a hit and on the miss that built it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = model if isinstance(model, torch.nn.Module) else None
    if loaded is None:
        if model_dir is not None:
            raise ValueError("pass model_dir only together with a loaded model")
        model_dir = model
    elif model_dir is None:
        raise ValueError(f"capture_cached got a loaded {type(model).__name__} without model_dir: pass the "
                         "directory it was loaded from, whose weights key the cache")
    model_dir = Path(model_dir)
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

    model_dtype = torch.float32 if loaded is None else next(loaded.parameters()).dtype
    key = {
        "format": "alignkit-activations", "version": CACHE_VERSION,
        "weights": cache.weights_hash(model_dir), "model_dtype": str(model_dtype),
        "probe_hash": texts_hash(texts), "ids_hash": cache.hash_obj(ids),
        "hook_points": None if hook_points is None else list(hook_points),
        "pooling": pooling, "max_rows": max_rows, "seed": seed, "dtype": str(dtype),
        "add_special_tokens": add_special_tokens,
    }
    digest = cache.hash_obj(key)
    cache_dir = Path(cache_dir) if cache_dir is not None else model_dir / "activations"
    path = cache_dir / f"acts-{digest}.safetensors"
    record_path = cache_dir / f"acts-{digest}.json"
    with cache.build_lock(path):
        hit = _read_entry(path, record_path, key, digest, mmap=mmap)
        if hit is not None:
            logger.info("activation cache hit %s", path)
            return hit
        if loaded is None:
            loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            loaded.to(device if device is not None else "cpu")
        acts = capture(loaded, tokenizer, texts, hook_points, pooling, batch_size=batch_size, max_rows=max_rows,
                       seed=seed, device=device, dtype=dtype, add_special_tokens=add_special_tokens)
        _write_entry(path, record_path, key, digest, acts)
        logger.info("activation cache built %s", path)
        if mmap:
            acts = dataclasses.replace(acts, acts=mmap_tensor(path, "acts"))
        return acts


def _read_entry(path: Path, record_path: Path, key: dict | None, digest: str | None,
                mmap: bool = False) -> Activations | None:
    """The cached entry, or None when absent or when it fails any check (logged as a warning).

    ``key`` and ``digest`` None: accept the entry's own recorded key (``load_activations``).
    """
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
        if cache.sha256_file(path) != info["sha256"]:
            raise ValueError("sha256 does not match the record (corrupted or rewritten)")
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != digest:
                raise ValueError("the file's own key does not match")
            acts = None if mmap else f.get_tensor("acts")
        if mmap:
            acts = mmap_tensor(path, "acts")
        return Activations(acts=acts, hook_points=info["hook_points"], pooling=info["pooling"], meta=info["meta"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        logger.warning("activation cache entry %s is damaged or stale (%s); rebuilding it", path, e)
        return None


def _write_entry(path: Path, record_path: Path, key: dict, digest: str, acts: Activations) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"acts": acts.acts.contiguous()}, tmp, metadata={"key": digest})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    cache.write_json_atomic(record_path, {
        "key": key, "digest": digest, "size": path.stat().st_size, "sha256": cache.sha256_file(path),
        "hook_points": acts.hook_points, "pooling": acts.pooling, "meta": acts.meta,
    })


# safetensors dtype codes -> (numpy dtype of the raw bytes, torch dtype to view them as)
_SAFETENSORS_DTYPES = {
    "F16": (np.float16, torch.float16), "BF16": (np.int16, torch.bfloat16),
    "F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64),
}


def mmap_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped (copy-on-write) instead of read.

    safetensors stores a little-endian u64 header length, a JSON header with each tensor's dtype,
    shape and byte offsets, then the raw bytes; the tensor is a ``numpy.memmap`` over its bytes
    (``mode="c"``: writes stay private to the process, the file is never modified), viewed as a
    torch tensor without a copy.

    Args:
        path: a ``.safetensors`` file.
        name: the tensor's name in it (``"acts"`` for activation cache entries).

    Returns:
        The tensor, on the CPU, backed by the file (float16, bfloat16, float32 or float64).

    Raises:
        ValueError: ``name`` is not in the file, an unsupported dtype, or a header whose offsets
            do not fit the file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        (n_header,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n_header))
    if name not in header:
        raise ValueError(f"{path} holds no tensor {name!r} (tensors: {sorted(k for k in header if k != '__metadata__')})")
    info = header[name]
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; memory-mapping supports "
                         f"{sorted(_SAFETENSORS_DTYPES)}")
    np_dtype, torch_dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    shape = tuple(int(s) for s in info["shape"])
    start, end = (int(o) for o in info["data_offsets"])
    offset = 8 + n_header + start
    if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize or \
            offset + (end - start) > path.stat().st_size:
        raise ValueError(f"{path}: the header's offsets for {name!r} do not fit its shape {shape} or the file size")
    if end == start:
        return torch.empty(shape, dtype=torch_dtype)
    arr = np.memmap(path, dtype=np_dtype, mode="c", offset=offset, shape=shape)
    t = torch.from_numpy(arr)
    return t.view(torch_dtype) if t.dtype != torch_dtype else t


def load_activations(path: str | os.PathLike, mmap: bool = True) -> Activations:
    """A cache entry written by ``capture_cached`` (``acts-<key>.safetensors``), by path.

    For readers that know which entry they want (e.g. a later stage of a pipeline, another process)
    and should not reload and rehash the checkpoint to find it. The entry is verified exactly as a
    cache hit is (its JSON record beside it: key, size, sha256 and the file's own key).

    Args:
        path: the entry's ``.safetensors`` file.
        mmap: memory-map ``acts`` from the file (default) instead of reading it into memory.

    Returns:
        The ``Activations`` that ``capture_cached`` returned when it built the entry.

    Raises:
        ValueError: no such entry, or one that fails verification (missing or stale record,
            wrong size or sha256).
    """
    path = Path(path)
    record_path = path.with_suffix(".json")
    if not path.is_file() or not record_path.is_file():
        raise ValueError(f"{path} is not an activation cache entry (need {path.name} and {record_path.name})")
    out = _read_entry(path, record_path, None, None, mmap=mmap)
    if out is None:
        raise ValueError(f"activation cache entry {path} failed verification (see the warning logged above)")
    return out


def capture_run(run_dir: str | Path, texts: Sequence[str], pooling: str = "last",
                hook_points: Sequence[str] | None = None, **kw) -> dict[int, Activations]:
    """Activations of every complete checkpoint of a run, ``{step: Activations}`` (cached).

    Entries live in ``<run_dir>/activations``; ``kw`` goes to ``capture_cached``. All captures are
    checked to be comparable with the first.
    """
    from alignkit.train import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"no complete checkpoints in {run_dir}")
    out = {step: capture_cached(d, None, texts, hook_points, pooling, cache_dir=Path(run_dir) / "activations", **kw)
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


def varying_points(captures: Sequence[Activations]) -> tuple[list[int], list[str], list[str]]:
    """Hook points usable by the measures: those no capture recorded as constant across prompts.

    A hook point whose rows are identical for every prompt (the embedding output under last-token
    pooling: every prompt ends with the same token) has zero variance, where CKA and effective
    rank are undefined; it is dropped and named, never turned into NaN.

    Args:
        captures: captures of the same hook points (e.g. every checkpoint of a run).

    Returns:
        ``(keep, labels, dropped)``: indices into ``hook_points`` of the kept points, their short
        labels (``"embed"``, ``"0"``, ``"1"`` ...), and the dropped point names, sorted.
    """
    captures = list(captures)
    if not captures:
        raise ValueError("varying_points needs at least one capture, got none")
    skip = set().union(*(set(a.meta.get("constant_points", [])) for a in captures))
    names = captures[0].hook_points
    keep = [i for i, n in enumerate(names) if n not in skip]
    return keep, [names[i].replace("layers.", "").replace(".resid", "") for i in keep], sorted(skip)


def check_comparable(a: Activations, b: Activations, same_width: bool = True,
                     same_tokenization: bool = True) -> None:
    """Raise ValueError unless two captures can be compared point by point and row by row.

    Args:
        a, b: captures, e.g. of a base model and a fine-tuned checkpoint.
        same_width: require equal ``d_model`` (``False`` for CKA across architectures).
        same_tokenization: require the probe texts to have the same token ids (same tokenizer);
            always required for ``"tokens"`` pooling, where a row is a token.
    """
    if a.hook_points != b.hook_points:
        la, lb = a.meta.get("n_layers"), b.meta.get("n_layers")
        if la is not None and lb is not None and la != lb:
            raise ValueError(f"cannot compare: a has {la} layers, b has {lb}")
        raise ValueError(f"cannot compare: hook points differ: a has {a.hook_points}, b has {b.hook_points}")
    if a.pooling != b.pooling:
        raise ValueError(f"cannot compare: a uses {a.pooling!r} pooling, b {b.pooling!r}")
    if a.meta.get("probe_hash") != b.meta.get("probe_hash"):
        ma, mb = a.meta, b.meta
        raise ValueError(f"cannot compare: different probe sets (a: {ma.get('n_texts')} texts, hash "
                         f"{ma.get('probe_hash')}; b: {mb.get('n_texts')} texts, hash {mb.get('probe_hash')})")
    if a.acts.shape[1] != b.acts.shape[1]:
        raise ValueError(f"cannot compare: a has {a.acts.shape[1]} rows, b has {b.acts.shape[1]}")
    if same_width and a.acts.shape[2] != b.acts.shape[2]:
        raise ValueError(f"cannot compare: a has width {a.acts.shape[2]}, b has {b.acts.shape[2]} "
                         "(pass same_width=False for measures that allow it)")
    if (same_tokenization or a.pooling == "tokens") and a.meta.get("ids_hash") != b.meta.get("ids_hash"):
        raise ValueError("cannot compare: the probe texts were tokenized differently (different tokenizers "
                         "or add_special_tokens)")
    if a.pooling == "tokens" and (a.meta.get("row_text") != b.meta.get("row_text")
                                  or a.meta.get("row_pos") != b.meta.get("row_pos")):
        raise ValueError("cannot compare: the rows are different tokens (different max_rows or seed)")


def check_same_tokenizer(tok_a, tok_b) -> None:
    """Raise ValueError unless two tokenizers have the same vocabulary and special tokens."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        diff = sorted(t for t in set(va) | set(vb) if va.get(t) != vb.get(t))
        t = diff[0]
        raise ValueError(f"tokenizers differ: vocabularies of {len(va)} and {len(vb)} tokens, {len(diff)} entries "
                         f"differ (e.g. {t!r}: {va.get(t, 'absent')} vs {vb.get(t, 'absent')})")
    sa, sb = _special_tokens(tok_a), _special_tokens(tok_b)
    if sa != sb:
        k = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))[0]
        raise ValueError(f"tokenizers differ in special tokens: {k} {sa.get(k)!r} vs {sb.get(k)!r}")
