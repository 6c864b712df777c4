"""Spectral effective rank of layer activations: RankMe, Rényi effective ranks, participation ratio.

Everything here is a pure function of activations (or of their singular values): a measure never
loads a model. Activations may be ``torch.Tensor`` (CPU or CUDA) or ``numpy.ndarray`` in any float
dtype (float16 and bfloat16 included); they are converted to float64 before centring, and results
are ``numpy.float64`` arrays or Python floats.

Definitions, for ``X: [n, d]`` (``n`` examples, ``d`` features) and ``Xc`` = ``X`` with its column
means removed (``center=True``, the default; ``center=False`` uses ``X`` as is):

* ``sigma_k``: singular values of ``Xc`` (``min(n, d)`` of them, descending), computed from the
  eigenvalues ``lambda_k`` of the smaller of ``Xc^T Xc`` and ``Xc Xc^T`` in float64, then
  ``sqrt``. Eigenvalues at or below ``tol = max(lambda) * max(n, d) * finfo(float64).eps`` (tiny
  negative ones included) are round-off of the eigendecomposition and are set to exactly 0.
  ``lambda_k = sigma_k^2`` are ``(n - 1)`` times the covariance eigenvalues; every metric below is
  scale invariant, so the factor never matters.
* RankMe (Garrido et al. 2023, "RankMe: assessing the downstream performance of pretrained
  self-supervised representations by their rank"): ``exp(-sum_k p_k log p_k)`` with
  ``p_k = sigma_k / sum_j sigma_j + eps``. It uses the singular values ``sigma``, **not** the
  variances ``sigma^2`` (some implementations use ``sigma^2``, which is the Rényi-1 rank below).
* Rényi effective rank of order ``alpha >= 0``: ``exp(S_alpha)``,
  ``S_alpha = log(sum_k p_k^alpha) / (1 - alpha)`` with ``p_k = lambda_k / sum_j lambda_j``.
  ``alpha = 1`` is the Shannon limit ``-sum p log p`` (the effective rank of Roy & Vetterli 2007
  applied to variances), ``alpha = 2`` is the participation ratio
  ``(sum lambda)^2 / sum lambda^2``, ``alpha = inf`` gives ``1 / max_k p_k`` and ``alpha = 0`` is
  the numerical rank: the number of ``lambda_k > tol``, the same ``tol`` (the noise floor of a
  float64 eigendecomposition of the Gram matrix, numpy's ``matrix_rank`` convention applied to
  ``lambda``). Those eigenvalues are zero for every ``alpha``, which keeps ``alpha -> 0+``
  continuous with the count. Effective rank is non-increasing in ``alpha``.

Caveats worth keeping in mind when reading per-layer curves:

* Effective rank is capped by ``min(n - 1, d)`` (centred): with fewer probe examples than features
  it measures the examples as much as the model. ``rank_vs_n`` shows how the curve moves with
  ``n``; compare checkpoints only at equal ``n``.
* Massive activations (attention-sink tokens, outlier dimensions) dominate ``sigma_1`` and pull
  every effective rank towards 1. Which token positions go into ``X`` is the caller's explicit
  choice (see ``activations.py``); ``center`` is explicit here.
* The singular values come from a Gram matrix, so values below ``~sqrt(max(n, d) * eps) *
  sigma_1`` (~1e-7 relative) are either 0 or inaccurate. That is irrelevant for these metrics
  (RankMe's own ``eps = 1e-7`` is larger), but ``spectrum`` is not an accurate tail-SVD.

One decomposition per layer serves every metric: ``layer_spectra`` returns the singular values and
each metric has a ``*_from_spectrum`` form; the ``X``-taking functions call those.
"""

from __future__ import annotations

import contextlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Literal, Mapping, Sequence, Union

import numpy as np
import torch

from alignkit.arrays import ArrayLike, as_float_tensor

logger = logging.getLogger(__name__)

Alpha = Union[float, int]

__all__ = [
    "spectrum",
    "layer_spectra",
    "rankme",
    "rankme_from_spectrum",
    "renyi_effective_rank",
    "renyi_from_spectrum",
    "participation_ratio",
    "participation_ratio_from_spectrum",
    "top_k_variance_fraction",
    "top_k_variance_fraction_from_spectrum",
    "metric_key",
    "layer_metrics",
    "bootstrap_layer_metrics",
    "delta_vs_base",
    "rank_vs_n",
]

_EPS64 = float(np.finfo(np.float64).eps)
# Bytes of resampled Gram / covariance matrices the bootstrap holds at once.
_BOOT_BUDGET = 16 * 1024**2


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _check_matrix(t: torch.Tensor, name: str) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [n, d] matrix, got shape {tuple(t.shape)}")
    _check_nd(t, name)


def _check_stack(t: torch.Tensor, name: str) -> None:
    if t.ndim != 3:
        raise ValueError(
            f"{name}: expected a 3-D [n_layers, n, d] stack, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no layers (shape {tuple(t.shape)})")
    _check_nd(t, name)


def _check_nd(t: torch.Tensor, name: str) -> None:
    if t.shape[-2] < 2:
        raise ValueError(f"{name} needs at least 2 rows, got {t.shape[-2]}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(t.shape)})")


def _check_finite(t: torch.Tensor, name: str) -> None:
    if bool(torch.isfinite(t).all()):
        return
    kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
    raise ValueError(f"{name} contains {kind}; spectral metrics need finite activations")


def _check_alphas(alpha: Alpha | Sequence[Alpha]) -> tuple[list[float], bool]:
    """Returns ``(alphas, is_scalar)``; raises for negative, NaN or non-numeric orders."""
    is_scalar = np.ndim(alpha) == 0
    values = [alpha] if is_scalar else list(np.asarray(alpha, dtype=object).ravel())
    if not values:
        raise ValueError("alpha is an empty list")
    out = []
    for a in values:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, float, np.integer,
                                                                 np.floating)):
            raise TypeError(f"alpha must be a real number, got {a!r}")
        a = float(a)
        if math.isnan(a):
            raise ValueError("alpha must be >= 0, got nan")
        if a < 0:
            raise ValueError(f"alpha must be >= 0, got {a:g}")
        out.append(a)
    return out, is_scalar


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


def _zero_variance_error(name: str, center: bool) -> ValueError:
    if center:
        return ValueError(f"{name} has zero variance across examples (all rows identical); "
                          "its effective rank is undefined: drop it or pool differently")
    return ValueError(f"{name} is all zeros (zero variance even without centring); "
                      "its effective rank is undefined")


def _compute_device(t: torch.Tensor) -> torch.device:
    return t.device if t.device.type == "cuda" else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Spectra
# --------------------------------------------------------------------------------------------


def _prepare(x: torch.Tensor, center: bool, name: str) -> tuple[torch.Tensor, float]:
    """Float64, optionally centred ``[n, d]`` data scaled to ``max|entry| = 1``, and the scale.

    The scaling only conditions the Gram matrix (every metric is scale invariant); ``spectrum``
    multiplies it back. Raises for NaN/Inf and zero variance.
    """
    _check_finite(x, name)
    if center and bool((x == x[0:1]).all()):
        # Decided on the stored values: float64 centring of identical rows can leave ~1e-16.
        raise _zero_variance_error(name, center)
    xc = x.to(device=_compute_device(x), dtype=torch.float64)
    if center:
        xc = xc - xc.mean(0, keepdim=True)
    scale = float(xc.abs().max())
    if scale == 0.0:
        raise _zero_variance_error(name, center)
    return xc / scale, scale


def _sqrt_eigenvalues(lam: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Descending ``sigma = sqrt(lambda)`` from ascending Gram eigenvalues ``lam: [..., k]``.

    Eigenvalues at or below ``tol = max(lambda) * max(n, d) * eps`` (tiny negative ones included)
    are round-off of the float64 eigendecomposition and become exactly 0: ``sqrt`` of that noise
    would report singular values of ``~1e-8 * sigma_1`` where the matrix has none.
    """
    lam = lam.flip(-1)
    tol = lam[..., :1] * (max(shape) * _EPS64)
    lam = torch.where(lam > tol, lam, torch.zeros((), dtype=lam.dtype, device=lam.device))
    return lam.sqrt_().cpu().numpy()


def _eig_spectrum(xc: torch.Tensor) -> np.ndarray:
    """Descending singular values ``[min(n, d)]`` of ``xc: [n, d]`` via the smaller Gram matrix."""
    n, d = xc.shape
    g = xc @ xc.T if n <= d else xc.T @ xc
    return _sqrt_eigenvalues(torch.linalg.eigvalsh(g), (n, d))


def spectrum(X: ArrayLike, center: bool = True) -> np.ndarray:
    """Singular values of ``X`` (centred over rows by default), descending, in float64.

    Computed from the eigenvalues of the smaller of ``Xc^T Xc`` and ``Xc Xc^T`` (float64);
    eigenvalues at or below ``max(lambda) * max(n, d) * eps`` (negative ones included) are
    round-off and give exactly 0. Tail values below ``~1e-7 * sigma_1`` are not accurate.

    Args:
        X: ``[n, d]`` activations (``n >= 2`` examples), any float dtype, torch or numpy.
        center: subtract the column means first.

    Returns:
        ``[min(n, d)]`` float64 singular values, descending.

    Raises:
        ValueError: for a non-2-D input, ``n < 2``, NaN/Inf, or zero variance.
    """
    x = as_float_tensor(X, "X")
    _check_matrix(x, "X")
    xc, scale = _prepare(x, center, "X")
    return _eig_spectrum(xc) * scale


def layer_spectra(acts: ArrayLike, center: bool = True) -> np.ndarray:
    """Singular values of every layer (as ``spectrum``), one eigendecomposition per layer.

    Args:
        acts: ``[L, n, d]`` activations.
        center: subtract each layer's column means first.

    Returns:
        ``[L, min(n, d)]`` float64 singular values, descending along the last axis.

    Raises:
        ValueError: naming the layer, for NaN/Inf or zero variance.
    """
    a = as_float_tensor(acts, "acts")
    _check_stack(a, "acts")
    out = []
    for i in range(a.shape[0]):
        xc, scale = _prepare(a[i], center, f"acts layer {i}")
        out.append(_eig_spectrum(xc) * scale)
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# Metrics from a spectrum (vectorised over leading axes)
# --------------------------------------------------------------------------------------------


def _out(v: np.ndarray) -> float | np.ndarray:
    return float(v) if np.ndim(v) == 0 else v


def rankme_from_spectrum(s: ArrayLike, eps: float = 1e-7) -> float | np.ndarray:
    """RankMe of singular values ``s`` (Garrido et al. 2023).

    ``exp(-sum_k p_k log p_k)`` with ``p_k = s_k / sum_j s_j + eps``: the singular values, not
    their squares. ``eps`` adds about ``k * eps * (1 - log eps)`` (~1.7e-6 per value for the
    default) to the entropy, so a rank-1 spectrum of length ``k`` scores ``~1 + 1.7e-6 k``.

    Args:
        s: ``[..., k]`` singular values (>= 0), e.g. from ``spectrum`` or ``layer_spectra``.
        eps: the paper's smoothing constant (``1e-7``); ``0`` gives the plain entropy.

    Returns:
        A float for a 1-D ``s``, else a ``[...]`` float64 array.
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    s = _check_spectrum(s)
    p = s / s.sum(-1, keepdims=True) + eps
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return _out(np.exp(-plogp.sum(-1)))


def _renyi_p(p: np.ndarray, a: float) -> np.ndarray:
    """Rényi effective rank ``exp(S_a)`` of probability vectors ``p: [..., k]`` (zeros allowed)."""
    pos = p > 0
    if a == 0.0:
        return pos.sum(-1).astype(np.float64)
    if math.isinf(a):
        return 1.0 / p.max(-1)
    logp = np.log(np.where(pos, p, 1.0))  # 0 where p == 0; those terms carry weight p = 0
    if a == 1.0:
        return np.exp(-(p * logp).sum(-1))
    if abs(a - 1.0) < 0.5:
        # sum p^a - 1 = sum p (p^(a-1) - 1): expm1/log1p keep full precision as a -> 1.
        return np.exp(np.log1p((p * np.expm1((a - 1.0) * logp)).sum(-1)) / (1.0 - a))
    # log sum p^a by log-sum-exp: no underflow for large a.
    z = np.where(pos, a * logp, -np.inf)
    zmax = z.max(-1, keepdims=True)
    lse = zmax[..., 0] + np.log(np.exp(z - zmax).sum(-1))
    return np.exp(lse / (1.0 - a))


def renyi_from_spectrum(
    s: ArrayLike,
    alpha: Alpha | Sequence[Alpha],
    *,
    shape: tuple[int, int] | None = None,
) -> float | np.ndarray:
    """Rényi effective rank(s) of singular values ``s`` (``p_k`` from ``lambda_k = s_k^2``).

    ``exp(log(sum_k p_k^alpha) / (1 - alpha))``; ``alpha = 1``: Shannon, ``exp(-sum p log p)``
    (orders near 1 go through ``expm1``/``log1p``, so values at ``1 +- 1e-6`` differ from it only
    by the true slope, ~1e-6 relative, with no cancellation error); ``alpha = inf``: ``1 / max p``;
    ``alpha = 0``: the number of
    ``lambda_k > tol``, ``tol = max(lambda) * max(n, d) * finfo(float64).eps``. Eigenvalues at or
    below ``tol`` are dropped for every ``alpha``.

    Args:
        s: ``[..., k]`` singular values (>= 0).
        alpha: an order ``>= 0`` (``float("inf")`` allowed) or a list of orders.
        shape: ``(n, d)`` of the matrix ``s`` came from, for ``tol``; ``None`` uses ``k`` in
            place of ``max(n, d)`` (the ``X``-taking functions pass the real shape).

    Returns:
        For a scalar ``alpha``: a float (1-D ``s``) or a ``[...]`` array. For a list: a
        ``[..., len(alpha)]`` float64 array.
    """
    alphas, is_scalar = _check_alphas(alpha)
    s = _check_spectrum(s)
    s = s / s.max(-1, keepdims=True)  # scale invariant; keeps s^2 in range
    lam = s * s
    n_max = max(shape) if shape is not None else s.shape[-1]
    tol = lam.max(-1, keepdims=True) * n_max * _EPS64
    lam = np.where(lam > tol, lam, 0.0)
    p = lam / lam.sum(-1, keepdims=True)
    vals = [_renyi_p(p, a) for a in alphas]
    return _out(vals[0]) if is_scalar else np.stack(vals, -1)


def participation_ratio_from_spectrum(s: ArrayLike) -> float | np.ndarray:
    """Participation ratio ``(sum lambda)^2 / sum lambda^2`` (``lambda = s^2``), Rényi ``alpha=2``.

    Args:
        s: ``[..., k]`` singular values.

    Returns:
        A float for a 1-D ``s``, else a ``[...]`` array.
    """
    s = _check_spectrum(s)
    lam = s * s
    lam = lam / lam.max(-1, keepdims=True)  # no overflow in lambda^2
    return _out(lam.sum(-1) ** 2 / (lam * lam).sum(-1))


def top_k_variance_fraction_from_spectrum(s: ArrayLike, k: int) -> float | np.ndarray:
    """Fraction of the variance in the top ``k`` directions: ``sum_{i<k} lambda_i / sum lambda``.

    Args:
        s: ``[..., m]`` singular values, descending (as ``spectrum`` returns them).
        k: number of leading directions, ``>= 1``; ``k >= m`` gives 1.0.

    Returns:
        A float for a 1-D ``s``, else a ``[...]`` array.
    """
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    s = _check_spectrum(s)
    lam = np.sort(s * s, axis=-1)[..., ::-1]
    return _out(lam[..., :k].sum(-1) / lam.sum(-1))


# --------------------------------------------------------------------------------------------
# Metrics of one matrix
# --------------------------------------------------------------------------------------------


def _shape(X: ArrayLike) -> tuple[int, int]:
    return tuple(X.shape)  # type: ignore[return-value]  # validated by spectrum()


def rankme(X: ArrayLike, center: bool = True, eps: float = 1e-7) -> float:
    """RankMe effective rank of ``X`` (Garrido et al. 2023): entropy of normalised ``sigma``.

    Args:
        X: ``[n, d]`` activations.
        center: subtract the column means first.
        eps: smoothing added to each ``p_k`` (the paper's ``1e-7``).

    Returns:
        ``exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / sum sigma + eps``; between ~1 and
        ``min(n, d)``.
    """
    return rankme_from_spectrum(spectrum(X, center), eps)


def renyi_effective_rank(
    X: ArrayLike, alpha: Alpha | Sequence[Alpha], center: bool = True
) -> float | np.ndarray:
    """Rényi effective rank ``exp(S_alpha)`` of the covariance spectrum of ``X``.

    See ``renyi_from_spectrum`` for the definition; ``alpha = 0`` counts eigenvalues
    ``lambda_k > max(lambda) * max(n, d) * finfo(float64).eps`` (the numerical rank), ``alpha = 1``
    is the Shannon effective rank, ``alpha = 2`` the participation ratio, ``alpha = inf`` gives
    ``1 / max p``. A list of orders reuses one eigendecomposition.

    Args:
        X: ``[n, d]`` activations.
        alpha: an order ``>= 0`` or a list of orders.
        center: subtract the column means first.

    Returns:
        A float for a scalar ``alpha``, else a ``[len(alpha)]`` float64 array.
    """
    _check_alphas(alpha)  # before the decomposition, so a bad alpha fails fast
    return renyi_from_spectrum(spectrum(X, center), alpha, shape=_shape(X))


def participation_ratio(X: ArrayLike, center: bool = True) -> float:
    """Participation ratio ``(sum lambda)^2 / sum lambda^2`` of the covariance of ``X``.

    Args:
        X: ``[n, d]`` activations.
        center: subtract the column means first.
    """
    return participation_ratio_from_spectrum(spectrum(X, center))


def top_k_variance_fraction(X: ArrayLike, k: int, center: bool = True) -> float:
    """Fraction of the (centred) variance of ``X`` in its top ``k`` principal directions.

    Args:
        X: ``[n, d]`` activations.
        k: number of leading directions, ``>= 1``.
        center: subtract the column means first.
    """
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return top_k_variance_fraction_from_spectrum(spectrum(X, center), k)


# --------------------------------------------------------------------------------------------
# Per-layer tables
# --------------------------------------------------------------------------------------------


def metric_key(alpha: float) -> str:
    """Table key of the Rényi rank of order ``alpha``: ``"renyi_0.5"``, ``"renyi_1"``, ``"renyi_inf"``.

    Args:
        alpha: the order (``float("inf")`` allowed).
    """
    return f"renyi_{float(alpha):g}"


def _metrics_from_spectra(
    s: np.ndarray, alphas: list[float], shape: tuple[int, int], eps: float
) -> dict[str, np.ndarray]:
    """All table metrics of spectra ``s: [..., k]``: ``{"rankme": [...], "renyi_a": [...]}``."""
    out = {"rankme": np.asarray(rankme_from_spectrum(s, eps), dtype=np.float64)}
    ren = np.asarray(renyi_from_spectrum(s, alphas, shape=shape))
    for j, a in enumerate(alphas):
        out[metric_key(a)] = ren[..., j]
    return out


def layer_metrics(
    acts: ArrayLike,
    alphas: Sequence[Alpha] = (0.5, 1, 2, float("inf")),
    center: bool = True,
    eps: float = 1e-7,
) -> dict[str, np.ndarray]:
    """RankMe and Rényi effective ranks of every layer, from one eigendecomposition per layer.

    Args:
        acts: ``[L, n, d]`` activations (e.g. last-token hidden states of ``n`` prompts).
        alphas: Rényi orders; ``renyi_2`` is the participation ratio.
        center: subtract each layer's column means first.
        eps: RankMe's smoothing constant.

    Returns:
        ``{"rankme": [L], "renyi_0.5": [L], "renyi_1": [L], ...}`` float64 arrays (keys from
        ``metric_key``).

    Raises:
        ValueError: naming the layer, for NaN/Inf or a zero-variance layer (e.g. last-token
            states at the embedding layer when every prompt ends with the same token).
    """
    alphas_l, _ = _check_alphas(list(alphas))
    s = layer_spectra(acts, center)
    return _metrics_from_spectra(s, alphas_l, _shape(acts)[1:], eps)


def _draw_rows(
    n: int, n_boot: int, scheme: str, frac: float, rng: np.random.Generator
) -> np.ndarray:
    """Row indices ``[n_boot, m]`` of the resamples (``m = n`` for ``"resample"``)."""
    if scheme == "resample":
        return rng.integers(0, n, size=(n_boot, n))
    m = int(round(frac * n))
    if not 2 <= m < n:
        raise ValueError(f"subsampling {frac:g} of {n} rows keeps {m}; the subsample bootstrap "
                         "needs 2 <= m < n (use more rows or another frac)")
    return np.stack([rng.permutation(n)[:m] for _ in range(n_boot)])


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _resampled_spectra(xc: torch.Tensor, idx: torch.Tensor, center: bool,
                       pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Singular values ``[B, min(m, d)]`` of the row resamples ``xc[idx[b]]``, re-centred.

    ``m <= d``: index the full Gram matrix, ``G[idx][:, idx]``, and double-centre it (double
    centring of the Gram matrix = centring the rows of the data); ``m > d``: covariance of the
    resampled rows. Both are exact, duplicated rows included. With a ``pool`` the chunks of
    resamples are processed by its threads (see ``bootstrap_layer_metrics``); every resample gets
    the same operations either way.
    """
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
    return _sqrt_eigenvalues(torch.cat(out), (m, d))


def bootstrap_layer_metrics(
    acts: ArrayLike,
    alphas: Sequence[Alpha] = (0.5, 1, 2, float("inf")),
    n_boot: int = 100,
    seed: int = 0,
    ci: float = 0.95,
    *,
    center: bool = True,
    scheme: Literal["subsample", "resample"] = "subsample",
    frac: float = 0.8,
    eps: float = 1e-7,
    eig_workers: int = 1,
) -> dict[str, dict]:
    """Per-layer effective ranks with intervals over the choice of examples (rows).

    The same row resamples are used for every layer, so the intervals of different layers (and
    of ``delta_vs_base`` curves computed from ``samples``) are paired.

    Schemes:

    * ``"subsample"`` (default): ``m = round(frac * n)`` distinct rows drawn without replacement
      (m-out-of-n subsampling, ``frac = 0.8``). Resampling *with* replacement duplicates rows,
      which removes distinct examples (~37 % of them), so every resampled effective rank is
      biased low, strongly so when ``n`` is near or below ``d`` (rank is capped by the number of
      distinct rows); subsamples have no duplicates. A subsample estimate varies around the
      full-sample one with variance ``~ sigma^2 (1/m - 1/n)`` (finite-population correction), so
      deviations are scaled by ``sqrt(m / (n - m))`` (= 2 at ``frac = 0.8``) to estimate the
      spread at size ``n`` (the delete-d jackknife / subsampling scaling, which assumes the
      estimate's spread goes as ``1/sqrt(n)``). Measured against the true spread over 100
      independent Gaussian data sets with a decaying spectrum, the implied standard deviation
      ``(hi - lo) / 3.92`` came out at 0.92-1.0 of the truth for ``n = 2d`` and 0.72-0.89 for
      ``n < d`` (there rank grows with ``n``, so ``1/sqrt(n)`` scaling understates the spread:
      read intervals as somewhat too narrow). ``frac = 0.5`` was worse (0.44-0.8 for ``n < d``),
      ``0.9`` slightly better but rests on 10 % of the rows.
    * ``"resample"``: the ordinary bootstrap, ``n`` rows with replacement, unscaled (same
      check: 1.46x too wide for RankMe and 0.74x for ``renyi_2`` at ``n < d``).

    In both, the resamples estimate the *spread* only: the interval is the point estimate plus
    the centred percentiles ``quantile(samples - mean(samples))`` times the scale, so the
    downward shift of the resampled values (smaller ``m`` or duplicates) cannot move it. It is
    then widened to contain the point if round-off put it a hair outside. It covers sampling
    noise of the probe set at size ``n``, not the bias of a finite ``n`` (see ``rank_vs_n``).

    Cost: one Gram (or covariance) matrix per layer, then ``L * n_boot`` float64
    eigendecompositions of ``min(m, d)``-square matrices, which dominate. Measured on the
    project's 2-core CPU, one thread, ``n_boot = 100``: 0.08 s per layer at ``n = 512, d = 128``
    (the tiny preset: ~1 s for 13 layers), 0.15 s at ``n = 256, d = 1024`` and 0.8 s at
    ``n = 512, d = 1024`` (``m = 410``; ~23 s for Qwen3-0.6B's 29 layers: lower ``n_boot`` or pass
    CUDA tensors, which keep all of it on the GPU).

    Args:
        acts: ``[L, n, d]`` activations.
        alphas: Rényi orders.
        n_boot: number of resamples (>= 2).
        seed: seed of the ``numpy.random.default_rng`` drawing them.
        ci: coverage of the interval, in ``(0, 1)``.
        center: subtract column means (of each resample: centring is redone after resampling).
        scheme: ``"subsample"`` or ``"resample"``, see above.
        frac: subsample fraction for ``"subsample"``.
        eps: RankMe's smoothing constant.
        eig_workers: CPU threads that run the resamples' eigendecompositions side by side, each
            with torch single-threaded (the previous thread count is restored afterwards). The
            eigendecomposition of a few-hundred-square matrix is a long chain of small
            matrix-vector products that threaded LAPACK parallelises badly: on the project's
            2-core CPU with ``OMP_WAIT_POLICY=PASSIVE``, at ``n = 512, d = 1024``, one resample
            took 35 ms with 2 torch threads and 13 ms with 1, and ``eig_workers=2`` (one resample
            per core) 5 ms: 58 s instead of 392 s for two models' 29 layers at ``n_boot=200``
            (benchmarks/RESULTS_scale.md). Results agree to round-off (~1e-12). The default 1
            keeps torch's current threading.

    Returns:
        ``{metric: {"point": [L], "lo": [L], "hi": [L], "mean": [L], "samples": [n_boot, L],
        "scheme": str, "m": int, "ci": float}}`` for the metrics of ``layer_metrics``.
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
    a = as_float_tensor(acts, "acts")
    _check_stack(a, "acts")
    n_layers, n, d = a.shape
    rows = _draw_rows(n, n_boot, scheme, frac, np.random.default_rng(seed))
    m = rows.shape[1]
    logger.info("bootstrap_layer_metrics: %d layers, %d %ss of %d/%d rows, %s path",
                n_layers, n_boot, scheme, m, n, "Gram" if m <= d else "covariance")
    point_s, boot_s = [], []
    parallel = eig_workers > 1 and _compute_device(a).type == "cpu"
    with contextlib.ExitStack() as stack:
        pool = None
        if parallel:  # one torch thread per worker, the previous count restored on exit
            stack.enter_context(_torch_threads(1))
            pool = stack.enter_context(ThreadPoolExecutor(eig_workers))
        for i in range(n_layers):
            xc, _ = _prepare(a[i], center, f"acts layer {i}")
            point_s.append(_eig_spectrum(xc))
            boot_s.append(_resampled_spectra(xc, torch.from_numpy(rows).to(xc.device), center, pool))
    point = _metrics_from_spectra(np.stack(point_s), alphas_l, (n, d), eps)
    samples = _metrics_from_spectra(np.stack(boot_s, 1), alphas_l, (m, d), eps)
    scale = 1.0 if scheme == "resample" else math.sqrt(m / (n - m))
    q = (1.0 - ci) / 2.0
    out = {}
    for key, p in point.items():
        smp = samples[key]
        mean = smp.mean(0)
        dev = smp - mean
        lo = np.minimum(p + scale * np.quantile(dev, q, axis=0), p)
        hi = np.maximum(p + scale * np.quantile(dev, 1.0 - q, axis=0), p)
        out[key] = {"point": p, "lo": lo, "hi": hi, "mean": mean, "samples": smp,
                    "scheme": scheme, "m": m, "n": n, "ci": ci, "scale": scale}
    return out


def paired_delta(boot_tuned: Mapping[str, Mapping], boot_base: Mapping[str, Mapping]) -> dict[str, dict[str, np.ndarray]]:
    """Per-layer change tuned − base of each bootstrapped metric, with a paired interval.

    Both inputs come from ``bootstrap_layer_metrics`` with the same ``n``, ``n_boot``, ``seed`` and
    scheme, so resample ``b`` uses the same probe rows in both: the interval is that of the paired
    difference (point difference plus the centred percentiles of the resampled differences, times
    the same finite-population scale).

    Returns:
        ``{metric: {"point": [L], "lo": [L], "hi": [L]}}``.
    """
    out = {}
    for key, t in boot_tuned.items():
        b = boot_base[key]
        if (t["n"], t["m"], t["samples"].shape) != (b["n"], b["m"], b["samples"].shape):
            raise ValueError(f"{key}: bootstraps differ in n, m or n_boot; run both with the same settings")
        q = (1.0 - t["ci"]) / 2.0
        point = t["point"] - b["point"]
        dev = (t["samples"] - b["samples"]) - (t["samples"] - b["samples"]).mean(0)
        out[key] = {"point": point, "lo": point + t["scale"] * np.quantile(dev, q, axis=0),
                    "hi": point + t["scale"] * np.quantile(dev, 1.0 - q, axis=0)}
    return out


def delta_vs_base(
    table_by_ckpt: Mapping[str, Mapping[str, ArrayLike | Mapping]],
    base_key: str,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-layer change of each metric against the base checkpoint: ``table[ckpt] - table[base]``.

    Args:
        table_by_ckpt: ``{ckpt: {metric: [L]}}``, e.g. ``layer_metrics`` of each checkpoint; a
            ``bootstrap_layer_metrics`` entry (a dict) contributes its ``"point"``.
        base_key: the checkpoint to subtract.

    Returns:
        ``{ckpt: {metric: [L]}}`` for every checkpoint except ``base_key``, for the base's metrics.
    """
    if base_key not in table_by_ckpt:
        raise ValueError(f"base_key {base_key!r} is not in table_by_ckpt "
                         f"(keys: {list(table_by_ckpt)})")

    def values(v):
        v = v["point"] if isinstance(v, Mapping) else v
        return np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, np.float64)

    base = {k: values(v) for k, v in table_by_ckpt[base_key].items()}
    out = {}
    for ckpt, table in table_by_ckpt.items():
        if ckpt == base_key:
            continue
        out[ckpt] = {}
        for k, b in base.items():
            if k not in table:
                raise ValueError(f"checkpoint {ckpt!r} has no metric {k!r}")
            v = values(table[k])
            if v.shape != b.shape:
                raise ValueError(f"{ckpt!r} {k!r} has shape {v.shape}, base has {b.shape}")
            out[ckpt][k] = v - b
    return out


def rank_vs_n(
    acts: ArrayLike,
    ns: Sequence[int],
    seed: int = 0,
    center: bool = True,
    n_repeats: int = 1,
    eps: float = 1e-7,
) -> dict[str, np.ndarray]:
    """RankMe per layer on random subsets of ``n`` examples, for several ``n``.

    Shows how far the effective rank is capped by the number of examples (``min(n - 1, d)``
    centred) and whether the layer ordering is stable as ``n`` grows. Within a repeat the
    subsets are nested (the first ``n`` rows of one random permutation), which makes the curves
    smooth in ``n``.

    Args:
        acts: ``[L, N, d]`` activations.
        ns: subset sizes, each in ``[2, N]``.
        seed: seed of the ``numpy.random.default_rng`` drawing the permutations.
        center: subtract column means (of each subset).
        n_repeats: independent permutations averaged over.
        eps: RankMe's smoothing constant.

    Returns:
        ``{"n": [len(ns)] int, "rankme": [len(ns), L] (mean over repeats),
        "rankme_std": [len(ns), L] (std over repeats, 0 for one repeat),
        "cap": [len(ns)] the largest possible rank, min(n - 1, d) centred or min(n, d)}``.
    """
    a = as_float_tensor(acts, "acts")
    _check_stack(a, "acts")
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
