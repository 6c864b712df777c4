"""Verdicts on published claims about post-training, each computing the paper's own quantity.

Every claim function takes its inputs per training seed (a list, one entry per seed) and returns
a ``Verdict``: per tested item a seed-combined ``Band`` (mean of the seeds' points, envelope of
their 95 % intervals: ``stats.envelope``) and ``"agrees"``, ``"disagrees"`` or ``"cannot tell"``
by ``stats.sign_verdict`` (every seed's interval on one side of 0, at least two seeds). One seed
can never decide: a single run is one sample of training noise. The overall verdict agrees when
every item agrees, disagrees when any item disagrees, and otherwise cannot tell.

* ``effective_rank_claim`` — Li et al. 2025: SFT and DPO raise the effective rank of final-layer,
  last-token representations ("entropy-seeking"), RLVR lowers it ("compression-seeking").
* ``sparsity_claim`` — Mukherjee et al. 2025: RL updates (DPO and GRPO among them) leave most
  parameters unchanged at bf16 precision, SFT updates do not.
* ``principal_claim`` — Zhu et al. 2025: RLVR updates avoid the principal directions of the
  pretrained weights, SFT updates target them.
"""

from __future__ import annotations

import dataclasses
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

    def to_dict(self) -> dict:
        """JSON-able: Bands as ``[point, lo, hi]`` floats."""
        def b(x: Band) -> list[float]:
            return [float(x.point), float(x.lo), float(x.hi)]
        return {"claim": self.claim, "source": self.source, "quantity": self.quantity,
                "items": {k: b(v) for k, v in self.items.items()},
                "per_seed": {k: [b(x) for x in v] for k, v in self.per_seed.items()},
                "verdicts": self.verdicts, "claimed": self.claimed,
                "context": {k: b(v) for k, v in self.context.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        def b(x: list[float]) -> Band:
            return Band(*(np.float64(v) for v in x))
        return cls(d["claim"], d["source"], d["quantity"], {k: b(v) for k, v in d["items"].items()},
                   {k: [b(x) for x in v] for k, v in d["per_seed"].items()}, d["verdicts"],
                   d["claimed"], {k: b(v) for k, v in d["context"].items()})

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
        """One Markdown sentence: the claim, the quantity, each item (the mean over seeds and the
        envelope of the seeds' intervals, ``stats.envelope``) with its verdict, the context
        numbers, the overall verdict and the number of seeds behind it."""
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
             claimed: dict[str, int], context: dict[str, Band] | None = None) -> Verdict:
    n = {len(v) for v in per_seed.values()}
    if len(n) != 1 or 0 in n:
        raise ValueError(f"every item needs one value per seed, got counts {sorted(n)}")
    return Verdict(claim, source, quantity, {k: envelope(v) for k, v in per_seed.items()},
                   per_seed, {k: sign_verdict(v, claimed[k]) for k, v in per_seed.items()},
                   claimed, context or {})


def effective_rank_claim(states: Sequence[Mapping[str, ArrayLike]], init: Mapping[str, str],
                         claimed: Mapping[str, int] = LI_CLAIMED, n_boot: int = 200,
                         seed: int = 0) -> Verdict:
    """Li et al. 2025: the change of effective rank each post-training stage makes to the
    final-layer, last-token representations of a fixed prompt set.

    The paper measures RankMe (Garrido et al. 2023: entropy of the normalised *singular values*)
    of the last layer's state at the last token; the covariance definition (entropy of the
    normalised *variances*, ``sigma^2``: Rényi order 1 in ``alignkit.spectral``) is tested beside
    it, since the two can disagree. Each stage is compared with the model it started from
    (``init``: DPO and GRPO continue SFT), a paired subsampling bootstrap over the prompts
    (``spectral.paired_delta``).

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
    per_seed: dict[str, list[Band]] = {}
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
                per_seed.setdefault(f"{m.upper()} {name}", []).append(
                    Band.of({f: d[key][f][0] for f in ("point", "lo", "hi")}))
    claim_of = {f"{m.upper()} {n}": claimed[m] for m in methods for n in RANK_DEFINITIONS}
    return _verdict("SFT and DPO raise the effective rank of final-layer representations, RLVR "
                    "lowers it", LI_2025, "Δ effective rank (stage's final model − its initial "
                    "model) of the last decoder layer's last-token states, RankMe and covariance "
                    "definitions, paired bootstrap over prompts", per_seed, claim_of)


def _ratio_bootstrap(parts: Mapping[str, tuple[np.ndarray, np.ndarray]], n_boot: int,
                     seed: int) -> tuple[dict, dict]:
    """``stats.ratio_bootstrap`` of ``sum(num) / sum(den)`` over weight tensors, one column per
    method: the same resample of tensors for every method (one architecture: the rows are the
    same tensors, so differences are paired)."""
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


def _moved(f: pd.DataFrame) -> bool:
    """Did this update change any weight? (A zero update is trivially sparse and off-principal:
    the claim cannot be tested on it.)"""
    return bool((f["norm_delta"] > 0).any())


def _unchanged_parts(f: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    numel = f["numel"].to_numpy(np.float64)
    return f["frac_unchanged_bf16"].to_numpy(np.float64) * numel, numel


def _overlap_parts(f: pd.DataFrame, side: str) -> tuple[np.ndarray, np.ndarray]:
    matrix = f["eff_rank"].notna().to_numpy()
    ratio = (f[f"overlap_{side}"] / f[f"chance_{side}"]).to_numpy(np.float64)
    return np.where(matrix, ratio, 0.0), matrix.astype(np.float64)


def sparsity_claim(own: Sequence[Mapping[str, pd.DataFrame]], rl: Sequence[str] = ("dpo", "grpo"),
                   reference: str = "sft", n_boot: int = 1000, seed: int = 0,
                   matched: Sequence[Mapping[str, float]] | None = None) -> Verdict:
    """Mukherjee et al. 2025: RL fine-tuning (PPO, GRPO, DPO ...) updates a small subnetwork —
    most parameters are unchanged — while SFT updates nearly all of them.

    Their update sparsity is the share of parameters whose value is unchanged after training,
    compared at bf16 precision (the checkpoints as released). Here: the share of all weight
    entries with ``bf16(W_final) == bf16(W_init)`` (``weight_drift``'s ``frac_unchanged_bf16``,
    pooled over entries), for each method's own update; each RL method against ``reference``
    with a paired bootstrap over weight tensors. Claimed: RL share − SFT share > 0. The claim is
    about the update's shape, so a second item per RL method matches the size: SFT's update
    rescaled to that method's whole-model norm (the column ``unchanged_bf16_at_<method>`` of the
    reference's table, ``stages._matched_unchanged``), claimed RL share − that share > 0 (an RL
    update sparser than an SFT update of the same size); without the column that item is left
    out. A seed where either update is zero gives NaN (untestable), never a vacuous agreement.

    Args:
        own: per seed, ``{method: weight_drift(own init, final)}``.
        matched: per seed, ``{rl method: unchanged share of SFT's update rescaled to that
            method's update norm}`` (context numbers).
    """
    per_seed: dict[str, list[Band]] = {}
    context: dict[str, list[float]] = {}
    for i, tables in enumerate(own):
        methods = [reference, *[m for m in rl if m in tables]]
        full, boots = _ratio_bootstrap({m: _unchanged_parts(tables[m]) for m in methods},
                                       n_boot, seed)
        for m in methods:
            context.setdefault(f"{m.upper()} unchanged share", []).append(full[m])
        for m in methods[1:]:
            moved = _moved(tables[m]) and _moved(tables[reference])
            per_seed.setdefault(f"{m.upper()} − {reference.upper()}", []).append(
                _diff_band(full, boots, m, reference) if moved else _UNTESTABLE)
            col = f"unchanged_bf16_at_{m}"
            if col in tables[reference]:
                numel = tables[reference]["numel"].to_numpy(np.float64)
                size = {m: _unchanged_parts(tables[m]),
                        "matched": (tables[reference][col].to_numpy(np.float64) * numel, numel)}
                full_m, boots_m = _ratio_bootstrap(size, n_boot, seed)
                per_seed.setdefault(f"{m.upper()} − {reference.upper()} at {m.upper()}'s norm",
                                    []).append(_diff_band(full_m, boots_m, m, "matched")
                                               if moved else _UNTESTABLE)
            if matched is not None:
                context.setdefault(f"{reference.upper()} at {m.upper()}'s update norm",
                                   []).append(matched[i][m])
    return _verdict(
        "RL updates leave most parameters unchanged, SFT updates do not", MUKHERJEE_2025,
        "share of weight entries unchanged at bf16 precision in each stage's own update, RL "
        "minus SFT and RL minus SFT's update rescaled to the RL update's norm (the claim is about "
        "the update's shape, not its size), paired bootstrap over weight tensors", per_seed,
        dict.fromkeys(per_seed, +1),
        {k: Band(*(np.float64(np.mean(v)),) * 3) for k, v in context.items()})


def principal_claim(own: Sequence[Mapping[str, pd.DataFrame]], rl: str = "grpo",
                    reference: str = "sft", n_boot: int = 1000, seed: int = 0) -> Verdict:
    """Zhu et al. 2025: RLVR updates lie off the principal directions of the pretrained weights,
    SFT updates target them.

    Per weight matrix, the overlap of the own update's top-``k`` singular subspace with W's
    (mean squared cosine of the principal angles, ``weight_drift``'s ``overlap_left`` /
    ``overlap_right``) divided by that matrix's chance level ``k / d`` (1: random directions),
    averaged over matrices; RLVR's average − SFT's with a paired bootstrap over matrices, for the
    output (left) and input (right) spaces. Claimed: < 0. The overlap is scale free, so the
    updates' different sizes do not enter it; a zero update (overlap 0 by convention) gives NaN.

    Args:
        own: per seed, ``{method: weight_drift(own init, final)}``.
    """
    per_seed: dict[str, list[Band]] = {}
    context: dict[str, list[float]] = {}
    for tables in own:
        for side, space in (("left", "output"), ("right", "input")):
            full, boots = _ratio_bootstrap({m: _overlap_parts(tables[m], side)
                                            for m in (rl, reference)}, n_boot, seed)
            per_seed.setdefault(f"{rl.upper()} − {reference.upper()}, {space} space", []).append(
                _diff_band(full, boots, rl, reference)
                if _moved(tables[rl]) and _moved(tables[reference]) else _UNTESTABLE)
            for m in (rl, reference):
                context.setdefault(f"{m.upper()} {space} overlap / chance", []).append(full[m])
    return _verdict(
        "RLVR updates avoid the principal directions of the pretrained weights, SFT updates "
        "target them", ZHU_2025,
        "overlap of the own update's top-k singular subspace with W's as a multiple of chance, "
        "averaged over weight matrices, RLVR minus SFT, paired bootstrap over matrices",
        per_seed, dict.fromkeys(per_seed, -1),
        {k: Band(*(np.float64(np.mean(v)),) * 3) for k, v in context.items()})
