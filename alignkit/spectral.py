"""Effective rank of activations ``[n, d]`` or ``[L, n, d]`` from their singular values: RankMe
(Garrido et al. 2023) and Rényi ranks. Formulas and pitfalls: docs/measures.md#effective-rank"""

from __future__ import annotations

import contextlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Mapping, Sequence, Union

import numpy as np
import torch

from alignkit import stats
from alignkit.stats import ArrayLike

logger = logging.getLogger(__name__)
Alpha = Union[float, int]  # an order of the Rényi rank

__all__ = ["spectrum", "layer_spectra", "singular_values_from_gram", "rankme",
           "rankme_from_spectrum", "renyi_effective_rank", "renyi_from_spectrum", "metric_key",
           "layer_metrics", "bootstrap_layer_metrics", "paired_delta", "rank_vs_n"]

_EPS64 = float(np.finfo(np.float64).eps)
_BOOT_BUDGET = 16 * 1024**2  # bytes of resampled Gram / covariance matrices held at once


def _as_tensor(X: ArrayLike, ndim: int, name: str) -> torch.Tensor:
    """``X`` as a float tensor, checked to be ``[n, d]`` (``ndim = 2``) or ``[L, n, d]`` (3)."""
    t = stats.as_float_tensor(X, name)
    if t.ndim != ndim:
        what = "2-D [n, d] matrix" if ndim == 2 else "3-D [n_layers, n, d] stack"
        raise ValueError(f"{name}: expected a {what}, got shape {tuple(t.shape)}")
    if ndim == 3 and t.shape[0] == 0:
        raise ValueError(f"{name} has no layers (shape {tuple(t.shape)})")
    if t.shape[-2] < 2:
        raise ValueError(f"{name} needs at least 2 rows, got {t.shape[-2]}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(t.shape)})")
    return t


def _check_alphas(alpha: Alpha | Sequence[Alpha]) -> tuple[list[float], bool]:
    """``(alphas as floats, is_scalar)``; raises for negative, NaN or non-numeric orders."""
    is_scalar = np.ndim(alpha) == 0
    values = [alpha] if is_scalar else list(np.asarray(alpha, dtype=object).ravel())
    if not values:
        raise ValueError("alpha is an empty list")
    real = (int, float, np.integer, np.floating)
    for a in values:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, real):
            raise TypeError(f"alpha must be a real number, got {a!r}")
        if not float(a) >= 0:  # NaN included
            raise ValueError(f"alpha must be >= 0, got {float(a):g}")
    return [float(a) for a in values], is_scalar


def _check_spectrum(s: ArrayLike) -> np.ndarray:
    """Singular values ``[..., k]`` as float64 numpy, checked."""
    if isinstance(s, torch.Tensor):
        s = s.detach().cpu().to(torch.float64).numpy()
    s = np.asarray(s, dtype=np.float64)
    if s.ndim == 0 or s.shape[-1] == 0:
        raise ValueError(f"a spectrum must be a non-empty [..., k] array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("spectrum contains NaN or Inf")
    if (s < 0).any():
        raise ValueError(f"singular values must be >= 0, got minimum {s.min():g}")
    if not (s.max(-1) > 0).all():
        raise ValueError("spectrum is all zeros: the data have zero variance")
    return s


def _prepare(x: torch.Tensor, center: bool, name: str) -> tuple[torch.Tensor, float]:
    """``(x / scale, scale)``: float64, centred if ``center``, ``max|entry| = 1`` (conditioning)."""
    stats.check_finite(x, name, "spectral metrics need finite activations")
    if center and bool((x == x[0:1]).all()):
        raise stats.zero_variance_error(name, "its effective rank")
    xc = x.to(torch.float64)
    if center:
        xc = xc - xc.mean(0, keepdim=True)
    scale = float(xc.abs().max())
    if scale == 0.0:  # uncentred only: centred, it means identical rows (caught above)
        raise ValueError(f"{name} is all zeros (zero variance even without centring); "
                         "its effective rank is undefined")
    return xc / scale, scale


def singular_values_from_gram(eigenvalues: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Singular values ``[..., k]`` (float64 numpy, descending) of ``X: [n, d]`` from the
    ascending eigenvalues ``[..., k]`` of ``X^T X`` or ``X X^T``, ``shape = (n, d)``; those at or
    below ``tol`` (docs/measures.md#effective-rank) become 0, not ``~1e-8 sigma_1`` of noise."""
    lam = eigenvalues.flip(-1)
    tol = lam[..., :1] * (max(shape) * _EPS64)
    lam = torch.where(lam > tol, lam, torch.zeros((), dtype=lam.dtype, device=lam.device))
    return lam.sqrt_().cpu().numpy()


def _eig_spectrum(xc: torch.Tensor, scale: float = 1.0) -> np.ndarray:
    """Singular values ``[min(n, d)]``, descending, of ``scale * xc`` via the smaller Gram."""
    n, d = xc.shape
    g = xc @ xc.T if n <= d else xc.T @ xc
    return singular_values_from_gram(torch.linalg.eigvalsh(g), (n, d)) * scale


def spectrum(X: ArrayLike, center: bool = True) -> np.ndarray:
    """Singular values ``[min(n, d)]`` of ``X: [n, d]`` (``n >= 2``), descending, float64."""
    return _eig_spectrum(*_prepare(_as_tensor(X, 2, "X"), center, "X"))


def layer_spectra(acts: ArrayLike, center: bool = True) -> np.ndarray:
    """Singular values ``[L, min(n, d)]`` of each layer of ``acts: [L, n, d]`` (as ``spectrum``)."""
    a = _as_tensor(acts, 3, "acts")
    return np.stack([_eig_spectrum(*_prepare(a[i], center, f"acts layer {i}"))
                     for i in range(len(a))])


def _out(v: np.ndarray) -> float | np.ndarray:
    return float(v) if np.ndim(v) == 0 else v


def rankme_from_spectrum(s: ArrayLike, eps: float = 1e-7) -> float | np.ndarray:
    """RankMe (Garrido et al. 2023) of singular values ``s: [..., k]``: a float or ``[...]``. The
    paper's ``eps = 1e-7`` scores a rank-1 spectrum ``~1 + 1.7e-6 k``; ``eps = 0``: the entropy."""
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    s = _check_spectrum(s)
    p = s / s.sum(-1, keepdims=True) + eps
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return _out(np.exp(-plogp.sum(-1)))


def _eigenvalues(s: np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    """``lambda = (s / max s)^2`` (scale invariant; keeps ``s^2`` in range), 0 below the numerical
    tolerance ``max(lambda) * max(shape) * eps`` (``shape``: the matrix behind ``s``; ``None``:
    ``k``)."""
    s = s / s.max(-1, keepdims=True)
    lam = s * s
    n_max = max(shape) if shape is not None else s.shape[-1]
    return np.where(lam > lam.max(-1, keepdims=True) * n_max * _EPS64, lam, 0.0)


def alpha_req_from_spectrum(s: ArrayLike, *,
                            shape: tuple[int, int] | None = None) -> float | np.ndarray:
    """α-ReQ (Agrawal et al. 2022; Li et al. 2025) of singular values ``s: [..., k]``: minus the
    least-squares slope of ``log lambda_i`` on ``log i`` over the eigenvalues ``lambda = s^2`` in
    descending order, above the numerical tolerance (``_eigenvalues``, as the Rényi ranks; NaN
    with fewer than two). Larger: a faster power-law decay, fewer effective directions."""
    lam = -np.sort(-_eigenvalues(_check_spectrum(s), shape), -1)
    keep = lam > 0
    x = np.broadcast_to(np.log(np.arange(1, lam.shape[-1] + 1, dtype=np.float64)), lam.shape)
    y = np.log(np.where(keep, lam, 1.0))
    w = keep.astype(np.float64)
    n = w.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = x - (w * x).sum(-1, keepdims=True) / n
        yc = y - (w * y).sum(-1, keepdims=True) / n
        slope = (w * xc * yc).sum(-1) / (w * xc * xc).sum(-1)
    return _out(np.where(n[..., 0] >= 2, -slope, np.nan))


def renyi_from_spectrum(s: ArrayLike, alpha: Alpha | Sequence[Alpha], *,
                        shape: tuple[int, int] | None = None) -> float | np.ndarray:
    """Rényi effective rank(s) (order 1: Roy & Vetterli 2007) of order ``alpha >= 0`` or ``inf`` of
    singular values ``s: [..., k]``: a float (1-D ``s``) or ``[...]``; ``[..., len(alpha)]`` for a
    list. ``shape = (n, d)`` of the matrix behind ``s`` sets ``tol`` (``None``: ``k``)."""
    alphas, is_scalar = _check_alphas(alpha)
    lam = _eigenvalues(_check_spectrum(s), shape)
    p = lam / lam.sum(-1, keepdims=True)
    pos = p > 0
    logp = np.log(np.where(pos, p, 1.0))  # 0 where p == 0; those terms carry weight p = 0
    vals = []
    for a in alphas:
        if a == 0.0:
            vals.append(pos.sum(-1).astype(np.float64))
        elif math.isinf(a):
            vals.append(1.0 / p.max(-1))
        elif a == 1.0:
            vals.append(np.exp(-(p * logp).sum(-1)))
        elif abs(a - 1.0) < 0.5:  # sum p^a - 1 = sum p (p^(a-1) - 1): expm1/log1p exact near 1
            vals.append(np.exp(np.log1p((p * np.expm1((a - 1.0) * logp)).sum(-1)) / (1.0 - a)))
        else:  # log sum p^a by log-sum-exp: no underflow for large a
            z = np.where(pos, a * logp, -np.inf)
            zmax = z.max(-1, keepdims=True)
            lse = zmax[..., 0] + np.log(np.exp(z - zmax).sum(-1))
            vals.append(np.exp(lse / (1.0 - a)))
    return _out(vals[0]) if is_scalar else np.stack(vals, -1)


def rankme(X: ArrayLike, center: bool = True, eps: float = 1e-7) -> float:
    """RankMe of ``X: [n, d]`` (Garrido et al. 2023), between ~1 and ``min(n, d)``."""
    return rankme_from_spectrum(spectrum(X, center), eps)


def renyi_effective_rank(X: ArrayLike, alpha: Alpha | Sequence[Alpha],
                         center: bool = True) -> float | np.ndarray:
    """Rényi rank(s) of ``X: [n, d]``: a float, or ``[len(alpha)]`` from one decomposition."""
    _check_alphas(alpha)  # before the decomposition, so a bad alpha fails fast
    return renyi_from_spectrum(spectrum(X, center), alpha, shape=tuple(X.shape))


def metric_key(alpha: float) -> str:
    """Table key of the Rényi rank of order ``alpha``: ``"renyi_0.5"``, ``"renyi_inf"``."""
    return f"renyi_{float(alpha):g}"


def _metrics_from_spectra(s: np.ndarray, alphas: list[float], shape: tuple[int, int],
                          eps: float) -> dict[str, np.ndarray]:
    """All table metrics of spectra ``s: [..., k]``: ``{"rankme": [...], "renyi_a": [...]}``."""
    out = {"rankme": np.asarray(rankme_from_spectrum(s, eps), dtype=np.float64),
           "alpha_req": np.asarray(alpha_req_from_spectrum(s, shape=shape), dtype=np.float64)}
    ren = np.asarray(renyi_from_spectrum(s, alphas, shape=shape))
    return out | {metric_key(a): ren[..., j] for j, a in enumerate(alphas)}


def layer_metrics(acts: ArrayLike, alphas: Sequence[Alpha] = (0.5, 1, 2, float("inf")),
                  center: bool = True, eps: float = 1e-7) -> dict[str, np.ndarray]:
    """RankMe and Rényi ranks of every layer of ``acts: [L, n, d]``, one decomposition each:
    ``{"rankme": [L], "renyi_0.5": [L], ...}`` (keys from ``metric_key``)."""
    alphas_l, _ = _check_alphas(list(alphas))
    return _metrics_from_spectra(layer_spectra(acts, center), alphas_l, tuple(acts.shape)[1:], eps)


def _resampled_spectra(xc: torch.Tensor, idx: torch.Tensor, center: bool,
                       pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Re-centred singular values ``[B, min(m, d)]`` of the row resamples ``xc[idx[b]]: [m, d]``."""
    d = xc.shape[1]
    b, m = idx.shape
    gram = m <= d
    g = xc @ xc.T if gram else None
    chunk = max(1, _BOOT_BUDGET // (8 * m * (m if gram else d)))

    def spectra(i: int) -> torch.Tensor:  # eigenvalues of resamples i .. i + chunk - 1
        if gram:
            j = idx[i:i + chunk]
            gs = g[j[:, :, None], j[:, None, :]]
            if center:
                r = gs.mean(-1, keepdim=True)
                gs.sub_(r).sub_(r.transpose(-1, -2)).add_(r.mean(-2, keepdim=True))
            return torch.linalg.eigvalsh(gs)
        xs = xc[idx[i:i + chunk]]
        if center:
            xs.sub_(xs.mean(1, keepdim=True))
        return torch.linalg.eigvalsh(xs.transpose(1, 2) @ xs)

    starts = range(0, b, chunk)
    out = list(pool.map(spectra, starts)) if pool is not None else [spectra(i) for i in starts]
    return singular_values_from_gram(torch.cat(out), (m, d))


def bootstrap_layer_metrics(
        acts: ArrayLike, alphas: Sequence[Alpha] = (0.5, 1, 2, float("inf")), n_boot: int = 100,
        seed: int = 0, ci: float = 0.95, *, center: bool = True,
        scheme: Literal["subsample", "resample"] = "subsample", frac: float = 0.8,
        eps: float = 1e-7, eig_workers: int = 1) -> dict[str, dict]:
    """Per-layer effective ranks of ``acts: [L, n, d]`` with intervals from ``n_boot >= 2``
    resamples of the probe rows, shared by all layers (docs/measures.md#effective-rank).

    Args:
        scheme: ``"subsample"`` (``round(frac * n)`` distinct rows) or ``"resample"`` (``n`` rows
            with replacement).
        eig_workers: threads for the ``L * n_boot`` eigendecompositions.

    Returns:
        ``{metric: {"point", "lo", "hi", "mean": [L], "samples": [n_boot, L], "scheme", "m",
        "n", "ci", "scale"}}`` for the metrics of ``layer_metrics``.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    if scheme not in ("subsample", "resample"):
        raise ValueError(f"scheme must be 'subsample' or 'resample', got {scheme!r}")
    if scheme == "subsample" and not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    if isinstance(eig_workers, bool) or not isinstance(eig_workers, int) or eig_workers < 1:
        raise ValueError(f"eig_workers must be a positive int, got {eig_workers!r}")
    alphas_l, _ = _check_alphas(list(alphas))
    a = _as_tensor(acts, 3, "acts")
    n_layers, n, d = a.shape
    m = n if scheme == "resample" else int(round(frac * n))
    if scheme == "subsample" and not 2 <= m < n:
        raise ValueError(f"subsampling {frac:g} of {n} rows keeps {m}; the subsample bootstrap "
                         "needs 2 <= m < n (use more rows or another frac)")
    rng = np.random.default_rng(seed)
    rows = (rng.integers(0, n, size=(n_boot, n)) if scheme == "resample"
            else np.stack([rng.permutation(n)[:m] for _ in range(n_boot)]))
    logger.info("bootstrap_layer_metrics: %d layers, %d %ss of %d/%d rows, %s path",
                n_layers, n_boot, scheme, m, n, "Gram" if m <= d else "covariance")
    point_s, boot_s = [], []
    with contextlib.ExitStack() as stack:
        pool = None
        if eig_workers > 1 and a.device.type == "cpu":  # one torch thread per worker
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(1)
            pool = stack.enter_context(ThreadPoolExecutor(eig_workers))
        for i in range(n_layers):
            xc, _ = _prepare(a[i], center, f"acts layer {i}")
            point_s.append(_eig_spectrum(xc))
            boot_s.append(_resampled_spectra(xc, torch.from_numpy(rows).to(xc.device), center,
                                             pool))
    point = _metrics_from_spectra(np.stack(point_s), alphas_l, (n, d), eps)
    samples = _metrics_from_spectra(np.stack(boot_s, 1), alphas_l, (m, d), eps)
    scale = 1.0 if scheme == "resample" else math.sqrt(m / (n - m))
    out = {}
    for key, p in point.items():
        lo, hi = stats.centred_interval(p, samples[key], ci, scale)
        out[key] = {"point": p, "lo": np.minimum(lo, p), "hi": np.maximum(hi, p),
                    "mean": samples[key].mean(0), "samples": samples[key], "scheme": scheme,
                    "m": m, "n": n, "ci": ci, "scale": scale}
    return out


def paired_delta(boot_tuned: Mapping[str, Mapping],
                 boot_base: Mapping[str, Mapping]) -> dict[str, dict[str, np.ndarray]]:
    """Per-layer change tuned − base of each metric, ``{metric: {"point", "lo", "hi": [L]}}``, of
    two ``bootstrap_layer_metrics`` with equal ``n``, ``n_boot``, ``seed`` and scheme (resample
    ``b`` drew the same rows in both): ``centred_interval`` of the paired differences."""
    out = {}
    for key, t in boot_tuned.items():
        if key not in boot_base:
            raise ValueError(f"{key}: the base bootstrap has no such metric "
                             f"(it has {list(boot_base)})")
        b = boot_base[key]
        if (t["n"], t["m"], t["samples"].shape) != (b["n"], b["m"], b["samples"].shape):
            raise ValueError(f"{key}: bootstraps differ in n, m or n_boot; "
                             "run both with the same settings")
        point = t["point"] - b["point"]
        lo, hi = stats.centred_interval(point, t["samples"] - b["samples"], t["ci"], t["scale"])
        out[key] = {"point": point, "lo": lo, "hi": hi}
    return out


def rank_vs_n(acts: ArrayLike, ns: Sequence[int], seed: int = 0, center: bool = True,
              n_repeats: int = 1, eps: float = 1e-7) -> dict[str, np.ndarray]:
    """RankMe per layer of ``acts: [L, N, d]`` on nested random subsets of ``n in ns`` examples
    (docs/measures.md#effective-rank).

    Returns:
        ``{"n": [len(ns)], "rankme": [len(ns), L]`` (mean over repeats), ``"rankme_std"``,
        ``"cap": [len(ns)]`` (``min(n - 1, d)`` centred, else ``min(n, d)``)``}``.
    """
    a = _as_tensor(acts, 3, "acts")
    n_layers, n_all, d = a.shape
    ns_arr = np.asarray(list(ns), dtype=np.int64)
    if ns_arr.ndim != 1 or ns_arr.size == 0:
        raise ValueError(f"ns must be a non-empty list of sizes, got {ns!r}")
    bad = ns_arr[(ns_arr < 2) | (ns_arr > n_all)]
    if bad.size:
        raise ValueError(f"every n must be in [2, {n_all}], got {int(bad[0])}")
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    rng = np.random.default_rng(seed)
    vals = np.empty((n_repeats, ns_arr.size, n_layers))
    for r in range(n_repeats):
        perm = torch.from_numpy(rng.permutation(n_all)).to(a.device)
        for j, n in enumerate(ns_arr):
            vals[r, j] = rankme_from_spectrum(layer_spectra(a[:, perm[:n]], center), eps)
    cap = np.minimum(ns_arr - 1 if center else ns_arr, d)
    return {"n": ns_arr, "rankme": vals.mean(0), "rankme_std": vals.std(0), "cap": cap}
