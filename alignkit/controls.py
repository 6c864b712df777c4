"""Controls for CKA of ``acts_a: [L_a, n, d_a]`` and ``acts_b: [L_b, n, d_b]`` (same examples,
same order): bootstrap intervals, a split-half noise floor, a chance level, resampled from the
full-data Grams. Formulas, controls and pitfalls: docs/measures.md#cka-controls"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch

from alignkit.cka import centred_gram, cka_matrix, hsic, layer_grams, prepare_pair, self_hsic
from alignkit.stats import ArrayLike, centred_interval

logger = logging.getLogger(__name__)

__all__ = ["bootstrap_cka_matrix", "bootstrap_layerwise_cka", "noise_floor",
           "permutation_baseline", "transition_layer_bootstrap"]


def _resampled_cka(a: torch.Tensor, b: torch.Tensor, rows: np.ndarray, debiased: bool,
                   dtype: torch.dtype) -> np.ndarray:
    """Layerwise CKA ``[1 + R, L]`` of the full sample (row 0) and the draws ``rows: [R, m]``."""
    counts = np.zeros((1 + len(rows), a.shape[1]))
    counts[0] = 1.0
    np.add.at(counts[1:], (np.arange(len(rows))[:, None], rows), 1.0)  # how often a row is drawn
    w = torch.from_numpy(np.ascontiguousarray(counts.T)).to(a.device)  # [n, 1 + R]
    m = w.sum(0)
    out = np.empty((w.shape[1], a.shape[0]))
    for i in range(a.shape[0]):
        ka = centred_gram(a[i], dtype, f"acts_a layer {i}").to(torch.float64)
        kb = centred_gram(b[i], dtype, f"acts_b layer {i}").to(torch.float64)
        ka_w, kb_w = ka @ w, kb @ w  # [n, R]
        if debiased:  # (K* 1) without the diagonal: each drawn row loses its own K_ii
            ka_w -= ka.diagonal()[:, None]
            kb_w -= kb.diagonal()[:, None]

        def resampled_hsic(x, y, xw, yw):
            tr = ((x * y) @ w * w).sum(0)
            if debiased:
                tr -= (x.diagonal() * y.diagonal()) @ w
            return hsic(m, tr, (xw * w).sum(0), (yw * w).sum(0), (xw * yw * w).sum(0), debiased)

        denom = torch.sqrt(resampled_hsic(ka, ka, ka_w, ka_w) * resampled_hsic(kb, kb, kb_w, kb_w))
        val = resampled_hsic(ka, kb, ka_w, kb_w) / denom
        val[~(denom > 0)] = float("nan")
        out[:, i] = val.cpu().numpy()
    return out


def _bootstrap_curves(acts_a: ArrayLike, acts_b: ArrayLike, n_boot: int, seed: int,
                      debiased: bool, scheme: str, gram_dtype: torch.dtype | None):
    """Point estimate ``[L]``, resampled curves ``[n_boot, L]``, scheme, ``m``, ``n``."""
    a, b, dtype = prepare_pair(acts_a, acts_b, debiased, gram_dtype, same_depth=True)
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    if scheme == "auto":
        scheme = "subsample" if debiased else "resample"
    elif scheme not in ("resample", "subsample"):
        raise ValueError(f"scheme must be 'auto', 'resample' or 'subsample', got {scheme!r}")
    n = a.shape[1]
    m = n if scheme == "resample" else n // 2
    if debiased and m < 4:
        raise ValueError(f"the debiased half-sample bootstrap needs at least 8 examples, got {n}")
    rng = np.random.default_rng(seed)
    rows = (rng.integers(0, n, size=(n_boot, n)) if scheme == "resample"
            else np.stack([rng.permutation(n)[:m] for _ in range(n_boot)]))
    curves = _resampled_cka(a, b, rows, debiased, dtype)
    if np.isnan(curves[1:]).any():
        logger.warning("bootstrap: %d resamples had a zero-variance layer and were ignored",
                       int(np.isnan(curves[1:]).any(1).sum()))
    return curves[0], curves[1:], scheme, m, n


def bootstrap_layerwise_cka(acts_a: ArrayLike, acts_b: ArrayLike, n_boot: int = 200,
                            seed: int = 0, debiased: bool = False, ci: float = 0.95, *,
                            scheme: Literal["auto", "resample", "subsample"] = "auto",
                            gram_dtype: torch.dtype | None = None) -> dict:
    """Bootstrap interval of layerwise CKA over the examples from ``n_boot`` resamples, ``scheme``
    ``"resample"`` (biased CKA only) or ``"subsample"`` (half-samples); ``"auto"`` picks by
    ``debiased`` (docs/measures.md#cka-controls).

    Returns:
        dict of ``point`` (full sample), ``mean`` (of the resamples), ``lo``, ``hi``: ``[L]``;
        ``samples: [n_boot, L]``, ``scheme``, ``m`` (rows per resample), ``ci``.
    """
    point, samples, scheme, m, n = _bootstrap_curves(
        acts_a, acts_b, n_boot, seed, debiased, scheme, gram_dtype)
    scale = 1.0 if scheme == "resample" else math.sqrt(m / (n - m))
    lo, hi = centred_interval(point, samples, ci, scale)
    return {"point": point, "mean": np.nanmean(samples, 0), "lo": lo, "hi": hi,
            "samples": samples, "scheme": scheme, "m": m, "ci": ci}


def bootstrap_cka_matrix(acts_a: ArrayLike, acts_b: ArrayLike, n_boot: int = 200,
                         seed: int = 0, ci: float = 0.95) -> dict:
    """Biased ``cka.cka_matrix`` with an ordinary bootstrap over the examples and, for each layer
    of ``acts_b``, the layers of ``acts_a`` tied for its best match (docs/measures.md#cka-controls).

    Returns:
        dict of ``point``, ``lo``, ``hi``: ``[L_a, L_b]``, ``samples: [n_boot, L_a, L_b]``,
        ``best: [L_b]`` (int) and ``ties: [L_a, L_b]`` (bool, the best included).
    """
    a, b, _ = prepare_pair(acts_a, acts_b, False)
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    point = cka_matrix(a, b)
    rows = (torch.from_numpy(np.sort(d)).to(a.device) for d in draws)
    samples = np.stack([cka_matrix(a[:, r], b[:, r.to(b.device)]) for r in rows])
    best = np.argmax(point, 0)
    cols = np.arange(point.shape[1])
    diff = samples[:, best, cols][:, None, :] - samples  # [n_boot, L_a, L_b]
    ties = centred_interval(point[best, cols][None, :] - point, diff, ci)[0] <= 0
    ties[best, cols] = True
    lo, hi = centred_interval(point, samples, ci)
    return {"point": point, "lo": lo, "hi": hi, "samples": samples, "best": best, "ties": ties}


def noise_floor(acts_a: ArrayLike, acts_b: ArrayLike, n_splits: int = 20, seed: int = 0,
                debiased: bool = False, z: float = 1.96, *,
                gram_dtype: torch.dtype | None = None) -> dict:
    """Sampling noise of layerwise CKA(base, tuned) from ``n_splits`` random splits of the examples
    into disjoint halves (docs/measures.md#cka-controls).

    Returns:
        dict of ``point`` (full set), ``se`` (``rms(diffs) / 2``), ``half_width`` (``z * se``),
        ``lo``/``hi`` (``point -/+ half_width``), ``mean_abs_diff``: ``[L]``; ``diffs:
        [n_splits, L]`` (half 1 - half 2).
    """
    a, b, dtype = prepare_pair(acts_a, acts_b, debiased, gram_dtype, same_depth=True)
    n = a.shape[1]
    half, min_half = n // 2, (4 if debiased else 2)
    if half < min_half:
        raise ValueError(f"noise_floor needs at least {2 * min_half} examples, got {n}")
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    rng = np.random.default_rng(seed)
    halves = np.stack([rng.permutation(n)[:2 * half] for _ in range(n_splits)])
    curves = _resampled_cka(a, b, halves.reshape(2 * n_splits, half), debiased, dtype)
    point, diffs = curves[0], curves[1::2] - curves[2::2]
    se = np.sqrt(np.nanmean(diffs**2, 0)) / 2.0
    return {"point": point, "diffs": diffs, "se": se, "half_width": z * se,
            "lo": point - z * se, "hi": point + z * se,
            "mean_abs_diff": np.nanmean(np.abs(diffs), 0)}


def permutation_baseline(acts_a: ArrayLike, acts_b: ArrayLike, n_perm: int = 20, seed: int = 0,
                         debiased: bool = False, *,
                         gram_dtype: torch.dtype | None = None) -> np.ndarray:
    """Chance level of the CKA heatmap: ``[L_a, L_b]`` float64 mean CKA over ``n_perm`` shuffles
    of the rows of ``acts_b`` (docs/measures.md#cka-controls)."""
    a, b, dtype = prepare_pair(acts_a, acts_b, debiased, gram_dtype)
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    n, f64, stacks = a.shape[1], torch.float64, []
    for stack, name in ((a, "acts_a"), (b, "acts_b")):
        names = [f"{name} layer {i}" for i in range(stack.shape[0])]
        g, r, _ = layer_grams(stack, debiased, dtype, names)
        g = g.view(-1, n, n)  # [L, n, n]
        tr = torch.stack([torch.linalg.vector_norm(k, dtype=f64) ** 2 for k in g])  # tr(K K)
        stacks.append((g, r, self_hsic(n, tr, r, debiased, names)))  # a shuffle keeps these
    (ga, ra, ha), (gb, rb, hb) = stacks
    flat_a, gp = ga.flatten(1).to(f64), torch.empty(gb.shape, dtype=f64, device=a.device)
    denom = torch.sqrt(ha[:, None] * hb[None, :])
    rng = np.random.default_rng(seed)
    total = torch.zeros_like(denom)
    for _ in range(n_perm):
        p = torch.from_numpy(rng.permutation(n)).to(ga.device)
        cross = flat_a @ gp.copy_(gb[:, p][:, :, p]).flatten(1).T  # tr(K_a P K_b P^T)
        total += hsic(n, cross, ra.sum(1)[:, None], rb.sum(1)[None, :], ra @ rb[:, p].T,
                      debiased) / denom
    return (total / n_perm).cpu().numpy()


def transition_layer_bootstrap(acts_a: ArrayLike, acts_b: ArrayLike, n_boot: int = 200,
                               seed: int = 0, debiased: bool = False, ci: float = 0.95, *,
                               scheme: Literal["auto", "resample", "subsample"] = "auto") -> dict:
    """``layers.transition_layer`` of layerwise CKA with a percentile bootstrap interval over
    examples (``bootstrap_layerwise_cka``'s schemes; docs/measures.md#cka-controls): a dict of
    ints ``point`` (full sample), ``lo``, ``hi``, ``samples: [n_boot]``, and the full-sample CKA
    ``curve: [L]`` (``L >= 2``)."""
    curve, samples, _, _, _ = _bootstrap_curves(
        acts_a, acts_b, n_boot, seed, debiased, scheme, None)
    if curve.shape[0] < 2:
        raise ValueError(f"a transition layer needs at least 2 layers, got {curve.shape[0]}")
    idx = np.argmin(np.diff(samples[~np.isnan(samples).any(1)], axis=1), axis=1) + 1
    alpha = (1.0 - ci) / 2.0
    return {"point": int(np.argmin(np.diff(curve)) + 1),
            "lo": int(np.quantile(idx, alpha, method="lower")),
            "hi": int(np.quantile(idx, 1.0 - alpha, method="higher")),
            "samples": idx, "curve": curve}
