"""Verdicts on published claims about post-training (Li, Mukherjee, Zhu et al. 2025), each from
the paper's own quantity per training seed, decided with the seed as the unit
(``stats.seed_verdict``: a Student-t interval over the seeds' estimates).
Quantities and the verdict rule: docs/measures.md#claims-and-the-verdict-rule"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from alignkit import spectral
from alignkit.stats import (
    ArrayLike,
    Band,
    count,
    inconclusive,
    ratio_bootstrap,
    seed_interval,
    seed_verdict,
    sides,
)

LI_2025 = ("Li et al. 2025, Tracing the representation geometry of language models from "
           "pretraining to post-training, arXiv:2509.23024")
MUKHERJEE_2025 = ("Mukherjee et al. 2025, Reinforcement learning finetunes small subnetworks in "
                  "large language models, arXiv:2505.11711")
ZHU_2025 = ("Zhu et al. 2025, The path not taken: RLVR provably learns off the principals, "
            "arXiv:2511.08567")
LI_CLAIMED = {"sft": +1, "dpo": +1, "grpo": -1}  # the sign of the change each stage is said to make
# Li et al.'s two measures: RankMe rises where the spectrum's power-law decay (alpha-ReQ) falls
RANK_DEFINITIONS = {"RankMe": ("rankme", +1), "α-ReQ": ("alpha_req", -1)}
UNTESTABLE = "untestable (an update is zero in some seed)"


@dataclasses.dataclass
class Verdict:
    """A published claim tested on this model, the training seed as the unit.

    Attributes:
        claim: the claim in words; source: the paper; quantity: what was computed (the paper's).
        per_seed: ``{item: [Band]}`` the item's estimate in each training seed with its
            within-seed interval (resampling prompts or tensors: shown, never decisive).
        claimed: ``{item: +1 | -1}`` the claimed sign.
        roles: ``{item: "claim" | "interpretation"}``: only claim items enter the verdict.
        items: ``{item: Band}`` the mean over seeds with its t-interval (``seed_interval``).
        verdicts: ``{item: "agrees" | "disagrees" | "inconclusive (n seeds)" | UNTESTABLE}``.
        context: ``{name: [float]}`` per-seed numbers that frame the test without entering it.
    """

    claim: str
    source: str
    quantity: str
    per_seed: dict[str, list[Band]]
    claimed: dict[str, int]
    roles: dict[str, str]
    context: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    items: dict[str, Band] = dataclasses.field(init=False)
    verdicts: dict[str, str] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        counts = {len(v) for v in self.per_seed.values()}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"every item needs one value per seed, got counts {sorted(counts)}")
        if set(self.roles) != set(self.per_seed) or set(self.claimed) != set(self.per_seed):
            raise ValueError("every item needs a claimed sign and a role")
        self.items, self.verdicts = {}, {}
        for k, bands in self.per_seed.items():
            points = [float(b.point) for b in bands]
            if not np.isfinite(points).all():
                self.items[k], self.verdicts[k] = _NAN, UNTESTABLE
            else:
                self.items[k] = seed_interval(points)
                self.verdicts[k] = seed_verdict(points, self.claimed[k])

    @property
    def n_seeds(self) -> int:
        return len(next(iter(self.per_seed.values())))

    @property
    def tested(self) -> list[str]:
        return [k for k, r in self.roles.items() if r == "claim"]

    @property
    def verdict(self) -> str:
        """``"agrees"`` when every claim item agrees (an intersection-union test: each at 5 %,
        the whole at 5 %), ``"disagrees"`` when any claim item disagrees (up to ``k`` x 5 % by
        chance for ``k`` items: stated in ``sentence``), else inconclusive."""
        v = [self.verdicts[k] for k in self.tested]
        if v and all(x == "agrees" for x in v):
            return "agrees"
        if "disagrees" in v:
            return "disagrees"
        return inconclusive(self.n_seeds)

    def item_sentence(self, item: str, fmt: str = "{:+.3f}") -> str:
        """``"DPO − SFT +0.188 [+0.150, +0.226] (per seed +0.18 [..], ...; 3 above, 0 below, 0
        straddle 0 (3 seeds); claimed > 0): agrees"``."""
        if self.verdicts[item] == UNTESTABLE:
            return f"{item} {UNTESTABLE}"
        b, bands = self.items[item], self.per_seed[item]

        def band(x: Band) -> str:
            return f"{fmt.format(float(x.point))} [{fmt.format(float(x.lo))}, " \
                   f"{fmt.format(float(x.hi))}]"

        mean = (fmt.format(float(b.point)) if not np.isfinite(b.lo) else band(b))
        sign = "> 0" if self.claimed[item] > 0 else "< 0"
        return (f"{item} {mean} (per seed {', '.join(band(x) for x in bands)}; "
                f"{sides(bands)}; claimed {sign}): {self.verdicts[item]}")

    def sentence(self, fmt: str = "{:+.3f}") -> str:
        """One Markdown sentence: the claim, each claim item and its verdict, the interpretation
        items and context apart, the overall verdict with its multiplicity."""
        tested = "; ".join(self.item_sentence(k, fmt) for k in self.tested)
        other = [k for k in self.per_seed if k not in self.tested]
        interp = ("; interpretation, outside the verdict: "
                  + "; ".join(self.item_sentence(k, fmt) for k in other)) if other else ""
        ctx = "".join(f"; {k}: {np.mean(v):.3f}" for k, v in self.context.items())
        k = len(self.tested)
        rule = ("every one of its items must agree" if k > 1 else "its one item decides")
        return (f"*{self.claim}* ({self.source}) — {self.quantity}: {tested}{interp}{ctx}. "
                f"Verdict over {count(self.n_seeds, 'training seed')} ({rule}; "
                f"{count(k, 'item')} at 5 % each): **{self.verdict}**.")


_NAN = Band(np.float64(np.nan), np.float64(np.nan), np.float64(np.nan))


def _verdict(claim: str, source: str, quantity: str, per_seed: dict[str, list[Band]],
             claimed: dict[str, int], interpretation: Sequence[str] = (),
             context: dict[str, list[float]] | None = None) -> Verdict:
    """The ``Verdict`` of per-seed items; items named in ``interpretation`` stay out of it."""
    roles = {k: "interpretation" if k in interpretation else "claim" for k in per_seed}
    return Verdict(claim, source, quantity, dict(per_seed), claimed, roles, dict(context or {}))


def effective_rank_claim(states: Sequence[Mapping[str, ArrayLike]], init: Mapping[str, str],
                         claimed: Mapping[str, int] = LI_CLAIMED, n_boot: int = 200,
                         seed: int = 0) -> Verdict:
    """Li et al. 2025: Δ RankMe and Δ α-ReQ of the final hidden states (after the final norm) at
    the last token, each stage vs its init (RankMe claimed up for SFT/DPO, down for RLVR; α-ReQ
    the other way).

    Args:
        states: per seed, ``{model label: [n, d]}`` final-norm last-token states for the same
            ``n`` prompts; labels include every method in ``claimed`` and its init.
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
            for name, (key, _) in RANK_DEFINITIONS.items():
                per_seed[f"{m.upper()} {name}"].append(
                    Band.of({f: d[key][f][0] for f in ("point", "lo", "hi")}))
    claim_of = {f"{m.upper()} {n}": claimed[m] * sign for m in methods
                for n, (_, sign) in RANK_DEFINITIONS.items()}
    return _verdict("SFT and DPO raise the effective rank of final-layer representations, RLVR "
                    "lowers it", LI_2025, "Δ RankMe and Δ α-ReQ (stage's final model − its "
                    "initial model) of the final hidden state after the final norm at the "
                    "prompt's last token (a prompt template's last token is the same in every "
                    "probe, where base and tuned models do different things), paired bootstrap "
                    "over prompts within a seed", per_seed, claim_of)


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


def _diff_band(full: dict, boots: dict, a: str, b: str | float, ci: float = 0.95) -> Band:
    """Paired bootstrap band of ``full[a] - full[b]`` (percentile interval); a number ``b`` is a
    fixed level (``full[a] - b``)."""
    ref, ref_boots = (b, b) if isinstance(b, float) else (full[b], boots[b])
    lo, hi = np.nanquantile(boots[a] - ref_boots, [(1 - ci) / 2, (1 + ci) / 2])
    return Band(np.float64(full[a] - ref), np.float64(lo), np.float64(hi))


def _moved(*tables: pd.DataFrame) -> bool:
    """Did every update change some weight? (A zero one is trivially sparse: untestable.)"""
    return all(bool((f["norm_delta"] > 0).any()) for f in tables)


def _unchanged_parts(f: pd.DataFrame, col: str = "frac_unchanged_bf16") -> tuple:
    numel = f["numel"].to_numpy(np.float64)
    return f[col].to_numpy(np.float64) * numel, numel


def _matrix_parts(f: pd.DataFrame, col: str,
                  chance: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D-weight column (over its ``chance`` column if given), averaged over matrices."""
    matrix = f["eff_rank"].notna().to_numpy()
    value = f[col] / f[chance] if chance else f[col]
    return np.where(matrix, value.to_numpy(np.float64), 0.0), matrix.astype(np.float64)


def sparsity_claim(own: Sequence[Mapping[str, pd.DataFrame]], rl: Sequence[str] = ("dpo", "grpo"),
                   reference: str = "sft", n_boot: int = 1000, seed: int = 0,
                   matched: Sequence[Mapping[str, float]] | None = None) -> Verdict:
    """Mukherjee et al. 2025: RL fine-tuning updates a small subnetwork (70–95 % of parameters
    unchanged), SFT nearly all weights. Per RL method, two claim items on the share of entries
    unchanged at bf16 (``|bf16(W1) - bf16(W0)| <= 1e-5``, the paper's tolerance): the share
    minus one half (most unchanged, claimed > 0) and the share minus ``reference``'s (claimed >
    0); the share minus that of the reference's update rescaled to the RL update's norm
    (``unchanged_bf16_at_<method>``) is an interpretation (shape, not size), outside the verdict.

    Args:
        own: per seed, ``{method: weight_drift(own init, final)}``.
        matched: per seed, ``{rl method: unchanged share of SFT's update rescaled to that
            method's update norm}`` (context numbers).
    """
    per_seed: dict[str, list[Band]] = defaultdict(list)
    context: dict[str, list[float]] = defaultdict(list)
    interpretation = []
    ref = reference.upper()
    for i, tables in enumerate(own):
        methods = [reference, *[m for m in rl if m in tables]]
        full, boots = _ratio_bootstrap({m: _unchanged_parts(tables[m]) for m in methods},
                                       n_boot, seed)
        for m in methods:
            context[f"{m.upper()} unchanged share"].append(full[m])
        for m in methods[1:]:
            moved = _moved(tables[m], tables[reference])
            per_seed[f"{m.upper()} unchanged share − 0.5"].append(
                _diff_band(full, boots, m, 0.5) if _moved(tables[m]) else _NAN)
            per_seed[f"{m.upper()} − {ref}"].append(
                _diff_band(full, boots, m, reference) if moved else _NAN)
            col = f"unchanged_bf16_at_{m}"
            if col in tables[reference]:
                full_m, boots_m = _ratio_bootstrap(
                    {m: _unchanged_parts(tables[m]),
                     "matched": _unchanged_parts(tables[reference], col)}, n_boot, seed)
                name = f"{m.upper()} − {ref} at {m.upper()}'s norm"
                interpretation.append(name)
                per_seed[name].append(_diff_band(full_m, boots_m, m, "matched") if moved
                                      else _NAN)
            if matched is not None:
                context[f"{ref} at {m.upper()}'s update norm"].append(matched[i][m])
    return _verdict(
        "RL updates leave most parameters unchanged, SFT updates do not", MUKHERJEE_2025,
        "share of weight entries unchanged at bf16 precision (|Δ| ≤ 1e-5, the paper's "
        "tolerance) in each stage's own update: RL's share above one half, RL minus SFT, and RL "
        "minus SFT's update rescaled to the RL update's norm (shape, not size), paired bootstrap "
        "over weight tensors within a seed", per_seed, dict.fromkeys(per_seed, +1),
        interpretation, context)


def principal_claim(own: Sequence[Mapping[str, pd.DataFrame]], rl: str = "grpo",
                    reference: str = "sft", n_boot: int = 1000, seed: int = 0) -> Verdict:
    """Zhu et al. 2025: RLVR learns off the principal directions of the pretrained weights, SFT
    on them. RLVR's − SFT's (claimed < 0), averaged over weight matrices: the overlap of the own
    update's top-k singular subspaces with W's (the mean squared cosine of their principal
    angles) over chance, output and input side; the rotation of W's top-k subspaces
    (``rotation_left`` / ``_right``) and the drift of its top-k singular values
    (``spectrum_drift``) where the tables hold them. ``own`` as in ``sparsity_claim``."""
    per_seed: dict[str, list[Band]] = defaultdict(list)
    context: dict[str, list[float]] = defaultdict(list)
    R, S = rl.upper(), reference.upper()
    for tables in own:
        moved = _moved(tables[rl], tables[reference])
        parts = {f"{R} − {S}, update overlap / chance, {space} space": (f"overlap_{side}",
                                                                      f"chance_{side}")
                 for side, space in (("left", "output"), ("right", "input"))}
        parts |= {f"{R} − {S}, rotation of W's principal subspace, {space} space":
                  (f"rotation_{side}", None) for side, space in (("left", "output"),
                                                                  ("right", "input"))
                  if f"rotation_{side}" in tables[rl]}
        if "spectrum_drift" in tables[rl]:
            parts[f"{R} − {S}, spectrum drift"] = ("spectrum_drift", None)
        for name, (col, chance) in parts.items():
            full, boots = _ratio_bootstrap({m: _matrix_parts(tables[m], col, chance)
                                            for m in (rl, reference)}, n_boot, seed)
            per_seed[name].append(_diff_band(full, boots, rl, reference) if moved else _NAN)
            for m in (rl, reference):
                context[f"{m.upper()} {col}" + (" / chance" if chance else "")].append(full[m])
    return _verdict(
        "RLVR updates avoid the principal directions of the pretrained weights and preserve "
        "its spectrum, SFT updates do not", ZHU_2025,
        "per weight matrix, the mean squared cosine of the principal angles between the own "
        "update's top-k singular subspace and W's (as a multiple of chance), the rotation of "
        "W's top-k singular subspace (1 − that cosine between W before and after) and the "
        "relative change of its top-k singular values, averaged over matrices, RLVR minus SFT, "
        "paired bootstrap over matrices within a seed", per_seed, dict.fromkeys(per_seed, -1),
        context=context)
