"""Verdicts on published claims about post-training (Li, Mukherjee, Zhu et al. 2025), each from
the paper's own quantity per training seed, combined by ``stats.sign_verdict``.
Quantities and the verdict rule: docs/measures.md#claims-and-the-verdict-rule"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from alignkit import spectral
from alignkit.stats import ArrayLike, Band, envelope, ratio_bootstrap, sign_verdict

LI_2025 = ("Li et al. 2025, Tracing the representation geometry of language models from "
           "pretraining to post-training, arXiv:2509.23024")
MUKHERJEE_2025 = ("Mukherjee et al. 2025, Reinforcement learning finetunes small subnetworks in "
                  "large language models, arXiv:2505.11711")
ZHU_2025 = ("Zhu et al. 2025, The path not taken: RLVR provably learns off the principals, "
            "arXiv:2511.08567")
LI_CLAIMED = {"sft": +1, "dpo": +1, "grpo": -1}  # the sign of the change each stage is said to make
RANK_DEFINITIONS = {"RankMe": "rankme", "covariance": spectral.metric_key(1.0)}


@dataclasses.dataclass
class Verdict:
    """A published claim tested on this model.

    Attributes:
        claim: the claim in words; source: the paper; quantity: what was computed (the paper's).
        items: ``{item: Band}`` the tested quantity per item, seeds combined (0-d arrays).
        per_seed: ``{item: [Band]}`` one per training seed.
        verdicts: ``{item: "agrees" | "disagrees" | "cannot tell"}``; claimed: ``{item: +1 | -1}``.
        context: ``{name: Band}`` numbers that frame the test without entering it (e.g. chance).
    """

    claim: str
    source: str
    quantity: str
    items: dict[str, Band]
    per_seed: dict[str, list[Band]]
    verdicts: dict[str, str]
    claimed: dict[str, int]
    context: dict[str, Band] = dataclasses.field(default_factory=dict)

    @property
    def n_seeds(self) -> int:
        return len(next(iter(self.per_seed.values())))

    @property
    def verdict(self) -> str:
        v = list(self.verdicts.values())
        if v and all(x == "agrees" for x in v):
            return "agrees"
        return "disagrees" if "disagrees" in v else "cannot tell"

    def sentence(self, fmt: str = "{:+.3f}") -> str:
        """One Markdown sentence: the claim, each item and its verdict, the context, the verdict."""
        parts = []
        for item, b in self.items.items():
            if np.isnan(float(b.point)):
                parts.append(f"{item} untestable (an update is zero in some seed)")
                continue
            on_side = sum(_side(x) == self.claimed[item] for x in self.per_seed[item])
            sign = "> 0" if self.claimed[item] > 0 else "< 0"
            parts.append(f"{item} {fmt.format(float(b.point))} [{fmt.format(float(b.lo))}, "
                         f"{fmt.format(float(b.hi))}] (claimed {sign}; "
                         f"{on_side} of {self.n_seeds} seeds on the claimed side: "
                         f"{self.verdicts[item]})")
        seeds = (f"{self.n_seeds} training seeds" if self.n_seeds > 1 else
                 "one training seed, which cannot decide")
        ctx = "".join(f"; {k}: {float(b.point):.3f}" for k, b in self.context.items())
        return (f"*{self.claim}* ({self.source}) — {self.quantity}: " + "; ".join(parts)
                + f"{ctx}. Verdict over {seeds}: **{self.verdict}**.")


def _side(b: Band) -> int:
    """+1 / -1 when ``b``'s interval excludes 0 above / below, else 0."""
    return 1 if float(b.lo) > 0 else (-1 if float(b.hi) < 0 else 0)


def _verdict(claim: str, source: str, quantity: str, per_seed: dict[str, list[Band]],
             claimed: dict[str, int], context: dict[str, list[float]] | None = None) -> Verdict:
    """The ``Verdict`` of per-seed items; ``context``: per-seed numbers, shown as their mean."""
    n = {len(v) for v in per_seed.values()}
    if len(n) != 1 or 0 in n:
        raise ValueError(f"every item needs one value per seed, got counts {sorted(n)}")
    context = {k: Band(*(np.float64(np.mean(v)),) * 3) for k, v in (context or {}).items()}
    return Verdict(claim, source, quantity, {k: envelope(v) for k, v in per_seed.items()},
                   dict(per_seed), {k: sign_verdict(v, claimed[k]) for k, v in per_seed.items()},
                   claimed, context)


def effective_rank_claim(states: Sequence[Mapping[str, ArrayLike]], init: Mapping[str, str],
                         claimed: Mapping[str, int] = LI_CLAIMED, n_boot: int = 200,
                         seed: int = 0) -> Verdict:
    """Li et al. 2025: Δ effective rank of final-layer last-token states, each stage vs its init.

    Args:
        states: per seed, ``{model label: [n, d]}`` last-token states of the last decoder layer
            for the same ``n`` prompts; labels include every method in ``claimed`` and its init.
        init: ``{method: label of the model it started from}``.
        claimed: ``{method: +1 | -1}``, the sign of change claimed; methods absent are skipped.
    """
    if not states:
        raise ValueError("effective_rank_claim needs the states of at least one seed")
    methods = [m for m in claimed if m in states[0]]
    if not methods:
        raise ValueError(f"no method of {sorted(claimed)} among the models {sorted(states[0])}")
    per_seed: dict[str, list[Band]] = defaultdict(list)
    for s in states:
        missing = [k for m in methods for k in (m, init[m]) if k not in s]
        if missing:
            raise ValueError(f"a seed lacks the states of {sorted(set(missing))}")
        boot = {k: spectral.bootstrap_layer_metrics(np.asarray(s[k])[None], alphas=(1.0,),
                                                    n_boot=n_boot, seed=seed)
                for k in {*methods, *(init[m] for m in methods)}}
        for m in methods:
            d = spectral.paired_delta(boot[m], boot[init[m]])
            for name, key in RANK_DEFINITIONS.items():
                per_seed[f"{m.upper()} {name}"].append(
                    Band.of({f: d[key][f][0] for f in ("point", "lo", "hi")}))
    claim_of = {f"{m.upper()} {n}": claimed[m] for m in methods for n in RANK_DEFINITIONS}
    return _verdict("SFT and DPO raise the effective rank of final-layer representations, RLVR "
                    "lowers it", LI_2025, "Δ effective rank (stage's final model − its initial "
                    "model) of the last decoder layer's last-token states, RankMe and covariance "
                    "definitions, paired bootstrap over prompts", per_seed, claim_of)


def _ratio_bootstrap(parts: Mapping[str, tuple[np.ndarray, np.ndarray]], n_boot: int,
                     seed: int) -> tuple[dict, dict]:
    """``stats.ratio_bootstrap`` per method over weight tensors, one resample for all (paired)."""
    if len({len(num) for num, _ in parts.values()}) != 1:
        raise ValueError("the weight tables differ in their tensors: compare one architecture")
    keys = list(parts)
    point, boots = ratio_bootstrap(np.stack([parts[k][0] for k in keys], 1),
                                   np.stack([parts[k][1] for k in keys], 1), n_boot, seed)
    return ({k: float(point[i]) for i, k in enumerate(keys)},
            {k: boots[:, i] for i, k in enumerate(keys)})


def _diff_band(full: dict, boots: dict, a: str, b: str, ci: float = 0.95) -> Band:
    """Paired bootstrap band of ``full[a] - full[b]`` (percentile interval)."""
    lo, hi = np.nanquantile(boots[a] - boots[b], [(1 - ci) / 2, (1 + ci) / 2])
    return Band(np.float64(full[a] - full[b]), np.float64(lo), np.float64(hi))


_UNTESTABLE = Band(np.float64(np.nan), np.float64(np.nan), np.float64(np.nan))


def _moved(*tables: pd.DataFrame) -> bool:
    """Did every update change some weight? (A zero one is trivially sparse: untestable.)"""
    return all(bool((f["norm_delta"] > 0).any()) for f in tables)


def _unchanged_parts(f: pd.DataFrame, col: str = "frac_unchanged_bf16") -> tuple:
    numel = f["numel"].to_numpy(np.float64)
    return f[col].to_numpy(np.float64) * numel, numel


def _overlap_parts(f: pd.DataFrame, side: str) -> tuple[np.ndarray, np.ndarray]:
    matrix = f["eff_rank"].notna().to_numpy()
    ratio = (f[f"overlap_{side}"] / f[f"chance_{side}"]).to_numpy(np.float64)
    return np.where(matrix, ratio, 0.0), matrix.astype(np.float64)


def sparsity_claim(own: Sequence[Mapping[str, pd.DataFrame]], rl: Sequence[str] = ("dpo", "grpo"),
                   reference: str = "sft", n_boot: int = 1000, seed: int = 0,
                   matched: Sequence[Mapping[str, float]] | None = None) -> Verdict:
    """Mukherjee et al. 2025: RL fine-tuning updates a small subnetwork, SFT nearly all weights:
    per RL method, its share of entries unchanged at bf16 minus ``reference``'s (claimed > 0),
    also against the reference's update rescaled to its norm (``unchanged_bf16_at_<method>``).

    Args:
        own: per seed, ``{method: weight_drift(own init, final)}``.
        matched: per seed, ``{rl method: unchanged share of SFT's update rescaled to that
            method's update norm}`` (context numbers).
    """
    per_seed: dict[str, list[Band]] = defaultdict(list)
    context: dict[str, list[float]] = defaultdict(list)
    ref = reference.upper()
    for i, tables in enumerate(own):
        methods = [reference, *[m for m in rl if m in tables]]
        full, boots = _ratio_bootstrap({m: _unchanged_parts(tables[m]) for m in methods},
                                       n_boot, seed)
        for m in methods:
            context[f"{m.upper()} unchanged share"].append(full[m])
        for m in methods[1:]:
            moved = _moved(tables[m], tables[reference])
            per_seed[f"{m.upper()} − {ref}"].append(
                _diff_band(full, boots, m, reference) if moved else _UNTESTABLE)
            col = f"unchanged_bf16_at_{m}"
            if col in tables[reference]:
                full_m, boots_m = _ratio_bootstrap(
                    {m: _unchanged_parts(tables[m]),
                     "matched": _unchanged_parts(tables[reference], col)}, n_boot, seed)
                per_seed[f"{m.upper()} − {ref} at {m.upper()}'s norm"].append(
                    _diff_band(full_m, boots_m, m, "matched") if moved else _UNTESTABLE)
            if matched is not None:
                context[f"{ref} at {m.upper()}'s update norm"].append(matched[i][m])
    return _verdict(
        "RL updates leave most parameters unchanged, SFT updates do not", MUKHERJEE_2025,
        "share of weight entries unchanged at bf16 precision in each stage's own update, RL "
        "minus SFT and RL minus SFT's update rescaled to the RL update's norm (the claim is about "
        "the update's shape, not its size), paired bootstrap over weight tensors", per_seed,
        dict.fromkeys(per_seed, +1), context)


def principal_claim(own: Sequence[Mapping[str, pd.DataFrame]], rl: str = "grpo",
                    reference: str = "sft", n_boot: int = 1000, seed: int = 0) -> Verdict:
    """Zhu et al. 2025: RLVR updates lie off the principal directions of the pretrained weights,
    SFT updates target them: ``overlap_left`` / ``overlap_right`` over chance, RLVR's − SFT's,
    claimed < 0; ``own`` as in ``sparsity_claim``."""
    per_seed: dict[str, list[Band]] = defaultdict(list)
    context: dict[str, list[float]] = defaultdict(list)
    for tables in own:
        moved = _moved(tables[rl], tables[reference])
        for side, space in (("left", "output"), ("right", "input")):
            full, boots = _ratio_bootstrap({m: _overlap_parts(tables[m], side)
                                            for m in (rl, reference)}, n_boot, seed)
            per_seed[f"{rl.upper()} − {reference.upper()}, {space} space"].append(
                _diff_band(full, boots, rl, reference) if moved else _UNTESTABLE)
            for m in (rl, reference):
                context[f"{m.upper()} {space} overlap / chance"].append(full[m])
    return _verdict(
        "RLVR updates avoid the principal directions of the pretrained weights, SFT updates "
        "target them", ZHU_2025,
        "overlap of the own update's top-k singular subspace with W's as a multiple of chance, "
        "averaged over weight matrices, RLVR minus SFT, paired bootstrap over matrices",
        per_seed, dict.fromkeys(per_seed, -1), context)
