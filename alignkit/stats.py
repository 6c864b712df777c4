"""Input checks and intervals shared by the measures: array conversion, finiteness, bootstraps.
Formulas, controls and pitfalls: docs/measures.md#intervals"""

from __future__ import annotations

import dataclasses
import functools
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


def as_float_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """``x`` as a floating torch tensor (no copy when possible) on CPU or CUDA (devices without
    float64, e.g. MPS, move to the CPU). Integers and booleans become float64; complex input and
    other types raise TypeError naming ``name``."""
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
    """``lo, hi = point + scale * quantile(samples - mean(samples))`` at ``(1 -+ ci) / 2`` over
    axis 0, NaN rows skipped; ``scale = sqrt(m / (n - m))`` takes size-``m`` subsamples to size
    ``n`` (docs/measures.md#intervals)."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    dev = samples - np.nanmean(samples, 0)
    q = (1.0 - ci) / 2.0
    return (point + scale * np.nanquantile(dev, q, axis=0),
            point + scale * np.nanquantile(dev, 1.0 - q, axis=0))


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0,
                   ci: float = 0.95) -> dict[str, np.ndarray]:
    """Mean of ``values: [n_examples, ...]`` over examples, NaN entries left out, with a
    percentile bootstrap interval: ``{"point", "lo", "hi", "n"}`` of one example's shape (``n``:
    the non-NaN examples behind each point; an all-NaN column gives NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 1 or v.shape[0] == 0:
        raise ValueError("bootstrap_mean needs values of shape [n_examples, ...] with n_examples "
                         f">= 1, got {v.shape}")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")
    if np.isinf(v).any():
        raise ValueError("bootstrap_mean got infinite values")
    point, boots = _nan_means(v, n_boot, seed)
    lo, hi = _percentiles(boots.reshape(n_boot, -1), ci)
    shape = v.shape[1:]
    return {"point": point, "lo": lo.reshape(shape), "hi": hi.reshape(shape),
            "n": np.isfinite(v).sum(0)}


def _nan_means(v: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(point [...], boots [n_boot, ...])``: means over examples (axis 0) of ``v: [n, ...]``,
    NaN entries left out, on ``ratio_bootstrap``'s resamples (the finite entries' sums over
    their counts; NaN where a cell has none)."""
    flat = v.reshape(v.shape[0], -1)
    ok = np.isfinite(flat)
    point, boots = ratio_bootstrap(np.where(ok, flat, 0.0), ok.astype(np.float64), n_boot, seed)
    return point.reshape(v.shape[1:]), boots.reshape(n_boot, *v.shape[1:])


def ratio_bootstrap(num: np.ndarray, den: np.ndarray, n_boot: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``point: [k]``, ``sum(num) / sum(den)`` over the rows of ``num, den: [n, k]``, and
    ``boots: [n_boot, k]``, the same on multinomial resamples of the rows (``default_rng(seed)``)
    shared by every column (paired); NaN where a resampled denominator is 0."""
    n = num.shape[0]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    counts = counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = num.sum(0) / den.sum(0)
        boots = (counts @ num) / (counts @ den)
    boots[~np.isfinite(boots)] = np.nan
    return point, boots


def _percentiles(boots: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0 of ``boots: [n_boot, k]``; NaN for an all-NaN column."""
    alpha = (1 - ci) / 2
    lo, hi = np.full(boots.shape[1], np.nan), np.full(boots.shape[1], np.nan)
    some = np.isfinite(boots).any(0)
    if some.any():
        lo[some], hi[some] = np.nanquantile(boots[:, some], [alpha, 1 - alpha], axis=0)
    return lo, hi


def gap_fraction(delta: np.ndarray, gap: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 ci: float = 0.95) -> Band:
    """Fraction of the mean gap a patch recovers, ``mean_i delta_i / mean_i gap_i`` per column of
    ``delta: [n, ...]`` (NaN entries left out with their gap; ``gap: [n]`` the full effect
    ``LP(donor) - LP(receiver)``), with a paired percentile bootstrap interval over examples.
    ValueError for mismatched lengths, infinite values, or a mean gap of 0."""
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
    lo, hi = _percentiles(boots, ci)
    shape = d.shape[1:]
    return Band(point.reshape(shape), lo.reshape(shape), hi.reshape(shape))


def argmax_frequencies(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """How often each column of ``values: [n, ..., K]`` has the largest mean over examples across
    bootstrap resamples of the examples: ``[..., K]`` frequencies summing to 1 over ``K`` (how
    sure "the best one" is, instead of an argmax on the same data)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 2 or v.shape[0] == 0:
        raise ValueError(f"argmax_frequencies needs values [n, ..., K] with n >= 1, got {v.shape}")
    boots = _nan_means(v, n_boot, seed)[1]
    if np.isnan(boots).all(-1).any():
        raise ValueError("argmax_frequencies: a row of candidates is all NaN")
    best = np.nanargmax(np.where(np.isnan(boots), -np.inf, boots), -1)  # [n_boot, ...]
    return np.stack([(best == k).mean(0) for k in range(v.shape[-1])], -1)


def versus_reference(values: np.ndarray, ref: np.ndarray, n_boot: int = 1000, seed: int = 0,
                     ci: float = 0.95) -> dict[str, np.ndarray]:
    """Each column of ``values: [n, ..., K]`` against the column ``ref: [...]`` of its row (paired
    over examples): ``{"point", "lo", "hi"}`` ``[..., K]`` of ``mean(column − ref)``, the intervals
    simultaneous over the ``K`` columns of a row (the bootstrap maximum of the studentised
    deviations, so all of a row's intervals hold together at ``ci``); the reference column's own
    is 0 [0, 0]."""
    v = np.asarray(values, dtype=np.float64)
    ref = np.asarray(ref, dtype=int)
    if v.ndim < 2 or v.shape[0] < 2 or ref.shape != v.shape[1:-1]:
        raise ValueError(f"versus_reference needs values [n >= 2, ..., K] and ref of shape "
                         f"{v.shape[1:-1]}, got {v.shape} and {ref.shape}")
    d = v - np.take_along_axis(v, np.broadcast_to(ref[None, ..., None], (*v.shape[:-1], 1)), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        point, boots = _nan_means(d, n_boot, seed)
        se = np.nanstd(boots, 0)
        dev = np.where(se > 0, np.abs(boots - point) / np.where(se > 0, se, 1), 0.0)
        crit = np.nanquantile(np.nanmax(dev, -1), ci, axis=0)  # [...]
    half = crit[..., None] * se
    return {"point": point, "lo": point - half, "hi": point + half}


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's exact test (McNemar 1947) of two models' ``[n]`` boolean scores on the same
    problems: ``{"only_a", "only_b", "n", "p", "diff"}`` (``diff = acc(b) - acc(a)``); the
    binomial tail is summed in log space, so any number of discordant pairs is exact."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"mcnemar needs two [n] boolean arrays over the same problems, got "
                         f"{a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    m, k = only_a + only_b, min(only_a, only_b)
    p = 1.0
    if m:
        logs = np.array([math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1)
                         for i in range(k + 1)]) - m * math.log(2.0)
        top = logs.max()
        p = min(1.0, 2.0 * math.exp(top + math.log(np.exp(logs - top).sum())))
    return {"only_a": only_a, "only_b": only_b, "n": int(a.size),
            "diff": float(b.mean() - a.mean()), "p": p}


@functools.lru_cache(maxsize=256)
def t_quantile(q: float, df: int) -> float:
    """Student's t quantile of probability ``q`` in (0.5, 1) with ``df >= 1`` degrees of freedom:
    the CDF (Gauss–Legendre quadrature of the density, float64) inverted by bisection."""
    if not 0.5 < q < 1.0 or int(df) != df or df < 1:
        raise ValueError(f"t_quantile needs q in (0.5, 1) and an integer df >= 1, got {q}, {df}")
    log_c = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
             - 0.5 * math.log(df * math.pi))
    nodes, weights = np.polynomial.legendre.leggauss(200)

    def cdf(x: float) -> float:  # P(T <= x), x > 0
        t = 0.5 * x * (nodes + 1.0)
        dens = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        return 0.5 + 0.5 * x * float(weights @ dens)

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def seed_interval(points, ci: float = 0.95) -> Band:
    """The seed as the unit: the mean of per-seed estimates ``points: [n]`` and its Student-t
    interval (df = n - 1), a 0-d Band; one seed gives NaN bounds (training noise unknown)."""
    x = np.asarray(points, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"seed_interval needs finite per-seed estimates, got {x.tolist()}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    mean = np.float64(x.mean())
    if x.size < 2:
        return Band(mean, np.float64(np.nan), np.float64(np.nan))
    half = t_quantile((1 + ci) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return Band(mean, np.float64(mean - half), np.float64(mean + half))


def seed_verdict(points, claimed: int, ci: float = 0.95) -> str:
    """``"agrees"`` / ``"disagrees"`` when the ``seed_interval`` of the per-seed estimates lies on
    the claimed (+1 / -1) / opposite side of 0, else ``"inconclusive (n seeds)"``."""
    if claimed not in (1, -1):
        raise ValueError(f"claimed must be +1 or -1, got {claimed!r}")
    b = seed_interval(points, ci)
    if not np.isfinite(b.lo):
        return inconclusive(np.size(points))
    lo, hi = (float(b.lo), float(b.hi)) if claimed > 0 else (-float(b.hi), -float(b.lo))
    return "agrees" if lo > 0 else ("disagrees" if hi < 0 else inconclusive(np.size(points)))


def count(n: int, noun: str) -> str:
    """``"3 seeds"``, ``"1 seed"``: a number with its noun, plural unless one."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def inconclusive(n_seeds: int) -> str:
    """The verdict that decides nothing: ``"inconclusive (3 seeds)"``."""
    return f"inconclusive ({count(n_seeds, 'seed')})"


def sides(bands: list[Band]) -> str:
    """Where each seed's own interval lies: ``"2 above, 0 below, 1 straddle 0 (3 seeds)"``."""
    lo = np.array([float(b.lo) for b in bands])
    hi = np.array([float(b.hi) for b in bands])
    above, below = int((lo > 0).sum()), int((hi < 0).sum())
    return (f"{above} above, {below} below, {len(bands) - above - below} straddle 0 "
            f"({count(len(bands), 'seed')})")
