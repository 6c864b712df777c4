"""Spectral drift (notebook 03, ``python -m alignkit spectral``): RankMe and Rényi effective ranks
per layer of every checkpoint with paired subsampling intervals, RankMe against the probe-set
size, and the CKA drift per layer beside them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from alignkit import cka, runs, spectral
from alignkit.analyses import common
from alignkit.analyses.common import k_of_n, per_seed
from alignkit.capture import varying_points
from alignkit.config import Config
from alignkit.models import device_for
from alignkit.stats import Band


@dataclasses.dataclass
class SpectralResult:
    """Effective ranks per layer of every checkpoint, with paired bootstraps.

    Attributes:
        metrics: metric names (``"rankme"``, ``"renyi_0.5"``, ... from ``spectral.metric_key``).
        point, lo, hi: ``{metric: [S + 1, L]}`` full-sample value and 95 % interval.
        samples: ``{metric: [S + 1, n_boot, L]}``: the same row subsamples for every checkpoint,
            so differences between checkpoints have paired intervals (``delta``).
        n, m, width, scale, ci: rows, rows per subsample, d_model, the spread's rescaling and
            the coverage of the intervals.
        ns, rank_vs_n: probe sizes and ``[2, len(ns), L]`` RankMe of reference and tuned on
            nested subsets of the probe set.
        cka_drift: ``[L]`` 1 - CKA(reference, tuned) per layer (same pooling), for comparison.
    """

    steps: list[int]
    labels: list[str]
    dropped: list[str]
    pooling: str
    alphas: tuple[float, ...]
    metrics: list[str]
    point: dict[str, np.ndarray]
    lo: dict[str, np.ndarray]
    hi: dict[str, np.ndarray]
    samples: dict[str, np.ndarray]
    n: int
    m: int
    width: int
    scale: float
    ci: float
    ns: list[int]
    rank_vs_n: np.ndarray
    cka_drift: np.ndarray

    @classmethod
    def from_bootstraps(cls, boot: dict[int, dict], **fields) -> SpectralResult:
        """From ``{step: spectral.bootstrap_layer_metrics(...)}`` (one setting for every step)."""
        steps = sorted(boot)
        metrics = list(boot[steps[0]])
        first = boot[steps[0]][metrics[0]]
        return cls(steps=steps, metrics=metrics, n=int(first["n"]), m=int(first["m"]),
                   scale=float(first["scale"]), ci=float(first["ci"]), **fields,
                   **{f: {k: np.stack([boot[s][k][f] for s in steps]) for k in metrics}
                      for f in ("point", "lo", "hi", "samples")})

    def band(self, metric: str, step: int) -> Band:
        i = self.steps.index(step)
        return Band(self.point[metric][i], self.lo[metric][i], self.hi[metric][i])

    def _boot(self, metric: str, i: int) -> dict:
        return {metric: {"point": self.point[metric][i], "samples": self.samples[metric][i],
                         "n": self.n, "m": self.m, "ci": self.ci, "scale": self.scale}}

    def delta(self, metric: str, step: int | None = None, ref: int | None = None) -> Band:
        """Paired change ``step - ref`` (default: tuned − reference) with its interval."""
        i = self.steps.index(self.steps[-1] if step is None else step)
        j = self.steps.index(self.steps[0] if ref is None else ref)
        return Band.of(spectral.paired_delta(self._boot(metric, i), self._boot(metric, j))[metric])

    def stability(self) -> float:
        """Share of (probe size, layer) cells whose Δ RankMe sign equals the sign at the largest n,
        the largest n itself left out (it always agrees with itself)."""
        sign = np.sign(self.rank_vs_n[1] - self.rank_vs_n[0])
        return float((sign[:-1] == sign[-1]).mean()) if len(sign) > 1 else float("nan")

    def drift_correlation(self) -> float:
        """Spearman correlation across layers of CKA drift and Δ RankMe (tuned − reference)."""
        drank = self.point["rankme"][-1] - self.point["rankme"][0]
        return float(pd.Series(self.cka_drift).rank().corr(pd.Series(drank).rank()))


def ensure(cfg: Config, ckpts: common.Checkpoints) -> SpectralResult:
    """RankMe and Rényi effective ranks per layer of every checkpoint with 80 %-subsampling
    bootstrap intervals (the same subsamples for every checkpoint), RankMe against the probe-set
    size, and the CKA drift per layer. Knobs: ``cfg.spectral``."""
    p, texts = cfg.spectral, common.probes(cfg, ckpts)

    def compute() -> SpectralResult:
        caps = common.captures(cfg, ckpts, p.pooling, texts)
        steps = [ckpts.steps[k] for k in ckpts.labels]
        keep, labels, dropped = varying_points([caps[ckpts.reference]])
        acts = {s: caps[k].acts[keep] for k, s in zip(ckpts.labels, steps)}
        dev = device_for(cfg)  # float64 eigh runs on CUDA too (benchmarks/RESULTS_real.md)
        boot = {s: spectral.bootstrap_layer_metrics(acts[s].to(dev), alphas=p.alphas,
                                                    n_boot=p.n_boot, seed=p.seed)
                for s in tqdm(steps, desc="spectral", leave=False)}
        ns = [n for n in (16, 32, 64, 128, 256, 512) if n <= len(texts)] or [len(texts)]
        return SpectralResult.from_bootstraps(
            boot, labels=labels, dropped=dropped, pooling=p.pooling, alphas=tuple(p.alphas),
            width=int(acts[steps[0]].shape[-1]), ns=ns,
            rank_vs_n=np.stack([spectral.rank_vs_n(acts[s], ns, seed=p.seed)["rankme"]
                                for s in (steps[0], steps[-1])]),
            cka_drift=1 - cka.layerwise_cka(acts[steps[0]], acts[steps[-1]]))

    return common.cached(cfg, ckpts, "spectral", p, compute, probe_hash=runs.hash_obj(texts))


def summarize(results: list[SpectralResult], cfg: Config | None = None) -> str:
    """Notebook 03 over training seeds: RankMe reference → tuned, the layers whose paired
    interval excludes 0, the two halves of the stack, Rényi deltas, stability in n."""
    n, labels = len(results), results[0].labels
    half = len(labels) // 2
    deltas = [r.delta("rankme") for r in results]
    up, down = np.array([d.lo > 0 for d in deltas]), np.array([d.hi < 0 for d in deltas])

    def names(mask) -> str:
        return ", ".join(lab for i, lab in enumerate(labels) if mask[i]) or "no layer"

    sv, every = common.seed_values, "" if n == 1 else "in every seed "
    lines = [
        f"- **RankMe, reference → final** (mean over layers): "
        f"{results[0].band('rankme', results[0].steps[0]).point.mean():.2f} → "
        f"{sv([r.band('rankme', r.steps[-1]).point.mean() for r in results])}.",
        f"- Paired Δ RankMe interval above 0 {every}at {names(up.all(0))}; below 0 {every}at "
        f"{names(down.all(0))}" + ("" if n == 1 else "; above in one seed and below in another "
                                   f"at {names(up.any(0) & down.any(0))}")
        + f". Of the {len(labels)} layers, above 0: {per_seed([int(u.sum()) for u in up])}; "
        f"below 0: {per_seed([int(d.sum()) for d in down])}.",
        "- Mean Δ RankMe, upper half of the stack: "
        f"{sv([d.point[half:].mean() for d in deltas], '{:+.2f}')}, positive "
        f"{k_of_n(sum(d.point[half:].mean() > 0 for d in deltas), n)}; lower half: "
        f"{sv([d.point[:half].mean() for d in deltas], '{:+.2f}')} (the study's "
        "hypothesis: a rise in mid-to-late layers)."]
    for alpha in results[0].alphas:
        upper = [r.delta(spectral.metric_key(alpha)).point[half:].mean() for r in results]
        lines.append(f"- Rényi α = {alpha:g}, upper half: mean Δ {sv(upper, '{:+.2f}')}, "
                     f"positive {k_of_n(sum(u > 0 for u in upper), n)}.")
    lines.append("- Δ sign at smaller probe sizes equals the full-size sign in "
                 f"{sv([100 * r.stability() for r in results], '{:.0f} %')} of (n, layer) "
                 "cells; Spearman correlation of CKA drift with Δ RankMe across layers "
                 f"{sv([r.drift_correlation() for r in results])}.")
    return "\n".join(lines)
