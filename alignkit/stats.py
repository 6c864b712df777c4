"""Input checks and intervals shared by the measures: array conversion, finiteness, bootstraps."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Band(Mapping):
    """An estimate with its interval, ``point``, ``lo``, ``hi`` of one shape; also readable as
    ``band["point"]``, like the dicts the bootstrap functions return (plots take either)."""

    point: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in ("point", "lo", "hi"):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(("point", "lo", "hi"))

    def __len__(self) -> int:
        return 3

    @classmethod
    def of(cls, d: Mapping) -> "Band":
        """The ``point``/``lo``/``hi`` of a mapping (e.g. a bootstrap result), as float64."""
        return cls(*(np.asarray(d[k], dtype=np.float64) for k in ("point", "lo", "hi")))

    def stack(self) -> np.ndarray:
        """``[3, ...]``: point, lo, hi (for storage)."""
        return np.stack([self.point, self.lo, self.hi])


def as_float_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """``x`` as a floating torch tensor (no copy when possible), kept on CPU or CUDA.

    Integer and boolean input becomes float64; complex input and other types raise TypeError
    naming ``name``. Devices without float64 (e.g. MPS) are moved to the CPU.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} must hold real numbers, got numpy dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        t = t.cpu()
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def check_finite(t: torch.Tensor, name: str, why: str) -> None:
    """ValueError naming the first layer of a ``[L, n, d]`` stack (or the matrix) with NaN/Inf,
    e.g. ``"acts layer 3 contains NaN; CKA needs finite activations"`` (``why`` ends it)."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
    more = ""
    if t.ndim == 3:
        bad = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        name = f"{name} layer {bad[0]}"
    raise ValueError(f"{name} contains {kind}{more}; {why}")


def zero_variance_error(name: str, what: str = "CKA") -> ValueError:
    """The error for a layer whose rows are all identical, where ``what`` is undefined."""
    return ValueError(f"{name} has zero variance across examples (all rows identical); {what} "
                      "is undefined there: drop it or pool differently")


def centred_interval(point: np.ndarray, samples: np.ndarray, ci: float = 0.95,
                     scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``point`` plus the centred percentiles of resampled values, times ``scale``.

    The resamples estimate the *spread* only: ``lo, hi = point + scale * quantile(samples -
    mean(samples))`` at ``(1 - ci) / 2`` and ``(1 + ci) / 2`` over axis 0 (NaN rows skipped), so
    a location shift of the resampled values (duplicates, half-size samples) cannot move it.
    ``scale`` rescales the spread of size-``m`` subsamples to size ``n`` (``sqrt(m / (n - m))``).
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    dev = samples - np.nanmean(samples, 0)
    q = (1.0 - ci) / 2.0
    return (point + scale * np.nanquantile(dev, q, axis=0),
            point + scale * np.nanquantile(dev, 1.0 - q, axis=0))


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0,
                   ci: float = 0.95) -> dict[str, np.ndarray]:
    """Mean of ``values: [n_examples, ...]`` over examples, with a percentile bootstrap interval.

    NaN entries (e.g. masked NPE) are left out of every mean; a column that is all NaN gives NaN.

    Returns:
        ``{"point", "lo", "hi", "n"}``, each of the shape of one example's values (``n``: the
        number of non-NaN examples behind each point).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 1 or v.shape[0] == 0:
        raise ValueError("bootstrap_mean needs values of shape [n_examples, ...] with n_examples "
                         f">= 1, got {v.shape}")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")
    n = v.shape[0]
    flat = v.reshape(n, -1)
    ok = np.isfinite(flat)
    if np.isinf(flat).any():
        raise ValueError("bootstrap_mean got infinite values")
    filled = np.where(ok, flat, 0.0)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = filled.sum(0) / ok.sum(0)
        boots = (counts @ filled) / (counts @ ok)  # [n_boot, cols]; NaN: no valid row drawn
    lo, hi = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    some = ok.any(0)
    if some.any():
        alpha = (1 - ci) / 2
        lo[some], hi[some] = np.nanquantile(boots[:, some], [alpha, 1 - alpha], axis=0)
    shape = v.shape[1:]
    return {"point": point.reshape(shape), "lo": lo.reshape(shape), "hi": hi.reshape(shape),
            "n": ok.sum(0).reshape(shape)}
