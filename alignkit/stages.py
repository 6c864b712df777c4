"""One cached ``ensure_*`` per notebook: what the CLI and the notebooks get their results from.

A result is stored under ``<run>/analysis/<stage>-<digest>/`` (``compare``: ``<root>/compare/``)
keyed by the weights of every checkpoint used, the probe texts or patched examples, the
parameters and ``ANALYSIS_VERSION`` (bump it when a computation changes); a second call reads it.
Parameters default to the notebooks' (``*_defaults``; ``tests/test_cli.py`` keeps them in step).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from alignkit import cka, claims, controls, layers, lens, patching, runs, spectral, weights
from alignkit.capture import Activations, capture_cached, capture_run, varying_points
from alignkit.config import Config, seed_configs
from alignkit.data import dataset_hash, eval_set, probe_texts
from alignkit.evaluate import evaluate_checkpoint, evaluate_run, flip_table, summary
from alignkit.models import (
    analysis_dtype,
    check_compatible,
    device_for,
    load_model,
    placement,
    preflight,
    resolve_model,
    shape_differences,
)
from alignkit.results import (
    CKAResult,
    CompareResult,
    CrossCKAResult,
    LensResult,
    PatchingResult,
    RunResults,
    SpectralResult,
)
from alignkit.stats import Band, bootstrap_mean
from alignkit.train import train

logger = logging.getLogger(__name__)

ANALYSIS_VERSION = 6
# what notebooks 02 (all three), 03, 04 and 05 (question) capture; "question": the mean over the
# question's own tokens, the template every probe shares left out (capture.template_span)
CAPTURE_POOLINGS = ("question", "mean", "last")


def cka_defaults(smoke: bool) -> dict:
    """Notebook 02's parameters (``POOLINGS``, ``N_BOOT``, ``N_PERM``)."""
    return {"pooling": "question", "alt_pooling": "last", "n_boot": 20 if smoke else 200,
            "n_perm": 5 if smoke else 50, "n_splits": 20, "seed": 0}


def spectral_defaults(smoke: bool) -> dict:
    """Notebook 03's parameters (``POOLING``, ``ALPHAS``, ``N_BOOT``)."""
    return {"pooling": "question", "alphas": (0.5, 1.0, 2.0, float("inf")),
            "n_boot": 20 if smoke else 200, "seed": 0}


def patching_defaults(smoke: bool) -> dict:
    """Notebook 04's parameters (``N_EXAMPLES`` ... ``MIN_SET``)."""
    return {"n_examples": 8 if smoke else 64, "n_cross": 4 if smoke else 32,
            "components": ("resid", "attn", "mlp"), "positions": "all",
            "batch_size": 8 if smoke else 32, "min_gap": 0.1, "min_set": 2}


def lens_defaults(smoke: bool) -> dict:
    """Notebook 04's difference-lens parameters: examples steered (the flips), the first tokens,
    tokens listed per layer, texts of the per-token KL and positions ranked, and the decoder
    layers steered (``steer_layers``: None, every one; steering at layer ``i`` reruns the layers
    after it, so a subset such as every fourth layer cuts the lens's main cost on a CPU)."""
    return {"n_examples": 8 if smoke else 64, "n_first": 5, "k": 10, "n_texts": 8 if smoke else 32,
            "top": 20, "batch_size": 8 if smoke else 32, "min_gap": 0.1, "min_set": 2, "seed": 0,
            "steer_layers": None}


def _lens_key(p: dict) -> dict:
    """The lens parameters as its cache key: ``steer_layers=None`` (every layer, the default) is
    left out, so results cached before the knob existed are still read."""
    return {k: v for k, v in p.items() if not (k == "steer_layers" and v is None)}


def compare_defaults(smoke: bool) -> dict:
    """Notebook 05's parameters (``POOLING`` ... ``SEED``)."""
    return {"pooling": "question", "n_boot": 20 if smoke else 200, "n_splits": 20,
            "n_examples": 8 if smoke else 64, "min_set": 2, "batch_size": 8 if smoke else 32,
            "min_gap": 0.1, "n_boot_patch": 50 if smoke else 1000, "tol": 1e-5, "k": 8, "seed": 0}


def _params(defaults: dict, given: dict) -> dict:
    """``defaults`` updated with the ``given`` values that are not None (tuples kept tuples)."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TypeError(f"unknown stage parameter(s) {unknown}; choose from {sorted(defaults)}")
    out = dict(defaults, **{k: v for k, v in given.items() if v is not None})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def _cached(where: Path, stage: str, key: dict, compute, cls):
    key = dict(key, stage=stage, version=ANALYSIS_VERSION)
    return runs.cached(where / f"{stage}-{runs.hash_obj(key)}", key, compute, cls.load)


def analysis_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "analysis"


def ensure_results(cfg: Config, method: str = "sft") -> RunResults:
    """Notebook 01: a method's run (and what it starts from), every checkpoint's evaluation
    (cached beside it) and the flip table (``flips.json``), each built only if missing."""
    run_dir = train(cfg, method)
    ds = eval_set(cfg)
    evals = evaluate_run(run_dir, cfg, ds)
    table = flip_table(evals, cfg, ds)
    table.save(run_dir / "flips.json")
    return RunResults(run_dir, evals, table)


def run_on(cfg: Config) -> dict:
    """Where and in which dtype analyses run the checkpoints: ``models.placement(cfg)`` and
    ``models.analysis_dtype(cfg)`` (bf16 on the real presets' GPUs, float32 on one without native
    bf16); pooled values are upcast per batch."""
    return {**placement(cfg), "model_dtype": analysis_dtype(cfg)}


def run_probes(cfg: Config, run_dir: Path) -> list[str]:
    """``probe_texts(cfg)`` formatted with the run's own tokenizer (its chat template)."""
    first = runs.list_checkpoints(run_dir)[0][1]
    return probe_texts(cfg, AutoTokenizer.from_pretrained(str(first)) if cfg.chat else None)


def ensure_captures(cfg: Config, method: str = "sft",
                    poolings=CAPTURE_POOLINGS) -> dict[str, dict[int, Activations]]:
    """``{pooling: {step: Activations}}`` of every checkpoint on the probe set (cached)."""
    run_dir = train(cfg, method)
    texts = run_probes(cfg, run_dir)
    return {p: capture_run(run_dir, texts, pooling=p, **run_on(cfg)) for p in poolings}


def _probe_key(cfg: Config, method: str, p: dict) -> tuple[Path, list[str], dict]:
    run_dir = train(cfg, method)
    texts = run_probes(cfg, run_dir)
    key = {"weights": [(s, h) for s, _, h in runs.checkpoint_hashes(run_dir)],
           "probe_hash": runs.hash_obj(texts), "params": p}
    return run_dir, texts, key


def ensure_cka(cfg: Config, method: str = "sft", **given) -> CKAResult:
    """Notebook 02: layerwise CKA of every checkpoint vs the base with bootstrap bands and noise
    floors, the base x final cross-layer matrix with its permutation baseline, the alignment and
    the transition layer. Parameters: ``cka_defaults`` updated by ``given``."""
    p = _params(cka_defaults(cfg.smoke), given)
    run_dir, texts, key = _probe_key(cfg, method, p)

    def compute() -> CKAResult:
        caps = capture_run(run_dir, texts, pooling=p["pooling"], **run_on(cfg))
        steps = sorted(caps)
        keep, labels, dropped = varying_points(caps.values())
        acts = {s: caps[s].acts[keep] for s in steps}
        base, final = acts[steps[0]], acts[steps[-1]]
        curves, noise = {}, {}
        for d in tqdm((False, True), desc="cka", leave=False):
            curves[d] = {s: Band.of(controls.bootstrap_layerwise_cka(
                base, acts[s], n_boot=p["n_boot"], seed=p["seed"], debiased=d)) for s in steps[1:]}
            noise[d] = controls.noise_floor(base, final, n_splits=p["n_splits"], seed=p["seed"],
                                            debiased=d)["half_width"]
        mat = np.asarray(cka.cka_matrix(base, final), dtype=np.float64)
        trans = controls.transition_layer_bootstrap(base, final, n_boot=p["n_boot"], seed=p["seed"])
        by_step = np.stack([np.ones(len(labels))] + [curves[False][s].point for s in steps[1:]])
        alt = capture_run(run_dir, texts, pooling=p["alt_pooling"], **run_on(cfg))
        alt_keep, alt_labels, _ = varying_points(alt.values())
        return CKAResult(
            steps=steps, labels=labels, dropped=dropped, pooling=p["pooling"],
            classic=curves[False], debiased=curves[True], noise_classic=noise[False],
            noise_debiased=noise[True], matrix=mat,
            chance=controls.permutation_baseline(base, final, n_perm=p["n_perm"], seed=p["seed"]),
            path=[(int(i), int(j)) for i, j in layers.alignment_path(mat)],
            best=layers.best_match(mat), remap=float(layers.remapping_index(mat)),
            transition=(int(trans["point"]), int(trans["lo"]), int(trans["hi"])),
            departure=layers.first_departure(np.array(steps), by_step, 1 - noise[False]),
            alt_pooling=p["alt_pooling"], alt_labels=alt_labels,
            alt_curve=cka.layerwise_cka(*(alt[s].acts[alt_keep] for s in (steps[0], steps[-1]))))

    return _cached(analysis_dir(run_dir), "cka", key, compute, CKAResult)


def ensure_spectral(cfg: Config, method: str = "sft", **given) -> SpectralResult:
    """Notebook 03: RankMe and Rényi effective ranks per layer of every checkpoint with
    80 %-subsampling bootstrap intervals (the same subsamples for every checkpoint), RankMe against
    the probe-set size, and the CKA drift per layer. Parameters: ``spectral_defaults``."""
    p = _params(spectral_defaults(cfg.smoke), given)
    run_dir, texts, key = _probe_key(cfg, method, p)

    def compute() -> SpectralResult:
        caps = capture_run(run_dir, texts, pooling=p["pooling"], **run_on(cfg))
        steps = sorted(caps)
        keep, labels, dropped = varying_points([caps[steps[0]]])
        acts = {s: caps[s].acts[keep] for s in steps}
        # on the model's device: 29 layers x 200 subsamples of 1,319 x 1,024 probes took 31 CPU
        # minutes per checkpoint (benchmarks/RESULTS_real.md); float64 eigh runs on CUDA too
        dev = device_for(cfg)
        boot = {s: spectral.bootstrap_layer_metrics(acts[s].to(dev), alphas=p["alphas"],
                                                    n_boot=p["n_boot"], seed=p["seed"])
                for s in tqdm(steps, desc="spectral", leave=False)}
        ns = [n for n in (16, 32, 64, 128, 256, 512) if n <= len(texts)] or [len(texts)]
        return SpectralResult.from_bootstraps(
            boot, labels=labels, dropped=dropped, pooling=p["pooling"], alphas=p["alphas"],
            width=int(acts[steps[0]].shape[-1]), ns=ns,
            rank_vs_n=np.stack([spectral.rank_vs_n(acts[s], ns, seed=p["seed"])["rankme"]
                                for s in (steps[0], steps[-1])]),
            cka_drift=1 - cka.layerwise_cka(acts[steps[0]], acts[steps[-1]]))

    return _cached(analysis_dir(run_dir), "spectral", key, compute, SpectralResult)


def _lens(cfg: Config, p: dict, base_dir: Path, tuned_dir: Path, flips: list[dict],
          label: str) -> LensResult:
    """The difference lens, steering and per-token KL of ``tuned_dir`` against ``base_dir`` on
    the ``flips`` rows: the one computation behind ``ensure_lens`` and ``ensure_models_lens``."""
    base, tokenizer = load_model(base_dir, dtype=cfg.dtype, **placement(cfg))
    tuned, _ = load_model(tuned_dir, dtype=cfg.dtype, **placement(cfg))
    exs = patching.examples_from_table(flips, tokenizer, chat=cfg.chat)
    positions = {"first": list(range(p["n_first"])), "answer": "answer"}
    kw = dict(batch_size=p["batch_size"], progress=False)
    diff, tokens, steer, control = {}, {}, {}, {}
    for name, q in positions.items():
        diff[name] = patching.mean_difference(base, tuned, tokenizer, exs, positions=q, **kw)
        tokens[name] = {who: lens.top_tokens(lens.lens_logits(m, diff[name]), tokenizer, p["k"])
                        for who, m in (("base", base), ("tuned", tuned))}
        r = patching.weight_sweep(base, tuned, tokenizer, exs, layers=p["steer_layers"],
                                  mean_positions=q, kinds=("steer", "steer_shuffled"),
                                  min_gap=p["min_gap"], seed=p["seed"], **kw)
        steer[name], control[name] = r["steer"], r["steer_shuffled"]
    spans = patching.tokenize_examples(tokenizer, exs[: p["n_texts"]])
    texts = [tokenizer.decode(s["input_ids"]) for s in spans]
    kls = lens.token_kl(base, tuned, tokenizer, texts, **kw)
    return LensResult(positions=positions, diff=diff, tokens=tokens, steer=steer, control=control,
                      texts=texts, n_prompt=[s["n_prompt"] for s in spans], token_kl=kls,
                      ranked=lens.rank_positions(kls, tokenizer, texts, p["top"]), label=label)


def ensure_lens(cfg: Config, method: str = "sft", **given) -> LensResult:
    """Notebook 04, what changed: the mean tuned - base residual difference of the flips at their
    first tokens and at their answer-predicting positions, read through each model's final norm
    and head, added back to base (steering) against its shuffled control, and the per-token KL
    of tuned against base on the flips' prompt + gold solution. Parameters: ``lens_defaults``."""
    p = _params(lens_defaults(cfg.smoke), given)
    res = ensure_results(cfg, method)
    ds = eval_set(cfg)
    sets, labels = patching_sets(cfg, res, p["n_examples"], p["min_set"], ds)
    base_dir, tuned_dir = Path(res.evals[0].checkpoint), Path(res.evals[-1].checkpoint)
    key = _pair_key(cfg, base_dir, tuned_dir, ds, {"flips": sets["flips"]}, _lens_key(p))
    return _cached(analysis_dir(res.run_dir), "lens", key,
                   lambda: _lens(cfg, p, base_dir, tuned_dir, sets["flips"], labels["flips"]),
                   LensResult)


def patching_sets(cfg: Config, res: RunResults, n_examples: int, min_set: int,
                  ds=None) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """``({"flips": rows, "controls": rows}, labels)``: at most ``n_examples`` of each.

    A set with fewer than ``min_set`` rows (a smoke run's models solve nothing) is replaced by
    held-out problems ranked by how much the run raised their answer log-prob (largest gain for
    flips, smallest change for controls, never one twice) and labelled ``"<set> (substitute)"``.
    """
    ds = ds if ds is not None else eval_set(cfg)
    gain = np.array(res.evals[-1].answer_logprob) - np.array(res.evals[0].answer_logprob)
    sets: dict[str, list[dict]] = {}
    labels: dict[str, str] = {}
    for name in ("flips", "controls"):
        rows = getattr(res.table, name)
        if len(rows) >= min_set:
            sets[name], labels[name] = rows[:n_examples], name
            continue
        order = np.argsort(-gain) if name == "flips" else np.argsort(np.abs(gain))
        taken = {r["index"] for r in sets.get("flips", [])}
        room = n_examples if name == "controls" else min(n_examples, max(1, len(gain) // 2))
        idx = [int(i) for i in order if int(i) not in taken][:room]  # leave controls some rows
        if not idx:
            raise ValueError(f"too few evaluation problems ({len(gain)}) to patch both flips and "
                             "controls: evaluate at least 2")
        sets[name] = [{"index": i, "question": ds[i]["question"], "answer": ds[i]["answer"]}
                      for i in idx]
        labels[name] = f"{name} (substitute)"
        logger.info("only %d %s in this run: using the %d held-out problems with the %s change in "
                    "answer log-prob as a substitute", len(rows), name, len(idx),
                    "largest" if name == "flips" else "smallest")
    return sets, labels


def _set_key(sets: dict) -> dict:
    return {k: [(r["index"], r["question"], r["answer"]) for r in v] for k, v in sets.items()}


def _pair_key(cfg: Config, base_dir: Path, tuned_dir: Path, ds, sets: dict, p: dict) -> dict:
    """Cache key of an analysis of one base/tuned pair on ``sets`` (patching, the lens)."""
    return {"base": runs.weights_hash(base_dir), "tuned": runs.weights_hash(tuned_dir),
            "eval": dataset_hash(ds), "sets": _set_key(sets), "dtype": analysis_dtype(cfg),
            "chat": cfg.chat, "params": p}


def ensure_patching(cfg: Config, method: str = "sft", **given) -> PatchingResult:
    """Notebook 04: every set x component x direction sweep, resid denoise by positions,
    cross-layer patching, weight ablation (base = first checkpoint, tuned = last), the
    mean-ablated difference with one global mean and with the mean of the prompt rows and of the
    answer-predicting rows alone (``ablation["flips/mean_diff@<q>"]`` against the resid noise
    patch there, ``"flips/noise@<q>"``) and the CKA matrix of their decoder layers. Parameters:
    ``patching_defaults``."""
    p = _params(patching_defaults(cfg.smoke), given)
    res = ensure_results(cfg, method)
    ds = eval_set(cfg)
    sets, labels = patching_sets(cfg, res, p["n_examples"], p["min_set"], ds)
    base_dir, tuned_dir = Path(res.evals[0].checkpoint), Path(res.evals[-1].checkpoint)
    key = _pair_key(cfg, base_dir, tuned_dir, ds, sets, p)

    def compute() -> PatchingResult:
        base, tokenizer = load_model(base_dir, dtype=cfg.dtype, **placement(cfg))
        tuned, _ = load_model(tuned_dir, dtype=cfg.dtype, **placement(cfg))
        examples = {k: patching.examples_from_table(v, tokenizer, chat=cfg.chat)
                    for k, v in sets.items()}
        kw = dict(batch_size=p["batch_size"], min_gap=p["min_gap"], progress=False)
        jobs = [(s, c, d) for s in examples for c in p["components"] for d in ("denoise", "noise")]
        sweeps = {f"{s}/{c}/{d}": patching.layer_sweep(
            base, tuned, tokenizer, examples[s], component=c, positions=p["positions"],
            direction=d, **kw) for s, c, d in tqdm(jobs, desc="patching", leave=False)}
        by_pos = {q: sweeps["flips/resid/denoise"] if q == p["positions"] else patching.layer_sweep(
            base, tuned, tokenizer, examples["flips"], component="resid", positions=q, **kw)
            for q in ("all", "prompt", "answer")}
        cross = {s: patching.cross_layer_sweep(base, tuned, tokenizer, exs[: p["n_cross"]], **kw)
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
        texts = run_probes(cfg, res.run_dir)
        caps = [capture_cached(d, None, texts, None, "question",
                               cache_dir=res.run_dir / "activations", **run_on(cfg))
                for d in (base_dir, tuned_dir)]
        decoder_points = [i for i, n in enumerate(caps[0].hook_points) if n != "embed"]
        return PatchingResult(
            sets=sets, labels=labels, base_step=res.evals[0].step, final_step=res.evals[-1].step,
            sweeps=sweeps, by_pos=by_pos, cross=cross, ablation=ablation,
            cka_matrix=cka.cka_matrix(*(c.acts[decoder_points] for c in caps)))

    return _cached(analysis_dir(res.run_dir), "patching", key, compute, PatchingResult)


def _structure(own: dict, n_boot: int, seed: int, tol: float):
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


def compare_claims(last_states: list[dict], own: list[dict], matched: list[dict], init: dict,
                   n_boot: int = 200, seed: int = 0) -> list:
    """The three published claims over training seeds (one entry per seed in each list, as in
    ``CompareResult``'s ``last_states``, ``own`` and ``matched_unchanged``): one seed cannot
    tell. Each claim is about named stages (``sft``, ``dpo``, ``grpo``): it is tested only when
    models carry those labels."""
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
    """``compare_claims`` on every seed's ``ensure_compare`` result together: the verdicts the
    notebook and the README state (each seed's own ``claims`` saw one seed and cannot tell; with
    one result, those stored claims are returned)."""
    if not results:
        raise ValueError("claims_over_seeds needs at least one comparison, got none")
    if len(results) == 1:
        return list(results[0].claims)
    if any(r.methods != results[0].methods or r.init != results[0].init for r in results):
        raise ValueError("the seeds' comparisons differ in methods or inits: "
                         f"{[(r.methods, r.init) for r in results]}")
    return compare_claims([r.last_states for r in results], [r.own for r in results],
                          [r.matched_unchanged for r in results], results[0].init, n_boot, seed)


def over_seeds(ensure, cfg: Config, *args, n_seeds: int | None = None, **given) -> list:
    """``[ensure(c, *args, **given) for c in seed_configs(cfg, n_seeds)]``: one result per training
    seed (``cfg.n_seeds`` by default), the first for ``cfg`` itself; each cached as usual."""
    cfgs = seed_configs(cfg, n_seeds)
    return [ensure(c, *args, **given) for c in tqdm(cfgs, desc="seeds", disable=len(cfgs) < 2)]


def _matched_unchanged(base, sft, own: dict) -> dict[str, float]:
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


def _compare_models(cfg: Config, p: dict, methods: list[str], paths: dict[str, Path],
                    cache_of: dict[str, Path], init: dict[str, str], evals: dict,
                    sets: dict, set_labels: dict, texts: list[str]) -> CompareResult:
    """Notebook 05's measures of ``methods`` against the reference ``paths["base"]`` and each
    against its ``init`` (a key of ``paths``): the one computation behind ``ensure_compare`` (this
    project's runs) and ``ensure_models_compare`` (any checkpoints). ``evals``: a
    ``CheckpointEval`` of the reference and of each method (accuracy, paired tests);
    ``cache_of``: each model's activation cache root."""
    caps = {k: capture_cached(v, None, texts, pooling=p["pooling"],
                              cache_dir=cache_of[k] / "activations", **run_on(cfg))
            for k, v in paths.items()}
    keep, labels, dropped = varying_points(caps.values())
    last_states = {  # claims.effective_rank_claim: the last decoder layer at the last token
        k: capture_cached(v, None, texts, pooling="last", cache_dir=cache_of[k] / "activations",
                          **run_on(cfg)).acts[-1].double().numpy() for k, v in paths.items()}
    acts = {k: a.acts[keep] for k, a in caps.items()}
    seed, n_boot = p["seed"], p["n_boot"]
    cka_bands = {m: Band.of(controls.bootstrap_layerwise_cka(acts["base"], acts[m],
                                                             n_boot=n_boot, seed=seed))
                 for m in methods}
    floor = np.max([controls.noise_floor(acts["base"], acts[m], n_splits=p["n_splits"],
                                         seed=seed)["half_width"] for m in methods], axis=0)
    boot = {k: spectral.bootstrap_layer_metrics(a.to(device_for(cfg)), n_boot=n_boot,
                                                seed=seed)  # on the GPU, as in ensure_spectral
            for k, a in acts.items()}
    delta = {(m, ref): Band.of(spectral.paired_delta(boot[m], boot[ref])["rankme"])
             for m in methods for ref in ("base", init[m])}
    # weight drift reads the fp32 checkpoints as saved (every update visible); with a device map
    # (models larger than one GPU) on the CPU
    device = device_for(cfg) if cfg.device != "map" else torch.device("cpu")

    def fp32(k):
        return load_model(paths[k], dtype="float32", device=device)[0]

    base, tokenizer = load_model(paths["base"], dtype=cfg.dtype, **placement(cfg))
    same = analysis_dtype(cfg) == "float32" and cfg.device != "map"  # loaded in fp32 already
    base32 = base if same else fp32("base")
    examples = patching.examples_from_table(sets["flips"], tokenizer, chat=cfg.chat)
    patches, drift, own, sft32 = {}, {}, {}, None
    for m in tqdm(methods, desc="compare", leave=False):
        tuned, _ = load_model(paths[m], dtype=cfg.dtype, **placement(cfg))
        patches[m] = patching.layer_sweep(
            base, tuned, tokenizer, examples, component="resid", positions="all",
            direction="denoise", batch_size=p["batch_size"], min_gap=p["min_gap"],
            progress=False)
        tuned = tuned if same else fp32(m)
        if m == "sft":
            sft32 = tuned  # kept for the matched-norm control below
        drift[m] = weights.weight_drift(base32, tuned, tol=p["tol"], k=p["k"], progress=False)
        if init[m] == "base":
            own[m] = drift[m]
        else:
            own[m] = weights.weight_drift(fp32(init[m]), tuned, tol=p["tol"], k=p["k"],
                                          progress=False)
    structure, structure_controls = _structure(own, p["n_boot_patch"], seed, p["tol"])
    matched = _matched_unchanged(base32, sft32, own) if sft32 is not None else {}
    return CompareResult(
        methods=methods, init=init, accuracy={k: summary([e])[0] for k, e in evals.items()},
        n_eval=evals["base"].n, pooling=p["pooling"], labels=labels, dropped=dropped,
        cka=cka_bands, cka_floor=floor, rank_vs_base={m: delta[m, "base"] for m in methods},
        rank_vs_init={m: delta[m, init[m]] for m in methods}, patch_set=set_labels["flips"],
        patches=patches, drift=drift, own=own,
        patch_curves={m: Band.of(bootstrap_mean(r.delta, n_boot=p["n_boot_patch"], seed=seed))
                      for m, r in patches.items()},
        structure=structure, structure_controls=structure_controls,
        correct={k: list(e.correct) for k, e in evals.items()}, last_states=last_states,
        matched_unchanged=matched,
        claims=compare_claims([last_states], [own], [matched], init, n_boot, seed))


def ensure_compare(cfg: Config, methods=runs.METHODS, **given) -> CompareResult:
    """Notebook 05: SFT, DPO and GRPO against one base (the SFT run's step 0) and against each
    method's own init: accuracy, layerwise CKA with bootstrap bands and noise floor, paired
    Δ RankMe, resid denoise patching on SFT's flips, weight drift per tensor and the structure of
    each own update. Trains and evaluates what is missing. Parameters: ``compare_defaults``."""
    p = _params(compare_defaults(cfg.smoke), given)
    methods = list(methods)
    if "sft" not in methods:
        raise ValueError(f"compare needs 'sft' among the methods (its step 0 is the base), "
                         f"got {methods}")
    res = {m: ensure_results(cfg, m) for m in methods}
    sft = res["sft"]
    paths = {"base": Path(sft.evals[0].checkpoint)}
    paths |= {m: Path(r.evals[-1].checkpoint) for m, r in res.items()}
    run_of = {"base": sft.run_dir} | {m: r.run_dir for m, r in res.items()}
    evals = {"base": sft.evals[0]} | {m: r.evals[-1] for m, r in res.items()}
    hashes = {k: runs.weights_hash(v) for k, v in paths.items()}
    init = {}
    for m, r in res.items():  # a method's init: its step 0, named after the model it equals
        h = runs.weights_hash(r.evals[0].checkpoint)
        init[m] = next((k for k, v in hashes.items() if v == h), f"{m} init")
        if init[m] == f"{m} init":
            paths[init[m]], run_of[init[m]] = Path(r.evals[0].checkpoint), r.run_dir
            hashes[init[m]] = h
    ds = eval_set(cfg)
    sets, set_labels = patching_sets(cfg, sft, p["n_examples"], p["min_set"], ds)
    texts = run_probes(cfg, sft.run_dir)
    key = {"models": hashes, "init": init, "probe_hash": runs.hash_obj(texts),
           "sets": _set_key({"flips": sets["flips"]}), "dtype": analysis_dtype(cfg),
           "chat": cfg.chat, "params": p}
    smoke = "-smoke" if cfg.smoke else ""
    return _cached(cfg.run_root / "compare" / f"{cfg.preset}{smoke}", "compare", key,
                   lambda: _compare_models(cfg, p, methods, paths, run_of, init, evals, sets,
                                           set_labels, texts), CompareResult)


def given_models(cfg: Config, models: dict[str, str], revisions: dict | None = None,
                 same_shape: bool = True) -> dict[str, Path]:
    """``{"base": reference dir, label: dir, ...}`` for ``models`` ``{label: directory or hub
    id}`` (the first the reference), each resolved (``models.resolve_model`` at its revision) and
    checked before any work: complete, supported, one tokenizer and (``same_shape``) one
    shape."""
    if len(models) < 2:
        raise ValueError(f"compare --models needs a reference and at least one other model, got "
                         f"{list(models)}")
    labels = list(models)
    if "base" in labels[1:]:
        raise ValueError("'base' names the reference: list it first")
    revisions = revisions or {}
    unknown = sorted(set(revisions) - set(models))
    if unknown:
        raise ValueError(f"revisions for unknown models {unknown}; models: {labels}")
    paths = {("base" if i == 0 else k): resolve_model(v, revisions.get(k))
             for i, (k, v) in enumerate(models.items())}
    for path in paths.values():
        preflight(path, cfg.chat)
    check_compatible(paths, same_shape)
    return paths


def models_evals(cfg: Config, paths: dict[str, Path], ds=None) -> dict:
    """``{label: CheckpointEval}`` of given models on the evaluation set, each cached in the
    shared store by its weights (a published directory is never written)."""
    ds = ds if ds is not None else eval_set(cfg)
    return {k: evaluate_checkpoint(v, cfg, ds, beside=False) for k, v in paths.items()}


def cross_defaults(smoke: bool) -> dict:
    """``ensure_models_cka``'s parameters: notebook 02's pooling, bootstrap and shuffles."""
    d = cka_defaults(smoke)
    return {k: d[k] for k in ("pooling", "n_boot", "n_perm", "seed")}


def ensure_models_cka(cfg: Config, models: dict[str, str], revisions: dict | None = None,
                      **given) -> CrossCKAResult:
    """Cross-layer CKA of every model in ``models`` (``{label: directory or hub id}``, the first
    the reference) against the reference, for models of any depth, width or supported family
    that share the reference's tokenizer: every reference layer against every layer of the
    model on the probe prompts, with a bootstrap interval over probes, the tied best-matching
    reference layers of each model layer, and the shuffled-rows chance level
    (``controls.bootstrap_cka_matrix``, ``permutation_baseline``). Same-layer measures
    (``ensure_models_compare``) need one shape; this one does not. Cached under
    ``<root>/models/cka/`` by content hashes. Parameters: ``cross_defaults``."""
    p = _params(cross_defaults(cfg.smoke), given)
    paths = given_models(cfg, models, revisions, same_shape=False)
    differs = shape_differences({k: AutoConfig.from_pretrained(str(v)) for k, v in paths.items()})
    root = cfg.run_root / "models"
    tokenizer = AutoTokenizer.from_pretrained(str(paths["base"])) if cfg.chat else None
    texts = probe_texts(cfg, tokenizer)
    key = {"models": {k: runs.weights_hash(v) for k, v in paths.items()},
           "probe_hash": runs.hash_obj(texts), "dtype": analysis_dtype(cfg), "chat": cfg.chat,
           "params": p}

    def compute() -> CrossCKAResult:
        kept = {}
        for k, v in paths.items():
            cap = capture_cached(v, None, texts, pooling=p["pooling"],
                                 cache_dir=root / "activations", **run_on(cfg))
            keep, labels, dropped = varying_points([cap])
            kept[k] = (cap.acts[keep], labels, dropped)
        out = {f: {} for f in ("cka", "lo", "hi", "chance", "best", "ties")}
        names = [k for k in paths if k != "base"]
        for m in tqdm(names, desc="cross-layer CKA", disable=len(names) < 2):
            boot = controls.bootstrap_cka_matrix(kept["base"][0], kept[m][0], n_boot=p["n_boot"],
                                                 seed=p["seed"])
            for f in ("lo", "hi", "best", "ties"):
                out[f][m] = boot[f]
            out["cka"][m] = boot["point"]
            out["chance"][m] = controls.permutation_baseline(kept["base"][0], kept[m][0],
                                                             n_perm=p["n_perm"], seed=p["seed"])
        return CrossCKAResult(models=names, labels={k: v[1] for k, v in kept.items()},
                              dropped={k: v[2] for k, v in kept.items()}, shape=differs,
                              pooling=p["pooling"], n_probes=len(texts), **out)

    return _cached(root / "cka", "cross_cka", key, compute, CrossCKAResult)


def _model_flips(cfg: Config, evals: dict, label: str, p: dict, ds) -> tuple[dict, dict]:
    """``patching_sets`` between the reference's evaluation and ``label``'s."""
    pair = [evals["base"], evals[label]]
    res = RunResults(cfg.run_root / "models", pair, flip_table(pair, cfg, ds))
    return patching_sets(cfg, res, p["n_examples"], p["min_set"], ds)


def ensure_models_lens(cfg: Config, models: dict[str, str], revisions: dict | None = None,
                       **given) -> dict[str, LensResult]:
    """``ensure_lens`` for any checkpoints (``given_models``): ``{label: LensResult}`` of each
    model against the reference on the reference's wrong answers that model gets right, cached
    under ``<root>/models/`` by content hashes. Parameters: ``lens_defaults``."""
    p = _params(lens_defaults(cfg.smoke), given)
    paths = given_models(cfg, models, revisions)
    ds = eval_set(cfg)
    evals = models_evals(cfg, paths, ds)
    out = {}
    for m in (k for k in paths if k != "base"):
        sets, labels = _model_flips(cfg, evals, m, p, ds)
        key = _pair_key(cfg, paths["base"], paths[m], ds, {"flips": sets["flips"]}, _lens_key(p))
        out[m] = _cached(cfg.run_root / "models" / "lens", "lens", key,
                         lambda m=m, sets=sets, labels=labels: _lens(
                             cfg, p, paths["base"], paths[m], sets["flips"], labels["flips"]),
                         LensResult)
    return out


def ensure_models_compare(cfg: Config, models: dict[str, str], revisions: dict | None = None,
                          inits: str = "series", **given) -> CompareResult:
    """Notebook 05 on any checkpoints, no training: ``models`` ``{label: directory or hub id}``,
    the first the reference (stored as ``"base"``), the others compared with it and, for ``inits
    = "series"``, each with the model listed before it as its own init (a published series: SFT,
    then DPO, then RL); ``"reference"``: every model's init is the reference. Evaluated (shared
    store, by weights), captured, measured and cached under ``<root>/models/`` by the models'
    content hashes. The flips are the reference's wrong answers that the second model gets right.
    Checks before any work: supported architecture, one shape, one tokenizer
    (``models.check_compatible``). Parameters: ``compare_defaults``."""
    p = _params(compare_defaults(cfg.smoke), given)
    if inits not in ("series", "reference"):
        raise ValueError(f"inits must be 'series' or 'reference', got {inits!r}")
    paths = given_models(cfg, models, revisions)
    methods = [k for k in paths if k != "base"]
    init = {m: ("base" if inits == "reference" or i == 0 else methods[i - 1])
            for i, m in enumerate(methods)}
    ds = eval_set(cfg)
    evals = models_evals(cfg, paths, ds)
    root = cfg.run_root / "models"
    sets, set_labels = _model_flips(cfg, evals, methods[0], p, ds)
    tokenizer = AutoTokenizer.from_pretrained(str(paths["base"])) if cfg.chat else None
    texts = probe_texts(cfg, tokenizer)
    key = {"models": {k: runs.weights_hash(v) for k, v in paths.items()}, "init": init,
           "order": methods, "eval": dataset_hash(ds), "probe_hash": runs.hash_obj(texts),
           "sets": _set_key({"flips": sets["flips"]}), "dtype": analysis_dtype(cfg),
           "chat": cfg.chat, "params": p}
    return _cached(root / "compare", "compare", key,
                   lambda: _compare_models(cfg, p, methods, paths, dict.fromkeys(paths, root),
                                           init, evals, sets, set_labels, texts), CompareResult)
