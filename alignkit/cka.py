"""Linear CKA (centred kernel alignment) between layer activations, with controls.

Everything here is a pure function of activations (or of CKA results): a measure never loads a
model. Activations may be ``torch.Tensor`` or ``numpy.ndarray`` in any float dtype (float16 and
bfloat16 included); results are ``numpy.float64`` arrays or Python floats.

Definitions (Kornblith et al. 2019, "Similarity of neural network representations revisited"):

* ``X: [n, d1]``, ``Y: [n, d2]`` hold the same ``n`` examples in the same row order.
  ``K = Xc Xc^T`` and ``L = Yc Yc^T`` are the linear Gram matrices of the column-centred data.
* Biased linear CKA = ``<K, L>_F / (||K||_F ||L||_F)``
  ``= ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` (feature-space form).
* Debiased linear CKA replaces each HSIC by the unbiased estimator of Song et al. (2012), as used by
  Nguyen et al. (2021, "Do wide and deep networks learn the same things?")::

      HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2))
                      - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))

  with ``K~`` = ``K`` with its diagonal set to zero. Equivalently ``n(n-3) HSIC_1 = <K^U, L^U>_F``
  where ``K^U`` is the U-centred Gram matrix (Szekely & Rizzo 2014), which is what the Gram-space
  code uses. The estimator is invariant to translating the features, needs ``n >= 4`` and can be
  negative: it is never clamped.

Numerics (measured on the 2-core CPU this project targets, torch 2.13, 2 threads, ``L = 28``,
``n = 512``, ``d = 1024``): the 28 Gram matmuls of one stack take 0.09 s in fp32 against 0.18 s
in fp64, and fp64 Grams made the whole ``cka_matrix`` ~2x slower (0.5 s against 0.25 s). So:

* inputs stored in 32 bits or fewer (float32/float16/bfloat16): ``cka_matrix``,
  ``layerwise_cka`` and the controls form each Gram matrix **in fp32 on column-centred data**
  (``_sym_gram`` also skips the redundant quarter of the product), centre it (double- or
  U-centring, row means formed in float64) and **accumulate every HSIC inner product in
  float64** (``_gram_products`` converts fp32 Grams to float64 in column chunks). Measured error
  against a float64 reference: ~1e-8 (see benchmarks/RESULTS_cka.md);
* float64 inputs stay in float64 throughout (``gram_dtype`` overrides either way);
* ``linear_cka`` (one pair) and ``StreamingCKA`` always compute in float64.

No epsilon is added anywhere: CKA stays exactly scale invariant. Activations far from unit scale
(Gram trace outside ``[1e-20, 1e20]``) are first rescaled to unit norm so fp32 cannot overflow or
underflow. A layer whose rows are all identical (e.g. last-token states at the embedding layer)
raises ``ValueError`` ("zero variance") instead of yielding NaN.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Sequence

import numpy as np
import torch

from alignkit.arrays import ArrayLike, as_float_tensor

logger = logging.getLogger(__name__)


__all__ = [
    "linear_cka",
    "cka_matrix",
    "layerwise_cka",
    "StreamingCKA",
    "bootstrap_layerwise_cka",
    "noise_floor",
    "permutation_baseline",
    "best_match",
    "alignment_path",
    "remapping_index",
    "transition_layer",
    "transition_layer_bootstrap",
    "first_departure",
]

# StreamingCKA: a layer whose centred sum of squares is below this fraction of its raw sum of
# squares is constant across examples (relative spread < 1e-10: float64 centring round-off).
_ZERO_VAR_RTOL = 1e-20
# Below this relative spread the Gram path checks whether the rows are exactly identical.
_SUSPECT_VAR_RTOL = 1e-12
# Gram traces outside this range make the Gram path rescale the data first (fp32 range safety).
_SAFE_TRACE = (1e-20, 1e20)
# Bytes of Gram matrices ``cka_matrix`` holds at once before it works in layer chunks.
_DEFAULT_GRAM_BUDGET = 2 * 1024**3


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _check_ndim(t: torch.Tensor, ndim: int, name: str) -> None:
    if t.ndim != ndim:
        what = "[n_examples, n_features]" if ndim == 2 else "[n_layers, n_examples, n_features]"
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(t.shape)})")
    if ndim == 3 and t.shape[0] == 0:
        raise ValueError(f"{name} has no layers (shape {tuple(t.shape)})")


def _check_finite(t: torch.Tensor, name: str) -> None:
    """Raises ``ValueError`` naming the first layer (for stacks) that holds NaN or Inf."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
    if t.ndim == 3:
        bad = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        name = f"{name} layer {bad[0]}"
    else:
        more = ""
    raise ValueError(f"{name} contains {kind}{more}; CKA needs finite activations")


def _check_n(n_x: int, n_y: int, debiased: bool, name_x: str, name_y: str) -> None:
    if n_x != n_y:
        raise ValueError(
            f"{name_x} and {name_y} must hold the same examples in the same order: "
            f"{name_x} has {n_x} rows, {name_y} has {n_y}"
        )
    if debiased and n_x < 4:
        raise ValueError(f"CKA needs at least 4 examples for the debiased estimator, got {n_x}")
    if n_x < 2:
        raise ValueError(f"CKA needs at least 2 examples, got {n_x}")


def _prepare_pair(
    X: ArrayLike, Y: ArrayLike, ndim: int, debiased: bool, name_x: str, name_y: str,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Converts and checks a pair; ``check_finite=False`` when the Gram path checks per layer."""
    x, y = as_float_tensor(X, name_x), as_float_tensor(Y, name_y)
    _check_ndim(x, ndim, name_x)
    _check_ndim(y, ndim, name_y)
    _check_n(x.shape[-2], y.shape[-2], debiased, name_x, name_y)
    if check_finite:
        _check_finite(x, name_x)
        _check_finite(y, name_y)
    if y.device != x.device:
        y = y.to(x.device)
    return x, y


def _gram_dtype_for(*tensors: torch.Tensor, gram_dtype: torch.dtype | None) -> torch.dtype:
    """fp32 Grams for inputs of <= 32 bits, fp64 when any input is fp64 (unless overridden)."""
    if gram_dtype is not None:
        if gram_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"gram_dtype must be torch.float32 or torch.float64, got {gram_dtype}")
        return gram_dtype
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _zero_variance_error(name: str) -> ValueError:
    return ValueError(
        f"{name} has zero variance across examples (all rows identical after centring); CKA is "
        "undefined there: drop it or pool differently"
    )


# --------------------------------------------------------------------------------------------
# Gram-space core
# --------------------------------------------------------------------------------------------


def _raw_gram(
    x: torch.Tensor,
    dtype: torch.dtype,
    name: str,
    buf: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gram matrix ``[n, n]`` (in ``dtype``) of the column-centred ``x: [n, d]``.

    Centring here only conditions the fp32 matmul: callers re-centre the Gram in float64
    (double-centring) or U-centre it, which ignores any leftover translation. When the Gram's
    trace leaves ``[1e-20, 1e20]`` (activations far from unit scale) the data are first scaled to
    unit Frobenius norm, so fp32 never overflows or underflows (CKA is scale invariant). This is
    also the per-layer input check: a NaN/Inf anywhere in ``x`` shows up in the column means.

    Args:
        x: ``[n, d]`` activations of one layer.
        dtype: ``torch.float32`` or ``torch.float64``.
        name: how error messages call ``x`` (e.g. ``"acts_a layer 3"``).
        buf: optional ``[n, d]`` scratch tensor of ``dtype`` (avoids an allocation per layer).
        out: optional ``[n, n]`` tensor of ``dtype`` that receives the Gram matrix.

    Raises:
        ValueError: if ``x`` holds NaN/Inf or all its rows are identical (zero variance).
    """
    n = x.shape[0]
    xf = x if x.dtype == dtype else x.to(dtype)
    mu = xf.mean(0, keepdim=True)
    if not bool(torch.isfinite(mu).all()):
        _check_finite(x, name)
        raise ValueError(f"{name} is too large to centre in {dtype} (column sums overflow)")
    xc = torch.sub(xf, mu, out=buf) if buf is not None else xf - mu
    g = _sym_gram(xc, out)
    ss = float(g.trace())  # ||Xc||_F^2
    rescale = not (_SAFE_TRACE[0] < ss < _SAFE_TRACE[1])
    if rescale:
        ss = float(torch.linalg.vector_norm(xc, dtype=torch.float64)) ** 2
    mean_sq = n * float(mu.to(torch.float64).square().sum())
    if not ss > _SUSPECT_VAR_RTOL * (ss + mean_sq):
        # Centring round-off leaves ~1e-7 relative residue in fp32: decide on the stored values.
        if ss == 0.0 or bool((x == x[0]).all()):
            raise _zero_variance_error(name)
        logger.warning("%s: variance is only %.1e of the mean square; CKA is at the mercy of "
                       "round-off there", name, ss / (ss + mean_sq))
    if rescale:
        xc.mul_(1.0 / math.sqrt(ss))
        g = _sym_gram(xc, out)
    return g


def _sym_gram(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ x.T`` for ``x: [n, d]``, skipping a quarter of the work on CPU.

    torch has no symmetric rank-k update, so for ``n >= 256`` on CPU the Gram is built from the
    top half-panel ``x[:h] @ x.T`` and the bottom-right block ``x[h:] @ x[h:].T``; the
    bottom-left block is the transpose of the top-right one (3/4 of the flops; measured 64 ms
    against 80 ms for 28 layers of 512 x 1024 on the target CPU).
    """
    n = x.shape[0]
    if out is None:
        out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    if n < 256 or x.device.type != "cpu":
        return torch.mm(x, x.T, out=out)
    h = n // 2
    torch.mm(x[:h], x.T, out=out[:h])
    torch.mm(x[h:], x[h:].T, out=out[h:, h:])
    out[h:, :h] = out[:h, h:].T
    return out


def _hsic_gram_(g: torch.Tensor, debiased: bool) -> torch.Tensor:
    """Centres the symmetric Gram ``g: [n, n]`` in place, in its own dtype, for HSIC.

    Biased: ``H g H`` (double-centring). Debiased: U-centring (Szekely & Rizzo 2014), whose
    diagonal is zero and for which ``<U(K), U(L)>_F = n (n - 3) HSIC_1(K, L)``, Song et al.'s
    unbiased estimator. The row means are formed in float64. For an fp32 Gram of centred data the
    corrections are small next to the entries, so fp32 storage of the result costs no more than
    the fp32 matmul already did.
    """
    n = g.shape[0]
    rows = g.sum(1).to(torch.float64)  # row sums = column sums (g is symmetric)
    if debiased:
        left = (rows - g.diagonal().to(torch.float64)) / (n - 2)  # sums of the zero-diag Gram
        left -= left.sum() / (2 * (n - 1))
        right = left
    else:
        left = rows / n
        right = left - left.mean()
    g.sub_(left.to(g.dtype)[:, None]).sub_(right.to(g.dtype)[None, :])
    if debiased:
        g.diagonal().zero_()
    return g


def _centred_gram(
    x: torch.Tensor,
    debiased: bool,
    dtype: torch.dtype,
    name: str,
    out: torch.Tensor | None = None,
    scratch: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The float64 ``[n, n]`` Gram matrix used for HSIC: double-centred or U-centred (debiased).

    Args:
        x: ``[n, d]`` activations of one layer.
        dtype: precision of the Gram matmul (the centring is done in float64 here).
        out: optional float64 ``[n, n]`` tensor to write into.
        scratch: optional ``(buf [n, d], g [n, n])`` tensors of ``dtype`` reused across layers
            (``g`` is None when ``dtype`` is float64: the matmul then writes into ``out``).
    """
    buf, g = scratch if scratch is not None else (None, None)
    if dtype == torch.float64:
        out = _raw_gram(x, dtype, name, buf=buf, out=out)
    else:
        g = _raw_gram(x, dtype, name, buf=buf, out=g)
        out = g.to(torch.float64) if out is None else out.copy_(g)
    return _hsic_gram_(out, debiased)


def _scratch(n: int, d: int, dtype: torch.dtype, device: torch.device):
    """Reusable ``(buf [n, d], g [n, n] or None)`` for ``_centred_gram``."""
    g = None if dtype == torch.float64 else torch.empty(n, n, dtype=dtype, device=device)
    return torch.empty(n, d, dtype=dtype, device=device), g


def _flat_grams(
    stack: torch.Tensor, debiased: bool, dtype: torch.dtype, name: str, first_layer: int = 0
) -> torch.Tensor:
    """Flattened HSIC-ready (double- or U-centred) Gram matrices of a layer stack.

    Args:
        stack: ``[L, n, d]`` activations.
        dtype: precision of the Grams, which are also stored in it.
        name: how error messages call the stack (``"acts_a"``).
        first_layer: index of ``stack[0]`` in the caller's numbering (for error messages).

    Returns:
        ``[L, n*n]`` tensor of ``dtype``.
    """
    n_layers, n, d = stack.shape
    grams = torch.empty(n_layers, n * n, dtype=dtype, device=stack.device)
    buf = torch.empty(n, d, dtype=dtype, device=stack.device)
    for layer in range(n_layers):
        g = grams[layer].view(n, n)
        _raw_gram(stack[layer], dtype, f"{name} layer {first_layer + layer}", buf=buf, out=g)
        _hsic_gram_(g, debiased)
    return grams


def _gram_products(
    ga: torch.Tensor, gb: torch.Tensor, chunk: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All inner products of flattened Grams, accumulated in float64.

    Args:
        ga: ``[L_a, m]``, gb: ``[L_b, m]`` (any float dtype).
        chunk: columns converted to float64 at a time (bounded extra memory).

    Returns:
        ``cross [L_a, L_b] = ga @ gb.T``, ``self_a [L_a]``, ``self_b [L_b]`` (squared norms).
    """
    f64 = torch.float64
    if ga.dtype == f64 and gb.dtype == f64:
        return (ga @ gb.T, torch.linalg.vector_norm(ga, dim=1).square(),
                torch.linalg.vector_norm(gb, dim=1).square())
    (la, m), lb = ga.shape, gb.shape[0]
    cross = torch.zeros(la, lb, dtype=f64, device=ga.device)
    self_a = torch.zeros(la, dtype=f64, device=ga.device)
    self_b = torch.zeros(lb, dtype=f64, device=ga.device)
    buf_a = torch.empty(la, min(chunk, m), dtype=f64, device=ga.device)
    buf_b = torch.empty(lb, min(chunk, m), dtype=f64, device=ga.device)
    for s in range(0, m, chunk):
        e = min(s + chunk, m)
        a = buf_a[:, : e - s].copy_(ga[:, s:e])
        b = buf_b[:, : e - s].copy_(gb[:, s:e])
        cross.addmm_(a, b.T)
        self_a += torch.linalg.vector_norm(a, dim=1).square()
        self_b += torch.linalg.vector_norm(b, dim=1).square()
    return cross, self_a, self_b


def _check_self_hsic(h: torch.Tensor, name: str, first_layer: int = 0) -> None:
    """A zero self-HSIC means a constant layer (or, debiased, a degenerate one)."""
    for layer in range(h.shape[0]):
        if not float(h[layer]) > 0.0:
            raise _zero_variance_error(f"{name} layer {first_layer + layer}")


# --------------------------------------------------------------------------------------------
# Feature-space core (shared by linear_cka's d < n path and StreamingCKA)
# --------------------------------------------------------------------------------------------


def _unbiased_hsic_from_stats(
    n: int,
    cross_sq: torch.Tensor,
    sx_c_sy: torch.Tensor,
    ss_x: torch.Tensor,
    ss_y: torch.Tensor,
    sum_k: torch.Tensor,
    sum_l: torch.Tensor,
    sum_kl: torch.Tensor,
    ky_sy: torch.Tensor,
    lx_sx: torch.Tensor,
) -> torch.Tensor:
    """``n (n-3) HSIC_1`` (Song et al. 2012) from streamed sufficient statistics.

    With rows ``x_i, y_i`` in any fixed translated frame (the estimator is translation
    invariant), ``k_i = ||x_i||^2``, ``l_i = ||y_i||^2``, ``s_x = sum_i x_i``, ``s_y = sum_i y_i``,
    ``C = X^T Y`` and ``K~ = X X^T - diag(k)``, ``L~ = Y Y^T - diag(l)``:

    * ``tr(K~ L~) = ||C||_F^2 - sum_i k_i l_i``                      (``cross_sq - sum_kl``)
    * ``1^T K~ 1 = ||s_x||^2 - sum_i k_i``                           (``ss_x - sum_k``)
    * ``1^T K~ L~ 1 = sum_i (x_i.s_x - k_i)(y_i.s_y - l_i)
      = s_x^T C s_y - (sum_i k_i y_i).s_y - (sum_i l_i x_i).s_x + sum_i k_i l_i``

    All arguments broadcast, so one call serves one pair, ``[L]`` pairs or ``[L_a, L_b]`` pairs.
    """
    trace_kl = cross_sq - sum_kl
    ones_k = ss_x - sum_k
    ones_l = ss_y - sum_l
    ones_kl = sx_c_sy - ky_sy - lx_sx + sum_kl
    return trace_kl + ones_k * ones_l / ((n - 1) * (n - 2)) - 2.0 * ones_kl / (n - 2)


def _feature_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool) -> float:
    """Linear CKA of one pair in feature space, float64. ``x: [n, d1]``, ``y: [n, d2]``."""
    stream = StreamingCKA(debiased=debiased)
    stream._names = ("X", "Y")
    stream.update(x, y)
    return float(stream.compute())


def _gram_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool, dtype: torch.dtype) -> float:
    """Linear CKA of one pair in Gram space. ``x: [n, d1]``, ``y: [n, d2]``."""
    gx = _centred_gram(x, debiased, dtype, "X")
    hxx = float(gx.square().sum())
    if not hxx > 0.0:
        raise _zero_variance_error("X")
    gy = _centred_gram(y, debiased, dtype, "Y")
    hyy = float(gy.square().sum())
    if not hyy > 0.0:
        raise _zero_variance_error("Y")
    hxy = float((gx * gy).sum())
    return hxy / math.sqrt(hxx * hyy)


# --------------------------------------------------------------------------------------------
# Public CKA functions
# --------------------------------------------------------------------------------------------


def linear_cka(
    X: ArrayLike,
    Y: ArrayLike,
    debiased: bool = False,
    *,
    method: Literal["auto", "feature", "gram"] = "auto",
) -> float:
    """Linear CKA between two representations of the same examples, in float64.

    Args:
        X: ``[n, d1]`` activations (torch or numpy, any float dtype).
        Y: ``[n, d2]`` activations of the same ``n`` examples, same row order.
        debiased: use the unbiased HSIC estimator (needs ``n >= 4``; the result can be negative).
        method: ``"feature"`` uses ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` (cheaper
            when ``d1, d2 < n``), ``"gram"`` the ``n x n`` Gram matrices, ``"auto"`` picks
            feature space when ``d1 < n`` and ``d2 < n``. Both give the same value.

    Returns:
        CKA as a Python float; biased CKA lies in [0, 1], debiased CKA in roughly [-1, 1].

    Raises:
        ValueError: on mismatched ``n``, too few examples, NaN/Inf, zero variance, wrong ndim.
    """
    x, y = _prepare_pair(X, Y, 2, debiased, "X", "Y")
    n = x.shape[0]
    if method == "auto":
        method = "feature" if (x.shape[1] < n and y.shape[1] < n) else "gram"
    if method == "feature":
        return _feature_cka(x, y, debiased)
    if method == "gram":
        return _gram_cka(x, y, debiased, torch.float64)
    raise ValueError(f"method must be 'auto', 'feature' or 'gram', got {method!r}")


def cka_matrix(
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    debiased: bool = False,
    *,
    gram_dtype: torch.dtype | None = None,
    max_gram_bytes: int = _DEFAULT_GRAM_BUDGET,
) -> np.ndarray:
    """Linear CKA between every layer of ``acts_a`` and every layer of ``acts_b``.

    Each layer's centred (biased) or U-centred (debiased) Gram matrix is computed once; all HSIC
    pairs are then one matmul ``[L_a, n*n] x [n*n, L_b]`` accumulated in float64. Grams are formed
    and stored in fp32 for inputs of 32 bits or fewer (about twice as fast as fp64 on the target
    CPU, within ~1e-8 of a float64 reference) and in fp64 for float64 input; see the module
    docstring. When the Grams of both stacks would exceed ``max_gram_bytes`` the layers are
    processed in chunks (the Grams of ``acts_b`` are then recomputed for every chunk of
    ``acts_a``). For ``n`` much larger than ``d``, ``StreamingCKA(pairs="matrix")`` needs no
    ``n x n`` memory at all.

    Args:
        acts_a: ``[L_a, n, d_a]`` activations (torch or numpy; float16/bfloat16/float32/float64).
        acts_b: ``[L_b, n, d_b]`` activations of the same ``n`` examples in the same order.
        debiased: use the unbiased HSIC estimator (``n >= 4``; entries can be negative).
        gram_dtype: override the Gram precision (``torch.float32`` or ``torch.float64``).
        max_gram_bytes: memory budget for the Gram matrices held at once (``4 n^2`` bytes per
            layer in fp32, ``8 n^2`` in fp64).

    Returns:
        ``[L_a, L_b]`` float64 array; entry ``[i, j]`` is CKA(acts_a[i], acts_b[j]).

    Raises:
        ValueError: on mismatched ``n``, too few examples, NaN/Inf, a zero-variance layer (the
            message names it), wrong ndim.
    """
    a, b = _prepare_pair(acts_a, acts_b, 3, debiased, "acts_a", "acts_b", check_finite=False)
    dtype = _gram_dtype_for(a, b, gram_dtype=gram_dtype)
    n_a, n_b, n = a.shape[0], b.shape[0], a.shape[1]
    per_layer = n * n * (8 if dtype == torch.float64 else 4)
    chunk = max(1, max_gram_bytes // (2 * per_layer))
    if (n_a + n_b) * per_layer > max_gram_bytes:
        logger.info("cka_matrix: Grams exceed %d bytes, working in chunks of %d layers",
                    max_gram_bytes, chunk)
    else:
        chunk = max(n_a, n_b)
    out = torch.empty(n_a, n_b, dtype=torch.float64)
    for i0 in range(0, n_a, chunk):
        ga = _flat_grams(a[i0:i0 + chunk], debiased, dtype, "acts_a", i0)
        for j0 in range(0, n_b, chunk):
            gb = _flat_grams(b[j0:j0 + chunk], debiased, dtype, "acts_b", j0)
            cross, ha, hb = _gram_products(ga, gb)
            _check_self_hsic(ha, "acts_a", i0)
            _check_self_hsic(hb, "acts_b", j0)
            block = cross / torch.sqrt(ha[:, None] * hb[None, :])
            out[i0:i0 + chunk, j0:j0 + chunk] = block.cpu()
    return out.numpy()


def layerwise_cka(
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    debiased: bool = False,
    *,
    gram_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Linear CKA of matching layers, ``CKA(acts_a[l], acts_b[l])``: the diagonal of ``cka_matrix``.

    Works one layer at a time (memory ``O(n^2)``), with the same Gram precision rule as
    ``cka_matrix``, so it reproduces that matrix's diagonal.

    Args:
        acts_a: ``[L, n, d_a]`` activations.
        acts_b: ``[L, n, d_b]`` activations of the same examples.
        debiased: use the unbiased HSIC estimator.
        gram_dtype: override the Gram precision (``torch.float32`` or ``torch.float64``).

    Returns:
        ``[L]`` float64 array.

    Raises:
        ValueError: if the two stacks have different numbers of layers, plus the checks of
            ``cka_matrix``.
    """
    a, b = _prepare_pair(acts_a, acts_b, 3, debiased, "acts_a", "acts_b", check_finite=False)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"layerwise_cka needs the same number of layers in both stacks, got "
            f"{a.shape[0]} (acts_a) and {b.shape[0]} (acts_b); use cka_matrix for all pairs"
        )
    dtype = _gram_dtype_for(a, b, gram_dtype=gram_dtype)
    n, dev = a.shape[1], a.device
    scratch_a, scratch_b = _scratch(n, a.shape[2], dtype, dev), _scratch(n, b.shape[2], dtype, dev)
    ga = torch.empty(n, n, dtype=torch.float64, device=dev)
    gb = torch.empty(n, n, dtype=torch.float64, device=dev)
    out = np.empty(a.shape[0], dtype=np.float64)
    for layer in range(a.shape[0]):
        _centred_gram(a[layer], debiased, dtype, f"acts_a layer {layer}", ga, scratch_a)
        _centred_gram(b[layer], debiased, dtype, f"acts_b layer {layer}", gb, scratch_b)
        haa = float(torch.linalg.vector_norm(ga)) ** 2
        hbb = float(torch.linalg.vector_norm(gb)) ** 2
        if not haa > 0.0:
            raise _zero_variance_error(f"acts_a layer {layer}")
        if not hbb > 0.0:
            raise _zero_variance_error(f"acts_b layer {layer}")
        out[layer] = float(torch.dot(ga.view(-1), gb.view(-1))) / math.sqrt(haa * hbb)
    return out


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class StreamingCKA:
    """Exact linear CKA accumulated over row batches, for ``n`` too large to hold at once.

    Accumulates float64 sufficient statistics in feature space, so ``compute()`` returns the same
    value as ``linear_cka`` / ``layerwise_cka`` / ``cka_matrix`` on all rows concatenated (not an
    average of per-batch CKAs, which is a different quantity). Rows are shifted by the mean of the
    first batch (CKA is translation invariant; the shift only protects against cancellation).

    Statistics per layer pair (``k_i = ||x_i||^2``, ``l_i = ||y_i||^2``): ``n``, ``sum x``,
    ``sum y``, ``X^T X``, ``Y^T Y``, ``X^T Y``; for the debiased estimator also ``sum k_i^2``,
    ``sum k_i l_i``, ``sum k_i x_i``, ``sum k_i y_i``, ``sum l_i x_i``, ``sum l_i y_i`` (see
    ``_unbiased_hsic_from_stats`` for the formula). Memory is ``O(L d^2)`` for
    ``pairs="layerwise"`` and ``O(L_a d_a L_b d_b)`` for ``pairs="matrix"``, independent of ``n``.

    Args:
        debiased: use the unbiased HSIC estimator (needs ``n >= 4`` rows in total).
        pairs: ``"layerwise"`` (needs ``L_a == L_b``; ``compute()`` gives ``[L]``) or
            ``"matrix"`` (``compute()`` gives ``[L_a, L_b]``).

    Example:
        >>> stream = StreamingCKA(debiased=True)
        >>> for a_batch, b_batch in batches:  # each [L, batch, d]
        ...     stream.update(a_batch, b_batch)
        >>> per_layer = stream.compute()  # [L]
    """

    def __init__(self, debiased: bool = False, pairs: Literal["layerwise", "matrix"] = "layerwise"):
        if pairs not in ("layerwise", "matrix"):
            raise ValueError(f"pairs must be 'layerwise' or 'matrix', got {pairs!r}")
        self.debiased = debiased
        self.pairs = pairs
        self.n = 0
        self._names = ("acts_a", "acts_b")
        self._squeeze: bool | None = None
        self._shape_a: tuple[int, int] | None = None
        self._shape_b: tuple[int, int] | None = None

    def _init_state(self, a: torch.Tensor, b: torch.Tensor) -> None:
        (la, _, da), (lb, _, db) = a.shape, b.shape
        f64, dev = torch.float64, a.device
        z = lambda *s: torch.zeros(*s, dtype=f64, device=dev)  # noqa: E731
        self._shape_a, self._shape_b = (la, da), (lb, db)
        self.shift_a = a.to(f64).mean(1)  # [La, da]
        self.shift_b = b.to(f64).mean(1)
        self.sum_a, self.sum_b = z(la, da), z(lb, db)
        self.aa, self.bb = z(la, da, da), z(lb, db, db)
        if self.debiased:
            self.k2, self.l2 = z(la), z(lb)  # sum k^2, sum l^2
            self.kx, self.ly = z(la, da), z(lb, db)  # sum k_i x_i, sum l_i y_i
        if self.pairs == "layerwise":
            self.ab = z(la, da, db)
            if self.debiased:
                self.kl, self.ky, self.lx = z(la), z(la, db), z(la, da)
        else:
            self.ab = z(la * da, lb * db)
            if self.debiased:
                self.kl, self.ky, self.lx = z(la, lb), z(la, lb * db), z(lb, la * da)

    def update(self, acts_a: ArrayLike, acts_b: ArrayLike) -> "StreamingCKA":
        """Adds a batch of rows.

        Args:
            acts_a: ``[batch, d_a]`` or ``[L_a, batch, d_a]`` activations.
            acts_b: ``[batch, d_b]`` or ``[L_b, batch, d_b]`` activations of the same rows.

        Returns:
            ``self``, so calls can be chained.
        """
        na, nb = self._names
        a, b = as_float_tensor(acts_a, na), as_float_tensor(acts_b, nb)
        squeeze = a.ndim == 2
        if self._squeeze is not None and squeeze != self._squeeze:
            raise ValueError("StreamingCKA: mix of 2-D and 3-D batches; keep one layout")
        _check_ndim(a, 2 if squeeze else 3, na)
        _check_ndim(b, 2 if squeeze else 3, nb)
        _check_finite(a, na)
        _check_finite(b, nb)
        if squeeze:
            a, b = a.unsqueeze(0), b.unsqueeze(0)
        if a.shape[1] != b.shape[1]:
            raise ValueError(
                f"{na} and {nb} must hold the same rows: {na} batch has {a.shape[1]} rows, "
                f"{nb} batch has {b.shape[1]}"
            )
        if self.pairs == "layerwise" and a.shape[0] != b.shape[0]:
            raise ValueError(
                f"pairs='layerwise' needs the same number of layers, got {a.shape[0]} (acts_a) "
                f"and {b.shape[0]} (acts_b); use pairs='matrix'"
            )
        if b.device != a.device:
            b = b.to(a.device)
        if a.shape[1] == 0:
            return self
        if self._shape_a is None:
            self._squeeze = squeeze
            self._init_state(a, b)
        for got, want, name in ((a, self._shape_a, na), (b, self._shape_b, nb)):
            if (got.shape[0], got.shape[2]) != want:
                raise ValueError(
                    f"{name} batch has {got.shape[0]} layers x {got.shape[2]} features, earlier "
                    f"batches had {want[0]} x {want[1]}"
                )
        x = a.to(torch.float64) - self.shift_a[:, None, :]  # [La, b, da]
        y = b.to(torch.float64) - self.shift_b[:, None, :]
        self.n += x.shape[1]
        self.sum_a += x.sum(1)
        self.sum_b += y.sum(1)
        self.aa += x.mT @ x
        self.bb += y.mT @ y
        if self.debiased:
            k, l = x.square().sum(2), y.square().sum(2)  # [La, b], [Lb, b]
            self.k2 += k.square().sum(1)
            self.l2 += l.square().sum(1)
            self.kx += (k[:, None, :] @ x).squeeze(1)
            self.ly += (l[:, None, :] @ y).squeeze(1)
        if self.pairs == "layerwise":
            self.ab += x.mT @ y
            if self.debiased:
                self.kl += (k * l).sum(1)
                self.ky += (k[:, None, :] @ y).squeeze(1)
                self.lx += (l[:, None, :] @ x).squeeze(1)
        else:
            rows = x.shape[1]
            xf = x.permute(1, 0, 2).reshape(rows, -1)  # [b, La*da]
            yf = y.permute(1, 0, 2).reshape(rows, -1)  # [b, Lb*db]
            self.ab += xf.T @ yf
            if self.debiased:
                self.kl += k @ l.T
                self.ky += k @ yf
                self.lx += l @ xf
        return self

    def _label(self, side: str, layer: int) -> str:
        name = self._names[0 if side == "a" else 1]
        return name if self._squeeze else f"{name} layer {layer}"

    def _self_hsic(self, side: str) -> torch.Tensor:
        """Per-layer self HSIC ``[L]`` of side ``"a"`` or ``"b"``, with the zero-variance check."""
        s, c, shift = (self.sum_a, self.aa, self.shift_a) if side == "a" else (
            self.sum_b, self.bb, self.shift_b)
        n = self.n
        cc = c - s[:, :, None] * s[:, None, :] / n  # centred X^T X
        var = cc.diagonal(dim1=1, dim2=2).sum(1)
        raw = c.diagonal(dim1=1, dim2=2).sum(1) + 2 * (shift * s).sum(1) + n * shift.square().sum(1)
        for layer in range(var.shape[0]):
            if not float(var[layer]) > _ZERO_VAR_RTOL * float(raw[layer]) or float(var[layer]) == 0:
                raise _zero_variance_error(self._label(side, layer))
        if not self.debiased:
            h = cc.square().sum((1, 2))
        else:
            k2, kx = (self.k2, self.kx) if side == "a" else (self.l2, self.ly)
            sum_k = c.diagonal(dim1=1, dim2=2).sum(1)
            ss = s.square().sum(1)
            h = _unbiased_hsic_from_stats(
                n, c.square().sum((1, 2)),
                torch.einsum("li,lij,lj->l", s, c, s), ss, ss, sum_k, sum_k, k2,
                (kx * s).sum(1), (kx * s).sum(1),
            )
        for layer in range(h.shape[0]):
            if not float(h[layer]) > 0.0:
                raise _zero_variance_error(self._label(side, layer))
        return h

    def compute(self) -> float | np.ndarray:
        """CKA of all rows seen so far.

        Returns:
            ``[L]`` (``pairs="layerwise"``) or ``[L_a, L_b]`` (``pairs="matrix"``) float64 array,
            or a Python float when the batches were 2-D and ``pairs="layerwise"``.

        Raises:
            ValueError: with too few rows or a zero-variance layer.
        """
        if self._shape_a is None:
            raise ValueError("StreamingCKA.compute() called before any rows were added")
        n = self.n
        _check_n(n, n, self.debiased, *self._names)
        haa, hbb = self._self_hsic("a"), self._self_hsic("b")
        sa, sb = self.sum_a, self.sum_b
        (la, da), (lb, db) = self._shape_a, self._shape_b
        if self.pairs == "layerwise":
            cross = self.ab  # [L, da, db]
            if not self.debiased:
                hab = (cross - sa[:, :, None] * sb[:, None, :] / n).square().sum((1, 2))
            else:
                hab = _unbiased_hsic_from_stats(
                    n, cross.square().sum((1, 2)),
                    torch.einsum("li,lij,lj->l", sa, cross, sb),
                    sa.square().sum(1), sb.square().sum(1),
                    self.aa.diagonal(dim1=1, dim2=2).sum(1),
                    self.bb.diagonal(dim1=1, dim2=2).sum(1),
                    self.kl, (self.ky * sb).sum(1), (self.lx * sa).sum(1),
                )
            out = (hab / torch.sqrt(haa * hbb)).cpu().numpy()
            return float(out[0]) if self._squeeze else out
        cross = self.ab.view(la, da, lb, db)
        if not self.debiased:
            centred = cross - sa[:, :, None, None] * sb[None, None, :, :] / n
            hab = centred.square().sum((1, 3))
        else:
            hab = _unbiased_hsic_from_stats(
                n, cross.square().sum((1, 3)),
                torch.einsum("ai,aibj,bj->ab", sa, cross, sb),
                sa.square().sum(1)[:, None], sb.square().sum(1)[None, :],
                self.aa.diagonal(dim1=1, dim2=2).sum(1)[:, None],
                self.bb.diagonal(dim1=1, dim2=2).sum(1)[None, :],
                self.kl,
                torch.einsum("abj,bj->ab", self.ky.view(la, lb, db), sb),
                torch.einsum("bai,ai->ab", self.lx.view(lb, la, da), sa),
            )
        return (hab / torch.sqrt(haa[:, None] * hbb[None, :])).cpu().numpy()


# --------------------------------------------------------------------------------------------
# Controls: bootstrap, noise floor, permutation baseline
# --------------------------------------------------------------------------------------------


def _weighted_layerwise(
    a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, debiased: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Layerwise CKA on many row resamples at once, from each layer's full Gram matrices.

    A resample is a count vector ``w: [n]`` (how often each example is drawn). For the resampled
    data ``X* = X[idx]``, with ``K = Xc Xc^T`` of the full data (centring is translation
    invariant, so the full-data centring is as good as any):
    ``sum(K* o L*) = w^T (K o L) w``, ``K* 1 = (K w)[idx]``, ``1^T K* 1 = w^T K w``, which gives
    the biased HSIC ``<H K* H, H L* H>`` and (for 0/1 weights: no duplicated rows) the Song et al.
    unbiased HSIC without ever materialising a resampled Gram matrix.

    Args:
        a: ``[L, n, d_a]``; b: ``[L, n, d_b]``.
        weights: ``[R, n]`` float64 counts; every row sums to ``m``.

    Returns:
        ``[R, L]`` float64 CKA values (NaN where a resample has zero variance).
    """
    w = weights.to(device=a.device, dtype=torch.float64)
    m = float(w[0].sum())
    n_layers = a.shape[0]
    out = torch.empty(w.shape[0], n_layers, dtype=torch.float64)
    wt = w.T.contiguous()  # [n, R]

    def hsic(p: torch.Tensor, rk: torch.Tensor, rl: torch.Tensor,
             dk: torch.Tensor, dl: torch.Tensor) -> torch.Tensor:
        s = ((p @ wt) * wt).sum(0)  # w^T (K o L) w, [R]
        tk, tl = (rk * wt).sum(0), (rl * wt).sum(0)  # w^T K w
        if not debiased:
            cross = (rk * rl * wt).sum(0)
            return s - 2.0 * cross / m + tk * tl / m**2
        # 0/1 weights: remove the diagonal (K~), then Song et al.'s formula with n -> m.
        s = s - (dk * dl) @ wt
        tk, tl = tk - dk @ wt, tl - dl @ wt
        cross = ((rk - dk[:, None]) * (rl - dl[:, None]) * wt).sum(0)
        return s + tk * tl / ((m - 1) * (m - 2)) - 2.0 * cross / (m - 2)

    for layer in range(n_layers):
        ka = _raw_gram(a[layer], dtype, f"acts_a layer {layer}").to(torch.float64)
        kb = _raw_gram(b[layer], dtype, f"acts_b layer {layer}").to(torch.float64)
        ra, rb = ka @ wt, kb @ wt  # [n, R]
        da, db = ka.diagonal(), kb.diagonal()
        hab = hsic(ka * kb, ra, rb, da, db)
        haa = hsic(ka * ka, ra, ra, da, da)
        hbb = hsic(kb * kb, rb, rb, db, db)
        denom = torch.sqrt(haa * hbb)
        val = hab / denom
        val[~(denom > 0)] = float("nan")
        out[:, layer] = val.cpu()
    return out


def _bootstrap_weights(
    n: int, n_boot: int, scheme: str, rng: np.random.Generator
) -> tuple[torch.Tensor, int]:
    if scheme == "resample":
        idx = rng.integers(0, n, size=(n_boot, n))
        w = np.zeros((n_boot, n))
        np.add.at(w, (np.arange(n_boot)[:, None], idx), 1.0)
        return torch.from_numpy(w), n
    m = n // 2
    w = np.zeros((n_boot, n))
    for r in range(n_boot):
        w[r, rng.permutation(n)[:m]] = 1.0
    return torch.from_numpy(w), m


def _resolve_scheme(scheme: str, debiased: bool) -> str:
    if scheme == "auto":
        return "subsample" if debiased else "resample"
    if scheme not in ("resample", "subsample"):
        raise ValueError(f"scheme must be 'auto', 'resample' or 'subsample', got {scheme!r}")
    return scheme


def _bootstrap_curves(
    acts_a: ArrayLike, acts_b: ArrayLike, n_boot: int, seed: int, debiased: bool, scheme: str,
    gram_dtype: torch.dtype | None,
) -> tuple[np.ndarray, np.ndarray, str, int, int]:
    """Point estimate ``[L]``, bootstrap curves ``[n_boot, L]``, scheme, m, n."""
    a, b = _prepare_pair(acts_a, acts_b, 3, debiased, "acts_a", "acts_b", check_finite=False)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"need the same number of layers, got {a.shape[0]} and {b.shape[0]}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    scheme = _resolve_scheme(scheme, debiased)
    n = a.shape[1]
    if debiased and scheme == "subsample" and n // 2 < 4:
        raise ValueError(f"the debiased half-sample bootstrap needs at least 8 examples, got {n}")
    dtype = _gram_dtype_for(a, b, gram_dtype=gram_dtype)
    rng = np.random.default_rng(seed)
    w, m = _bootstrap_weights(n, n_boot, scheme, rng)
    w = torch.cat([torch.ones(1, n, dtype=torch.float64), w])  # row 0: the full sample
    curves = _weighted_layerwise(a, b, w, debiased, dtype).numpy()
    if np.isnan(curves[1:]).any():
        logger.warning("bootstrap: %d resamples had a zero-variance layer and were ignored",
                       int(np.isnan(curves[1:]).any(1).sum()))
    return curves[0], curves[1:], scheme, m, n


def bootstrap_layerwise_cka(
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    n_boot: int = 200,
    seed: int = 0,
    debiased: bool = False,
    ci: float = 0.95,
    *,
    scheme: Literal["auto", "resample", "subsample"] = "auto",
    gram_dtype: torch.dtype | None = None,
) -> dict:
    """Bootstrap interval of layerwise CKA over the examples (rows).

    Works from each layer's Gram matrices (a resample of rows is a reweighting of the Gram
    matrix), so ``n_boot`` resamples cost a few ``[n, n] x [n, n_boot]`` matmuls per layer.

    Schemes (``"auto"``: ``"resample"`` for biased CKA, ``"subsample"`` for debiased):

    * ``"resample"``: ``n`` rows drawn with replacement. Duplicated rows act like extra diagonal
      terms of the Gram matrix: for biased CKA this is an ordinary bootstrap of a V-statistic, but
      it inflates the resampled values (biased CKA grows as the number of distinct examples
      shrinks). For the debiased estimator duplicates are worse: a duplicated pair ``(i, i')`` puts
      ``||x_i||^2`` back off the diagonal, reintroducing exactly the bias the estimator removes.
    * ``"subsample"``: half-samples without replacement (``m = n // 2``, no duplicates, so the
      U-statistic stays unbiased). A half-sample estimate has variance ``sigma^2 (1/m - 1/n)``
      around the full-sample one (finite-population correction), so deviations are scaled by
      ``sqrt(m / (n - m))`` (= 1 for ``m = n/2``) to estimate the spread at size ``n``.

    In both schemes the resamples estimate the *spread* only: the interval is the point estimate
    plus the centred percentiles ``quantile(samples - mean(samples))`` times the scale above, so a
    location shift of the resampled values (duplicates, ratio bias at size ``m``) cannot move it.

    Args:
        acts_a: ``[L, n, d_a]``; acts_b: ``[L, n, d_b]`` activations of the same examples.
        n_boot: number of resamples.
        seed: seed of the ``numpy.random.default_rng`` drawing them.
        debiased: use the unbiased HSIC estimator.
        ci: coverage of the interval, e.g. 0.95.
        scheme: see above.
        gram_dtype: override the Gram precision.

    Returns:
        dict with ``point`` ``[L]`` (full-sample CKA), ``mean`` ``[L]`` (mean of the resampled
        values), ``lo``/``hi`` ``[L]`` (interval edges), ``samples`` ``[n_boot, L]``, ``scheme``,
        ``m`` (rows per resample), ``ci``.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    point, samples, scheme, m, n = _bootstrap_curves(
        acts_a, acts_b, n_boot, seed, debiased, scheme, gram_dtype)
    scale = 1.0 if scheme == "resample" else math.sqrt(m / (n - m))
    mean = np.nanmean(samples, 0)
    dev = samples - mean
    alpha = (1.0 - ci) / 2.0
    lo = point + scale * np.nanquantile(dev, alpha, axis=0)
    hi = point + scale * np.nanquantile(dev, 1.0 - alpha, axis=0)
    return {"point": point, "mean": mean, "lo": lo, "hi": hi, "samples": samples,
            "scheme": scheme, "m": m, "ci": ci}


def noise_floor(
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    n_splits: int = 20,
    seed: int = 0,
    debiased: bool = False,
    z: float = 1.96,
    *,
    gram_dtype: torch.dtype | None = None,
) -> dict:
    """Sampling noise of layerwise CKA(base, tuned) from split halves of the probe set.

    CKA needs paired rows, so the noise floor is *not* CKA between two halves of one model.
    Instead: split the examples at random into two disjoint halves ``A`` and ``B`` of equal size
    (``n // 2`` each), compute ``layerwise_cka(acts_a[:, A], acts_b[:, A])`` and the same on
    ``B``, and record the difference; repeat ``n_splits`` times. The halves are independent
    samples of the same comparison, so ``Var(diff) ~ 2 Var(half) ~ 4 Var(full)`` and
    ``rms(diff) / 2`` estimates the standard error of the full-probe-set CKA. A per-layer change
    smaller than ``z`` times that cannot be told apart from the choice of probe examples.

    Args:
        acts_a: ``[L, n, d_a]`` activations of the base model.
        acts_b: ``[L, n, d_b]`` activations of the tuned model on the same examples.
        n_splits: number of random half splits.
        seed: seed of the ``numpy.random.default_rng`` drawing the splits.
        debiased: use the unbiased HSIC estimator (each half needs >= 4 examples).
        z: multiplier of the standard error for the band (1.96: ~95 %).
        gram_dtype: override the Gram precision.

    Returns:
        dict with ``point`` ``[L]`` (full-set layerwise CKA), ``diffs`` ``[n_splits, L]``
        (half1 - half2), ``se`` ``[L]`` (``rms(diffs) / 2``), ``half_width`` ``[L]``
        (``z * se``), ``lo``/``hi`` ``[L]`` (``point -/+ half_width``), ``mean_abs_diff`` ``[L]``.
    """
    a, b = _prepare_pair(acts_a, acts_b, 3, debiased, "acts_a", "acts_b", check_finite=False)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"need the same number of layers, got {a.shape[0]} and {b.shape[0]}")
    n = a.shape[1]
    half = n // 2
    min_half = 4 if debiased else 2
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
    dtype = _gram_dtype_for(a, b, gram_dtype=gram_dtype)
    curves = _weighted_layerwise(a, b, torch.from_numpy(w), debiased, dtype).numpy()
    point, diffs = curves[0], curves[1::2] - curves[2::2]
    se = np.sqrt(np.nanmean(diffs**2, 0)) / 2.0
    return {"point": point, "diffs": diffs, "se": se, "half_width": z * se,
            "lo": point - z * se, "hi": point + z * se,
            "mean_abs_diff": np.nanmean(np.abs(diffs), 0)}


def permutation_baseline(
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    n_perm: int = 20,
    seed: int = 0,
    debiased: bool = False,
    *,
    gram_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Chance level of the CKA heatmap: mean CKA after shuffling the rows of ``acts_b``.

    Shuffling breaks the example pairing while keeping each representation's geometry. Centring
    and U-centring commute with a row permutation, so each shuffle just permutes the stored
    Grams. Biased CKA of unrelated data is far from 0 when ``d`` is not small next to ``n``
    (about ``0.67`` for ``n = 512``, ``d = 1024``); this baseline shows that level.

    Args:
        acts_a: ``[L_a, n, d_a]``; acts_b: ``[L_b, n, d_b]``.
        n_perm: number of shuffles.
        seed: seed of ``numpy.random.default_rng``.
        debiased: use the unbiased HSIC estimator.
        gram_dtype: override the Gram precision.

    Returns:
        ``[L_a, L_b]`` float64 mean CKA over the shuffles.
    """
    a, b = _prepare_pair(acts_a, acts_b, 3, debiased, "acts_a", "acts_b", check_finite=False)
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    dtype = _gram_dtype_for(a, b, gram_dtype=gram_dtype)
    n, lb = a.shape[1], b.shape[0]
    ga = _flat_grams(a, debiased, dtype, "acts_a")
    gb = _flat_grams(b, debiased, dtype, "acts_b")
    _, ha, hb = _gram_products(ga, gb)  # self HSICs (a shuffle of rows leaves them unchanged)
    _check_self_hsic(ha, "acts_a")
    _check_self_hsic(hb, "acts_b")
    gb3 = gb.view(lb, n, n)
    denom = torch.sqrt(ha[:, None] * hb[None, :])
    rng = np.random.default_rng(seed)
    total = torch.zeros(a.shape[0], lb, dtype=torch.float64, device=ga.device)
    for _ in range(n_perm):
        p = torch.from_numpy(rng.permutation(n)).to(ga.device)
        gp = gb3[:, p][:, :, p].reshape(lb, n * n)
        total += _gram_products(ga, gp)[0] / denom
    return (total / n_perm).cpu().numpy()


# --------------------------------------------------------------------------------------------
# Layer correspondence and transitions (pure functions of CKA results)
# --------------------------------------------------------------------------------------------


def _as_matrix(cka_mat: ArrayLike, name: str = "cka_mat") -> np.ndarray:
    m = cka_mat.detach().cpu().numpy() if isinstance(cka_mat, torch.Tensor) else np.asarray(cka_mat)
    m = m.astype(np.float64)
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"{name} must be a non-empty 2-D [L_a, L_b] matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return m


def best_match(cka_mat: ArrayLike) -> np.ndarray:
    """Most similar layer of model B for each layer of model A.

    Args:
        cka_mat: ``[L_a, L_b]`` CKA matrix.

    Returns:
        ``[L_a]`` int array, ``argmax_j cka_mat[i, j]`` (first maximum on ties).
    """
    return _as_matrix(cka_mat).argmax(1)


def alignment_path(cka_mat: ArrayLike) -> list[tuple[int, int]]:
    """Monotone layer alignment by dynamic time warping on the cost ``1 - CKA``.

    Steps are ``(i+1, j)``, ``(i, j+1)`` or ``(i+1, j+1)``; the path runs from ``(0, 0)`` to
    ``(L_a - 1, L_b - 1)`` and minimises the summed cost. Ties prefer the diagonal step.

    Args:
        cka_mat: ``[L_a, L_b]`` CKA matrix.

    Returns:
        The path as a list of ``(i, j)`` index pairs.
    """
    cost = 1.0 - _as_matrix(cka_mat)
    la, lb = cost.shape
    acc = np.full((la + 1, lb + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, la + 1):
        for j in range(1, lb + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    path = [(la - 1, lb - 1)]
    i, j = la, lb
    while (i, j) != (1, 1):
        moves = [(acc[i - 1, j - 1], i - 1, j - 1), (acc[i - 1, j], i - 1, j),
                 (acc[i, j - 1], i, j - 1)]
        _, i, j = min(moves, key=lambda t: t[0])  # min keeps the first (diagonal) on ties
        path.append((i - 1, j - 1))
    return path[::-1]


def remapping_index(cka_mat: ArrayLike) -> float:
    """How far layers moved: mean ``|best_match(i) - i|`` over the layers of a square matrix.

    Args:
        cka_mat: ``[L, L]`` CKA matrix between two models with the same depth.

    Returns:
        0.0 when every layer matches itself best; larger values mean the best-matching layer
        shifted, in units of layers.
    """
    m = _as_matrix(cka_mat)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"remapping_index needs a square matrix, got shape {m.shape}")
    return float(np.mean(np.abs(m.argmax(1) - np.arange(m.shape[0]))))


def transition_layer(layerwise_values: ArrayLike) -> int:
    """The layer where a layerwise curve drops most steeply.

    Args:
        layerwise_values: ``[L]`` values, e.g. layerwise CKA(base, tuned), ``L >= 2``.

    Returns:
        ``argmin_l (v[l] - v[l-1])``: the index of the layer *after* the steepest drop, in
        ``1..L-1`` (the first such layer on ties). A curve that never drops still gets the layer
        after its smallest increase; check ``np.diff`` if that matters.
    """
    v = np.asarray(layerwise_values.detach().cpu() if isinstance(layerwise_values, torch.Tensor)
                   else layerwise_values, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] < 2:
        raise ValueError(
            f"layerwise_values must be 1-D with at least 2 layers, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("layerwise_values contains NaN or Inf")
    return int(np.argmin(np.diff(v)) + 1)


def transition_layer_bootstrap(
    acts_a: ArrayLike,
    acts_b: ArrayLike,
    n_boot: int = 200,
    seed: int = 0,
    debiased: bool = False,
    ci: float = 0.95,
    *,
    scheme: Literal["auto", "resample", "subsample"] = "auto",
) -> dict:
    """``transition_layer`` of layerwise CKA, with a bootstrap interval over examples.

    Uses the resampling schemes of ``bootstrap_layerwise_cka``. The index is discrete, so the
    interval is the plain percentile interval of the resampled indices (no rescaling); with the
    half-sample scheme (debiased default) it is conservative (half-size samples are noisier).

    Args:
        acts_a: ``[L, n, d_a]``; acts_b: ``[L, n, d_b]``.
        n_boot: number of resamples.
        seed: seed of ``numpy.random.default_rng``.
        debiased: use the unbiased HSIC estimator.
        ci: coverage of the interval.
        scheme: ``"auto"``, ``"resample"`` or ``"subsample"``.

    Returns:
        dict with ``point`` (int, from the full sample), ``lo``/``hi`` (int percentiles of the
        resampled indices), ``samples`` ``[n_boot]`` int, ``curve`` ``[L]`` full-sample CKA.
    """
    point_curve, samples, _, _, _ = _bootstrap_curves(
        acts_a, acts_b, n_boot, seed, debiased, scheme, None)
    keep = ~np.isnan(samples).any(1)
    idx = np.argmin(np.diff(samples[keep], axis=1), axis=1) + 1
    alpha = (1.0 - ci) / 2.0
    return {"point": transition_layer(point_curve),
            "lo": int(np.quantile(idx, alpha, method="lower")),
            "hi": int(np.quantile(idx, 1.0 - alpha, method="higher")),
            "samples": idx, "curve": point_curve}


def first_departure(
    steps: Sequence[int] | np.ndarray,
    cka_by_step: ArrayLike,
    lo_band: ArrayLike | float,
) -> np.ndarray:
    """For each layer, the first checkpoint step whose CKA falls below the noise band.

    Args:
        steps: ``[n_ckpt]`` increasing training steps of the checkpoints.
        cka_by_step: ``[n_ckpt, L]`` layerwise CKA(base, checkpoint).
        lo_band: ``[L]`` (or a scalar) lower edge of the noise band, e.g. ``noise_floor(...)["lo"]``
            or ``1 - half_width``.

    Returns:
        ``[L]`` int64 array: the first ``steps[t]`` with ``cka_by_step[t, l] < lo_band[l]``, or
        ``-1`` where the layer never leaves the band.
    """
    s = np.asarray(steps)
    c = _as_matrix(cka_by_step, "cka_by_step")
    if s.ndim != 1 or s.shape[0] != c.shape[0]:
        raise ValueError(f"steps must be 1-D with one entry per checkpoint ({c.shape[0]}), "
                         f"got shape {s.shape}")
    if s.shape[0] > 1 and not np.all(np.diff(s) > 0):
        raise ValueError(f"steps must be strictly increasing, got {s.tolist()}")
    lo = np.broadcast_to(np.asarray(lo_band, dtype=np.float64), (c.shape[1],))
    below = c < lo[None, :]
    first = below.argmax(0)
    return np.where(below.any(0), s[first], -1).astype(np.int64)
