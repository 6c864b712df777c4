"""Weight-space drift: how far, how sparsely and in which directions post-training moved each matrix.

Compares two models of the same architecture and shape, the base ``W`` and the tuned ``W'``, one
parameter tensor at a time, with ``dW = W' - W`` in float64 (each tensor is cast on its own, so
memory stays at a few copies of the largest matrix even for real-size models). A measure never
loads a model: pass ``torch.nn.Module`` objects (e.g. from ``alignkit.tiny.load_model``) or state
dicts. Per parameter tensor (one row per layer and module: ``q, k, v, o, gate, up, down``, the
norms ``input_norm, post_attn_norm, q_norm, k_norm``, ``embed``, ``final_norm``, and ``lm_head``
only when it is not tied to the embedding — a state-dict ``lm_head.weight`` that shares storage
with, or equals, ``embed_tokens.weight`` is a tied copy and is dropped):

* ``rel_change = ||dW||_F / ||W||_F`` (0 for ``dW = 0``; ``inf`` when ``W = 0`` and ``dW != 0``).
* ``frac_changed``: share of entries with ``|dW| > tol`` (``tol`` absolute, see ``weight_drift``).
  Control ``frac_changed_dense``: the share a dense Gaussian update with the same RMS would give,
  ``erfc(tol / (rms * sqrt 2))``; far below it means the update is sparser than dense noise of
  the same size.
* ``frac_mass``: the smallest share of entries holding ``mass`` (0.9) of ``||dW||_F^2`` (largest
  ``|dW|`` first) — scale free, no tolerance. Control ``frac_mass_dense``: the same share for a
  dense Gaussian update (0.4446 at ``mass = 0.9``); a uniform update would give 0.9.
* For 2-D matrices ``[d_out, d_in]`` only (1-D norms and biases get NaN here):

  - ``eff_rank``: RankMe of ``dW``'s singular values (``alignkit.spectral.rankme_from_spectrum``:
    ``exp(-sum p log p)``, ``p_k = sigma_k / sum sigma + eps``), ``rank_delta`` its numerical rank
    (Gram eigenvalues above ``sigma_1^2 * max(d_out, d_in) * eps64``, spectral's convention: singular
    values below ``~sqrt(max(d_out, d_in) * eps64) * sigma_1``, ~5e-7 sigma_1 at width 1024, count as 0).
    Controls: ``eff_rank_dense``, RankMe of a Gaussian matrix of the same shape (seeded, what an
    unstructured update scores) and the cap ``min(d_out, d_in)`` (``eff_rank_max``).
  - ``overlap_left`` / ``overlap_right``: mean squared cosine of the principal angles between the
    span of ``dW``'s top left (output-space, ``d_out``) / right (input-space, ``d_in``) singular
    vectors and the span of ``W``'s top ``k``: ``||U_dW^T U_W||_F^2 / k_delta`` with
    ``k_delta = min(k, rank_delta)`` update directions (directions beyond the update's rank are
    arbitrary and are not counted) against ``k_base = min(k, rank W)`` base directions. 1: the
    update lives inside the base's principal subspace; ``chance_left = k_base / d_out`` and
    ``chance_right = k_base / d_in`` are its expectation for randomly oriented update directions
    (a random unit vector puts ``k/d`` of its squared length in any fixed ``k``-dim subspace).

A zero update (``dW = 0`` exactly) gets 0 everywhere, never NaN: ``rel_change``,
``frac_changed``, ``frac_mass``, ``eff_rank``, ``rank_delta`` and both overlaps are 0 (no changed
entry, no direction; the effective rank of the zero matrix is taken as its rank, 0).

Singular values and vectors come, as in ``alignkit.spectral``, from the float64 eigendecomposition
of the smaller Gram matrix (``min(d_out, d_in)`` square): top vectors are accurate to ~1e-12;
singular values below ``~1e-7 * sigma_1`` are 0 or inaccurate, which RankMe's ``eps`` hides.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Mapping, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from alignkit import spectral

logger = logging.getLogger(__name__)

__all__ = ["weight_drift", "summarize_drift", "module_name", "gaussian_mass_share", "MATRIX_METRICS"]

ModelLike = Union[torch.nn.Module, Mapping[str, torch.Tensor]]

# metrics defined for 2-D matrices only (NaN for 1-D parameters)
MATRIX_METRICS = ("eff_rank", "rank_delta", "eff_rank_dense", "eff_rank_max", "overlap_left",
                  "overlap_right", "chance_left", "chance_right", "k_delta", "k_base")

_SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
          "down_proj": "down", "input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm",
          "q_norm": "q_norm", "k_norm": "k_norm"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_EPS64 = float(np.finfo(np.float64).eps)


def module_name(name: str, n_layers: int) -> tuple[int, str]:
    """``(layer, module)`` of a parameter name, e.g. ``model.layers.3.self_attn.q_proj.weight -> (3, "q")``.

    Layer ``-1`` is the token embedding; ``n_layers`` holds everything after the decoder stack
    (final norm, an untied ``lm_head``) and any other parameter outside ``layers.{i}``. Biases get
    a ``.bias`` suffix (``"q.bias"``); unknown sublayer names are kept as their path.

    Args:
        name: a ``named_parameters`` / state-dict key.
        n_layers: number of decoder layers.
    """
    stem, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias") or not stem:
        stem, leaf = name, ""
    suffix = ".bias" if leaf == "bias" else ""
    m = _LAYER.search(stem)
    if m:
        path = m.group(2)
        return int(m.group(1)), _SHORT.get(path.rsplit(".", 1)[-1], path) + suffix
    last = stem.rsplit(".", 1)[-1]
    short = {"embed_tokens": "embed", "norm": "final_norm", "lm_head": "lm_head"}.get(last, stem)
    return (-1 if short == "embed" else n_layers), short + suffix


def _params(model: ModelLike, side: str) -> dict[str, torch.Tensor]:
    """Floating parameters by name; tied duplicates (shared storage) appear once, first name kept."""
    if isinstance(model, torch.nn.Module):
        return {n: p.detach() for n, p in model.named_parameters()}  # named_parameters drops tied copies
    if not isinstance(model, Mapping):
        raise TypeError(f"{side} must be a torch.nn.Module or a state dict (Mapping[str, Tensor]), "
                        f"got {type(model).__name__}; load directories with alignkit.tiny.load_model")
    out, seen = {}, set()
    for n, t in model.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{side} state dict entry {n!r} is a {type(t).__name__}, not a torch.Tensor")
        if not t.is_floating_point():
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[n] = t.detach()
    return out


def _check_pair(pb: dict[str, torch.Tensor], pt: dict[str, torch.Tensor], base, tuned) -> None:
    for n, t in pb.items():
        if n not in pt:
            raise ValueError(f"parameter {n!r} is in base only (tuned has no such parameter): "
                             "weight_drift compares two models of the same architecture")
        if tuple(t.shape) != tuple(pt[n].shape):
            raise ValueError(f"parameter {n!r} has shape {tuple(t.shape)} in base and {tuple(pt[n].shape)} in tuned: "
                             "weight_drift compares two models of the same shape")
    for n in pt:
        if n not in pb:
            raise ValueError(f"parameter {n!r} is in tuned only (base has no such parameter): "
                             "weight_drift compares two models of the same architecture")
    if isinstance(base, torch.nn.Module) and isinstance(tuned, torch.nn.Module) and type(base) is not type(tuned):
        raise ValueError(f"base is a {type(base).__name__} and tuned a {type(tuned).__name__}: "
                         "weight_drift compares two models of the same architecture")
    if not pb:
        raise ValueError("base has no floating-point parameters")


def _drop_tied_head_(pb: dict[str, torch.Tensor], pt: dict[str, torch.Tensor]) -> None:
    """Drop ``lm_head.weight`` where it is a copy of ``embed_tokens.weight`` (tied weights saved twice,
    e.g. a scaled or reloaded state dict): in both models when it equals the embedding in both, or
    in the one model that has it when the other (a module with tied weights) does not. A tied head
    is counted once, as ``embed``."""
    def find(suffix: list[str]) -> str | None:
        names = [n for n in {**pb, **pt} if n.rsplit(".", 2)[-2:] == suffix]
        return names[0] if len(names) == 1 else None

    h, e = find(["lm_head", "weight"]), find(["embed_tokens", "weight"])
    if h is None or e is None:
        return

    def tied(p: dict[str, torch.Tensor]) -> bool:
        return h in p and e in p and p[h].shape == p[e].shape and torch.equal(p[h], p[e])

    sides = [p for p in (pb, pt) if h in p]
    if all(tied(p) for p in sides):
        logger.info("%s equals %s (tied): counted once, as embed", h, e)
        for p in sides:
            del p[h]


def _n_layers(names) -> int:
    idx = [int(m.group(1)) for m in map(_LAYER.search, names) if m]
    return max(idx) + 1 if idx else 0


def gaussian_mass_share(mass: float = 0.9) -> float:
    """Share of the entries of a dense Gaussian matrix, largest ``|x|`` first, holding ``mass`` of ``sum x^2``.

    For ``x ~ N(0, 1)`` the entries with ``|x| > c`` are a share ``erfc(c / sqrt 2)`` of all and carry
    ``2 c phi(c) + erfc(c / sqrt 2)`` of ``E[x^2]``; solved for ``c`` by bisection (0.4446 at 0.9).

    Args:
        mass: the fraction of the squared norm, in ``(0, 1]``.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if mass == 1.0:
        return 1.0

    def held(c: float) -> float:
        return 2.0 * c * math.exp(-c * c / 2.0) / math.sqrt(2.0 * math.pi) + math.erfc(c / math.sqrt(2.0))

    lo, hi = 0.0, 40.0  # held() decreases from 1 to 0 on [0, inf)
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if held(mid) > mass else (lo, mid)
    return math.erfc(lo / math.sqrt(2.0))


def _mass_share(d: torch.Tensor, mass: float) -> float:
    """Smallest share of entries of ``d`` holding ``mass`` of ``sum d^2`` (0 for ``d = 0``)."""
    sq = d.reshape(-1).square()
    total = float(sq.sum())
    if total == 0.0:
        return 0.0
    if sq.device.type == "cpu":  # numpy sorts in place, without torch.sort's int64 index array
        a = sq.numpy()
        a.sort()
        csum = torch.from_numpy(a[::-1].cumsum())
    else:
        csum = torch.sort(sq, descending=True).values.cumsum(0)
    count = int(torch.searchsorted(csum, torch.tensor([mass * total], dtype=csum.dtype, device=csum.device))[0]) + 1
    return min(count, sq.numel()) / sq.numel()


def _top_singular(x: torch.Tensor, k: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Singular values (descending, round-off zeroed) and the top ``min(k, rank)`` singular vectors.

    From the eigendecomposition of the smaller Gram matrix of ``x`` (float64, divided by
    ``max|x|^2``), as ``alignkit.spectral`` does; the other side's vectors are ``x v / sigma`` (or
    ``x^T u / sigma``). ``x`` is not copied.

    Returns:
        ``sigma: [min(m, n)]`` numpy, ``U: [m, r]``, ``V: [n, r]`` with ``r = min(k, rank)``.
    """
    m, n = x.shape
    scale = float(x.abs().max())
    if scale == 0.0:
        return np.zeros(min(m, n)), x.new_zeros((m, 0)), x.new_zeros((n, 0))
    tall = m >= n
    lam, vecs = torch.linalg.eigh((x.T @ x if tall else x @ x.T) / (scale * scale))
    sigma = spectral._sqrt_eigenvalues(lam, (m, n)) * scale  # descending, round-off eigenvalues set to 0
    r = min(k, int((sigma > 0).sum()))
    top = vecs.flip(-1)[:, :r]
    s = torch.as_tensor(sigma[:r].copy(), dtype=x.dtype, device=x.device)
    other = (x @ top if tall else x.T @ top) / s
    u, v = (other, top) if tall else (top, other)
    return sigma, u, v


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles: ``||a^T b||_F^2 / a.shape[1]`` (0 when ``a`` is empty)."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return 0.0
    return float((a.T @ b).square().sum()) / a.shape[1]


_DENSE_RANK: dict[tuple, float] = {}  # (shape, eps) -> RankMe of the seeded Gaussian control, once per process


def _dense_rank(shape: tuple[int, int], eps: float, device) -> float:
    """RankMe of a seeded Gaussian matrix of ``shape`` (computed once per shape and ``eps``)."""
    key = (shape, eps)
    if key not in _DENSE_RANK:
        g = torch.Generator(device="cpu").manual_seed(0)
        z = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
        _DENSE_RANK[key] = spectral.rankme_from_spectrum(spectral.spectrum(z, center=False), eps)
    return _DENSE_RANK[key]


def weight_drift(
    base: ModelLike,
    tuned: ModelLike,
    tol: float = 1e-5,
    k: int = 8,
    mass: float = 0.9,
    eps: float = 1e-7,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-parameter drift of ``tuned`` from ``base``: size, sparsity, rank and direction of ``dW``.

    See the module docstring for the definitions and their controls.

    ``tol`` is absolute, applied to ``|W' - W|`` computed in float64. The default ``1e-5`` sits far
    above float32 round-off (a float32 weight of size ``|w| <= 1`` is stored to within
    ``|w| * 2^-24 <= 6e-8``, so a tolerance ~170x that never counts a value that only passed
    through float32 as changed) and at about bfloat16's resolution for weights near ``|w| = 1e-3``
    (``2^-8 |w|``): in a bfloat16 checkpoint of typical weights (``|w| ~ 0.01-0.1``) every
    representable change exceeds it. Set ``tol=0`` to count any bitwise change.

    Cost: per matrix two Gram eigendecompositions (``W``, ``dW``; ``min(d_out, d_in)`` square, with
    vectors), one for the Gaussian control (once per shape and process) and a sort of ``|dW|^2``.
    Measured on the project's 2-core CPU with Qwen3-0.6B shapes (float32 in): 6.6 s per decoder
    layer and 44 s for the 151936 x 1024 embedding (~4 min for the whole model), peak RSS 7.1 GB
    (both models' float32 tensors included). ``device="cuda"`` moves each tensor's work to the GPU.

    Args:
        base: the reference model ``W``, a ``torch.nn.Module`` or a state dict.
        tuned: the model ``W'`` of the same architecture and shapes.
        tol: absolute threshold on ``|dW|`` for ``frac_changed`` (``>= 0``).
        k: number of top singular directions of ``W`` and ``dW`` compared (``>= 1``).
        mass: fraction of ``||dW||^2`` for ``frac_mass``, in ``(0, 1]``.
        eps: RankMe's smoothing constant (``alignkit.spectral``'s default).
        device: where to compute (``None``: where each parameter lives; devices without float64
            fall back to the CPU).
        progress: show a tqdm bar over parameters.

    Returns:
        One row per parameter tensor, in the base's order, with columns ``name, layer, module,
        shape, numel, norm_base, norm_delta, rel_change, frac_changed, frac_changed_dense,
        frac_mass, frac_mass_dense`` and, NaN for 1-D parameters, ``eff_rank, rank_delta,
        eff_rank_dense, eff_rank_max, overlap_left, overlap_right, chance_left, chance_right,
        k_delta, k_base``. ``df.attrs`` holds ``tol, k, mass, eps, n_layers``.

    Raises:
        ValueError: naming the first parameter that exists in one model only or whose shapes
            differ, for models of different classes, for NaN/Inf weights, or bad ``tol``/``k``/
            ``mass``.
        TypeError: for inputs that are neither modules nor state dicts.
    """
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    pb, pt = _params(base, "base"), _params(tuned, "tuned")
    _drop_tied_head_(pb, pt)
    _check_pair(pb, pt, base, tuned)
    n_layers = _n_layers(pb)
    dense_mass = gaussian_mass_share(mass)
    rows = []
    for name, wb in tqdm(pb.items(), desc="weight drift", disable=not progress, leave=False):
        dev = torch.device(device) if device is not None else wb.device
        if dev.type not in ("cpu", "cuda"):
            dev = torch.device("cpu")
        w = wb.to(device=dev, dtype=torch.float64)
        d = pt[name].to(device=dev, dtype=torch.float64) - w
        for side, t in (("base", w), ("tuned", d)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"parameter {name!r} of {side} contains NaN or Inf")
        layer, module = module_name(name, n_layers)
        nb, nd = float(torch.linalg.vector_norm(w)), float(torch.linalg.vector_norm(d))
        numel = w.numel()
        rms = nd / math.sqrt(numel)
        row = {
            "name": name, "layer": layer, "module": module, "shape": tuple(w.shape), "numel": numel,
            "norm_base": nb, "norm_delta": nd,
            "rel_change": 0.0 if nd == 0.0 else (nd / nb if nb > 0 else math.inf),
            "frac_changed": float((d.abs() > tol).sum()) / numel,
            "frac_changed_dense": math.erfc(tol / (rms * math.sqrt(2.0))) if rms > 0 else 0.0,
            "frac_mass": _mass_share(d, mass),
            "frac_mass_dense": dense_mass,
        }
        row.update(dict.fromkeys(MATRIX_METRICS, math.nan))
        if w.ndim == 2 and min(w.shape) > 0:
            m, n = w.shape
            s_d, u_d, v_d = _top_singular(d, k)
            _, u_w, v_w = _top_singular(w, k)
            rank = int((s_d > 0).sum())
            row.update({
                "eff_rank": spectral.rankme_from_spectrum(s_d, eps) if rank > 0 else 0.0,
                "rank_delta": rank,
                "eff_rank_dense": _dense_rank((m, n), eps, dev),
                "eff_rank_max": min(m, n),
                "overlap_left": _overlap(u_d, u_w), "overlap_right": _overlap(v_d, v_w),
                "chance_left": u_w.shape[1] / m, "chance_right": v_w.shape[1] / n,
                "k_delta": u_d.shape[1], "k_base": u_w.shape[1],
            })
        rows.append(row)
        del w, d
    df = pd.DataFrame(rows)
    df.attrs.update({"tol": tol, "k": k, "mass": mass, "eps": eps, "n_layers": n_layers})
    logger.info("weight_drift: %d parameters, %d layers, largest relative change %.3g (%s)", len(df), n_layers,
                df["rel_change"].max(), df.loc[df["rel_change"].idxmax(), "name"])
    return df


def summarize_drift(df: pd.DataFrame, by: str | list[str] = "module") -> pd.DataFrame:
    """Pool ``weight_drift`` rows by module type (or layer): one number per group.

    ``rel_change`` pools norms, ``sqrt(sum ||dW||^2 / sum ||W||^2)`` (a whole-group relative change,
    not a mean of ratios); ``frac_changed``/``frac_changed_dense`` are entry-weighted means (the
    share of the group's entries that changed); ``frac_mass``, ``eff_rank``, ``eff_rank_dense``, the
    overlaps and their chance levels are plain means over the group's tensors (NaN-skipping).

    Args:
        df: a ``weight_drift`` table.
        by: column(s) to group by, e.g. ``"module"``, ``"layer"`` or ``["layer", "module"]``.

    Returns:
        One row per group with ``n_tensors, numel, rel_change, frac_changed, frac_changed_dense,
        frac_mass, frac_mass_dense, eff_rank, eff_rank_dense, overlap_left, overlap_right,
        chance_left, chance_right``.
    """
    keys = [by] if isinstance(by, str) else list(by)
    missing = [c for c in keys + ["norm_base", "norm_delta", "numel"] if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks column(s) {missing}: pass a weight_drift table")

    def pool(g: pd.DataFrame) -> pd.Series:
        nb2, nd2 = float((g["norm_base"] ** 2).sum()), float((g["norm_delta"] ** 2).sum())
        w = g["numel"] / g["numel"].sum()
        out = {"n_tensors": len(g), "numel": int(g["numel"].sum()),
               "rel_change": 0.0 if nd2 == 0 else (math.sqrt(nd2 / nb2) if nb2 > 0 else math.inf),
               "frac_changed": float((w * g["frac_changed"]).sum()),
               "frac_changed_dense": float((w * g["frac_changed_dense"]).sum())}
        for c in ("frac_mass", "frac_mass_dense", "eff_rank", "eff_rank_dense", "overlap_left", "overlap_right",
                  "chance_left", "chance_right"):
            out[c] = float(g[c].mean()) if g[c].notna().any() else math.nan
        return pd.Series(out)

    table = pd.DataFrame({key: pool(g) for key, g in df.groupby(keys if len(keys) > 1 else keys[0], sort=True)}).T.rename_axis(keys)
    return table.astype({"n_tensors": int, "numel": int}).infer_objects()
