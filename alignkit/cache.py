"""Atomic writes, content hashes and cache keys shared by every cached artifact.

Every artifact that takes longer than a second to build is written under a temporary name and
renamed into place, so a reader never sees a half-written file or directory as complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock


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
    """Full sha256 hex digest of a file's bytes.

    Memoised in-process by (absolute path, size, mtime_ns): checkpoints are verified by several
    stages (list, evaluate, capture), and a 0.6B checkpoint takes seconds to hash. Any rewrite or
    truncation changes size or mtime and is hashed afresh.
    """
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
    """Content hash of a saved model directory (its weight files), independent of its path."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:length]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
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
    """Yield a temporary directory beside ``final``; rename it to ``final`` on success.

    On any exception the temporary directory is removed and ``final`` is left untouched. An
    existing ``final`` is replaced only after the new one is complete.
    """
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
    """True when ``model_dir/manifest.json`` exists and records the hash of the weights there now.

    A missing, truncated or damaged weight file, or a manifest that cannot be read, gives False:
    the directory is then rebuilt, never read as valid.
    """
    manifest = Path(model_dir) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return weights_hash(model_dir) == json.loads(manifest.read_text())["weights_hash"]
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        return False


def ensure_writable(path: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Fail early, before any long work, if ``path`` cannot hold the results.

    Creates ``path`` (with parents), writes and removes a probe file, and checks that at least
    ``need_bytes`` are free on its file system.

    Raises:
        OSError: naming the directory and the remedy, when it cannot be created or written, or
            when less than ``need_bytes`` is free.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise OSError(f"cannot write to {path} ({e.strerror or e}): choose a writable directory with "
                      "ALIGNKIT_HOME or the config's root") from e
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OSError(f"only {free / 2**30:.2f} GiB free at {path}, about {need_bytes / 2**30:.2f} GiB needed: "
                      "free some space or point ALIGNKIT_HOME (or the config's root) to a larger disk")
    return path
