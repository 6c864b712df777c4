"""Causal localisation (notebook 04, ``python -m alignkit patching``): every set x component x
direction activation-patching sweep between the reference and the tuned model, resid denoise by
positions, cross-layer patching, weight ablation and the mean-ablated difference, on the flips and
the controls (``behaviour.example_sets``)."""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from alignkit import cka, patching, runs
from alignkit.analyses import behaviour, common
from alignkit.analyses.common import mode_sentence, per_seed, seed_values
from alignkit.config import Config, PatchingParams
from alignkit.data import dataset_hash, eval_set
from alignkit.layers import alignment_path, best_match
from alignkit.models import load_model, placement
from alignkit.patching import PatchResult
from alignkit.stats import Band, bootstrap_mean, gap_fraction, near_best

POSITION_NAMES = {"prompt": "prompt rows", "answer": "answer-predicting rows"}


def curve(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Band:
    """Mean over examples (axis 0) with a bootstrap 95 % interval."""
    return Band.of(bootstrap_mean(values, n_boot=n_boot, seed=seed))


def fraction(r: PatchResult, n_boot: int = 1000, seed: int = 0) -> Band:
    """``[L]`` the fraction of the mean gap a sweep recovers: mean Δ / mean gap, the quantity
    its curve plots against the dashed gap, with a paired bootstrap interval over examples."""
    return gap_fraction(r.delta, r.lp_donor - r.lp_receiver, n_boot=n_boot, seed=seed)


def half_depth(frac: Band) -> tuple[int | None, int | None]:
    """The first layer whose gap fraction reaches 0.5, and the first whose interval lies
    entirely above 0.5 (``None``: no such layer)."""
    first = next((i for i, v in enumerate(frac.point) if v >= 0.5), None)
    sure = next((i for i, v in enumerate(frac.lo) if v > 0.5), None)
    return first, sure


def peak_layer(delta: np.ndarray) -> int:
    """The layer of the largest |mean Δ| over examples (a selected maximum)."""
    return int(np.nanargmax(np.abs(np.nanmean(delta, 0))))


@dataclasses.dataclass
class PatchingResult:
    """Patching sweeps of the reference (base) against the tuned model.

    Attributes:
        sets, labels: ``{"flips" | "controls": rows}`` patched and their labels.
        sweeps: ``{"<set>/<component>/<direction>": PatchResult [n, L]}`` (``sweep()``).
        by_pos: ``{"all" | "prompt" | "answer": PatchResult [n, L]}`` flips, resid, denoise.
        cross: ``{set: PatchResult [n_cross, L, L]}`` cross-layer denoise.
        ablation: ``{"<set>/<revert|graft|mean_diff>": PatchResult [n, L]}`` weight ablation,
            and on the flips ``"flips/mean_diff@<prompt|answer>"`` (the mean difference of those
            rows put back there) with ``"flips/noise@<prompt|answer>"`` (all of it removed there).
        cka_matrix: ``[L, L]`` CKA of reference x tuned decoder layers, for the path.
    """

    sets: dict[str, list[dict]]
    labels: dict[str, str]
    base_step: int
    final_step: int
    sweeps: dict[str, PatchResult]
    by_pos: dict[str, PatchResult]
    cross: dict[str, PatchResult]
    ablation: dict[str, PatchResult]
    cka_matrix: np.ndarray

    def sweep(self, set_: str = "flips", component: str = "resid",
              direction: str = "denoise") -> PatchResult:
        return self.sweeps[f"{set_}/{component}/{direction}"]

    def components(self) -> list[str]:
        return sorted({k.split("/")[1] for k in self.sweeps}, key=["resid", "attn", "mlp"].index)

    def gap(self) -> float:
        """Mean tuned − reference answer log-prob on the patched flips (nats)."""
        r = self.sweep()
        return float(np.mean(r.lp_donor - r.lp_receiver))

    def fraction(self, n_boot: int = 1000, seed: int = 0) -> Band:
        """``[L]`` fraction of the mean gap the resid denoise sweep recovers (``fraction``)."""
        return fraction(self.sweep(), n_boot, seed)

    def half_depth(self, n_boot: int = 1000, seed: int = 0) -> tuple[int | None, int | None]:
        """The sufficiency depth of the resid denoise sweep (``half_depth``)."""
        return half_depth(self.fraction(n_boot, seed))

    def specificity(self) -> float:
        """Mean |Δ| of the resid denoise sweep on the flips over that on the controls."""
        return float(np.nanmean(np.abs(self.sweep().delta))
                     / np.nanmean(np.abs(self.sweep("controls").delta)))

    def best_donors(self, set_: str = "flips", n_boot: int = 1000,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``best: [L]`` the tuned donor layer whose cross-layer patch raises each reference layer
        most, and ``ties: [L, L]`` every donor tied with it (``stats.near_best``: the paired
        bootstrap interval of the difference from the best reaches 0). The tied set is the
        finding, not the argmax."""
        return near_best(self.cross[set_].delta, n_boot=n_boot, seed=seed)

    def mean_ablation(self) -> dict[str, tuple[int, float, float]]:
        """``{"all" | "prompt" | "answer": (layer, full, kept)}`` on the flips: the layer where
        removing the tuned − reference residual difference at those rows (the resid noise patch)
        changes the tuned model's mean answer log-prob most, that change, and the change when only
        the example-specific part is removed there (the rows' mean difference kept). ``kept /
        full`` near 0: a constant shift at those rows (a steering vector) carries the change."""
        out = {}
        for q in ("all", "prompt", "answer"):
            md_key = "flips/mean_diff" if q == "all" else f"flips/mean_diff@{q}"
            if md_key not in self.ablation:
                continue
            full_r = self.sweep("flips", "resid", "noise") if q == "all" else \
                self.ablation[f"flips/noise@{q}"]
            full = np.nanmean(full_r.delta, 0)
            j = int(np.nanargmax(np.abs(full)))
            out[q] = (j, float(full[j]), float(np.nanmean(self.ablation[md_key].delta, 0)[j]))
        return out


def ensure(cfg: Config, ckpts: common.Checkpoints) -> PatchingResult:
    """Every set x component x direction sweep, resid denoise by positions, cross-layer
    patching, weight ablation (reference against the tuned model), the mean-ablated difference
    with one global mean and with the mean of the prompt rows and of the answer-predicting rows
    alone, and the CKA matrix of their decoder layers. Knobs: ``cfg.patching``."""
    p, pair = cfg.patching, ckpts.pair(ckpts.tuned)
    ds = eval_set(cfg)
    res = behaviour.ensure(cfg, pair)
    sets, labels = behaviour.example_sets(cfg, res, ds)

    def compute() -> PatchingResult:
        base, tokenizer = load_model(pair.paths[pair.reference], dtype=cfg.dtype, **placement(cfg))
        tuned, _ = load_model(pair.paths[pair.tuned], dtype=cfg.dtype, **placement(cfg))
        examples = {k: patching.examples_from_table(v, tokenizer, chat=cfg.chat)
                    for k, v in sets.items()}
        kw = dict(batch_size=p.batch_size, min_gap=p.min_gap, progress=False)
        jobs = [(s, c, d) for s in examples for c in p.components for d in ("denoise", "noise")]
        sweeps = {f"{s}/{c}/{d}": patching.layer_sweep(
            base, tuned, tokenizer, examples[s], component=c, positions=p.positions,
            direction=d, **kw) for s, c, d in tqdm(jobs, desc="patching", leave=False)}
        by_pos = {q: sweeps["flips/resid/denoise"] if q == p.positions else patching.layer_sweep(
            base, tuned, tokenizer, examples["flips"], component="resid", positions=q, **kw)
            for q in ("all", "prompt", "answer")}
        cross = {s: patching.cross_layer_sweep(base, tuned, tokenizer, exs[: p.n_cross], **kw)
                 for s, exs in examples.items()}
        ablation = {f"{s}/{k}": r for s, exs in examples.items()
                    for k, r in patching.weight_sweep(base, tuned, tokenizer, exs, **kw).items()}
        for q in ("prompt", "answer"):  # the mean difference of those rows only, put back there,
            # against removing the whole difference there (the resid noise patch at q)
            ablation[f"flips/mean_diff@{q}"] = patching.weight_sweep(
                base, tuned, tokenizer, examples["flips"], mean_positions=q, kinds=("mean_diff",),
                **kw)["mean_diff"]
            ablation[f"flips/noise@{q}"] = patching.layer_sweep(
                base, tuned, tokenizer, examples["flips"], component="resid", positions=q,
                direction="noise", **kw)
        caps = list(common.captures(cfg, pair, cfg.cka.pooling).values())
        decoder_points = [i for i, n in enumerate(caps[0].hook_points) if n != "embed"]
        return PatchingResult(
            sets=sets, labels=labels, base_step=res.evals[0].step, final_step=res.evals[-1].step,
            sweeps=sweeps, by_pos=by_pos, cross=cross, ablation=ablation,
            cka_matrix=cka.cka_matrix(*(c.acts[decoder_points] for c in caps)))

    return common.cached(cfg, pair, "patching", p, compute, eval=dataset_hash(ds),
                  sets=behaviour.set_key(sets), cka_pooling=cfg.cka.pooling,
                  probe_hash=runs.hash_obj(common.probes(cfg, pair)))


def summarize(results: list[PatchingResult], cfg: Config | None = None) -> str:
    """Notebook 04 over training seeds: the gap, the sufficiency depth, the peak layer per
    component and direction, specificity, cross-layer ties, weight ablation and the mean-ablated
    difference (intervals: ``cfg.patching.n_boot`` and ``seed``)."""
    p = cfg.patching if cfg is not None else PatchingParams()
    n_boot, seed = p.n_boot, p.seed
    sweeps = [r.sweep() for r in results]
    fracs = [r.fraction(n_boot, seed) for r in results]
    depth = [half_depth(f) for f in fracs]
    gaps = [curve((s.lp_donor - s.lp_receiver)[:, None], n_boot, seed) for s in sweeps]
    lines = [
        "- **Sets**: " + "; ".join(f"{len(r.sets['flips'])} {r.labels['flips']}, "
                                   f"{len(r.sets['controls'])} {r.labels['controls']}"
                                   for r in results)
        + ". Mean gap (tuned − reference answer log-prob on the flips): "
        + per_seed([f"{g.point[0]:.3f} [{g.lo[0]:.3f}, {g.hi[0]:.3f}]" for g in gaps])
        + f" nats; flips whose gap is below {p.min_gap} nats (NPE masked): "
        + per_seed([s.meta["n_npe_masked"] for s in sweeps]) + ".",
        "- **Sufficiency depth** (first layer where the resid denoise patch recovers half the mean "
        "gap, mean Δ / mean gap as plotted): layer "
        + mode_sentence([d[0] if d[0] is not None else "never" for d in depth])
        + "; its fraction: " + per_seed([
            f"{f.point[d[0]]:.2f} [{f.lo[d[0]]:.2f}, {f.hi[d[0]]:.2f}]" if d[0] is not None
            else f"— (largest {np.nanmax(f.point):.2f})" for f, d in zip(fracs, depth)])
        + "; first layer whose interval lies above one half: "
        + per_seed([str(d[1]) if d[1] is not None else "none" for d in depth]) + "."]
    for direction in ("denoise", "noise"):
        parts = []
        for comp in results[0].components():
            rs = [r.sweep("flips", comp, direction).delta for r in results]
            peaks = [peak_layer(d) for d in rs]
            ctrl = [curve(r.sweep("controls", comp, direction).delta, n_boot, seed).point
                    for r in results]
            at = [f"{curve(d, n_boot, seed).point[i]:+.3f} (controls {c[i]:+.3f})"
                  for d, i, c in zip(rs, peaks, ctrl)]
            parts.append(f"{comp} at layer {mode_sentence(peaks)}, mean Δ {per_seed(at)}")
        lines.append(f"- **{direction}**: the layer of the largest mean |Δ| on the flips — "
                     + "; ".join(parts) + " (maxima over layers: selected, not corrected).")
    lines.append(f"- **Specificity**: mean |Δ| of the resid denoise sweep, flips / controls "
                 f"{seed_values([r.specificity() for r in results])}.")
    own = []
    for r in results:
        _, ties = r.best_donors("flips", n_boot, seed)
        path = set(map(tuple, alignment_path(r.cka_matrix)))
        on_path = sum(any((i, int(j)) in path for j in np.flatnonzero(ties[i]))
                      for i in range(len(ties)))
        cka_best = best_match(r.cka_matrix)
        own.append(f"{int(np.diag(ties).sum())}, {on_path} and "
                   f"{int(sum(ties[i, cka_best[i]] for i in range(len(ties))))} of {len(ties)}")
    lines.append("- **Cross-layer** (tuned donors tied with the best one, paired bootstrap over "
                 "examples): reference layers whose own tuned layer, a CKA alignment-path partner "
                 "and the CKA best match are among them: " + per_seed(own) + ".")
    rev = [peak_layer(r.ablation["flips/revert"].delta) for r in results]
    gr = [peak_layer(r.ablation["flips/graft"].delta) for r in results]
    lines.append(f"- **Weights**: reverting one layer changes the tuned model's answer log-prob "
                 f"most at layer {mode_sentence(rev)}; grafting one tuned layer into the "
                 f"reference at layer {mode_sentence(gr)}.")
    ablations = [r.mean_ablation() for r in results]
    for q in ablations[0]:
        full = [a[q][1] for a in ablations]
        rows = "all rows, one global mean" if q == "all" else f"the {POSITION_NAMES[q]} only"
        if all(abs(f) <= 1e-12 for f in full):
            lines.append(f"- **Mean-ablated difference** ({rows}): removing the residual "
                         "difference changes nothing here.")
            continue
        share = [100 * a[q][2] / a[q][1] if abs(a[q][1]) > 1e-12 else float("nan")
                 for a in ablations]
        lines.append(f"- **Mean-ablated difference** ({rows}): at layer "
                     f"{mode_sentence([a[q][0] for a in ablations])}, where removing the "
                     f"difference there matters most (a change of {seed_values(full, '{:+.2f}')} "
                     f"nats), keeping only its mean still changes the answer log-prob by "
                     f"{seed_values(share, '{:.0f} %')} of that (near 0 %: a constant shift "
                     "carries the change; a ratio of small changes is noisy).")
    return "\n".join(lines)
