"""Causal localisation (notebook 04, ``python -m alignkit patching``): every set x component x
direction activation-patching sweep between the reference and the tuned model, resid denoise by
positions, cross-layer patching, weight ablation and the mean-ablated difference, on the flips and
the controls (``behaviour.example_sets``), scored by ``cfg.patching.metric``; and the resid denoise
sweep under every metric (``evaluate.TARGETS``), the check of what each one measures."""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from alignkit import cka, patching, runs
from alignkit.analyses import behaviour, common
from alignkit.analyses.common import k_of_n, mode_sentence, per_seed, seed_values
from alignkit.config import Config, PatchingParams
from alignkit.data import dataset_hash, eval_set
from alignkit.evaluate import TARGETS
from alignkit.layers import alignment_path, best_match
from alignkit.models import load_model, placement
from alignkit.patching import GenerationResult, PatchResult
from alignkit.stats import Band, argmax_frequencies, bootstrap_mean, gap_fraction, versus_reference

EXTRAS = {"positions": "the resid patch by positions (prompt rows, answer-predicting rows)",
          "checks": "the other metrics' sweeps (how much of each metric's gap the controls "
                    "carry)",
          "ablation": "weight ablation (revert, graft) and the mean-ablated difference"}
POSITION_NAMES = {"prompt": "prompt rows", "answer": "rows predicting the scored tokens"}
METRIC_NAMES = {"answer": "answer (the final answer after the gold solution)",
                "computed": "computed (the results the solution computes)",
                "copy": "copy control (the final answer after the last result is corrupted: "
                        "only a copy)"}


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


def carried_share(flips: PatchResult, controls: PatchResult, n_boot: int = 1000,
                  seed: int = 0) -> Band:
    """The share of the flips' mean gap (tuned − reference, unpatched) that the controls show too:
    mean control gap / mean flip gap, with a bootstrap interval resampling each set on its own.
    Near 1: the metric's improvement is not specific to the problems the tuned model newly solves
    (format, copying); near 0: it is."""
    gf, gc = flips.lp_donor - flips.lp_receiver, controls.lp_donor - controls.lp_receiver
    rng = np.random.default_rng(seed)
    fi = rng.integers(0, len(gf), (n_boot, len(gf)))
    ci = rng.integers(0, len(gc), (n_boot, len(gc)))
    boots = gc[ci].mean(1) / gf[fi].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return Band(np.array([gc.mean() / gf.mean()]), np.array([lo]), np.array([hi]))


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
        metric: what every sweep above scores (``cfg.patching.metric``).
        checks: ``{"<metric>/<set>": PatchResult [n, L]}`` the resid denoise sweep (all
            positions) under each metric of ``evaluate.TARGETS`` with something to score.
        generation: ``{set: GenerationResult [n, L]}`` solving with the tuned residual stream
            held at each layer (``patching.generation_sweep``) on the first ``n_generate``.
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
    metric: str
    checks: dict[str, PatchResult]
    generation: dict[str, GenerationResult]

    def sweep(self, set_: str = "flips", component: str = "resid",
              direction: str = "denoise") -> PatchResult:
        return self.sweeps[f"{set_}/{component}/{direction}"]

    def carried(self, metric: str, n_boot: int = 1000, seed: int = 0) -> Band:
        """``carried_share`` of ``metric``'s check sweeps (controls' gap / flips' gap)."""
        return carried_share(self.checks[f"{metric}/flips"], self.checks[f"{metric}/controls"],
                             n_boot, seed)

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
        """``freq: [L, L]`` how often each tuned donor layer's cross-layer patch raises each
        reference layer most across bootstrap resamples of the examples
        (``stats.argmax_frequencies``), and ``beats_own: [L, L]`` the donors whose interval of
        Δ(donor) − Δ(own layer), simultaneous over the row's donors
        (``stats.versus_reference``), lies above 0: a remapping beyond chance."""
        delta = self.cross[set_].delta
        own = np.arange(delta.shape[1])
        vs = versus_reference(delta, own, n_boot=n_boot, seed=seed)
        return argmax_frequencies(delta, n_boot=n_boot, seed=seed), vs["lo"] > 0

    def mean_ablation(self, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, tuple[int, float, float, float, float]]:
        """``{"all" | "prompt" | "answer": (layer, full, kept, lo, hi)}`` on the flips: the layer
        where removing the tuned − reference residual difference at those rows (the resid noise
        patch) changes the tuned model's mean scored log-prob most, that change, and the change
        when only the example-specific part is removed there (the rows' mean difference kept),
        and the bootstrap interval of ``full`` there (``lo``, ``hi``; the layer is selected, so
        it is optimistic). ``kept / full`` near 0: a constant shift at those rows (a steering
        vector) carries the change; an interval of ``full`` that includes 0: no effect to share."""
        out = {}
        for q in ("all", "prompt", "answer"):
            md_key = "flips/mean_diff" if q == "all" else f"flips/mean_diff@{q}"
            if md_key not in self.ablation:
                continue
            full_r = self.sweep("flips", "resid", "noise") if q == "all" else \
                self.ablation[f"flips/noise@{q}"]
            full = np.nanmean(full_r.delta, 0)
            j = int(np.nanargmax(np.abs(full)))
            band = curve(full_r.delta[:, [j]], n_boot, seed)
            out[q] = (j, float(full[j]), float(np.nanmean(self.ablation[md_key].delta, 0)[j]),
                      float(band.lo[0]), float(band.hi[0]))
        return out


def ensure(cfg: Config, ckpts: common.Checkpoints) -> PatchingResult:
    """Every set x component x direction sweep, resid denoise by positions, cross-layer
    patching, weight ablation (reference against the tuned model), the mean-ablated difference
    with one global mean and with the mean of the prompt rows and of the answer-predicting rows
    alone, and the CKA matrix of their decoder layers. Knobs: ``cfg.patching``."""
    p, pair = cfg.patching, ckpts.pair(ckpts.tuned)
    if set(p.extras) - set(EXTRAS):
        raise ValueError(f"patching.extras: unknown {sorted(set(p.extras) - set(EXTRAS))}; "
                         f"choose from {list(EXTRAS)}")
    ds = eval_set(cfg)
    res = behaviour.ensure(cfg, pair)
    sets, labels = behaviour.example_sets(cfg, res, ds)

    def compute() -> PatchingResult:
        base, tokenizer = load_model(pair.paths[pair.reference], dtype=cfg.dtype, **placement(cfg))
        tuned, _ = load_model(pair.paths[pair.tuned], dtype=cfg.dtype, **placement(cfg))
        by_metric = {m: {k: behaviour.patch_examples(cfg, tokenizer, v, m)
                         for k, v in sets.items()} for m in TARGETS}
        examples = by_metric[p.metric]
        for k, v in examples.items():
            if not v:
                raise ValueError(f"no {k} example has anything to score under the metric "
                                 f"{p.metric!r}; choose another (--set patching.metric=answer)")
        kw = dict(batch_size=p.batch_size, min_gap=p.min_gap, progress=False, metric=p.metric)
        jobs = [(s, c, d) for s in examples for c in p.components for d in ("denoise", "noise")]
        sweeps = {f"{s}/{c}/{d}": patching.layer_sweep(
            base, tuned, tokenizer, examples[s], component=c, positions=p.positions,
            direction=d, **kw) for s, c, d in tqdm(jobs, desc="patching", leave=False)}
        by_pos = {q: sweeps["flips/resid/denoise"] if q == p.positions else patching.layer_sweep(
            base, tuned, tokenizer, examples["flips"], component="resid", positions=q, **kw)
            for q in ("all", "prompt", "answer") if q == p.positions or "positions" in p.extras}
        cross = {s: patching.cross_layer_sweep(base, tuned, tokenizer, exs[: p.n_cross], **kw)
                 for s, exs in examples.items() if p.n_cross > 0}  # 0: not run (L x L patches)
        ablation = {f"{s}/{k}": r for s, exs in examples.items() if "ablation" in p.extras
                    for k, r in patching.weight_sweep(base, tuned, tokenizer, exs, **kw).items()}
        # the mean difference of those rows only, put back there, against removing the whole
        # difference there (the resid noise patch at q)
        for q in ("prompt", "answer") if "ablation" in p.extras else ():
            ablation[f"flips/mean_diff@{q}"] = patching.weight_sweep(
                base, tuned, tokenizer, examples["flips"], mean_positions=q, kinds=("mean_diff",),
                **kw)["mean_diff"]
            ablation[f"flips/noise@{q}"] = patching.layer_sweep(
                base, tuned, tokenizer, examples["flips"], component="resid", positions=q,
                direction="noise", **kw)
        checks = {f"{m}/{s}": sweeps[f"{s}/resid/denoise"]
                  if m == p.metric and p.positions == "all" else patching.layer_sweep(
                      base, tuned, tokenizer, exs, **dict(kw, metric=m))
                  for m in TARGETS for s, exs in by_metric[m].items()
                  if exs and (m == p.metric or "checks" in p.extras)}
        generation = {s: patching.generation_sweep(
            base, tuned, tokenizer, exs[: p.n_generate], max_new_tokens=cfg.eval.max_new_tokens,
            stop=cfg.eval.stop, progress=False) for s, exs in by_metric["answer"].items()
            if p.n_generate > 0}
        caps = list(common.captures(cfg, pair, cfg.cka.pooling).values())
        decoder_points = [i for i, n in enumerate(caps[0].hook_points) if n != "embed"]
        return PatchingResult(
            sets=sets, labels=labels, base_step=res.evals[0].step, final_step=res.evals[-1].step,
            sweeps=sweeps, by_pos=by_pos, cross=cross, ablation=ablation,
            cka_matrix=cka.cka_matrix(*(c.acts[decoder_points] for c in caps)),
            metric=p.metric, checks=checks, generation=generation)

    return common.cached(cfg, pair, "patching", p, compute, eval=dataset_hash(ds),
                  decoding=(cfg.eval.max_new_tokens, list(cfg.eval.stop)),
                  sets=behaviour.set_key(sets), cka_pooling=cfg.cka.pooling,
                  probe_hash=runs.hash_obj(common.probes(cfg, pair)))


def _metric_line(results: list[PatchingResult], n_boot: int, seed: int) -> str:
    """What each metric measures: its gap on the flips and on the controls, the controls' share."""
    shares = {m: [r.carried(m, n_boot, seed) for r in results] for m in TARGETS
              if all(f"{m}/{s}" in r.checks for r in results for s in ("flips", "controls"))}
    parts = []
    for m, bands in shares.items():
        gaps = [[np.mean(r.checks[f"{m}/{s}"].lp_donor - r.checks[f"{m}/{s}"].lp_receiver)
                 for s in ("flips", "controls")] for r in results]
        parts.append(f"{METRIC_NAMES[m]}: gap on the flips {seed_values([g[0] for g in gaps])}, "
                     f"on the controls {seed_values([g[1] for g in gaps])} nats, the controls' "
                     "share " + per_seed([f"{b.point[0]:.2f} [{b.lo[0]:.2f}, {b.hi[0]:.2f}]"
                                          for b in bands]))
    metric = results[0].metric
    candidates = [m for m in ("computed", "answer") if m in shares]
    # per seed, which of computed and answer has the controls carrying the smaller share
    least = [min(candidates, key=lambda m: shares[m][k].point[0])
             for k in range(len(results))] if candidates else []
    verdict = (f"`{metric}`, the metric whose controls carry the smaller share "
               f"{k_of_n(sum(x == metric for x in least), len(least))}"
               if metric in candidates else f"`{metric}`")
    carried = shares[metric] if metric in candidates else []
    warn = (" Its controls still show most of the flips' gap (share above one half "
            + k_of_n(sum(b.lo[0] > 0.5 for b in carried), len(carried))
            + "): the tuned model's advantage on these tokens is largely not specific to the "
            "problems it newly solves.") if any(b.point[0] > 0.5 for b in carried) else ""
    return ("- **Metric** (the tokens scored, tuned − reference log-prob before any patch): "
            + "; ".join(parts) + f". The sweeps below score {verdict}." + warn)


def _generation_line(results: list[PatchingResult]) -> str:
    """Solving with the patch held: how many flips the reference solves with the tuned residual
    stream held at its best layer, and what holding it does to the controls."""
    flips, ctrl = [r.generation["flips"] for r in results], [r.generation["controls"]
                                                               for r in results]
    best = [int(np.argmax(g.correct.mean(0))) for g in flips]
    half = [next((str(i) for i, v in enumerate(g.correct.mean(0)) if v >= 0.5), "none")
            for g in flips]
    return ("- **Solving with the patch held** (the reference generates greedily, as in "
            "evaluation, with the tuned model's residual stream after one layer in place of its "
            "own at every position; no copying or format can help): flips solved at the best "
            "layer " + per_seed([f"{int(g.correct[:, b].sum())} of {len(g.correct)} (layer {b})"
                                 for g, b in zip(flips, best)])
            + "; first layer solving at least half: " + per_seed(half)
            + "; alone, the reference solves " + per_seed([int(g.receiver.sum()) for g in flips])
            + " and the tuned model " + per_seed([int(g.donor.sum()) for g in flips])
            + " of them. The controls (solved by both alone): "
            + per_seed([f"{int(g.correct.sum(0).min())} of {len(g.correct)} still solved at the "
                        "worst layer, "
                        f"{int(g.correct[:, -1].sum())} at the last" for g in ctrl])
            + " (best layer selected on the same flips, not corrected).")


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
    metric = results[0].metric
    if any(r.metric != metric for r in results):
        raise ValueError(f"the seeds were patched under different metrics "
                         f"{sorted({r.metric for r in results})}: summarize one at a time")
    lines = [_metric_line(results, n_boot, seed),
        "- **Sets**: " + "; ".join(f"{r.sweep().meta['n_examples']} of {len(r.sets['flips'])} "
                                   f"{r.labels['flips']}, {r.sweep('controls').meta['n_examples']}"
                                   f" of {len(r.sets['controls'])} {r.labels['controls']}"
                                   for r in results)
        + f" (those with something to score under `{metric}`). Mean gap (tuned − reference "
        "log-prob of the scored tokens on the flips): "
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
    if all(r.generation for r in results):
        lines.append(_generation_line(results))
    lines.append(f"- **Specificity**: mean |Δ| of the resid denoise sweep, flips / controls "
                 f"{seed_values([r.specificity() for r in results])}.")
    own, beaten = [], []
    crossed = results if all(r.cross for r in results) else []  # patching.n_cross=0: not run
    for r in crossed:
        freq, beats = r.best_donors("flips", n_boot, seed)
        modal = freq.argmax(1)
        path = set(map(tuple, alignment_path(r.cka_matrix)))
        cka_best = best_match(r.cka_matrix)
        n_l = len(freq)
        own.append(f"{int((modal == np.arange(n_l)).sum())}, "
                   f"{sum((i, int(j)) in path for i, j in enumerate(modal))} and "
                   f"{int((modal == cka_best).sum())} of {n_l} (median frequency "
                   f"{np.median(freq.max(1)):.2f})")
        rows = [i for i in range(n_l) if beats[i].any()]
        beaten.append(f"{len(rows)} of {n_l}" + (f" ({', '.join(map(str, rows))})" if rows else ""))
    lines.append("- **Cross-layer** (the most frequent best tuned donor over bootstrap resamples "
                 "of the examples): reference layers where it is the own tuned layer, a CKA "
                 "alignment-path partner and the CKA best match: " + per_seed(own)
                 + "; reference layers where another donor beats the own layer (intervals "
                 "simultaneous over the donors): " + per_seed(beaten) + "." if crossed else
                 "- **Cross-layer**: not run (`patching.n_cross=0`: its L × L patches per "
                 "example do not fit this preset's budget).")
    if all("flips/revert" in r.ablation for r in results):
        rev = [peak_layer(r.ablation["flips/revert"].delta) for r in results]
        gr = [peak_layer(r.ablation["flips/graft"].delta) for r in results]
        lines.append(f"- **Weights**: reverting one layer changes the tuned model's scored "
                     f"log-prob most at layer {mode_sentence(rev)}; grafting one tuned layer "
                     f"into the reference at layer {mode_sentence(gr)}.")
    missing = [x for x in EXTRAS if x not in p.extras]
    if missing:
        lines.append("- **Not run** at this preset's budget (`patching.extras`): "
                     + ", ".join(EXTRAS[x] for x in missing) + ".")
    ablations = [r.mean_ablation(n_boot, seed) for r in results]
    for q in ablations[0]:
        effect = [not a[q][3] <= 0 <= a[q][4] for a in ablations]  # the interval excludes 0
        rows = "all rows, one global mean" if q == "all" else f"the {POSITION_NAMES[q]} only"
        where = (f"at layer {mode_sentence([a[q][0] for a in ablations])}, where removing the "
                 "difference there matters most (a change of "
                 + per_seed([f"{a[q][1]:+.2f} [{a[q][3]:+.2f}, {a[q][4]:+.2f}]"
                             for a in ablations]) + " nats, selected layer)")
        if not any(effect):
            lines.append(f"- **Mean-ablated difference** ({rows}): no effect — {where}: the "
                         "interval of the change includes 0 "
                         + k_of_n(len(effect), len(effect)) + ", so there is nothing to share "
                         "between the mean and the example-specific part.")
            continue
        share = [f"{100 * a[q][2] / a[q][1]:.0f} %" if e else "no effect"
                 for a, e in zip(ablations, effect)]
        lines.append(f"- **Mean-ablated difference** ({rows}): {where}, keeping only its mean "
                     f"still changes the scored log-prob by {per_seed(share)} of that (near 0 %: a "
                     "constant shift carries the change; \"no effect\": the change's interval "
                     "includes 0; a ratio of small changes is noisy).")
    return "\n".join(lines)
