"""SFT vs DPO vs GRPO (notebook 05, ``python -m alignkit compare``): each model against one
reference and against its own init — accuracy with paired tests, layerwise CKA, paired Δ RankMe,
resid denoise patching on the first model's flips, weight drift — and the published claims, each
computed as its paper defines it (``alignkit.claims``). The same for any checkpoints
(``--models``), with cross-layer CKA for models of other shapes (``report_models``)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from alignkit import claims, controls, patching, runs, spectral
from alignkit.analyses import behaviour, cka, common, lens, weights
from alignkit.analyses.common import mode_sentence, per_seed, seed_values
from alignkit.analyses.patching import curve, fraction, half_depth
from alignkit.analyses.weights import WeightsResult, methods_of
from alignkit.capture import Activations, varying_points
from alignkit.claims import Verdict
from alignkit.config import CompareParams, Config, analysis_key
from alignkit.data import dataset_hash, eval_set
from alignkit.evaluate import summary
from alignkit.models import device_for, load_model, part, placement
from alignkit.patching import PatchResult
from alignkit.stats import Band, mcnemar

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompareResult:
    """Every model against one reference and against its own init.

    Attributes:
        methods: the compared models; init: ``{method: label of the model it started from}``.
        accuracy: ``{"base" | method: summary row}`` (accuracy with its Wilson interval ...).
        labels, dropped: hook points kept / dropped (probe activations, ``pooling``).
        cka: ``{method: Band [L]}`` CKA(reference, final) with bootstrap bands; cka_floor: ``[L]``
            the widest split-half noise half-width of the comparisons.
        rank_vs_base, rank_vs_init: ``{method: Band [L]}`` paired Δ RankMe.
        patch_set, patches: the flips label and ``{method: PatchResult [n, L]}`` resid denoise of
            the final model into the reference; patch_curves ``{method: Band [L]}`` their mean Δ.
        weights: the weight drift of every method (``analyses.weights``).
        correct: ``{"base" | method: [n_eval] bool}`` per-problem exact match (paired tests).
        last_states: ``{model label: [n, d]}`` last-token states after the final norm on the
            probes (``final_state``; ``claims.effective_rank_claim``).
        claims: the published claims tested on this comparison alone (``compare_claims``).
    """

    methods: list[str]
    init: dict[str, str]
    accuracy: dict[str, dict]
    n_eval: int
    pooling: str
    labels: list[str]
    dropped: list[str]
    cka: dict[str, Band]
    cka_floor: np.ndarray
    rank_vs_base: dict[str, Band]
    rank_vs_init: dict[str, Band]
    patch_set: str
    patches: dict[str, PatchResult]
    patch_curves: dict[str, Band]
    weights: WeightsResult
    correct: dict[str, list[bool]]
    last_states: dict[str, np.ndarray]
    claims: list[Verdict]
    base_hash: str = ""  # the reference's weights hash: "the same base" across seeds

    def gap(self, method: str) -> float:
        """Mean LP(final) − LP(reference) on the patched flips."""
        r = self.patches[method]
        return float(np.mean(r.lp_donor - r.lp_receiver))

    def accuracy_tests(self) -> dict[str, dict]:
        """McNemar's exact test (paired: the same problems) of each final model against the
        reference and, where it started elsewhere, against its own init: ``{"<a> → <b>": ...}``."""
        out = {}
        for m in self.methods:
            for ref in dict.fromkeys(("base", self.init[m])):
                if ref in self.correct and ref != m:
                    out[f"{ref} → {m}"] = mcnemar(self.correct[ref], self.correct[m])
        return out


def ensure(cfg: Config, ckpts: common.Checkpoints) -> CompareResult:
    """Every model of ``ckpts`` (``weights.methods_of``: the three methods' runs,
    ``common.from_methods``, or given models of one shape) against the reference and against its
    own init, on the flips of the first model. Knobs: ``cfg.compare``; examples, batch and
    ``min_gap``: ``cfg.patching``; weight measures: ``cfg.weights``."""
    p, methods = cfg.compare, methods_of(ckpts)
    init = {m: ckpts.init_of(m) for m in methods}
    ds, texts = eval_set(cfg), common.probes(cfg, ckpts)
    evaluated = behaviour.ensure(cfg, ckpts)
    evals = dict(zip(evaluated.labels, evaluated.evals))
    sets, set_labels = behaviour.example_sets(cfg, behaviour.ensure(cfg, ckpts.pair(methods[0])),
                                              ds)

    def compute() -> CompareResult:
        caps = common.captures(cfg, ckpts, p.pooling, texts, together=("last",))
        keep, labels, dropped = varying_points(caps.values())
        names = {ckpts.reference: "base"}  # the reference is "base" in every table and claim
        acts = {k: a.acts[keep] for k, a in caps.items()}
        ref = acts[ckpts.reference]
        cka_bands = {m: Band.of(controls.bootstrap_layerwise_cka(ref, acts[m], n_boot=p.n_boot,
                                                                 seed=p.seed)) for m in methods}
        floor = np.max([controls.noise_floor(ref, acts[m], n_splits=p.n_splits,
                                             seed=p.seed)["half_width"] for m in methods], axis=0)
        boot = {k: spectral.bootstrap_layer_metrics(a.to(device_for(cfg)), n_boot=p.n_boot,
                                                    seed=p.seed) for k, a in acts.items()}
        delta = {(m, r): Band.of(spectral.paired_delta(boot[m], boot[r])["rankme"])
                 for m in methods for r in (ckpts.reference, init[m])}
        base, tokenizer = load_model(ckpts.paths[ckpts.reference], dtype=cfg.dtype,
                                     **placement(cfg))
        examples = behaviour.patch_examples(cfg, tokenizer, sets["flips"])
        last = common.captures(cfg, ckpts, "last", texts)
        last_states, patches = {}, {}
        for k in ckpts.labels:  # one model beside the base at a time
            model = base if k == ckpts.reference else load_model(
                ckpts.paths[k], dtype=cfg.dtype, **placement(cfg))[0]
            last_states[names.get(k, k)] = final_state(model, last[k])
            if k in methods:
                patches[k] = patching.layer_sweep(
                    base, model, tokenizer, examples, component="resid", positions="all",
                    direction="denoise", batch_size=cfg.patching.batch_size,
                    min_gap=cfg.patching.min_gap, progress=False, metric=cfg.patching.metric)
            del model
        w = weights.ensure(cfg, ckpts)
        inits = {m: names.get(v, v) for m, v in init.items()}
        return CompareResult(
            methods=methods, init=inits,
            accuracy={names.get(k, k): summary([evals[k]])[0] for k in [ckpts.reference,
                                                                        *methods]},
            n_eval=evals[ckpts.reference].n, pooling=p.pooling, labels=labels, dropped=dropped,
            cka=cka_bands, cka_floor=floor,
            rank_vs_base={m: delta[m, ckpts.reference] for m in methods},
            rank_vs_init={m: delta[m, init[m]] for m in methods}, patch_set=set_labels["flips"],
            patches=patches, patch_curves={m: curve(r.delta, p.n_boot_patch, p.seed)
                                           for m, r in patches.items()},
            weights=w, correct={names.get(k, k): list(evals[k].correct)
                                for k in [ckpts.reference, *methods]},
            last_states=last_states, base_hash=runs.weights_hash(ckpts.paths[ckpts.reference]),
            claims=compare_claims(
                [last_states], [w.own], [w.matched_unchanged], inits, p.n_boot, p.seed))

    return common.cached(cfg, ckpts, "compare", p, compute, eval=dataset_hash(ds),
                  sets=behaviour.set_key({"flips": sets["flips"]}),
                  probe_hash=runs.hash_obj(texts), batch_size=cfg.patching.batch_size,
                  min_gap=cfg.patching.min_gap, metric=cfg.patching.metric,
                  weights=analysis_key(cfg.weights))


def final_state(model: torch.nn.Module, last: Activations) -> np.ndarray:
    """``[n, d]`` float64: the last decoder layer's states at the last token (``last``: a capture
    with ``"last"`` pooling) through the model's own final norm, the ``hidden_states[-1]`` Li et
    al. 2025 measure."""
    p = next(model.parameters())
    with torch.no_grad():
        normed = part(model, "norm")(last.acts[-1].to(device=p.device, dtype=p.dtype))
    return normed.double().cpu().numpy()


def compare_claims(last_states: list[dict], own: list[dict], matched: list[dict], init: dict,
                   n_boot: int = 200, seed: int = 0) -> list:
    """The three published claims over training seeds (one entry per seed in each list): one
    seed is inconclusive. Each claim is about named stages (``sft``, ``dpo``, ``grpo``): it is
    tested only when models carry those labels."""
    methods = list(own[0])
    out = []  # models labelled otherwise (compare --models base=... tuned=...) test no claim
    if set(claims.LI_CLAIMED) & set(methods):
        out.append(claims.effective_rank_claim(last_states, init, n_boot=n_boot, seed=seed))
    if "sft" in methods and len(methods) > 1:
        out.append(claims.sparsity_claim(own, rl=[m for m in methods if m != "sft"],
                                         matched=matched, seed=seed))
    if {"sft", "grpo"} <= set(methods):
        out.append(claims.principal_claim(own, seed=seed))
    return out


def claims_over_seeds(results: list[CompareResult], n_boot: int = 200, seed: int = 0) -> list:
    """``compare_claims`` on every seed's result together: the verdicts the notebook and the
    README state (with one result, the claims stored with it)."""
    if not results:
        raise ValueError("claims_over_seeds needs at least one comparison, got none")
    if len(results) == 1:
        return list(results[0].claims)  # computed with the result, under the same cache key
    if any(r.methods != results[0].methods or r.init != results[0].init for r in results):
        raise ValueError("the seeds' comparisons differ in methods or inits: "
                         f"{[(r.methods, r.init) for r in results]}")
    return compare_claims([r.last_states for r in results], [r.weights.own for r in results],
                          [r.weights.matched_unchanged for r in results], results[0].init,
                          n_boot, seed)


def _name(label: str) -> str:
    return label if label == "base" else label.upper()


def _method_line(rs: list[CompareResult], m: str) -> str:
    n, tests = len(rs), [r.accuracy_tests() for r in rs]
    sig = []
    for key in (k for k in tests[0] if k.endswith(f"→ {m}")):
        ts = [t[key] for t in tests]
        vs = f"vs {_name(key.split(' → ')[0])}"
        if n == 1:
            t = ts[0]
            sig.append(f"{vs} {100 * t['diff']:+.1f} points (McNemar p = {t['p']:.2g}, "
                       f"{t['only_b']} gained / {t['only_a']} lost)")
        else:
            hi = sum(t["p"] < 0.05 and t["diff"] > 0 for t in ts)
            lo = sum(t["p"] < 0.05 and t["diff"] < 0 for t in ts)
            sig.append(f"{vs}: significantly higher in {hi}, lower in {lo} of {n} seeds")
    fracs = [fraction(r.patches[m]) for r in rs]
    depth = [half_depth(f)[0] for f in fracs]
    whole = [r.weights.whole_model(m)["rel_change"] for r in rs]
    start = "from the base" if rs[0].init[m] == "base" else f"from {_name(rs[0].init[m])}"
    a = rs[0].accuracy[m]
    return (
        f"- **{m.upper()}** ({start}): accuracy "
        f"{seed_values([100 * r.accuracy[m]['accuracy'] for r in rs], '{:.1f} %')}"
        + (f" (95 % CI {100 * a['acc_lo']:.1f}–{100 * a['acc_hi']:.1f})" if n == 1 else "")
        + f" vs base {100 * rs[0].accuracy['base']['accuracy']:.1f} %; paired: " + "; ".join(sig)
        + ". CKA vs base lowest at layer "
        + mode_sentence([r.labels[int(np.argmin(r.cka[m].point))] for r in rs])
        + f"; mean CKA {seed_values([r.cka[m].point.mean() for r in rs], '{:.3f}')}. Mean Δ "
        f"RankMe vs base {seed_values([r.rank_vs_base[m].point.mean() for r in rs], '{:+.2f}')}"
        f"; of {len(rs[0].labels)} hook points, interval above 0 at: "
        f"{per_seed([int((r.rank_vs_base[m].lo > 0).sum()) for r in rs])}; below 0 at: "
        f"{per_seed([int((r.rank_vs_base[m].hi < 0).sum()) for r in rs])}. Resid denoise "
        f"reaches half the mean gap ({seed_values([r.gap(m) for r in rs], '{:+.2f}')} nats) at "
        "layer "
        + mode_sentence([d if d is not None else "never" for d in depth])
        + f". Own update ‖ΔW‖/‖W‖ {seed_values(whole, '{:.2e}')}; largest in module "
        + mode_sentence([r.weights.own_by_module()[m].idxmax() for r in rs]) + ".")


def summarize(results: list[CompareResult], cfg: Config | None = None,
              with_claims: bool = True) -> str:
    """Notebook 05 over training seeds: per method accuracy (McNemar against base and own init),
    CKA, Δ RankMe, patching depth (fraction of the mean gap) and own update, then (unless
    ``with_claims`` is false: a seed's own block) the published claims over the seeds
    (``claims_over_seeds``, bootstrap: ``cfg.compare``)."""
    n, methods = len(results), results[0].methods
    p = cfg.compare if cfg is not None else CompareParams()
    same = len({r.base_hash for r in results}) == 1 and bool(results[0].base_hash)
    lines = [f"- Base accuracy {100 * results[0].accuracy['base']['accuracy']:.1f} %"
             + ("." if n == 1 else " (the same base in every seed)." if same else
                " (the first seed's: the seeds' bases differ, so the vs-base comparisons do not "
                "share a reference).")]
    lines += [_method_line(results, m) for m in methods]
    whole = [{m: r.weights.whole_model(m)["rel_change"] for m in methods} for r in results]
    lines.append("- Largest own weight update: " + mode_sentence(
        [max(methods, key=lambda m: w[m]).upper() for w in whole])
        + "; lowest mean CKA vs base: " + mode_sentence(
        [min(methods, key=lambda m: r.cka[m].point.mean()).upper() for r in results]) + ".")
    if not with_claims:
        return "\n".join(lines)
    verdicts = claims_over_seeds(results, p.n_boot, p.seed)
    lines += ["", f"**Published claims, each with its paper's own quantity**, over {n} training "
              "seed" + ("s" if n > 1 else "") + " (the seed is the unit: each item is the mean of "
              "the seeds' estimates with its Student-t 95 % interval, df = seeds − 1, and agrees "
              "(disagrees) when that interval lies on the claimed (opposite) side of 0; each "
              "seed's estimate follows with its within-seed interval, which does not decide; "
              "interpretation items and the numbers after the items stay outside the verdict):",
              ""]
    lines += [f"{i}. " + v.sentence() for i, v in enumerate(verdicts, 1)] or [
        "None tested: each claim is about a named stage; label the models sft, dpo or grpo."]
    return "\n".join(lines)


def report_models(cfg: Config, models: dict[str, str], revisions: dict | None = None,
                  inits: str = "series") -> str:
    """``compare --models``: accuracy and cross-layer CKA of any checkpoints against the first
    (``cka.ensure_cross``, any depth or width); when every model has the reference's shape, also
    ``ensure`` and each model's difference lens; else the same-layer measures are skipped with a
    warning naming the config fields that differ. The sentences, all from cached results."""
    ckpts = common.from_models(cfg, models, revisions, inits, same_shape=False)
    cross = cka.ensure_cross(cfg, ckpts)
    out = [cka.summarize_cross(cross)]
    other = {m: f for m, f in cross.shape.items() if f}
    if other:
        acc = [f"- {k}: {100 * r['accuracy']:.1f} % [{100 * r['acc_lo']:.1f}, "
               f"{100 * r['acc_hi']:.1f}] of {e.n} problems"
               for k, e in zip(ckpts.labels, behaviour.ensure(cfg, ckpts).evals)
               for r in summary([e])]
        logger.warning("same-layer measures (layerwise CKA, Δ RankMe per layer, patching, weight "
                       "drift, difference lens, per-token KL) need the reference's shape: %s",
                       "; ".join(f"{m} differs in {', '.join(f)}" for m, f in other.items()))
        return "\n".join(out + ["", "Accuracy (95 % Wilson):", *acc])
    out += ["", summarize([ensure(cfg, ckpts)], cfg)]
    for m in ckpts.labels[1:]:
        out += ["", f"What changed, {m} against the reference:", "",
                lens.summarize([lens.ensure(cfg, ckpts.pair(m))], cfg)]
    return "\n".join(out)


