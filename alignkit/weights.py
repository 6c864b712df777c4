"""Weight-space drift: how far, how sparsely and in which directions post-training moved weights,
one parameter tensor at a time, each metric with its control (Mukherjee et al. 2025; Garrido et
al. 2023; Zhu et al. 2025). Formulas, controls and pitfalls: docs/measures.md#weight-drift"""

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
                  "overlap_right", "chance_left", "chance_right", "k_delta", "k_base",
                  "rotation_left", "rotation_right", "spectrum_drift")

_SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
          "up_proj": "up", "down_proj": "down", "input_layernorm": "input_norm",
          "post_attention_layernorm": "post_attn_norm", "q_norm": "q_norm", "k_norm": "k_norm"}
_OUTSIDE = {"embed_tokens": "embed", "wte": "embed", "embed_in": "embed", "norm": "final_norm",
            "ln_f": "final_norm", "final_layer_norm": "final_norm", "lm_head": "lm_head"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+)$")
_SAME_ARCH = "weight_drift compares two models of the same architecture"
_DENSE_RANK: dict[tuple, float] = {}  # (shape, eps) -> eff_rank_dense, computed once per process
_CHUNK = 1 << 22  # entries per slice of the elementwise counts (32 MiB of float64)


def module_name(name: str, n_layers: int) -> tuple[int, str]:
    """``(layer, module)`` of a parameter name: ``(3, "q")`` for ``*.layers.3.*.q_proj.weight``,
    ``(-1, "embed")``, ``(n_layers, ...)`` for the rest outside ``layers.{i}`` (final norm, untied
    ``lm_head``); biases get ``.bias`` (``"q.bias"``), unknown sublayer names keep their path."""
    stem, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias") or not stem:
        stem, leaf = name, ""
    suffix = ".bias" if leaf == "bias" else ""
    m = _LAYER.search(stem)
    if m:
        path = m.group(2)
        return int(m.group(1)), _SHORT.get(path.rsplit(".", 1)[-1], path) + suffix
    short = _OUTSIDE.get(stem.rsplit(".", 1)[-1], stem)
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
    """Share of a Gaussian matrix's entries, largest ``|x|`` first, holding ``mass`` of ``sum x^2``
    (the control of ``frac_mass``; derivation: docs/measures.md#weight-drift)."""
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


def _slices(x: torch.Tensor):
    """``x`` flattened, in slices of ``_CHUNK`` entries (no full-size temporaries)."""
    flat = x.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        yield flat[i : i + _CHUNK]


def _mass_share_(d: torch.Tensor, mass: float) -> float:
    """Smallest share of entries of ``d`` holding ``mass`` of ``sum d^2``; **overwrites** ``d``."""
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


def bf16_unchanged_share(w: torch.Tensor, d: torch.Tensor, scale: float = 1.0,
                         atol: float = 1e-5) -> float:
    """``frac_unchanged_bf16`` of the update ``d`` rescaled by ``scale``: the share of entries
    whose bf16 values differ by at most ``atol``, ``|bf16(w + scale * d) - bf16(w)| <= atol``
    (Mukherjee et al. 2025's ``torch.isclose(..., atol=1e-5)`` on bf16 weights;
    docs/measures.md#weight-drift); ValueError on bad shapes."""
    if w.shape != d.shape or w.numel() == 0:
        raise ValueError(f"w and d must have one non-empty shape, got {tuple(w.shape)} and "
                         f"{tuple(d.shape)}")
    same = 0
    for ws, ds in zip(_slices(w), _slices(d)):
        new = (ws.double() + scale * ds.double()).float().bfloat16().float()
        same += int(((new - ws.float().bfloat16().float()).abs() <= atol).sum())
    return same / w.numel()


def _gaussian_spectrum(m: int, n: int, dev: torch.device) -> np.ndarray:
    """Singular values of a seeded standard Gaussian ``[m, n]`` (``eff_rank_dense``), by blocks."""
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


def _top_singular(*parts: torch.Tensor, k: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """``sigma`` (descending) and top ``min(k, rank)`` singular vectors ``U``, ``V`` of the sum of
    ``parts`` (one part: that matrix), never forming the sum: its Gram from the parts' pairwise
    products (small ``[min, min]`` matrices), the other side's vectors as ``sum(x v) / sigma``."""
    m, n = parts[0].shape
    scale = max(max(float(x.max()), -float(x.min())) for x in parts)  # no full-size |x|
    if scale == 0.0:
        return np.zeros(min(m, n)), parts[0].new_zeros((m, 0)), parts[0].new_zeros((n, 0))
    tall = m >= n
    gram = sum((a.T @ b if tall else a @ b.T) for a in parts for b in parts)
    lam, vecs = torch.linalg.eigh(gram / (scale * scale))
    sigma = spectral.singular_values_from_gram(lam, (m, n)) * scale
    r = min(k, int((sigma > 0).sum()))
    top = vecs.flip(-1)[:, :r]
    s = torch.as_tensor(sigma[:r].copy(), dtype=parts[0].dtype, device=parts[0].device)
    other = sum((x @ top if tall else x.T @ top) for x in parts) / s
    return (sigma, other, top) if tall else (sigma, top, other)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles, ``||a^T b||_F^2 / a.shape[1]`` (0 if empty)."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return 0.0
    return float((a.T @ b).square().sum()) / a.shape[1]


def _spectrum_drift(before: np.ndarray, after: np.ndarray) -> float:
    """``||sigma_after - sigma_before|| / ||sigma_before||`` of the top singular values (NaN for
    a zero matrix): how far an update moves W's spectrum (Zhu et al. 2025)."""
    norm = float(np.linalg.norm(before))
    return float(np.linalg.norm(after - before)) / norm if norm > 0 else math.nan


def weight_drift(base: ModelLike, tuned: ModelLike, tol: float = 1e-5, k: int = 8,
                 mass: float = 0.9, eps: float = 1e-7, device: str | torch.device | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """Per-parameter drift of ``tuned`` from ``base``: size, sparsity, rank and direction of ``dW``.

    Args:
        tol: absolute threshold on ``|dW|`` of ``frac_changed`` (``0``: any bitwise change).
        k, mass: subspace size of the overlaps (``>= 1``); ``frac_mass``'s share, in ``(0, 1]``.
        eps: RankMe's smoothing constant.
        device: where to compute (``None``: each parameter's device; CPU where float64 is missing).

    Returns:
        One row per tensor, in the base's order: ``name, layer, module, shape, numel, norm_base,
        norm_delta`` and the columns of docs/measures.md#weight-drift; ``df.attrs`` holds ``tol,
        k, mass, eps, n_layers``. ValueError names the first parameter in one model only, of
        unequal shape or with NaN/Inf; also for models of different classes or bad arguments.
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
            s_d, u_d, v_d = _top_singular(d, k=k)
            s_w, u_w, v_w = _top_singular(w, k=k)
            s_t, u_t, v_t = _top_singular(w, d, k=k)  # W + dW, without a third full copy
            top = min(k, len(s_w))
            rank = int((s_d > 0).sum())
            if ((m, n), eps) not in _DENSE_RANK:  # RankMe of a seeded Gaussian matrix, once
                _DENSE_RANK[(m, n), eps] = spectral.rankme_from_spectrum(
                    _gaussian_spectrum(m, n, dev), eps)
            row.update(eff_rank=spectral.rankme_from_spectrum(s_d, eps) if rank > 0 else 0.0,
                       rank_delta=rank, eff_rank_dense=_DENSE_RANK[(m, n), eps],
                       eff_rank_max=min(m, n), overlap_left=_overlap(u_d, u_w),
                       overlap_right=_overlap(v_d, v_w), chance_left=u_w.shape[1] / m,
                       chance_right=v_w.shape[1] / n, k_delta=u_d.shape[1], k_base=u_w.shape[1],
                       rotation_left=1.0 - _overlap(u_w, u_t), rotation_right=1.0 - _overlap(
                           v_w, v_t), spectrum_drift=_spectrum_drift(s_w[:top], s_t[:top]))
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
    """Pool a ``weight_drift`` table by ``by`` (``"module"``, ``"layer"``, or a list of both): one
    row per group, ``n_tensors``, ``numel`` and the pooled columns (docs/measures.md#weight-drift).
    ValueError for a table without ``weight_drift``'s columns."""
    keys = [by] if isinstance(by, str) else list(by)
    missing = [c for c in keys + ["norm_base", "norm_delta", "numel"] if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks column(s) {missing}: pass a weight_drift table")

    def pool(g: pd.DataFrame) -> pd.Series:
        nb2, nd2 = float((g["norm_base"] ** 2).sum()), float((g["norm_delta"] ** 2).sum())
        w = g["numel"] / g["numel"].sum()
        out = {"n_tensors": len(g), "numel": int(g["numel"].sum()),
               "rel_change": 0.0 if nd2 == 0 else (math.sqrt(nd2 / nb2) if nb2 > 0 else math.inf)}
        for c in ("frac_changed", "frac_changed_dense", "frac_unchanged_bf16"):
            out[c] = float((w * g[c]).sum())
        for c in ("frac_mass", "frac_mass_dense", "eff_rank", "eff_rank_dense", "overlap_left",
                  "overlap_right", "chance_left", "chance_right"):
            out[c] = float(g[c].mean()) if g[c].notna().any() else math.nan
        return pd.Series(out)

    groups = df.groupby(keys if len(keys) > 1 else keys[0], sort=True)
    table = pd.DataFrame({key: pool(g) for key, g in groups}).T.rename_axis(keys)
    return table.astype({"n_tensors": int, "numel": int}).infer_objects()
