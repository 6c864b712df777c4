"""Layer correspondence and transitions: pure numpy functions of CKA matrices and curves.

``cka_mat: [L_a, L_b]`` holds CKA between layer ``i`` of model A and layer ``j`` of model B
(``cka.cka_matrix``, as in the layer-correspondence plots of Kornblith et al. 2019); a layerwise
curve ``[L]`` holds CKA of matching layers (``cka.layerwise_cka``), and ``first_departure``
compares checkpoints' curves with a noise band (``controls.noise_floor``)."""

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
    """Monotone layer alignment by dynamic time warping on the cost ``1 - CKA``.

    Steps are ``(i+1, j)``, ``(i, j+1)`` or ``(i+1, j+1)``; the path runs from ``(0, 0)`` to
    ``(L_a - 1, L_b - 1)`` and minimises the summed cost. Ties prefer the diagonal step.

    Returns:
        The path as a list of ``(i, j)`` index pairs.
    """
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
        moves = [(acc[i - 1, j - 1], i - 1, j - 1), (acc[i - 1, j], i - 1, j),
                 (acc[i, j - 1], i, j - 1)]
        _, i, j = min(moves, key=lambda t: t[0])  # min keeps the first (diagonal) on ties
        path.append((i - 1, j - 1))
    return path[::-1]


def remapping_index(cka_mat: ArrayLike) -> float:
    """How far layers moved: mean ``|best_match(i) - i|`` over the layers of a square ``[L, L]``
    matrix (two models of the same depth).

    Returns:
        0.0 when every layer matches itself best; larger values mean the best-matching layer
        shifted, in units of layers.
    """
    m = _as_float64(cka_mat, "cka_mat", 2)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"remapping_index needs a square matrix, got shape {m.shape}")
    return float(np.mean(np.abs(m.argmax(1) - np.arange(m.shape[0]))))


def transition_layer(layerwise_values: ArrayLike) -> int:
    """The layer where a layerwise curve ``[L]`` (e.g. layerwise CKA(base, tuned), ``L >= 2``)
    drops most steeply.

    Returns:
        ``argmin_l (v[l] - v[l-1])``: the index of the layer *after* the steepest drop, in
        ``1..L-1`` (the first such layer on ties). A curve that never drops still gets the layer
        after its smallest increase; check ``np.diff`` if that matters.
    """
    v = _as_float64(layerwise_values, "layerwise_values", 1)
    return int(np.argmin(np.diff(v)) + 1)


def first_departure(steps: Sequence[int] | np.ndarray, cka_by_step: ArrayLike,
                    lo_band: ArrayLike | float) -> np.ndarray:
    """For each layer, the first checkpoint step whose CKA falls below the noise band.

    Args:
        steps: ``[n_ckpt]`` increasing training steps of the checkpoints.
        cka_by_step: ``[n_ckpt, L]`` layerwise CKA(base, checkpoint).
        lo_band: ``[L]`` (or a scalar) lower edge of the noise band, e.g.
            ``controls.noise_floor(...)["lo"]`` or ``1 - half_width``.

    Returns:
        ``[L]`` int64 array: the first ``steps[t]`` with ``cka_by_step[t, l] < lo_band[l]``, or
        ``-1`` where the layer never leaves the band.
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
    first = below.argmax(0)
    return np.where(below.any(0), s[first], -1).astype(np.int64)
