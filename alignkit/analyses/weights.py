"""Weight drift (notebook 05, ``python -m alignkit weights``): how far, how sparsely and in which
directions each model moved from the reference and from its own init, against the controls."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from alignkit import weights
from alignkit.analyses.common import Checkpoints, cached, mode_sentence, seed_values
from alignkit.config import Config
from alignkit.models import device_for, load_model
from alignkit.stats import Band, bootstrap_mean


@dataclasses.dataclass
class WeightsResult:
    """Attributes:
        reference: the label of the model every drift is measured from.
        methods: the models measured (every label after the reference, bar added inits);
            init: ``{method: label of the model it started from}``.
        drift, own: ``{method: weights.weight_drift table}`` vs the reference and vs the own init.
        structure: ``{group: {method: Band}}`` own-update means over weight matrices with
            bootstrap intervals over matrices; structure_controls: ``{group: control value}``.
        matched_unchanged: ``{method: bf16-unchanged share of SFT's own update rescaled to that
            method's update norm}`` (``claims.sparsity_claim``'s size control; with an ``sft``).
    """

    reference: str
    methods: list[str]
    init: dict[str, str]
    drift: dict[str, pd.DataFrame]
    own: dict[str, pd.DataFrame]
    structure: dict[str, dict[str, Band]]
    structure_controls: dict[str, float]
    matched_unchanged: dict[str, float]

    def whole_model(self, method: str) -> pd.Series:
        """The own update of ``method`` pooled over the whole model."""
        return weights.summarize_drift(self.own[method].assign(model="all"), "model").iloc[0]

    def own_by_module(self) -> pd.DataFrame:
        """``[module, method]`` relative change ‖ΔW‖/‖W‖ of each own update, pooled per module."""
        return pd.DataFrame({m: weights.summarize_drift(self.own[m], "module")["rel_change"]
                             for m in self.methods})

    def drift_by_layer(self) -> dict[str, pd.DataFrame]:
        """``{"<method> vs base" | "<method> own update": summarize_drift(table, "layer")}``."""
        out = {f"{m} vs base": weights.summarize_drift(self.drift[m], "layer")
               for m in self.methods}
        out |= {f"{m} own update": weights.summarize_drift(self.own[m], "layer")
                for m in self.methods if self.init[m] != self.reference}
        return out


def methods_of(ckpts: Checkpoints) -> list[str]:
    """The labels a comparison measures: all after the reference but inits added only as such."""
    return [k for k in ckpts.labels[1:] if not k.endswith(" init")]


def structure(own: dict, n_boot: int, seed: int, tol: float):
    """Own-update means over 2-D weight matrices with bootstrap intervals, and the controls."""
    groups = {"90 %-mass share": ("frac_mass", "frac_mass_dense"),
              "overlap, output space": ("overlap_left", "chance_left"),
              "overlap, input space": ("overlap_right", "chance_right"),
              f"share |ΔW| > {tol:g}": ("frac_changed", "frac_changed_dense")}
    values, controls_ = {}, {}
    for g, (col, control) in groups.items():
        mats = {m: df[df["eff_rank"].notna()] for m, df in own.items()}
        values[g] = {m: Band.of(bootstrap_mean(t[col].to_numpy(), n_boot=n_boot, seed=seed))
                     for m, t in mats.items()}
        controls_[g] = float(next(iter(mats.values()))[control].mean())
    return values, controls_


def matched_unchanged(base, sft, own: dict) -> dict[str, float]:
    """``{method: share of entries unchanged at bf16}`` of SFT's own update (from the base)
    rescaled to each other method's own-update norm (whole model): how sparse SFT's update would
    look at that size. Per tensor, the same share goes into ``own["sft"]`` as the column
    ``unchanged_bf16_at_<method>`` (``claims.sparsity_claim`` bootstraps it over tensors)."""
    wb, ws = dict(base.named_parameters()), dict(sft.named_parameters())
    norm = {m: float(np.sqrt((t["norm_delta"] ** 2).sum())) for m, t in own.items()}
    out = {}
    for m in own:
        if m == "sft" or norm["sft"] == 0:
            continue
        c, kept, total, by_name = norm[m] / norm["sft"], 0.0, 0, {}
        for n, w in wb.items():
            by_name[n] = weights.bf16_unchanged_share(w.detach(), (ws[n] - w).detach(), c)
            kept += by_name[n] * w.numel()
            total += w.numel()
        out[m] = kept / total
        own["sft"][f"unchanged_bf16_at_{m}"] = own["sft"]["name"].map(by_name).astype(float)
    return out


def ensure(cfg: Config, ckpts: Checkpoints) -> WeightsResult:
    """``weights.weight_drift`` of every model against the reference and its own init, in float32
    as saved, the structure of each own update and, with an ``sft`` model, the size-matched
    control. Knobs: ``cfg.weights``."""
    p = cfg.weights
    methods = methods_of(ckpts)
    init = {m: ckpts.init_of(m) for m in methods}

    def compute() -> WeightsResult:
        device = device_for(cfg) if cfg.device != "map" else torch.device("cpu")

        def fp32(k):
            return load_model(ckpts.paths[k], dtype="float32", device=device)[0]

        base = fp32(ckpts.reference)
        drift, own, sft = {}, {}, None
        for m in tqdm(methods, desc="weight drift", leave=False):
            tuned = fp32(m)
            sft = tuned if m == "sft" else sft  # kept for the matched-norm control below
            drift[m] = weights.weight_drift(base, tuned, tol=p.tol, k=p.k, progress=False)
            own[m] = drift[m] if init[m] == ckpts.reference else weights.weight_drift(
                fp32(init[m]), tuned, tol=p.tol, k=p.k, progress=False)
        values, controls_ = structure(own, p.n_boot, p.seed, p.tol)
        matched = matched_unchanged(base, sft, own) if sft is not None else {}
        return WeightsResult(ckpts.reference, methods, init, drift, own, values, controls_,
                             matched)

    return cached(cfg, ckpts, "weights", p, compute)


def summarize(results: list[WeightsResult], cfg: Config | None = None) -> str:
    """Per model over training seeds: the whole-model relative change of its own update, the
    module and layer where it is largest, and its structure against the controls."""
    r0, lines = results[0], []
    for m in r0.methods:
        whole = [r.whole_model(m)["rel_change"] for r in results]
        layer = []
        for r in results:
            lay = weights.summarize_drift(r.own[m], "layer")
            lay = lay[(lay.index >= 0) & (lay.index < r.own[m].attrs["n_layers"])]["rel_change"]
            layer.append(int(lay.idxmax()))
        groups = "; ".join(
            g + " " + seed_values([float(r.structure[g][m].point) for r in results], "{:.3f}")
            + f" (control {c:.3f})" for g, c in r0.structure_controls.items())
        lines.append(f"- **{m}** (own update, from {r0.init[m]}): ‖ΔW‖/‖W‖ "
                     f"{seed_values(whole, '{:.2e}')}; largest in module "
                     + mode_sentence([r.own_by_module()[m].idxmax() for r in results])
                     + f" and layer {mode_sentence(layer)}; {groups}.")
    return "\n".join(lines)
