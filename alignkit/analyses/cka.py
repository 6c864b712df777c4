"""Representation drift (notebook 02, ``python -m alignkit cka``): layerwise CKA of every checkpoint
against the reference with bootstrap bands and noise floors, the reference × tuned cross-layer
matrix with its permutation baseline, alignment, remapping and transition; and cross-layer CKA of
models of any depth, width or family against a reference (``ensure_cross``)."""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoConfig

from alignkit import cka, controls, layers, runs
from alignkit.analyses import common
from alignkit.analyses.common import k_of_n, mode_sentence, per_seed, seed_values
from alignkit.capture import capture_cached, varying_points
from alignkit.config import Config, with_values
from alignkit.models import shape_differences
from alignkit.stats import Band


@dataclasses.dataclass
class CKAResult:
    """``steps [S + 1]`` (the reference first); ``labels [L]`` kept hook points (``dropped``: the
    constant ones); ``classic``, ``debiased``: ``{step: Band [L]}`` bootstrap bands vs the
    reference; ``noise_*`` ``[L]``: split-half noise-floor half-widths (reference vs tuned);
    ``matrix``, ``chance`` ``[L, L]``: CKA of reference layer i × tuned layer j and its
    shuffled-rows mean; ``path`` (DTW), ``best`` ``[L]``, ``remap``; ``transition`` ``(point, lo,
    hi)``: the layer after the steepest drop; ``departure [L]``: first step outside the noise band
    (-1: never); ``alt_*``: the final layerwise curve under the other pooling."""

    steps: list[int]
    labels: list[str]
    dropped: list[str]
    pooling: str
    classic: dict[int, Band]
    debiased: dict[int, Band]
    noise_classic: np.ndarray
    noise_debiased: np.ndarray
    matrix: np.ndarray
    chance: np.ndarray
    path: list[tuple[int, int]]
    best: np.ndarray
    remap: float
    transition: tuple[int, int, int]
    departure: np.ndarray
    alt_pooling: str
    alt_labels: list[str]
    alt_curve: np.ndarray

    def by_step(self) -> np.ndarray:
        """``[S + 1, L]`` classic CKA of every checkpoint vs the reference (1 for itself)."""
        rows = [self.classic[s].point for s in self.steps[1:]]
        return np.stack([np.ones(len(self.labels))] + rows)

    def final(self) -> np.ndarray:
        """``[L]`` classic CKA of the tuned model (the last checkpoint) vs the reference."""
        return self.classic[self.steps[-1]].point

    def beyond_noise(self) -> int:
        """Hook points whose final CKA lies below one minus the noise floor."""
        return int(sum(v < 1 - hw for v, hw in zip(self.final(), self.noise_classic)))

    def embed_best(self) -> int | None:
        """Decoder layers whose best tuned match is the embedding (None: no embedding row)."""
        return int(sum(int(b) == 0 for b in self.best[1:])) if self.labels[0] == "embed" else None

    def pooling_effect(self) -> dict:
        """``embed_best``, ``remap`` and ``contrast`` (``heatmap_contrast`` of the matrix above
        its permutation baseline): what notebook 02 compares between poolings."""
        return {"embed_best": self.embed_best(), "remap": float(self.remap),
                "contrast": heatmap_contrast(self.matrix - self.chance)}


def heatmap_contrast(mat: np.ndarray, far: int = 3) -> float:
    """Mean diagonal of a cross-layer matrix minus the mean of its cells ``far`` or more layers
    off it: 0 for a flat heatmap, large when layers match only themselves."""
    mat = np.asarray(mat, dtype=np.float64)
    i, j = np.indices(mat.shape)
    off = np.abs(i - j) >= far
    if not off.any():
        raise ValueError(f"a {mat.shape} matrix has no cell {far} or more layers off the diagonal")
    return float(np.diag(mat).mean() - mat[off].mean())


def ensure(cfg: Config, ckpts: common.Checkpoints) -> CKAResult:
    """Every ``CKAResult`` field for checkpoints of one shape (a run's, or given models as if
    steps). Knobs: ``cfg.cka``."""
    p, texts = cfg.cka, common.probes(cfg, ckpts)

    def compute() -> CKAResult:
        caps = common.captures(cfg, ckpts, p.pooling, texts)
        steps = [ckpts.steps[k] for k in ckpts.labels]
        keep, labels, dropped = varying_points(caps.values())
        acts = {s: caps[k].acts[keep] for k, s in zip(ckpts.labels, steps)}
        base, final = acts[steps[0]], acts[steps[-1]]
        curves, noise = {}, {}
        for d in tqdm((False, True), desc="cka", leave=False):
            curves[d] = {s: Band.of(controls.bootstrap_layerwise_cka(
                base, acts[s], n_boot=p.n_boot, seed=p.seed, debiased=d)) for s in steps[1:]}
            noise[d] = controls.noise_floor(base, final, n_splits=p.n_splits, seed=p.seed,
                                            debiased=d)["half_width"]
        mat = np.asarray(cka.cka_matrix(base, final), dtype=np.float64)
        trans = controls.transition_layer_bootstrap(base, final, n_boot=p.n_boot, seed=p.seed)
        by_step = np.stack([np.ones(len(labels))] + [curves[False][s].point for s in steps[1:]])
        alt = common.captures(cfg, ckpts, p.alt_pooling, texts)
        alt_keep, alt_labels, _ = varying_points(alt.values())
        return CKAResult(
            steps, labels, dropped, p.pooling, curves[False], curves[True], noise[False],
            noise[True], mat,
            controls.permutation_baseline(base, final, n_perm=p.n_perm, seed=p.seed),
            [(int(i), int(j)) for i, j in layers.alignment_path(mat)], layers.best_match(mat),
            float(layers.remapping_index(mat)), tuple(int(trans[k]) for k in ("point", "lo", "hi")),
            layers.first_departure(np.array(steps), by_step, 1 - noise[False]), p.alt_pooling,
            alt_labels, cka.layerwise_cka(*(alt[k].acts[alt_keep]
                                            for k in (ckpts.reference, ckpts.tuned))))

    return common.cached(cfg, ckpts, "cka", p, compute, probe_hash=runs.hash_obj(texts))


def ensure_old_pooling(cfg: Config, ckpts: common.Checkpoints) -> CKAResult:
    """``ensure`` with ``cfg.cka.old_pooling`` (notebook 02, section 5: the template kept)."""
    return ensure(with_values(cfg, {"cka.pooling": cfg.cka.old_pooling}), ckpts)


def summarize(results: list[CKAResult], cfg: Config | None = None) -> str:
    """Notebook 02 over training seeds: largest drift, noise floor, transition, remapping,
    embedding matches, departures, the other pooling."""
    labels, r0 = results[0].labels, results[0]
    final = [r.final() for r in results]
    trans = [r.transition for r in results]
    lines = [
        f"- **Largest drift at the final checkpoint** ({r0.pooling} pooling, classic CKA): layer "
        + mode_sentence([labels[int(np.argmin(f))] for f in final]) + "; lowest CKA "
        + seed_values([f.min() for f in final], "{:.3f}") + ". Hook points beyond the "
        f"noise floor: {per_seed([r.beyond_noise() for r in results])} of {len(labels)}.",
        "- **Transition** (steepest drop in layerwise CKA): into layer "
        + mode_sentence([labels[t[0]] for t in trans]) + "; bootstrap 95 % interval: "
        + per_seed([f"layers {labels[t[1]]}–{labels[t[2]]}" for t in trans]) + ".",
        f"- **Remapping index** {seed_values([r.remap for r in results])}; reference "
        "layers whose best tuned match is another layer: "
        + per_seed([sum(int(b) != i for i, b in enumerate(r.best)) for r in results])
        + f" of {len(labels)}."]
    if labels[0] == "embed":
        lines.append("- Reference layers whose best tuned match is the **embedding**: "
                     + per_seed([r.embed_best() for r in results])
                     + f" of {len(labels) - 1} decoder layers.")
    early = [int(sum(0 <= d <= r.steps[1] for d in r.departure)) for r in results]
    lines += [
        "- **Over training**: hook points outside the noise band by the first checkpoint after "
        f"the reference (step {r0.steps[1]}): {per_seed(early)}.",
        f"- With **{r0.alt_pooling}** pooling the final layerwise CKA is lowest at layer "
        + mode_sentence([r.alt_labels[int(np.argmin(r.alt_curve))] for r in results])
        + "; lowest CKA " + seed_values([r.alt_curve.min() for r in results], "{:.3f}")
        + "."]
    if len(results) == 1:
        lines.append("- First departures from the noise band (step per layer): " + ", ".join(
            f"{lab}: {int(s) if s >= 0 else '—'}" for lab, s in zip(labels, r0.departure)) + ".")
    return "\n".join(lines)


def summarize_pooling(new: list[CKAResult], old: list[CKAResult]) -> str:
    """Notebook 02, section 5: per seed, the embedding-as-best-match count and the heatmap's
    contrast under the question pooling (``new``) and the old mean pooling (``old``)."""
    if len(new) != len(old) or not new:
        raise ValueError(f"one result per seed under each pooling, got {len(new)} and {len(old)}")
    a, b = [r.pooling_effect() for r in new], [r.pooling_effect() for r in old]
    pn, po = new[0].pooling, old[0].pooling
    lines = []
    if a[0]["embed_best"] is not None:
        lines.append(f"- Decoder layers whose best tuned match is the embedding: {po} pooling: "
                     f"{per_seed([x['embed_best'] for x in b])}; {pn} pooling: "
                     f"{per_seed([x['embed_best'] for x in a])} "
                     f"(of {len(new[0].labels) - 1}).")
    flatter = sum(x["contrast"] < y["contrast"] for x, y in zip(b, a))
    lines.append("- Heatmap contrast (diagonal minus far-off-diagonal CKA above chance): "
                 f"{po} {seed_values([x['contrast'] for x in b], '{:.3f}')}; {pn} "
                 f"{seed_values([x['contrast'] for x in a], '{:.3f}')}: the {po}-pooled "
                 f"heatmap is flatter than the {pn}-pooled one {k_of_n(flatter, len(new))}.")
    return "\n".join(lines)


@dataclasses.dataclass
class CrossCKAResult:
    """Given models against the reference ``"base"``, any depths and widths: ``models`` (the
    others), per label its kept hook points (``labels``) and constant ones (``dropped``); per
    model the config fields that differ (``shape``), ``cka [L_ref, L_m]`` (biased) with its
    bootstrap ``lo``, ``hi`` and shuffled-rows ``chance``, ``best [L_m]`` reference layer and the
    reference layers tied with it (``ties [L_ref, L_m]``); ``pooling``, ``n_probes``."""

    models: list[str]
    labels: dict[str, list[str]]
    dropped: dict[str, list[str]]
    shape: dict[str, list[str]]
    pooling: str
    n_probes: int
    cka: dict[str, np.ndarray]
    lo: dict[str, np.ndarray]
    hi: dict[str, np.ndarray]
    chance: dict[str, np.ndarray]
    best: dict[str, np.ndarray]
    ties: dict[str, np.ndarray]


def ensure_cross(cfg: Config, ckpts: common.Checkpoints) -> CrossCKAResult:
    """Cross-layer CKA of every model against the reference for models of any depth, width or
    supported family sharing its tokenizer (``common.from_models(..., same_shape=False)``), with
    a bootstrap over probes, tied best matches and the chance level. Knobs: ``cfg.cka``."""
    p, texts = cfg.cka, common.probes(cfg, ckpts)
    differs = shape_differences({k: AutoConfig.from_pretrained(str(v))
                                 for k, v in ckpts.paths.items()})

    def compute() -> CrossCKAResult:
        kept = {}
        for k, v in ckpts.paths.items():
            cap = capture_cached(v, None, texts, pooling=p.pooling,
                                 cache_dir=cfg.run_root / "activations", **common.run_on(cfg))
            keep, labels, dropped = varying_points([cap])
            kept[k] = (cap.acts[keep], labels, dropped)
        out = {f: {} for f in ("cka", "lo", "hi", "chance", "best", "ties")}
        names, ref = ckpts.labels[1:], kept[ckpts.reference][0]
        for m in tqdm(names, desc="cross-layer CKA", disable=len(names) < 2):
            boot = controls.bootstrap_cka_matrix(ref, kept[m][0], n_boot=p.n_boot, seed=p.seed)
            for f in ("lo", "hi", "best", "ties"):
                out[f][m] = boot[f]
            out["cka"][m] = boot["point"]
            out["chance"][m] = controls.permutation_baseline(ref, kept[m][0], n_perm=p.n_perm,
                                                             seed=p.seed)
        return CrossCKAResult(names, {k: v[1] for k, v in kept.items()},
                              {k: v[2] for k, v in kept.items()}, differs, p.pooling, len(texts),
                              **out)

    return common.cached(cfg, ckpts, "cross_cka", p, compute, probe_hash=runs.hash_obj(texts))


def summarize_cross(res: CrossCKAResult) -> str:
    """``ensure_cross`` in sentences: per model, its depth against the reference's, the reference
    layers tied for the best match of its first, middle and last layer, CKA of the last layers
    with its interval, and the cells whose interval reaches the chance level."""
    ref, lines = res.labels["base"], []
    for m in res.models:
        labels, ties, mat = res.labels[m], res.ties[m], res.cka[m]
        shape = (f"differs from the reference in {', '.join(res.shape[m])}" if res.shape[m]
                 else "the reference's shape")
        matched = "; ".join(
            f"{labels[j]} → {{{', '.join(ref[i] for i in np.nonzero(ties[:, j])[0])}}}"
            for j in sorted({0, len(labels) // 2, len(labels) - 1}))
        lines.append(
            f"- **{m}** ({len(labels)} hook points against the reference's {len(ref)}; {shape}): "
            f"best-matching reference layers, ties included (its layer → reference layers): "
            f"{matched}. CKA of the last layers {mat[-1, -1]:.3f} [{res.lo[m][-1, -1]:.3f}, "
            f"{res.hi[m][-1, -1]:.3f}]; {int((res.lo[m] <= res.chance[m]).sum())} of {mat.size} "
            "cells have an interval reaching the shuffled-rows chance level (max chance "
            f"{res.chance[m].max():.3f}).")
    return "\n".join([f"Cross-layer CKA on {res.n_probes} probes ({res.pooling} pooling), "
                      "bootstrap 95 % intervals:", *lines])
