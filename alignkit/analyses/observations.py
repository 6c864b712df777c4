"""The seed study's four observations (../SEED.md; README, Results), each split into items with a
claimed sign, computed per training seed from the CKA, spectral and patching results and decided
with the seed as the unit (``stats.seed_verdict``). Definitions: docs/measures.md#observations"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from alignkit.analyses.cka import CKAResult
from alignkit.analyses.patching import PatchingResult, fraction
from alignkit.analyses.spectral import SpectralResult
from alignkit.stats import Band, count, seed_interval, seed_verdict

OBSERVATIONS = {
    1: "Early layers stable, a mid-depth transition, late layers drift most (layerwise CKA)",
    2: "Partial layer remapping after the transition (cross-layer CKA)",
    3: "A late rise of effective rank (RankMe)",
    4: "Late-layer patches carry the improvement, with a mid-layer dip (activation patching)",
}


@dataclasses.dataclass(frozen=True)
class Item:
    """One tested item: its observation, name, what it computes, the claimed sign, and how to
    compute it per seed (``value(cka, spectral, patching, controls)``)."""

    observation: int
    name: str
    quantity: str
    claimed: int
    value: Callable[..., float]
    control: bool = False  # the same quantity on the controls is shown beside it


def thirds(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Early, middle and late decoder layers ``0 .. n - 1``: the first ``n // 3``, the next
    ``n // 3``, the rest (12 layers: 0–3, 4–7, 8–11); ValueError below 3 layers."""
    if n < 3:
        raise ValueError(f"the observations split the decoder into thirds: need >= 3 layers, "
                         f"got {n}")
    k = n // 3
    idx = np.arange(n)
    return idx[:k], idx[k:2 * k], idx[2 * k:]


def _decoder(labels: Sequence[str]) -> np.ndarray:
    """Indices of the decoder layers among hook-point labels (every label but ``"embed"``)."""
    return np.array([i for i, lab in enumerate(labels) if lab != "embed"])


def _cka_parts(r: CKAResult) -> tuple[np.ndarray, np.ndarray, tuple]:
    dec = _decoder(r.labels)
    return 1.0 - r.final()[dec], r.noise_classic[dec], thirds(len(dec))


def early_within_noise(r: CKAResult, *_) -> float:
    drift, noise, (early, _, _) = _cka_parts(r)
    return float(np.mean(drift[early] - noise[early]))


def mid_transition(r: CKAResult, *_) -> float:
    curve = r.final()  # drops into each hook point from the one before it
    dec = _decoder(r.labels)
    drop = np.array([curve[i - 1] - curve[i] if i > 0 else 1.0 - curve[i] for i in dec])
    _, mid, _ = thirds(len(dec))
    rest = np.setdiff1d(np.arange(len(dec)), mid)
    return float(drop[mid].max() - drop[rest].max())


def late_drift_most(r: CKAResult, *_) -> float:
    drift, _, (early, mid, late) = _cka_parts(r)
    return float(drift[late].mean() - drift[np.concatenate([early, mid])].mean())


def _offdiag(r: CKAResult) -> tuple[np.ndarray, tuple]:
    """Per decoder layer i of the reference: the best other tuned hook point's CKA above chance
    minus its own layer's, and the thirds."""
    m = r.matrix - r.chance
    dec = _decoder(r.labels)
    return np.array([np.delete(m[i], i).max() - m[i, i] for i in dec]), thirds(len(dec))


def early_diagonal(r: CKAResult, *_) -> float:
    gain, (early, _, _) = _offdiag(r)
    return float(-gain[early].mean())


def remapped_after(r: CKAResult, *_) -> float:
    gain, (_, mid, late) = _offdiag(r)
    return float(gain[np.concatenate([mid, late])].mean())


def _rank_delta(s: SpectralResult) -> tuple[np.ndarray, tuple]:
    dec = _decoder(s.labels)
    d = s.delta("rankme").point[dec]
    return d, thirds(len(dec))


def late_rank_rise(_, s: SpectralResult, *__) -> float:
    d, (_, _, late) = _rank_delta(s)
    return float(d[late].mean())


def rank_rise_late_not_early(_, s: SpectralResult, *__) -> float:
    d, (early, _, late) = _rank_delta(s)
    return float(d[late].mean() - d[early].mean())


def _patch_fraction(p: PatchingResult, controls: bool) -> np.ndarray:
    """The plotted fraction of the gap (its point does not depend on the bootstrap: one draw)."""
    return fraction(p.sweep("controls" if controls else "flips"), n_boot=1).point


def late_patch(_, __, p: PatchingResult, controls: bool = False) -> float:
    f = _patch_fraction(p, controls)
    return float(f[thirds(len(f))[2]].mean())


def mid_dip(_, __, p: PatchingResult, controls: bool = False) -> float:
    d = np.nanmean(p.sweep("controls" if controls else "flips").delta, 0)
    return float(d[thirds(len(d))[1]].mean())


def late_over_early_patch(_, __, p: PatchingResult, controls: bool = False) -> float:
    f = _patch_fraction(p, controls)
    early, _, late = thirds(len(f))
    return float(f[late].mean() - f[early].mean())


ITEMS = (
    Item(1, "early layers within the noise floor", "mean over the first third of decoder layers "
         "of (1 − CKA) minus the split-half noise half-width", -1, early_within_noise),
    Item(1, "steepest drop in the middle third", "largest one-layer CKA drop into a middle-third "
         "layer minus the largest into any other layer", +1, mid_transition),
    Item(1, "late layers drift most", "mean (1 − CKA) over the last third minus over the first "
         "two thirds", +1, late_drift_most),
    Item(2, "early layers match their own layer", "first third: own-layer CKA minus the best "
         "other hook point's (cross-layer CKA above its permutation baseline)", +1,
         early_diagonal),
    Item(2, "later layers match another layer better", "last two thirds: the best other hook "
         "point's CKA minus the own layer's (above baseline; a maximum over the other layers, "
         "biased towards remapping)", +1, remapped_after),
    Item(3, "effective rank rises in the last third", "mean Δ RankMe (final − reference) over "
         "the last third", +1, late_rank_rise),
    Item(3, "the rise is larger late than early", "mean Δ RankMe, last third minus first "
         "third", +1, rank_rise_late_not_early),
    Item(4, "late patches raise the scored log-prob", "resid denoise, mean fraction of the "
         "gap recovered over the last third", +1, late_patch, control=True),
    Item(4, "mid-layer patches lower it", "resid denoise, mean Δ scored log-prob (nats, the "
         "patching metric) over the middle third", -1, mid_dip, control=True),
    Item(4, "late patches recover more than early ones", "resid denoise fraction, last third "
         "minus first third", +1, late_over_early_patch, control=True),
)


@dataclasses.dataclass
class Row:
    """One item's result: per-seed values, their mean with its t-interval, the verdict, and the
    controls' values (NaN where the item has no control)."""

    item: Item
    per_seed: list[float]
    band: Band
    verdict: str
    controls: list[float]


def table(cka: Sequence[CKAResult], spectral: Sequence[SpectralResult],
          patching: Sequence[PatchingResult]) -> list[Row]:
    """Every item of ``ITEMS`` over training seeds (one result of each analysis per seed, in
    seed order)."""
    n = len(cka)
    if n == 0 or len(spectral) != n or len(patching) != n:
        raise ValueError(f"one CKA, spectral and patching result per seed, got {len(cka)}, "
                         f"{len(spectral)}, {len(patching)}")
    rows = []
    for it in ITEMS:
        vals = [it.value(c, s, p) for c, s, p in zip(cka, spectral, patching)]
        ctrl = ([it.value(c, s, p, True) for c, s, p in zip(cka, spectral, patching)]
                if it.control else [])
        rows.append(Row(it, vals, seed_interval(vals), seed_verdict(vals, it.claimed), ctrl))
    return rows


def observation_verdicts(rows: Sequence[Row]) -> dict[int, str]:
    """Per observation: agrees when each of its items agrees, disagrees when any disagrees,
    else inconclusive (the items' own wording)."""
    out = {}
    for k in OBSERVATIONS:
        v = [r.verdict for r in rows if r.item.observation == k]
        out[k] = ("agrees" if all(x == "agrees" for x in v) else "disagrees" if "disagrees" in v
                  else next(x for x in v if x.startswith("inconclusive")))
    return out


def summarize(rows: Sequence[Row], run: str = "embedded", metric: str = "computed") -> str:
    """The verdict table (Markdown): observation, item and its quantity, the value per seed, the
    mean with its t-interval, the controls' mean, the verdict; then each observation's verdict.
    ``metric``: the patching results' (``PatchingResult.metric``)."""
    n = len(rows[0].per_seed)
    lines = [f"Run: {run}, {count(n, 'training seed')}. Each item is computed per "
             "seed from that seed's final checkpoint against the reference; the seed is the unit "
             "(mean with its Student-t 95 % interval, df = seeds − 1; one seed decides nothing). "
             "Thirds of the decoder layers: first, middle, last. Patching scores the "
             f"`{metric}` tokens of the gold solution; the controls' value (problems right in both "
             "models) is shown beside, and notebook `04_patching` reports how much of each "
             "metric's gap the controls carry.", "",
             "| observation | item (claimed sign) | quantity | per seed | mean [95 % t] | "
             "controls | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    seen = set()
    for r in rows:
        k = r.item.observation
        obs = "" if k in seen else f"{k}. {OBSERVATIONS[k]}"
        seen.add(k)
        sign = "> 0" if r.item.claimed > 0 else "< 0"
        mean = (f"{float(r.band.point):+.3f}" if not np.isfinite(r.band.lo) else
                f"{float(r.band.point):+.3f} [{float(r.band.lo):+.3f}, {float(r.band.hi):+.3f}]")
        ctrl = f"{np.mean(r.controls):+.3f}" if r.controls else "—"
        lines.append(f"| {obs} | {r.item.name} ({sign}) | {r.item.quantity} | "
                     + ", ".join(f"{v:+.3f}" for v in r.per_seed)
                     + f" | {mean} | {ctrl} | {r.verdict} |")
    verdicts = observation_verdicts(rows)
    lines += ["", "Observations (each agrees only when all its items agree; "
              f"{len(rows)} items at 5 % each, uncorrected): "
              + "; ".join(f"{k}. **{v}**" for k, v in verdicts.items()) + "."]
    return "\n".join(lines)
