"""Controls for layerwise CKA: bootstrap intervals, a split-half noise floor, a chance level.

A resample of the ``n`` examples is a count vector ``w: [n]`` (0/1 for half-samples) with
``m = sum(w)`` rows. Its Gram matrix is ``K[idx][:, idx]``, so the four sums of ``cka.hsic``
follow from the full-data Grams without forming it: ``tr = w'(K o L)w``, ``1'K1 = w'Kw``,
``1'KL1 = sum_i w_i (Kw)_i (Lw)_i``; for the debiased estimator (Song et al. 2012; Nguyen et al.
2021) each drawn row's own ``K_ii`` is removed first. CKA itself: Kornblith et al. (2019).

Every function takes ``acts_a: [L_a, n, d_a]`` and ``acts_b: [L_b, n, d_b]``, the same examples in
the same order (``L_a == L_b`` but for ``permutation_baseline``), ``debiased`` and (where taken)
``gram_dtype`` as ``cka.cka_matrix`` does, and a ``seed`` for the ``numpy.random.default_rng``
that draws.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch

from alignkit.cka import centred_gram, cka_matrix, hsic, prepare_pair
from alignkit.stats import ArrayLike, centred_interval, zero_variance_error

logger = logging.getLogger(__name__)

__all__ = ["bootstrap_cka_matrix", "bootstrap_layerwise_cka", "noise_floor",
           "permutation_baseline", "transition_layer_bootstrap"]


def _resampled_cka(a: torch.Tensor, b: torch.Tensor, weights: np.ndarray, debiased: bool,
                   dtype: torch.dtype) -> np.ndarray:
    """Layerwise CKA of many row resamples at once, from each layer's full-data Grams.

    ``a: [L, n, d_a]``, ``b: [L, n, d_b]``, ``weights: [R, n]`` counts (how often each example
    is drawn). Returns ``[R, L]`` float64 CKA (NaN where a resample has zero variance).
    """
    w = torch.from_numpy(np.ascontiguousarray(weights.T, dtype=np.float64)).to(a.device)  # [n, R]
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
    w = np.zeros((n_boot + 1, n))
    w[0] = 1.0  # row 0: the full sample
    if scheme == "resample":
        idx = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
        w[1:] = np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n)
    else:
        for r in range(1, n_boot + 1):
            w[r, rng.permutation(n)[:m]] = 1.0
    curves = _resampled_cka(a, b, w, debiased, dtype)
    if np.isnan(curves[1:]).any():
        logger.warning("bootstrap: %d resamples had a zero-variance layer and were ignored",
                       int(np.isnan(curves[1:]).any(1).sum()))
    return curves[0], curves[1:], scheme, m, n


def bootstrap_layerwise_cka(acts_a: ArrayLike, acts_b: ArrayLike, n_boot: int = 200,
                            seed: int = 0, debiased: bool = False, ci: float = 0.95, *,
                            scheme: Literal["auto", "resample", "subsample"] = "auto",
                            gram_dtype: torch.dtype | None = None) -> dict:
    """Bootstrap interval of layerwise CKA over the examples (rows), from ``n_boot`` resamples.

    Schemes (``"auto"``: ``"resample"`` for biased CKA, ``"subsample"`` for debiased):

    * ``"resample"``: ``n`` rows drawn with replacement, an ordinary bootstrap of the biased
      V-statistic. Duplicates inflate biased CKA and, for the debiased estimator, put
      ``||x_i||^2`` back off the diagonal: exactly the bias it removes.
    * ``"subsample"``: half-samples without replacement (``m = n // 2``, no duplicates). Their
      spread is ``sigma^2 (1/m - 1/n)`` around the full-sample value (finite-population
      correction), so deviations are scaled by ``sqrt(m / (n - m))`` to size ``n``.

    Returns:
        dict with ``point`` ``[L]`` (full-sample CKA), ``mean`` ``[L]`` (mean of the resampled
        values), ``lo``/``hi`` ``[L]`` (``stats.centred_interval`` of coverage ``ci``),
        ``samples`` ``[n_boot, L]``, ``scheme``, ``m`` (rows per resample), ``ci``.
    """
    point, samples, scheme, m, n = _bootstrap_curves(
        acts_a, acts_b, n_boot, seed, debiased, scheme, gram_dtype)
    scale = 1.0 if scheme == "resample" else math.sqrt(m / (n - m))
    lo, hi = centred_interval(point, samples, ci, scale)
    return {"point": point, "mean": np.nanmean(samples, 0), "lo": lo, "hi": hi,
            "samples": samples, "scheme": scheme, "m": m, "ci": ci}


def bootstrap_cka_matrix(acts_a: ArrayLike, acts_b: ArrayLike, n_boot: int = 200,
                         seed: int = 0, ci: float = 0.95) -> dict:
    """Cross-layer CKA (biased) between every layer of ``acts_a`` and every layer of ``acts_b``
    (any depths and widths), with an ordinary bootstrap over the examples and, per layer of
    ``acts_b``, the layers of ``acts_a`` tied for its best match.

    Each resample draws ``n`` rows with replacement (the draws of ``bootstrap_layerwise_cka``'s
    ``"resample"`` scheme for the same ``seed``, so its diagonal is that function's curves) and
    recomputes ``cka.cka_matrix`` on those rows. Intervals are ``stats.centred_interval``s (as
    in ``bootstrap_layerwise_cka``: duplicated rows shift resampled CKA up, so only the spread of
    the resamples is used). Layer ``i`` of ``acts_a`` is tied with column ``j``'s best match
    ``i*`` (largest full-sample CKA) when the interval of the paired difference
    ``CKA[i*, j] - CKA[i, j]`` reaches 0: an argmax among ties is not a finding, the tied set is.

    Returns:
        dict with ``point`` ``[L_a, L_b]``, ``lo``/``hi`` ``[L_a, L_b]`` (the interval),
        ``samples`` ``[n_boot, L_a, L_b]``, ``best`` ``[L_b]`` (int) and ``ties`` ``[L_a, L_b]``
        (bool, the best included).
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
    """Sampling noise of layerwise CKA(base, tuned) from split halves of the probe set.

    CKA needs paired rows, so the noise floor is *not* CKA between two halves of one model:
    the examples are split at random into disjoint halves ``A``, ``B`` (``n // 2`` each), and
    ``layerwise_cka`` on ``A`` minus the same on ``B`` is recorded, ``n_splits`` times. The halves
    are independent samples of the same comparison, so ``Var(diff) ~ 2 Var(half) ~ 4 Var(full)``
    and ``rms(diff) / 2`` estimates the standard error of the full-set CKA. The band is ``z``
    standard errors wide on each side (1.96: ~95 %); debiased, each half needs >= 4 examples.

    Returns:
        dict with ``point`` ``[L]`` (full-set layerwise CKA), ``diffs`` ``[n_splits, L]``
        (half1 - half2), ``se`` ``[L]`` (``rms(diffs) / 2``), ``half_width`` ``[L]``
        (``z * se``), ``lo``/``hi`` ``[L]`` (``point -/+ half_width``), ``mean_abs_diff`` ``[L]``.
    """
    a, b, dtype = prepare_pair(acts_a, acts_b, debiased, gram_dtype, same_depth=True)
    n = a.shape[1]
    half, min_half = n // 2, (4 if debiased else 2)
    if half < min_half:
        raise ValueError(f"noise_floor needs at least {2 * min_half} examples, got {n}")
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    rng = np.random.default_rng(seed)
    w = np.zeros((1 + 2 * n_splits, n))
    w[0] = 1.0
    for s in range(n_splits):
        perm = rng.permutation(n)
        w[1 + 2 * s, perm[:half]] = 1.0
        w[2 + 2 * s, perm[half:2 * half]] = 1.0
    curves = _resampled_cka(a, b, w, debiased, dtype)
    point, diffs = curves[0], curves[1::2] - curves[2::2]
    se = np.sqrt(np.nanmean(diffs**2, 0)) / 2.0
    return {"point": point, "diffs": diffs, "se": se, "half_width": z * se,
            "lo": point - z * se, "hi": point + z * se,
            "mean_abs_diff": np.nanmean(np.abs(diffs), 0)}


def permutation_baseline(acts_a: ArrayLike, acts_b: ArrayLike, n_perm: int = 20, seed: int = 0,
                         debiased: bool = False, *,
                         gram_dtype: torch.dtype | None = None) -> np.ndarray:
    """Chance level of the CKA heatmap: ``[L_a, L_b]`` float64 mean CKA over ``n_perm`` shuffles
    of the rows of ``acts_b``.

    Shuffling breaks the example pairing but keeps each representation's geometry; a shuffle
    permutes the rows and columns of the stored Grams. Biased CKA of unrelated data is far from 0
    when ``d`` is not small next to ``n`` (about 0.67 for ``n = 512``, ``d = 1024``).
    """
    a, b, dtype = prepare_pair(acts_a, acts_b, debiased, gram_dtype)
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    n, f64, stacks = a.shape[1], torch.float64, []
    for stack, name in ((a, "acts_a"), (b, "acts_b")):
        g = torch.empty(stack.shape[0], n, n, dtype=dtype, device=a.device)  # [L, n, n]
        r = torch.empty(stack.shape[0], n, dtype=f64, device=a.device)  # row sums
        tr = torch.empty(stack.shape[0], dtype=f64, device=a.device)  # tr(K K)
        for i, x in enumerate(stack):
            centred_gram(x, dtype, f"{name} layer {i}", out=g[i])
            if debiased:
                g[i].diagonal().zero_()
            r[i], tr[i] = g[i].sum(1, dtype=f64), torch.linalg.vector_norm(g[i], dtype=f64) ** 2
        h = hsic(n, tr, r.sum(1), r.sum(1), r.square().sum(1), debiased)
        if not bool((h > 0).all()):  # a shuffle leaves the self HSICs unchanged
            raise zero_variance_error(f"{name} layer {int((~(h > 0)).nonzero()[0, 0])}")
        stacks.append((g, r, h))
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
    """``layers.transition_layer`` of layerwise CKA, with a bootstrap interval over examples.

    Uses the resampling schemes of ``bootstrap_layerwise_cka``. The index is discrete, so the
    interval is the plain percentile interval of the resampled indices (no rescaling); with the
    half-sample scheme (debiased default) it is conservative (half-size samples are noisier).

    Returns:
        dict with ``point`` (int, from the full sample), ``lo``/``hi`` (int percentiles of
        coverage ``ci`` of the resampled indices), ``samples`` ``[n_boot]`` int, ``curve`` ``[L]``
        full-sample CKA (``L >= 2``).
    """
    curve, samples, _, _, _ = _bootstrap_curves(
        acts_a, acts_b, n_boot, seed, debiased, scheme, None)
    if curve.shape[0] < 2:
        raise ValueError(f"a transition layer needs at least 2 layers, got {curve.shape[0]}")
    # The layer after the steepest drop, as layers.transition_layer (which comes later).
    idx = np.argmin(np.diff(samples[~np.isnan(samples).any(1)], axis=1), axis=1) + 1
    alpha = (1.0 - ci) / 2.0
    return {"point": int(np.argmin(np.diff(curve)) + 1),
            "lo": int(np.quantile(idx, alpha, method="lower")),
            "hi": int(np.quantile(idx, 1.0 - alpha, method="higher")),
            "samples": idx, "curve": curve}
