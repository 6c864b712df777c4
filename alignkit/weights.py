"""Weight-space drift: how far, how sparsely and in which directions post-training moved weights.

Compares base ``W`` and tuned ``W'`` (modules or state dicts of one architecture and shape) one
parameter tensor at a time, ``dW = W' - W`` in float64, so memory stays at a few copies of the
largest matrix. One row per tensor: ``q, k, v, o, gate, up, down``, the norms, ``embed``,
``final_norm``, and ``lm_head`` only when untied (a state-dict copy sharing storage with, or
equal to, ``embed_tokens.weight`` is dropped). Columns and their controls:

* ``rel_change = ||dW||_F / ||W||_F`` (0 for ``dW = 0``; ``inf`` when ``W = 0 != dW``).
* ``frac_changed``: share of entries with ``|dW| > tol``. Control ``frac_changed_dense``: the share
  for a dense Gaussian update of the same RMS, ``erfc(tol / (rms sqrt 2))``; far below it means
  the update is sparser than dense noise of the same size.
* ``frac_unchanged_bf16``: share of entries equal after rounding both models to bfloat16 (the
  update sparsity of Mukherjee et al. 2025, who compare released bf16 checkpoints): an update
  below half a bf16 step of ``|w|`` (``2^-9 |w|``) leaves the entry unchanged.
* ``frac_mass``: smallest share of entries (largest ``|dW|`` first) holding ``mass`` of
  ``||dW||_F^2``, scale free. Control ``frac_mass_dense``: the same for a dense Gaussian update
  (``gaussian_mass_share``: 0.4446 at ``mass = 0.9``; a uniform update gives 0.9).
* 2-D ``[d_out, d_in]`` only (NaN for 1-D): ``eff_rank``, RankMe (Garrido et al. 2023) of
  ``dW``'s singular values, and ``rank_delta``, its numerical rank (``alignkit.spectral``'s
  tolerance); controls ``eff_rank_dense`` (RankMe of a seeded Gaussian matrix of the same shape)
  and the cap ``eff_rank_max = min(d_out, d_in)``. ``overlap_left`` / ``overlap_right``: mean
  squared cosine of the principal angles between ``dW``'s top ``k_delta = min(k, rank_delta)``
  left (output) / right (input) singular vectors and ``W``'s top ``k_base = min(k, rank W)``,
  ``||U_dW^T U_W||_F^2 / k_delta``: 1 when the update lies in the base's principal subspace.
  Controls ``chance_left = k_base / d_out``, ``chance_right = k_base / d_in``: the expectation for
  random directions (a random unit vector puts ``k/d`` of its length^2 in a ``k``-dim subspace).

A zero update gets 0 in every column, never NaN (the rank of the zero matrix is 0). GPT-2's
``Conv1D`` stores ``[d_in, d_out]``: given modules, its weights are transposed to ``nn.Linear``'s
``[d_out, d_in]``, so ``left`` is the output space in every family (state dicts are taken as they
are). Layers are found as ``layers.{i}`` or GPT-2's ``h.{i}``.
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

__all__ = ["weight_drift", "summarize_drift", "module_name", "gaussian_mass_share",
           "bf16_unchanged_share", "MATRIX_METRICS"]

ModelLike = Union[torch.nn.Module, Mapping[str, torch.Tensor]]
MATRIX_METRICS = ("eff_rank", "rank_delta", "eff_rank_dense", "eff_rank_max", "overlap_left",
                  "overlap_right", "chance_left", "chance_right", "k_delta", "k_base")

_SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
          "up_proj": "up", "down_proj": "down", "input_layernorm": "input_norm",
          "post_attention_layernorm": "post_attn_norm", "q_norm": "q_norm", "k_norm": "k_norm"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+)$")
_SAME_ARCH = "weight_drift compares two models of the same architecture"
_DENSE_RANK: dict[tuple, float] = {}  # (shape, eps) -> eff_rank_dense, computed once per process


def module_name(name: str, n_layers: int) -> tuple[int, str]:
    """``(layer, module)`` of a parameter name: ``(3, "q")`` for ``*.layers.3.*.q_proj.weight``.

    Layer ``-1`` is the token embedding; ``n_layers`` (the number of decoder layers) holds the
    final norm, an untied ``lm_head`` and anything else outside ``layers.{i}``. Biases get a
    ``.bias`` suffix (``"q.bias"``); unknown sublayer names are kept as their path.
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
    short = {"embed_tokens": "embed", "wte": "embed", "embed_in": "embed", "norm": "final_norm",
             "ln_f": "final_norm", "final_layer_norm": "final_norm", "lm_head": "lm_head"}.get(
                 last, stem)
    return (-1 if short == "embed" else n_layers), short + suffix


def _params(model: ModelLike, side: str) -> dict[str, torch.Tensor]:
    """Floating parameters by name; tied duplicates (shared storage) once, first name kept."""
    if isinstance(model, torch.nn.Module):  # named_parameters already drops tied copies
        conv = {f"{m}.weight" for m, mod in model.named_modules()
                if type(mod).__name__ == "Conv1D"}  # GPT-2: [d_in, d_out]
        return {n: p.detach().T if n in conv else p.detach() for n, p in model.named_parameters()}
    if not isinstance(model, Mapping):
        raise TypeError(f"{side} must be a torch.nn.Module or a state dict (Mapping[str, Tensor]), "
                        f"got {type(model).__name__}; load directories with "
                        "alignkit.tiny.load_model")
    out, seen = {}, set()
    for n, t in model.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{side} state dict entry {n!r} is a {type(t).__name__}, "
                            "not a torch.Tensor")
        if not t.is_floating_point():
            continue
        if t.device.type != "meta":  # meta tensors have no storage to compare
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in seen:
                continue
            seen.add(key)
        out[n] = t.detach()
    return out


def _paired_params(base: ModelLike, tuned: ModelLike) -> tuple[dict, dict]:
    """Floating parameters of both models by name, checked to pair up by name and shape."""
    pb, pt = _params(base, "base"), _params(tuned, "tuned")
    # a tied lm_head saved twice: dropped where it equals the embedding in every model having it
    heads = [n for n in {**pb, **pt} if n.rsplit(".", 2)[-2:] == ["lm_head", "weight"]]
    embeds = [n for n in {**pb, **pt} if n.rsplit(".", 2)[-2:] == ["embed_tokens", "weight"]]
    if len(heads) == 1 and len(embeds) == 1:
        h, e = heads[0], embeds[0]
        sides = [p for p in (pb, pt) if h in p]
        if all(e in p and p[h].shape == p[e].shape and torch.equal(p[h], p[e]) for p in sides):
            logger.info("%s equals %s (tied): counted once, as embed", h, e)
            for p in sides:
                del p[h]
    for n, t in pb.items():
        if n not in pt:
            raise ValueError(f"parameter {n!r} is in base only (tuned has no such parameter): "
                             f"{_SAME_ARCH}")
        if tuple(t.shape) != tuple(pt[n].shape):
            raise ValueError(f"parameter {n!r} has shape {tuple(t.shape)} in base and "
                             f"{tuple(pt[n].shape)} in tuned: "
                             "weight_drift compares two models of the same shape")
    for n in pt:
        if n not in pb:
            raise ValueError(f"parameter {n!r} is in tuned only (base has no such parameter): "
                             f"{_SAME_ARCH}")
    modules = isinstance(base, torch.nn.Module) and isinstance(tuned, torch.nn.Module)
    if modules and type(base) is not type(tuned):
        raise ValueError(f"base is a {type(base).__name__} and tuned a {type(tuned).__name__}: "
                         f"{_SAME_ARCH}")
    if not pb:
        raise ValueError("base has no floating-point parameters")
    return pb, pt


def gaussian_mass_share(mass: float = 0.9) -> float:
    """Share of a Gaussian matrix's entries, largest ``|x|`` first, holding ``mass`` of ``sum x^2``.

    For ``x ~ N(0, 1)`` the entries with ``|x| > c`` are a share ``erfc(c / sqrt 2)`` of all and
    carry ``2 c phi(c) + erfc(c / sqrt 2)`` of ``E[x^2]``; ``c`` is found by bisection.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if mass == 1.0:
        return 1.0
    lo, hi = 0.0, 40.0  # the share held decreases from 1 to 0 as c goes from 0 to inf
    for _ in range(200):
        c = (lo + hi) / 2.0
        phi = math.exp(-c * c / 2.0) / math.sqrt(2.0 * math.pi)
        held = 2.0 * c * phi + math.erfc(c / math.sqrt(2.0))
        lo, hi = (c, hi) if held > mass else (lo, c)
    return math.erfc(lo / math.sqrt(2.0))


_CHUNK = 1 << 22  # entries per slice of the elementwise counts (32 MiB of float64)


def _slices(x: torch.Tensor):
    """``x`` flattened, in slices of ``_CHUNK`` entries: elementwise counts over a tensor as large
    as Qwen's 151,936 x 1,024 embedding without full-size temporaries."""
    flat = x.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        yield flat[i : i + _CHUNK]


def _mass_share_(d: torch.Tensor, mass: float) -> float:
    """Smallest share of entries of ``d`` holding ``mass`` of ``sum d^2`` (0 for ``d = 0``).
    **Overwrites** ``d`` (its squares are sorted in its own storage: no full-size copy)."""
    sq = d.reshape(-1).square_()
    total = float(sq.sum())
    if total == 0.0:
        return 0.0
    if sq.device.type == "cpu":  # numpy sorts and sums in place, without an int64 index array
        a = sq.numpy()
        a.sort()
        desc = a[::-1]
        np.cumsum(desc, out=desc)
        count = int(np.searchsorted(desc, mass * total)) + 1
    else:
        csum = torch.sort(sq, descending=True).values.cumsum(0)
        target = torch.tensor([mass * total], dtype=csum.dtype, device=csum.device)
        count = int(torch.searchsorted(csum, target)[0]) + 1
    return min(count, sq.numel()) / sq.numel()


def bf16_unchanged_share(w: torch.Tensor, d: torch.Tensor, scale: float = 1.0) -> float:
    """Share of entries with ``bf16(w + scale * d) == bf16(w)``, ``w + scale * d`` taken in
    float32 as a checkpoint stores it: ``frac_unchanged_bf16`` of an update rescaled by ``scale``
    (e.g. to another update's norm, to separate its size from its shape)."""
    if w.shape != d.shape or w.numel() == 0:
        raise ValueError(f"w and d must have one non-empty shape, got {tuple(w.shape)} and "
                         f"{tuple(d.shape)}")
    same = 0
    for ws, ds in zip(_slices(w), _slices(d)):
        new = (ws.double() + scale * ds.double()).float()
        same += int((new.bfloat16() == ws.float().bfloat16()).sum())
    return same / w.numel()


def _gaussian_spectrum(m: int, n: int, dev: torch.device) -> np.ndarray:
    """Singular values of a seeded standard Gaussian ``[m, n]`` matrix (the dense control of
    ``eff_rank``). Above ``_CHUNK`` entries (an embedding) the matrix is never held whole: its
    smaller Gram matrix is summed over blocks of rows (or columns) drawn one after another."""
    g = torch.Generator().manual_seed(0)
    if m * n <= _CHUNK:
        z = torch.randn((m, n), generator=g, dtype=torch.float64)
        return spectral.spectrum(z.to(dev), center=False)
    k, step = min(m, n), max(1, _CHUNK // min(m, n))
    gram = torch.zeros((k, k), dtype=torch.float64, device=dev)
    for i in range(0, max(m, n), step):
        block = torch.randn((min(step, max(m, n) - i), k), generator=g,
                            dtype=torch.float64).to(dev)
        gram += block.T @ block  # tall: Z^T Z; wide: the same for Z^T (one Gram, one spectrum)
    return spectral.singular_values_from_gram(torch.linalg.eigvalsh(gram), (m, n))


def _top_singular(x: torch.Tensor, k: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """``sigma: [min(m, n)]`` (numpy, descending) of ``x: [m, n]`` and top vectors ``U: [m, r]``,
    ``V: [n, r]``, ``r = min(k, rank)``, from the smaller Gram matrix of ``x / max|x|`` (top
    vectors accurate to ~1e-12); the other side's are ``x v / sigma`` (or ``x^T u / sigma``)."""
    m, n = x.shape
    scale = max(float(x.max()), -float(x.min()))  # max |x| without a full-size |x|
    if scale == 0.0:
        return np.zeros(min(m, n)), x.new_zeros((m, 0)), x.new_zeros((n, 0))
    tall = m >= n
    lam, vecs = torch.linalg.eigh((x.T @ x if tall else x @ x.T) / (scale * scale))
    sigma = spectral.singular_values_from_gram(lam, (m, n)) * scale
    r = min(k, int((sigma > 0).sum()))
    top = vecs.flip(-1)[:, :r]
    s = torch.as_tensor(sigma[:r].copy(), dtype=x.dtype, device=x.device)
    other = (x @ top if tall else x.T @ top) / s
    return (sigma, other, top) if tall else (sigma, top, other)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles, ``||a^T b||_F^2 / a.shape[1]`` (0 if empty)."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return 0.0
    return float((a.T @ b).square().sum()) / a.shape[1]


def weight_drift(base: ModelLike, tuned: ModelLike, tol: float = 1e-5, k: int = 8,
                 mass: float = 0.9, eps: float = 1e-7, device: str | torch.device | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """Per-parameter drift of ``tuned`` from ``base``: size, sparsity, rank and direction of ``dW``.

    Columns and controls are defined in the module docstring. ``tol`` is absolute, on ``|dW|``:
    ``1e-5`` is far above float32 round-off (``<= 6e-8`` for ``|w| <= 1``) and below any change
    representable in bfloat16 for typical weights (``2^-8 |w|``, ``|w| ~ 0.01-0.1``); ``tol=0``
    counts any bitwise change. Cost per matrix: Gram eigendecompositions of ``W`` and ``dW`` (the
    Gaussian control's once per shape) and a sort of ``|dW|^2`` (benchmarks/RESULTS_scale.md).

    Args:
        k, mass: as in the module docstring (``k >= 1``, ``mass`` in ``(0, 1]``).
        eps: RankMe's smoothing constant.
        device: where to compute (``None``: each parameter's device; CPU where float64 is missing).

    Returns:
        One row per parameter tensor, in the base's order: ``name, layer, module, shape, numel,
        norm_base, norm_delta`` and the module docstring's columns; ``df.attrs`` holds ``tol, k,
        mass, eps, n_layers``. ValueError names the first parameter in one model only, of unequal
        shape or with NaN/Inf; also for models of different classes or bad arguments.
    """
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    dense_mass = gaussian_mass_share(mass)  # raises for mass outside (0, 1]
    pb, pt = _paired_params(base, tuned)
    n_layers = max((int(m.group(1)) + 1 for m in map(_LAYER.search, pb) if m), default=0)
    rows = []
    for name, wb in tqdm(pb.items(), desc="weight drift", disable=not progress, leave=False):
        dev = torch.device(device) if device is not None else wb.device
        if dev.type not in ("cpu", "cuda"):
            dev = torch.device("cpu")
        w = wb.to(device=dev, dtype=torch.float64)
        d = pt[name].to(device=dev, dtype=torch.float64, copy=True).sub_(w)  # no temporary
        for side, t in (("base", w), ("tuned", d)):
            if not all(bool(torch.isfinite(c).all()) for c in _slices(t)):
                raise ValueError(f"parameter {name!r} of {side} contains NaN or Inf")
        layer, module = module_name(name, n_layers)
        nb, nd = float(torch.linalg.vector_norm(w)), float(torch.linalg.vector_norm(d))
        numel = w.numel()
        rms = nd / math.sqrt(numel)
        row = {"name": name, "layer": layer, "module": module, "shape": tuple(w.shape),
               "numel": numel, "norm_base": nb, "norm_delta": nd,
               "rel_change": 0.0 if nd == 0.0 else (nd / nb if nb > 0 else math.inf),
               "frac_changed": sum(int((c.abs() > tol).sum()) for c in _slices(d)) / numel,
               "frac_changed_dense": math.erfc(tol / (rms * math.sqrt(2.0))) if rms > 0 else 0.0,
               "frac_unchanged_bf16": bf16_unchanged_share(w, d),
               "frac_mass": math.nan, "frac_mass_dense": dense_mass}  # frac_mass: below
        row.update(dict.fromkeys(MATRIX_METRICS, math.nan))
        if w.ndim == 2 and min(w.shape) > 0:
            m, n = w.shape
            s_d, u_d, v_d = _top_singular(d, k)
            _, u_w, v_w = _top_singular(w, k)
            rank = int((s_d > 0).sum())
            if ((m, n), eps) not in _DENSE_RANK:  # RankMe of a seeded Gaussian matrix, once
                _DENSE_RANK[(m, n), eps] = spectral.rankme_from_spectrum(
                    _gaussian_spectrum(m, n, dev), eps)
            row.update(eff_rank=spectral.rankme_from_spectrum(s_d, eps) if rank > 0 else 0.0,
                       rank_delta=rank, eff_rank_dense=_DENSE_RANK[(m, n), eps],
                       eff_rank_max=min(m, n), overlap_left=_overlap(u_d, u_w),
                       overlap_right=_overlap(v_d, v_w), chance_left=u_w.shape[1] / m,
                       chance_right=v_w.shape[1] / n, k_delta=u_d.shape[1], k_base=u_w.shape[1])
        row["frac_mass"] = _mass_share_(d, mass)  # last: it overwrites d
        rows.append(row)
        del w, d
    df = pd.DataFrame(rows)
    df.attrs.update({"tol": tol, "k": k, "mass": mass, "eps": eps, "n_layers": n_layers})
    logger.info("weight_drift: %d parameters, %d layers, largest relative change %.3g (%s)",
                len(df), n_layers, df["rel_change"].max(),
                df.loc[df["rel_change"].idxmax(), "name"])
    return df


def summarize_drift(df: pd.DataFrame, by: str | list[str] = "module") -> pd.DataFrame:
    """Pool a ``weight_drift`` table by ``by`` (``"module"``, ``"layer"``, or a list of both).

    One row per group: ``n_tensors, numel``; ``rel_change = sqrt(sum ||dW||^2 / sum ||W||^2)``
    (the whole group's change, not a mean of ratios); ``frac_changed(_dense)`` weighted by entries;
    ``frac_unchanged_bf16`` likewise; ``frac_mass(_dense)``, ``eff_rank(_dense)``, ``overlap_*``,
    ``chance_*``: NaN-skipping means.
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
               "frac_changed_dense": float((w * g["frac_changed_dense"]).sum()),
               "frac_unchanged_bf16": float((w * g["frac_unchanged_bf16"]).sum())}
        for c in ("frac_mass", "frac_mass_dense", "eff_rank", "eff_rank_dense", "overlap_left",
                  "overlap_right", "chance_left", "chance_right"):
            out[c] = float(g[c].mean()) if g[c].notna().any() else math.nan
        return pd.Series(out)

    groups = df.groupby(keys if len(keys) > 1 else keys[0], sort=True)
    table = pd.DataFrame({key: pool(g) for key, g in groups}).T.rename_axis(keys)
    return table.astype({"n_tensors": int, "numel": int}).infer_objects()
