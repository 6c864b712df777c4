"""Run and checkpoint directories, manifests, atomic writes and the content-keyed cache.

Layout of a run (``run_dir(cfg, method)`` = ``<root>/<method>/<preset>[-smoke]-<run_key>``)::

    checkpoints/step-000000/   the starting model (step 0), from_pretrained-loadable
    checkpoints/step-NNNNNN/   one directory per scheduled step, each with manifest.json
    trainer/checkpoint-N/      TRL/transformers state used only to resume
    train_log.json             the training-loss history (and the method's own metrics)
    activations/               captures (alignkit.capture)
    analysis/<stage>-<key>/    stage results (alignkit.stages): key.json + result/

Everything that takes longer than a second to build is written under a temporary name and
renamed into place, so a reader never sees a half-written file or directory as complete, and
every cached result records the key it was built under: a stale entry is never read as fresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
from filelock import FileLock

from alignkit.config import Config
from alignkit.data import POST_TRAINING_STREAM

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
    """Full sha256 hex digest of a file's bytes, memoised by (path, size, mtime_ns): any rewrite
    or truncation changes size or mtime and is hashed afresh."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
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
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:length]


def write_json_atomic(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> None:
    """Write ``obj`` as pretty JSON to ``path`` through a temporary file and a rename (keys
    sorted unless ``sort_keys=False``, which keeps the order of every dict, as results need)."""
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
    """Yield a temporary directory beside ``final``, renamed to ``final`` on success (replacing
    an existing one only then); on any exception it is removed and ``final`` left untouched."""
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
    """Whether ``model_dir/manifest.json`` records the hash of the weights there now (False for
    missing, truncated or damaged files: such a directory is rebuilt, never read as valid)."""
    manifest = Path(model_dir) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return weights_hash(model_dir) == json.loads(manifest.read_text())["weights_hash"]
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        return False


def ensure_writable(path: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Fail before any long work (OSError naming the directory and the remedy) unless ``path``
    can be created and written and has ``need_bytes`` free."""
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
    """Cache key of a run: base, data, every knob, the SFT run a DPO/GRPO run starts from
    (``init="sft"``) and, for GRPO, the stop strings that cut completions."""
    check_method(method)
    base = {"model": cfg.model, "tiny": cfg.tiny if cfg.model == "tiny" else None,
            "data": cfg.data_source, "generator": cfg.generator, "chat": cfg.chat,
            "precision": cfg.precision}  # training autocast; master weights are always fp32
    if method == "sft":
        return hash_obj(dict(base, sft=cfg.sft))
    knobs = getattr(cfg, method)
    obj = dict(base, method=method, stream=POST_TRAINING_STREAM, **{method: knobs},
               init=run_key(cfg, "sft") if knobs.init == "sft" else "base")
    if method == "grpo":
        obj["stop"] = cfg.eval.stop
    return hash_obj(obj)


def run_dir(cfg: Config, method: str) -> Path:
    """``<root>/<method>/<preset>[-smoke]-<run_key>``: where ``train(cfg, method)`` writes."""
    smoke = "-smoke" if cfg.smoke else ""
    return cfg.run_root / method / f"{cfg.preset}{smoke}-{run_key(cfg, method)}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run (weights match their manifest) as (step, directory)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return [(int(d.name.split("-")[1]), d) for d in sorted(root.glob("step-*"))
            if d.is_dir() and manifest_matches(d)]


def checkpoint_hashes(run_dir: Path) -> list[tuple[int, Path, str]]:
    """``(step, dir, weights_hash)`` of every complete checkpoint; ValueError when none."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"no complete checkpoints in {run_dir}")
    return [(s, d, json.loads((d / "manifest.json").read_text())["weights_hash"]) for s, d in ckpts]


def export_checkpoint(model, tokenizer, ckpt: Path, manifest: dict) -> None:
    """Save a from_pretrained directory with its manifest (and weights hash), atomically."""
    with atomic_dir(ckpt) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "manifest.json", dict(manifest, weights_hash=weights_hash(tmp)))


R = TypeVar("R")


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``path/arrays.npz`` (no pickle) and ``path/result.json`` (``meta``) atomically."""
    with atomic_dir(path) as tmp:
        np.savez(tmp / "arrays.npz", **arrays)
        write_json_atomic(tmp / "result.json", meta, sort_keys=False)


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, meta)`` of a ``save_arrays`` directory."""
    path = Path(path)
    meta = json.loads((path / "result.json").read_text())
    with np.load(path / "arrays.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}, meta


def cached(path: Path, key: dict, compute: Callable[[], R], load: Callable[[Path], R]) -> R:
    """The result stored at ``path`` under ``key``, else ``compute()`` saved there: ``result/``
    holds what its ``save`` wrote (``load`` reads it), ``key.json`` the key. A directory whose key
    differs or whose files are damaged is recomputed with a warning and replaced atomically."""
    with build_lock(path):
        if path.exists():
            try:
                if json.loads((path / "key.json").read_text()) != json.loads(stable_json(key)):
                    raise ValueError("it was stored under another key (stale)")
                result = load(path / "result")
                logger.info("reusing %s", path)
                return result
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                logger.warning("result %s is damaged or stale (%s); recomputing it", path, e)
        result = compute()
        with atomic_dir(path) as tmp:
            result.save(tmp / "result")
            write_json_atomic(tmp / "key.json", json.loads(stable_json(key)))
        logger.info("wrote %s", path)
        return result
