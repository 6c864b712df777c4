"""Linear CKA, classic (Kornblith et al. 2019) and debiased (Nguyen et al. 2021), from one HSIC
formula. Formulas, precision and pitfalls: docs/measures.md#cka"""

from __future__ import annotations

import logging
import math
from typing import Sequence, Union

import numpy as np
import torch

from alignkit.stats import ArrayLike, as_float_tensor, check_finite, zero_variance_error

logger = logging.getLogger(__name__)
Scalar = Union[torch.Tensor, float]  # a number, or tensors of them that broadcast

__all__ = ["linear_cka", "cka_matrix", "layerwise_cka", "prepare_pair", "centred_gram", "hsic",
           "layer_grams", "self_hsic"]

_SUSPECT_VAR_RTOL = 1e-12  # variance / mean square below which rows are checked for identity
_SAFE_TRACE = (1e-20, 1e20)  # Gram traces outside it make ``centred_gram`` rescale (fp32 range)
_DEFAULT_GRAM_BUDGET = 2 * 1024**3  # bytes of Grams ``cka_matrix`` holds before it chunks layers


def prepare_pair(X: ArrayLike, Y: ArrayLike, debiased: bool, gram_dtype: torch.dtype | None = None,
                 *, ndim: int = 3, names: tuple[str, str] = ("acts_a", "acts_b"),
                 same_depth: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Checks ``X: [L_a, n, d_a]``, ``Y: [L_b, n, d_b]`` (``[n, d]`` when ``ndim=2``; the same
    examples in order, called ``names`` in errors; ``same_depth``: ``L_a == L_b``) and returns
    ``(x, y, gram_dtype)``, float tensors with ``y`` on ``x``'s device. ValueError on bad input."""
    x, y = as_float_tensor(X, names[0]), as_float_tensor(Y, names[1])
    what = "[n_examples, n_features]" if ndim == 2 else "[n_layers, n_examples, n_features]"
    for t, name in ((x, names[0]), (y, names[1])):
        if t.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")
        if t.shape[-1] == 0:
            raise ValueError(f"{name} has no features (shape {tuple(t.shape)})")
        if ndim == 3 and t.shape[0] == 0:
            raise ValueError(f"{name} has no layers (shape {tuple(t.shape)})")
    if same_depth and x.shape[0] != y.shape[0]:
        raise ValueError(f"need the same number of layers in both stacks, got {x.shape[0]} "
                         f"({names[0]}) and {y.shape[0]} ({names[1]}); cka_matrix takes all pairs")
    n, n_y = x.shape[-2], y.shape[-2]
    if n != n_y:
        raise ValueError(f"{names[0]} and {names[1]} must hold the same examples in the same "
                         f"order: {names[0]} has {n} rows, {names[1]} has {n_y}")
    if debiased and n < 4:
        raise ValueError(f"CKA needs at least 4 examples for the debiased estimator, got {n}")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples, got {n}")
    if gram_dtype is None:
        gram_dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    elif gram_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram_dtype must be torch.float32 or torch.float64, got {gram_dtype}")
    return x, y.to(x.device), gram_dtype


def centred_gram(x: torch.Tensor, dtype: torch.dtype, name: str,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix ``Xc Xc^T: [n, n]`` of ``dtype`` (into ``out`` if given) of one layer's centred
    ``x: [n, d]``, rescaled if its trace is extreme; ``name`` labels errors (``"acts layer 3"``)."""
    n = x.shape[0]
    xf = x.to(dtype)
    mu = xf.mean(0, keepdim=True)
    if not bool(torch.isfinite(mu).all()):  # NaN/Inf anywhere in x shows up in the means
        check_finite(x, name, "CKA needs finite activations")
        raise ValueError(f"{name} is too large to centre in {dtype} (column sums overflow)")
    xc = xf - mu
    g = _sym_gram(xc, out)
    ss = float(g.trace())  # ||Xc||_F^2
    rescale = not (_SAFE_TRACE[0] < ss < _SAFE_TRACE[1])
    if rescale:
        ss = float(torch.linalg.vector_norm(xc, dtype=torch.float64)) ** 2
    mean_sq = n * float(mu.to(torch.float64).square().sum())
    if not ss > _SUSPECT_VAR_RTOL * (ss + mean_sq):
        if ss == 0.0 or bool((x == x[0]).all()):
            raise zero_variance_error(name)
        logger.warning("%s: variance is only %.1e of the mean square; CKA is at the mercy of "
                       "round-off there", name, ss / (ss + mean_sq))
    if rescale:
        g = _sym_gram(xc.mul_(1.0 / math.sqrt(ss)), out)
    return g


def hsic(n: Scalar, tr_kl: Scalar, sum_k: Scalar, sum_l: Scalar, sum_kl: Scalar,
         debiased: bool) -> Scalar:
    """HSIC of Gram matrices ``K``, ``L`` over ``n`` rows from ``tr_kl = tr(KL)``, ``sum_k = 1'K1``,
    ``sum_l = 1'L1``, ``sum_kl = 1'KL1`` (tensors broadcast, e.g. ``n: [R]``): biased, or debiased
    (Song et al. 2012; sums over the zero-diagonal Grams)."""
    if debiased:
        return (tr_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * sum_kl / (n - 2)) / (
            n * (n - 3))
    return (tr_kl - 2.0 * sum_kl / n + sum_k * sum_l / n**2) / n**2


def self_hsic(n: int, tr: torch.Tensor, rows: torch.Tensor, debiased: bool,
              names: Sequence[str]) -> torch.Tensor:
    """``HSIC(K, K): [L]`` of Grams with ``tr = tr(KK): [L]`` and row sums ``rows: [L, n]``;
    ``zero_variance_error`` naming the first layer where it is not positive (constant or, when
    debiased, degenerate)."""
    h = hsic(n, tr, rows.sum(1), rows.sum(1), rows.square().sum(1), debiased)
    if not bool((h > 0).all()):
        raise zero_variance_error(names[int((~(h > 0)).nonzero()[0, 0])])
    return h


def _sym_gram(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ x.T`` of ``x: [n, d]``, on CPU (``n >= 256``) with 3/4 of the flops (docs: CKA)."""
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


def layer_grams(stack: torch.Tensor, debiased: bool, dtype: torch.dtype,
                names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, Sequence[str]]:
    """``centred_gram`` of each layer of ``stack: [L, n, d]``, flattened ``[L, n*n]`` of ``dtype``
    (zero diagonal when ``debiased``), their float64 row sums ``[L, n]``, and ``names``."""
    n_layers, n, _ = stack.shape
    grams = torch.empty(n_layers, n * n, dtype=dtype, device=stack.device)
    rows = torch.empty(n_layers, n, dtype=torch.float64, device=stack.device)
    for i in range(n_layers):
        g = centred_gram(stack[i], dtype, names[i], out=grams[i].view(n, n))
        if debiased:
            g.diagonal().zero_()
        rows[i] = g.sum(1, dtype=torch.float64)
    return grams, rows, names


def _sq_norms(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(g, dim=1).square()


def _cka_of_grams(n: int, a: tuple, b: tuple, debiased: bool, chunk: int = 1 << 16):
    """CKA ``[L_a, L_b]`` (float64) of two stacks' ``layer_grams``: ``tr(KL)`` is ``ga @ gb.T``."""
    (ga, ra, names_a), (gb, rb, names_b) = a, b
    f64 = torch.float64
    if ga.dtype == f64 and gb.dtype == f64:
        cross, tr_a, tr_b = ga @ gb.T, _sq_norms(ga), _sq_norms(gb)
    else:
        (la, m), lb = ga.shape, gb.shape[0]
        cross = torch.zeros(la, lb, dtype=f64, device=ga.device)
        tr_a, tr_b = cross.new_zeros(la), cross.new_zeros(lb)
        buf_a, buf_b = cross.new_empty(la, min(chunk, m)), cross.new_empty(lb, min(chunk, m))
        for s in range(0, m, chunk):
            part_a = buf_a[:, :min(chunk, m - s)].copy_(ga[:, s:s + chunk])
            part_b = buf_b[:, :min(chunk, m - s)].copy_(gb[:, s:s + chunk])
            cross.addmm_(part_a, part_b.T)
            tr_a += _sq_norms(part_a)
            tr_b += _sq_norms(part_b)
    h_a, h_b = self_hsic(n, tr_a, ra, debiased, names_a), self_hsic(n, tr_b, rb, debiased, names_b)
    h_ab = hsic(n, cross, ra.sum(1)[:, None], rb.sum(1)[None, :], ra @ rb.T, debiased)
    return h_ab / torch.sqrt(h_a[:, None] * h_b[None, :])


def linear_cka(X: ArrayLike, Y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA of ``X: [n, d1]`` and ``Y: [n, d2]`` (same examples, same row order) from fp64
    Grams: a float in [0, 1] (biased) or roughly [-1, 1] (debiased)."""
    x, y, dtype = prepare_pair(X, Y, debiased, torch.float64, ndim=2, names=("X", "Y"))
    ga = layer_grams(x[None], debiased, dtype, ["X"])
    gb = layer_grams(y[None], debiased, dtype, ["Y"])
    return float(_cka_of_grams(x.shape[0], ga, gb, debiased)[0, 0])


def cka_matrix(acts_a: ArrayLike, acts_b: ArrayLike, debiased: bool = False, *,
               gram_dtype: torch.dtype | None = None,
               max_gram_bytes: int = _DEFAULT_GRAM_BUDGET) -> np.ndarray:
    """Linear CKA ``[L_a, L_b]`` (float64), ``[i, j]`` = CKA(acts_a[i], acts_b[j]), of
    ``acts_a: [L_a, n, d_a]`` and ``acts_b: [L_b, n, d_b]`` (the same examples in order); in
    chunks of layers above ``max_gram_bytes`` of Grams."""
    a, b, dtype = prepare_pair(acts_a, acts_b, debiased, gram_dtype)
    n_a, n_b, n = a.shape[0], b.shape[0], a.shape[1]
    per_layer = n * n * (8 if dtype == torch.float64 else 4)
    chunk = max(1, max_gram_bytes // (2 * per_layer))
    if (n_a + n_b) * per_layer > max_gram_bytes:
        logger.info("cka_matrix: Grams exceed %d bytes, working in chunks of %d layers",
                    max_gram_bytes, chunk)
    else:
        chunk = max(n_a, n_b)
    out = torch.empty(n_a, n_b, dtype=torch.float64)
    for i in range(0, n_a, chunk):
        ga = layer_grams(a[i:i + chunk], debiased, dtype,
                         [f"acts_a layer {k}" for k in range(i, n_a)])
        for j in range(0, n_b, chunk):
            gb = layer_grams(b[j:j + chunk], debiased, dtype,
                             [f"acts_b layer {k}" for k in range(j, n_b)])
            out[i:i + chunk, j:j + chunk] = _cka_of_grams(n, ga, gb, debiased).cpu()
    return out.numpy()


def layerwise_cka(acts_a: ArrayLike, acts_b: ArrayLike, debiased: bool = False, *,
                  gram_dtype: torch.dtype | None = None) -> np.ndarray:
    """CKA of matching layers ``[L]`` (float64), ``CKA(acts_a[l], acts_b[l])`` for
    ``acts_a: [L, n, d_a]`` and ``acts_b: [L, n, d_b]``: the diagonal of ``cka_matrix`` (same
    precision rule), one layer at a time (memory ``O(n^2)``)."""
    a, b, dtype = prepare_pair(acts_a, acts_b, debiased, gram_dtype, same_depth=True)
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        ga = layer_grams(a[i:i + 1], debiased, dtype, [f"acts_a layer {i}"])
        gb = layer_grams(b[i:i + 1], debiased, dtype, [f"acts_b layer {i}"])
        out[i] = float(_cka_of_grams(a.shape[1], ga, gb, debiased)[0, 0])
    return out
