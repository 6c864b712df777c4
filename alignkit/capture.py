"""The one capture path (CKA, spectral, patching): hook-point activations pooled per text inside
the forward hooks, in float64, with an on-disk cache. Poolings: docs/measures.md#hook-points"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from alignkit import models, runs
from alignkit.hooks import hook_points as default_hook_points
from alignkit.hooks import record, select

logger = logging.getLogger(__name__)

POOLINGS = ("last", "mean", "question")
CACHE_VERSION = 3  # 2: stored by runs.cached; 3: a row per text only


@dataclasses.dataclass
class Activations:
    """Captured activations of one model on one probe set.

    ``acts: [n_points, n_texts, d_model]`` in ``hook_points`` order (e.g. ``["embed",
    "layers.0.resid", ...]``), a row per text. ``meta`` is plain JSON: the arguments, sizes and
    hashes (``probe_hash`` of the texts, ``ids_hash`` of their token ids), the model and
    tokenizer, ``row_pos`` (under ``"last"``: each text's last token position),
    ``constant_points`` (points whose rows are all identical, e.g. ``embed`` under ``"last"`` when
    every prompt ends alike).
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
    return runs.hash_obj({"vocab": vocab, "special": models.special_tokens(tokenizer)})


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
    """``(prefix, suffix)``: how many tokens every text shares at its start and end (the template
    ``"question"`` pooling leaves out); ValueError for < 2 texts or a text with nothing else."""
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


def _check_args(pooling: str, batch_size: int, dtype: torch.dtype) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")


def capture(model: torch.nn.Module, tokenizer, texts: Sequence[str],
            hook_points: Sequence[str] | Callable[[str], bool] | None = None, pooling: str = "last",
            batch_size: int = 32, device: str | torch.device | None = None,
            dtype: torch.dtype = torch.float32, add_special_tokens: bool = False) -> Activations:
    """Run ``model`` on ``texts`` and pool each hook point's output per text.

    Args:
        hook_points: names or a ``names_filter`` predicate (default: ``embed`` and every
            ``layers.{i}.resid``).
        pooling: ``"last"`` real token, ``"mean"`` over real tokens or ``"question"`` (over the
            tokens besides the template all texts share, ``template_span``).
        device: where the model is expected to be (default: where its parameters are).
        dtype: storage dtype of ``acts`` (pooled in float64 first).
    """
    return capture_poolings(model, tokenizer, texts, [pooling], hook_points, batch_size, device,
                            dtype, add_special_tokens)[pooling]


def capture_poolings(model: torch.nn.Module, tokenizer, texts: Sequence[str],
                     poolings: Sequence[str],
                     hook_points: Sequence[str] | Callable[[str], bool] | None = None,
                     batch_size: int = 32, device: str | torch.device | None = None,
                     dtype: torch.dtype = torch.float32,
                     add_special_tokens: bool = False) -> dict[str, Activations]:
    """``{pooling: capture(..., pooling)}`` for several poolings from one forward per batch (the
    same batches, so each equals its own ``capture`` bit for bit)."""
    poolings = list(dict.fromkeys(poolings))
    if not poolings:
        raise ValueError("capture_poolings needs at least one pooling")
    for pooling in poolings:
        _check_args(pooling, batch_size, dtype)
    names = default_hook_points(model) if hook_points is None else select(model, hook_points)
    texts = texts if isinstance(texts, str) else list(texts)  # tokenize rejects a single str
    ids = tokenize(tokenizer, texts, add_special_tokens)
    lengths, n_texts = [len(s) for s in ids], len(texts)
    spans = {p: template_span(ids) if p == "question" else (0, 0) for p in poolings}
    run_on = models.input_device(model)
    want = run_on if device is None else torch.device(device)
    if want.type != run_on.type or want.index not in (None, run_on.index):
        raise ValueError(f"the model is on {run_on} but device={str(want)!r}; move the model first")
    state: dict[str, torch.Tensor] = {}  # the batch's last-token indices
    masks: dict[str, torch.Tensor] = {}  # each pooling's tokens to pool

    def pool(_name: str, t: torch.Tensor) -> list[torch.Tensor]:  # [b, s, d] -> P x [b, d] f64
        out = []
        for p in poolings:
            if p == "last":
                out.append(t[torch.arange(len(t), device=t.device),
                             state["last"].to(t.device)].double())
            else:
                m = masks[p].unsqueeze(-1).to(t.device)  # (a layer on another GPU)
                out.append(torch.where(m, t.double(), 0.0).sum(1) / m.sum(1))
        return out

    acts = {p: torch.empty((len(names), n_texts, 0), dtype=dtype) for p in poolings}
    with models.eval_mode(model), record(model, names, reduce=pool) as store, \
            tqdm(total=n_texts, desc="capture", unit="text", leave=False) as bar:
        for batch in models.by_length(lengths, batch_size):
            rows = [ids[i] for i in batch]
            for p in poolings:
                inputs, masks[p], state["last"] = _batch_inputs(tokenizer, rows, spans[p], run_on)
            store.clear()
            models.decoder(model)(**inputs, use_cache=False)
            for k, p in enumerate(poolings):
                for j, name in enumerate(names):
                    stored = _to_storage(name, store[name][k], batch, texts, dtype)
                    if acts[p].shape[-1] == 0:
                        acts[p] = torch.empty((len(names), n_texts, stored.shape[-1]),
                                              dtype=dtype)
                    acts[p][j, torch.tensor(batch)] = stored
            bar.update(len(batch))

    out = {}
    for p in poolings:
        meta = {"n_texts": n_texts, "n_rows": n_texts, "n_tokens": sum(lengths),
                "probe_hash": texts_hash(texts), "ids_hash": runs.hash_obj(ids),
                "constant_points": [n for n, a in zip(names, acts[p]) if bool((a == a[0]).all())],
                "model_class": type(model).__name__,
                "model_name": str(getattr(model.config, "_name_or_path", "")),
                "n_layers": models.n_layers(model), "d_model": int(acts[p].shape[-1]),
                "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
                "vocab_size": len(tokenizer), "vocab_hash": vocab_hash(tokenizer),
                "add_special_tokens": add_special_tokens, "dtype": str(dtype)}
        if p == "question":
            meta["template_tokens"] = list(spans[p])
        if p == "last":
            meta["row_pos"] = [n - 1 for n in lengths]
        out[p] = Activations(acts=acts[p], hook_points=list(names), pooling=p, meta=meta)
    return out


def _batch_inputs(tokenizer, ids: list[list[int]], template: tuple[int, int],
                  device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A padded batch's decoder inputs, the mask of tokens to pool and each last token's index."""
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids, mask = models.pad(ids, models.pad_id(tokenizer), left)
    offset = torch.tensor([input_ids.shape[1] - len(s) if left else 0 for s in ids])
    pool_mask = torch.zeros_like(mask)
    for r, s in enumerate(ids):
        pool_mask[r, offset[r] + template[0]: offset[r] + len(s) - template[1]] = True
    last = offset + torch.tensor([len(s) for s in ids]) - 1
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)  # real tokens at 0..len-1
    inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=mask.long())
    return {k: v.to(device) for k, v in inputs.items()}, pool_mask.to(device), last.to(device)


def _to_storage(name: str, pooled: torch.Tensor, batch: list[int], texts: list[str],
                dtype: torch.dtype) -> torch.Tensor:
    """``pooled: [rows, d]`` as ``dtype`` on the CPU; raises on a NaN/Inf or ``dtype`` overflow."""
    finite = torch.isfinite(pooled).all(-1)
    if not bool(finite.all()):
        r = int((~finite).nonzero()[0])
        kind = "NaN" if bool(torch.isnan(pooled[r]).any()) else "Inf"
        i = batch[r]
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
                   device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                   add_special_tokens: bool = False, mmap: bool = False,
                   model_dtype: str = "float32",
                   device_map: str | dict | None = None,
                   together: Sequence[str] = ()) -> Activations:
    """``capture`` of a saved checkpoint, cached by ``runs.cached`` under its weights' hash, the
    model dtype, the texts, their token ids and every argument that changes the result.

    Args:
        model: a model directory (loaded in ``model_dtype`` on a miss only), or a loaded model
            whose weights are still those of ``model_dir``; ``tokenizer`` None loads the
            directory's.
        cache_dir: where entries live (default: ``<model_dir>/activations``).
        device: where a model loaded here goes (default CPU; ``device_map`` spreads it instead,
            ``models.placement``); for a loaded one, as in ``capture``.
        mmap: ``acts`` memory-mapped from the entry's file, copy-on-write.
        together: other poolings cached beside this one: on a miss, those not cached yet come
            from the same forwards (``capture_poolings``).
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
    poolings = list(dict.fromkeys([pooling, *together]))
    for p in poolings:
        _check_args(p, batch_size, dtype)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    ids = tokenize(tokenizer, texts, add_special_tokens)
    run_dtype = getattr(torch, model_dtype) if loaded is None else next(loaded.parameters()).dtype
    weights = runs.weights_hash(model_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else model_dir / "activations"

    def key(p: str) -> dict:
        return {"format": "alignkit-activations", "version": CACHE_VERSION, "weights": weights,
                "model_dtype": str(run_dtype), "probe_hash": texts_hash(texts),
                "ids_hash": runs.hash_obj(ids),
                "hook_points": None if hook_points is None else list(hook_points), "pooling": p,
                "dtype": str(dtype), "add_special_tokens": add_special_tokens}

    def entry(p: str) -> Path:
        return cache_dir / f"acts-{runs.hash_obj(key(p))}"

    fresh: dict[str, Activations] = {}  # poolings computed in one pass, not yet stored

    def compute(p: str) -> Activations:
        if p not in fresh:
            m = loaded if loaded is not None else models.load_model(
                model_dir, model_dtype, device if device is not None else "cpu",
                device_map=device_map)[0]
            wanted = [q for q in poolings if q == p or not entry(q).exists()]
            fresh.update(capture_poolings(m, tokenizer, texts, wanted, hook_points, batch_size,
                                          device, dtype, add_special_tokens))
        return fresh.pop(p)

    out = runs.cached(entry(pooling), key(pooling), lambda: compute(pooling), mmap=mmap)
    for p in poolings[1:]:
        runs.cached(entry(p), key(p), lambda p=p: compute(p), mmap=True)
    return out


def varying_points(captures: Sequence[Activations]) -> tuple[list[int], list[str], list[str]]:
    """Hook points no capture recorded as constant, as ``(keep, labels, dropped)``: indices into
    ``hook_points``, short labels (``"embed"``, ``"0"``, ...) and the dropped names, sorted."""
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
    ``same_tokenization`` False different token ids."""
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
    if same_tokenization and ma.get("ids_hash") != mb.get("ids_hash"):
        raise ValueError("cannot compare: the probe texts were tokenized differently "
                         "(different tokenizers or add_special_tokens)")
