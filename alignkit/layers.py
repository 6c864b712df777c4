"""Layer correspondence and transitions: pure numpy functions of CKA matrices ``[L_a, L_b]``
and layerwise curves ``[L]``. Formulas and pitfalls: docs/measures.md#layer-correspondence"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["best_match", "alignment_path", "remapping_index", "transition_layer",
           "first_departure"]


def _as_float64(values: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """``values`` (numpy, list, or a torch tensor on any device) as a finite float64 array."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch
        values = values.detach().cpu().numpy()
    v = np.asarray(values, dtype=np.float64)
    if ndim == 2 and (v.ndim != 2 or 0 in v.shape):
        raise ValueError(f"{name} must be a non-empty 2-D [L_a, L_b] matrix, got shape {v.shape}")
    if ndim == 1 and (v.ndim != 1 or v.shape[0] < 2):
        raise ValueError(f"{name} must be 1-D with at least 2 layers, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return v


def best_match(cka_mat: ArrayLike) -> np.ndarray:
    """Most similar layer of model B for each layer of model A: ``[L_a]`` int array,
    ``argmax_j cka_mat[i, j]`` (first maximum on ties)."""
    return _as_float64(cka_mat, "cka_mat", 2).argmax(1)


def alignment_path(cka_mat: ArrayLike) -> list[tuple[int, int]]:
    """Monotone layer alignment, a list of ``(i, j)`` from ``(0, 0)`` to ``(L_a - 1, L_b - 1)``:
    dynamic time warping (Sakoe & Chiba 1978) on the cost ``1 - CKA``, diagonal steps on ties."""
    cost = 1.0 - _as_float64(cka_mat, "cka_mat", 2)
    la, lb = cost.shape
    acc = np.full((la + 1, lb + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, la + 1):
        for j in range(1, lb + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    path = [(la - 1, lb - 1)]
    i, j = la, lb
    while (i, j) != (1, 1):
        _, i, j = min([(acc[i - 1, j - 1], i - 1, j - 1), (acc[i - 1, j], i - 1, j),
                       (acc[i, j - 1], i, j - 1)], key=lambda t: t[0])  # diagonal first on ties
        path.append((i - 1, j - 1))
    return path[::-1]


def remapping_index(cka_mat: ArrayLike) -> float:
    """How far layers moved, in layers: mean ``|best_match(i) - i|`` over a square ``[L, L]``
    matrix (two models of the same depth); 0.0 when every layer matches itself best."""
    m = _as_float64(cka_mat, "cka_mat", 2)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"remapping_index needs a square matrix, got shape {m.shape}")
    return float(np.mean(np.abs(m.argmax(1) - np.arange(m.shape[0]))))


def transition_layer(layerwise_values: ArrayLike) -> int:
    """The layer after the steepest drop of a layerwise curve ``v: [L]`` (``L >= 2``), e.g.
    CKA(base, tuned): ``argmin_l (v[l] - v[l-1])`` in ``1..L-1``, the first on ties."""
    v = _as_float64(layerwise_values, "layerwise_values", 1)
    return int(np.argmin(np.diff(v)) + 1)


def first_departure(steps: Sequence[int] | np.ndarray, cka_by_step: ArrayLike,
                    lo_band: ArrayLike | float) -> np.ndarray:
    """For each layer, the first checkpoint step whose CKA falls below the noise band: ``[L]``
    int64, the first ``steps[t]`` with ``cka_by_step[t, l] < lo_band[l]``, ``-1`` if none.

    Args:
        steps: ``[n_ckpt]`` strictly increasing training steps of the checkpoints.
        cka_by_step: ``[n_ckpt, L]`` layerwise CKA(base, checkpoint).
        lo_band: ``[L]`` or a scalar, e.g. ``controls.noise_floor(...)["lo"]``.
    """
    s = np.asarray(steps)
    c = _as_float64(cka_by_step, "cka_by_step", 2)
    if s.ndim != 1 or s.shape[0] != c.shape[0]:
        raise ValueError(f"steps must be 1-D with one entry per checkpoint ({c.shape[0]}), "
                         f"got shape {s.shape}")
    if s.shape[0] > 1 and not np.all(np.diff(s) > 0):
        raise ValueError(f"steps must be strictly increasing, got {s.tolist()}")
    lo = np.broadcast_to(np.asarray(lo_band, dtype=np.float64), (c.shape[1],))
    below = c < lo[None, :]
    return np.where(below.any(0), s[below.argmax(0)], -1).astype(np.int64)
