"""Input checks and intervals shared by the measures: array conversion, finiteness, bootstraps."""

from __future__ import annotations

import dataclasses
import math
import warnings
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


def ratio_bootstrap(num: np.ndarray, den: np.ndarray, n_boot: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``sum(num) / sum(den)`` over rows of ``num, den: [n, k]`` per column, and the same ratio on
    ``n_boot`` bootstrap resamples of the rows (multinomial counts from ``default_rng(seed)``),
    one resample shared by every column, so differences between columns are paired.

    Returns ``point: [k]`` and ``boots: [n_boot, k]``; a ratio with a zero denominator is NaN.
    """
    n = num.shape[0]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    counts = counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = num.sum(0) / den.sum(0)
        boots = (counts @ num) / (counts @ den)
    boots[~np.isfinite(boots)] = np.nan
    return point, boots


def gap_fraction(delta: np.ndarray, gap: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 ci: float = 0.95) -> Band:
    """Fraction of the mean gap a patch recovers: ``mean_i delta_i / mean_i gap_i`` per column.

    The summary a patching curve plots (mean Δ against the mean gap), unlike the mean of
    per-example ratios (NPE), which is heavy-tailed where a gap is small. The interval is a
    paired percentile bootstrap over examples: numerator and denominator come from one resample.

    Args:
        delta: ``[n, ...]`` per-example effect of the patch (NaN entries are left out of their
            column, with their gap).
        gap: ``[n]`` per-example full effect (``LP(donor) - LP(receiver)``).

    ValueError for mismatched lengths, infinite values, or a mean gap of 0.
    """
    d = np.asarray(delta, dtype=np.float64)
    g = np.asarray(gap, dtype=np.float64)
    if g.ndim != 1 or d.ndim < 1 or d.shape[0] != g.shape[0] or g.shape[0] == 0:
        raise ValueError(f"gap_fraction needs delta [n, ...] and gap [n] with n >= 1, got "
                         f"{d.shape} and {g.shape}")
    if not np.isfinite(g).all() or np.isinf(d).any():
        raise ValueError("gap_fraction got NaN or infinite gaps, or infinite deltas")
    if not (isinstance(n_boot, int) and n_boot >= 1) or not 0 < ci < 1:
        raise ValueError(f"n_boot must be a positive int and ci in (0, 1), got {n_boot!r}, {ci!r}")
    n = d.shape[0]
    flat = d.reshape(n, -1)
    ok = np.isfinite(flat)
    num, den = np.where(ok, flat, 0.0), ok * g[:, None]
    if np.all(den.sum(0) == 0):
        raise ValueError("gap_fraction: the mean gap is 0, so no fraction of it is defined")
    point, boots = ratio_bootstrap(num, den, n_boot, seed)
    alpha = (1 - ci) / 2
    lo, hi = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    some = np.isfinite(boots).any(0)
    if some.any():
        lo[some], hi[some] = np.nanquantile(boots[:, some], [alpha, 1 - alpha], axis=0)
    shape = d.shape[1:]
    return Band(point.reshape(shape), lo.reshape(shape), hi.reshape(shape))


def near_best(values: np.ndarray, n_boot: int = 1000, seed: int = 0,
              ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The best column of ``values: [n, ..., K]`` (largest mean over examples, per leading index)
    and every column tied with it: those whose paired bootstrap interval of ``mean(best) -
    mean(column)`` reaches 0. An argmax among ties is not a finding; the tied set is.

    Returns:
        ``best: [...]`` (int) and ``ties: [..., K]`` (bool, the best included; all-NaN columns
        never tie).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 2 or v.shape[0] == 0:
        raise ValueError(f"near_best needs values [n, ..., K] with n >= 1, got {v.shape}")
    with warnings.catch_warnings():  # all-NaN columns (cross-layer grids) are handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        point = np.nanmean(v, 0)
    if np.isnan(point).all(-1).any():
        raise ValueError("near_best: a row of candidates is all NaN")
    best = np.nanargmax(point, -1)
    diff = np.take_along_axis(v, best[None, ..., None], -1) - v
    lo = bootstrap_mean(diff, n_boot=n_boot, seed=seed, ci=ci)["lo"]
    ties = (lo <= 0) & ~np.isnan(point)
    np.put_along_axis(ties, best[..., None], True, -1)
    return best, ties


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's exact test for two models scored on the same problems (paired accuracies).

    ``b``: problems only ``a`` gets right, ``c``: only ``b``; the two-sided p-value is the exact
    binomial ``P(min(b, c) or fewer of b + c | p = 1/2)``, doubled and capped at 1 (1 when
    ``b + c = 0``). ``diff`` is ``acc(b) - acc(a)``.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"mcnemar needs two [n] boolean arrays over the same problems, got "
                         f"{a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    m, k = only_a + only_b, min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m if m else 1.0
    return {"only_a": only_a, "only_b": only_b, "n": int(a.size),
            "diff": float(b.mean() - a.mean()), "p": min(1.0, 2.0 * tail)}


def envelope(bands: list[Band]) -> Band:
    """Seeds combined: the mean of the seeds' points and the envelope of their intervals
    (lowest ``lo``, highest ``hi``), which covers both the within-run interval and the spread
    between training seeds. A sign claim holds across seeds when this excludes 0."""
    if not bands:
        raise ValueError("envelope needs at least one seed's Band")
    return Band(np.mean([b.point for b in bands], 0), np.min([b.lo for b in bands], 0),
                np.max([b.hi for b in bands], 0))


def sign_verdict(bands: list[Band], claimed: int) -> str:
    """``"agrees"``, ``"disagrees"`` or ``"cannot tell"`` for a claimed sign (+1 / -1) of a scalar
    quantity measured in each training seed (one Band per seed, 0-d).

    Agrees (disagrees) when at least 2 seeds were run and every seed's interval lies above
    (below) 0 in the claimed (opposite) direction, i.e. the ``envelope`` excludes 0; one seed
    cannot tell, since training variance is then unknown.
    """
    if claimed not in (1, -1):
        raise ValueError(f"claimed must be +1 or -1, got {claimed!r}")
    env = envelope(bands)
    lo, hi = float(env.lo) * claimed, float(env.hi) * claimed
    if claimed < 0:
        lo, hi = hi, lo
    if len(bands) < 2:
        return "cannot tell"
    return "agrees" if lo > 0 else ("disagrees" if hi < 0 else "cannot tell")
