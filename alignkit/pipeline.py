"""Cached pipeline stages: the one place the CLI and the notebooks get stage results from.

Each ``ensure_…`` function builds its result once and returns it; a second call (from the CLI,
a notebook or a test) reads it back from disk and computes nothing. Results live beside the run
they describe::

    <run_dir>/activations/            captures (``alignkit.activations.capture_run``)
    <run_dir>/analysis/cka-<key>/     result.json (structure, scalars, key) + arrays.npz
    <run_dir>/analysis/spectral-<key>/
    <run_dir>/analysis/patching-<key>/

``<key>`` hashes everything the result depends on: the weights hash of every checkpoint used
(verified against the files by ``train.list_checkpoints``), the probe texts or the patched
examples, the stage's parameters and ``ANALYSIS_VERSION``. A result whose recorded key does not
match the request, or whose files are damaged, is recomputed with a logged warning, never read.
Directories are written under a temporary name and renamed (``cache.atomic_dir``) under an
inter-process lock (``cache.build_lock``).

The stage parameters default to the notebooks' values (``cka_defaults``, ``spectral_defaults``,
``patching_defaults``; smoke sizes when ``cfg.smoke``), so a notebook run after the CLI finds the
CLI's files; ``tests/test_cli.py`` checks that the notebooks' parameters cells agree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from alignkit import cache
from alignkit.config import Config

logger = logging.getLogger(__name__)

# Bump when a stage's computation changes, so results of the old code are not reused.
ANALYSIS_VERSION = 1


# ----------------------------------------------------------------------------- defaults


def cka_defaults(smoke: bool) -> dict:
    """Parameters of ``ensure_cka`` used by notebook 02 (``POOLINGS[0]``, ``N_BOOT``, ``N_PERM``)."""
    return {"pooling": "mean", "n_boot": 20 if smoke else 200, "n_perm": 5 if smoke else 50, "n_splits": 20,
            "seed": 0}


def spectral_defaults(smoke: bool) -> dict:
    """Parameters of ``ensure_spectral`` used by notebook 03 (``POOLING``, ``ALPHAS``, ``N_BOOT``)."""
    return {"pooling": "mean", "alphas": (0.5, 1.0, 2.0, float("inf")), "n_boot": 20 if smoke else 200, "seed": 0}


def patching_defaults(smoke: bool) -> dict:
    """Parameters of ``ensure_patching`` used by notebook 04 (``N_EXAMPLES`` ... ``MIN_SET``)."""
    return {"n_examples": 8 if smoke else 128, "n_cross": 4 if smoke else 64, "components": ("resid", "attn", "mlp"),
            "positions": "all", "batch_size": 8 if smoke else 32, "min_gap": 0.1, "min_set": 2}


CAPTURE_POOLINGS = ("mean", "last")  # what notebooks 02 (both), 03 and 04 (mean) capture


# ----------------------------------------------------------------------------- runs


def analysis_dir(run_dir: str | Path) -> Path:
    """Where the analysis results of a run live."""
    return Path(run_dir) / "analysis"


def _checkpoint_hashes(run_dir: Path) -> list[tuple[int, Path, str]]:
    """``(step, dir, weights_hash)`` of every complete checkpoint (hashes verified by list_checkpoints)."""
    from alignkit.train import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"no complete checkpoints in {run_dir}")
    return [(s, d, json.loads((d / "manifest.json").read_text())["weights_hash"]) for s, d in ckpts]


def ensure_captures(cfg: Config, method: str = "sft", poolings=CAPTURE_POOLINGS) -> dict[str, dict]:
    """The captures notebooks 02–04 make: ``{pooling: {step: Activations}}`` of every checkpoint.

    Residual stream after every layer and the embedding output, on ``probe_texts(cfg)``, through
    ``capture_run`` (cached in ``<run_dir>/activations``).
    """
    from alignkit.activations import capture_run, probe_texts
    from alignkit.train import train

    run_dir = train(cfg, method)
    texts = probe_texts(cfg)
    return {p: capture_run(run_dir, texts, pooling=p) for p in poolings}


# ----------------------------------------------------------------------------- storage


def _encode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """JSON-able tree of ``obj``; arrays go to ``arrays`` and are referenced by name."""
    from alignkit.patching import PatchResult

    if isinstance(obj, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = obj
        return {"__array__": name}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, PatchResult):
        return {"__patch__": {f.name: _encode(getattr(obj, f.name), arrays) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, arrays) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a pipeline result")


def _decode(obj: Any, arrays) -> Any:
    from alignkit.patching import PatchResult

    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__array__" in obj:
        return arrays[obj["__array__"]]
    if "__patch__" in obj:
        return PatchResult(**{k: _decode(v, arrays) for k, v in obj["__patch__"].items()})
    if "__tuple__" in obj:
        return tuple(_decode(v, arrays) for v in obj["__tuple__"])
    return {_decode(k, arrays): _decode(v, arrays) for k, v in obj["__dict__"]}


def save_result(path: str | Path, key: dict, result: Any) -> None:
    """Write ``result`` (nested dicts/lists/tuples of arrays, scalars, PatchResults) atomically.

    ``path`` becomes a directory with ``result.json`` (the key, its digest and the structure) and
    ``arrays.npz`` (every array, loaded without pickle).
    """
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(result, arrays)
    with cache.atomic_dir(path) as tmp:
        np.savez(tmp / "arrays.npz", **arrays)
        cache.write_json_atomic(tmp / "result.json", {"key": key, "digest": cache.hash_obj(key), "result": tree})


def load_result(path: str | Path, key: dict | None = None) -> Any:
    """Read a ``save_result`` directory; with ``key``, raise ValueError unless it was stored under it."""
    path = Path(path)
    info = json.loads((path / "result.json").read_text())
    if key is not None and info.get("key") != json.loads(cache.stable_json(key)):
        raise ValueError(f"{path} was stored under another key (stale)")
    with np.load(path / "arrays.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return _decode(info["result"], arrays)


def _cached(run_dir: Path, stage: str, key: dict, compute: Callable[[], Any]) -> Any:
    """The stored result of ``stage`` under ``key`` in ``<run_dir>/analysis``, computed on a miss."""
    key = dict(key, stage=stage, version=ANALYSIS_VERSION)
    path = analysis_dir(run_dir) / f"{stage}-{cache.hash_obj(key)}"
    with cache.build_lock(path):
        if path.exists():
            try:
                result = load_result(path, key)
                logger.info("%s: reusing %s", stage, path)
                return result
            except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
                logger.warning("%s result %s is damaged or stale (%s); recomputing it", stage, path, e)
        result = compute()
        save_result(path, key, result)
        logger.info("%s: wrote %s", stage, path)
        return result


# ----------------------------------------------------------------------------- CKA (notebook 02)


def _params(defaults: dict, given: dict) -> dict:
    """A stage's parameters: ``defaults`` updated with the ``given`` values that are not None."""
    return dict(defaults, **{k: v for k, v in given.items() if v is not None})


def _probe_stage(cfg: Config, method: str, defaults: dict, given: dict) -> tuple[dict, Path, list[str], dict]:
    """Parameters (defaults updated with the given non-None ones), run directory, probe texts and the
    cache key (every checkpoint's weights hash, the probe set, the parameters) of a probe-set stage."""
    from alignkit.activations import probe_texts
    from alignkit.train import train

    p = _params(defaults, given)
    run_dir = train(cfg, method)
    texts = probe_texts(cfg)
    key = {"weights": [(s, h) for s, _, h in _checkpoint_hashes(run_dir)], "probe_hash": cache.hash_obj(texts),
           "params": p}
    return p, run_dir, texts, key


def ensure_cka(cfg: Config, method: str = "sft", pooling: str | None = None, n_boot: int | None = None,
               n_perm: int | None = None, n_splits: int | None = None, seed: int | None = None) -> dict:
    """What notebook 02 computes: layerwise CKA (base vs every checkpoint) with bootstrap bands,
    noise floors, the base × final cross-layer matrix with its permutation baseline, alignment and
    transition layer. Cached; parameters default to ``cka_defaults(cfg.smoke)``.

    Hook points whose rows are identical in any checkpoint (zero variance: CKA undefined) are
    dropped and listed in ``dropped``.

    Returns:
        dict with ``steps`` (checkpoint steps, base first), ``labels`` ``[L]`` (kept hook points:
        ``"embed"``, ``"0"``, ``"1"`` ...), ``dropped``, ``pooling``, ``curves``
        ``{debiased: {step: {"point", "lo", "hi"} [L]}}`` for every step after the base,
        ``noise`` ``{debiased: noise_floor(base, final)}`` (``half_width`` ``[L]`` ...),
        ``matrix`` and ``chance`` ``[L, L]`` (classic CKA base layer i × final layer j and its
        shuffled-rows mean), ``path`` (DTW alignment, list of ``(i, j)``), ``best`` ``[L]``,
        ``remap`` (float), ``transition`` (``transition_layer_bootstrap``: ``point``, ``lo``,
        ``hi``, ``samples``, ``curve``) and ``departure`` ``[L]`` (first step leaving the noise
        band, -1 if none).
    """
    from alignkit import cka
    from alignkit.activations import capture_run, varying_points

    p, run_dir, texts, key = _probe_stage(cfg, method, cka_defaults(cfg.smoke), dict(
        pooling=pooling, n_boot=n_boot, n_perm=n_perm, n_splits=n_splits, seed=seed))

    def compute() -> dict:
        caps = capture_run(run_dir, texts, pooling=p["pooling"])
        steps = sorted(caps)
        keep, labels, dropped = varying_points(caps.values())
        acts = {s: caps[s].acts[keep] for s in steps}
        base, final = acts[steps[0]], acts[steps[-1]]
        bar = tqdm(total=2 * (len(steps) - 1) + 5, desc="cka", leave=False)
        curves = {}
        for d in (False, True):
            curves[d] = {}
            for s in steps[1:]:
                b = cka.bootstrap_layerwise_cka(base, acts[s], n_boot=p["n_boot"], seed=p["seed"], debiased=d)
                curves[d][s] = {"point": b["point"], "lo": b["lo"], "hi": b["hi"]}
                bar.update()
        noise = {}
        for d in (False, True):
            noise[d] = cka.noise_floor(base, final, n_splits=p["n_splits"], seed=p["seed"], debiased=d)
            bar.update()
        mat = cka.cka_matrix(base, final)
        chance = cka.permutation_baseline(base, final, n_perm=p["n_perm"], seed=p["seed"])
        bar.update(2)
        trans = cka.transition_layer_bootstrap(base, final, n_boot=p["n_boot"], seed=p["seed"])
        bar.update()
        bar.close()
        by_step = np.stack([np.ones(len(labels))] + [curves[False][s]["point"] for s in steps[1:]])
        departure = cka.first_departure(np.array(steps), by_step, 1 - noise[False]["half_width"])
        mat = np.asarray(mat, dtype=np.float64)
        return {"steps": steps, "labels": labels, "dropped": dropped, "pooling": p["pooling"],
                "curves": curves, "noise": noise, "matrix": mat, "chance": np.asarray(chance),
                "path": [tuple(int(v) for v in ij) for ij in cka.alignment_path(mat)],
                "best": cka.best_match(mat), "remap": float(cka.remapping_index(mat)), "transition": trans,
                "departure": np.asarray(departure)}

    return _cached(run_dir, "cka", key, compute)


# ----------------------------------------------------------------------------- spectral (notebook 03)


def ensure_spectral(cfg: Config, method: str = "sft", pooling: str | None = None, alphas=None,
                    n_boot: int | None = None, seed: int | None = None) -> dict:
    """What notebook 03 computes: RankMe and Rényi effective ranks per layer of every checkpoint
    with 80 %-subsampling bootstrap intervals, and RankMe against the probe-set size for the base
    and the final checkpoint. Cached; parameters default to ``spectral_defaults(cfg.smoke)``.

    Hook points constant across prompts in the base capture are skipped (rank undefined).

    Returns:
        dict with ``steps``, ``labels`` ``[L]``, ``dropped``, ``pooling``, ``alphas``, ``boot``
        ``{step: spectral.bootstrap_layer_metrics(...)}`` (``{metric: {"point", "lo", "hi",
        "samples" [n_boot, L], ...}}``), ``ns`` (probe sizes) and ``rank_vs_n``
        ``{step: spectral.rank_vs_n(...)}`` for the base and the final step.
    """
    from alignkit import spectral
    from alignkit.activations import capture_run, varying_points

    p, run_dir, texts, key = _probe_stage(cfg, method, spectral_defaults(cfg.smoke), dict(
        pooling=pooling, alphas=None if alphas is None else tuple(alphas), n_boot=n_boot, seed=seed))

    def compute() -> dict:
        caps = capture_run(run_dir, texts, pooling=p["pooling"])
        steps = sorted(caps)
        keep, labels, dropped = varying_points([caps[steps[0]]])
        boot = {s: spectral.bootstrap_layer_metrics(caps[s].acts[keep], alphas=p["alphas"], n_boot=p["n_boot"],
                                                    seed=p["seed"])
                for s in tqdm(steps, desc="spectral", leave=False)}
        ns = [n for n in (16, 32, 64, 128, 256, 512) if n <= len(texts)]
        rv = {s: spectral.rank_vs_n(caps[s].acts[keep], ns, seed=p["seed"]) for s in (steps[0], steps[-1])}
        return {"steps": steps, "labels": labels, "dropped": dropped, "pooling": p["pooling"],
                "alphas": tuple(p["alphas"]), "boot": boot, "ns": ns, "rank_vs_n": rv}

    return _cached(run_dir, "spectral", key, compute)


# ----------------------------------------------------------------------------- patching (notebook 04)


def patching_sets(cfg: Config, results: list[dict], table: dict, n_examples: int, min_set: int,
                  ds=None) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """The examples notebook 04 patches: flips and controls from the flip table, at most
    ``n_examples`` each.

    A set with fewer than ``min_set`` rows (a smoke run's models solve nothing) is replaced by
    held-out problems ranked by how much the run raised their answer log-prob (largest gain for
    flips, smallest change for controls, never the same problem twice), labelled a substitute.

    Returns:
        ``(sets, labels)``: ``{"flips": rows, "controls": rows}`` (rows with ``index``,
        ``question``, ``answer``) and ``{"flips": "flips" or "flips (substitute)", ...}``.
    """
    from alignkit.evaluate import eval_set

    ds = ds if ds is not None else eval_set(cfg)
    gain = np.array(results[-1]["answer_logprob"]) - np.array(results[0]["answer_logprob"])
    sets: dict[str, list[dict]] = {}
    labels: dict[str, str] = {}
    for name in ("flips", "controls"):
        rows = table[name]
        if len(rows) >= min_set:
            sets[name], labels[name] = rows[:n_examples], name
            continue
        order = np.argsort(-gain) if name == "flips" else np.argsort(np.abs(gain))
        taken = {r["index"] for r in sets.get("flips", [])}
        idx = [int(i) for i in order if int(i) not in taken][:n_examples]
        sets[name] = [{"index": i, "question": ds[i]["question"], "answer": ds[i]["answer"]} for i in idx]
        labels[name] = f"{name} (substitute)"
        logger.info("only %d %s in this run: using the %d held-out problems with the %s change in answer log-prob "
                    "as a substitute", len(rows), name, len(idx), "largest" if name == "flips" else "smallest")
    return sets, labels


def ensure_patching(cfg: Config, method: str = "sft", n_examples: int | None = None, n_cross: int | None = None,
                    components=None, positions=None, batch_size: int | None = None, min_gap: float | None = None,
                    min_set: int | None = None) -> dict:
    """What notebook 04 computes: activation-patching sweeps (every set × component × direction),
    the resid denoise sweep by patched positions, cross-layer patching and weight ablation, base
    (first checkpoint) vs tuned (last). Cached; parameters default to ``patching_defaults``.

    Returns:
        dict with ``sets`` and ``labels`` (``patching_sets``), ``base_step``, ``final_step``,
        ``sweeps`` ``{(set, component, direction): PatchResult [n, L]}``, ``by_pos``
        ``{"all" | "prompt" | "answer": PatchResult}`` (flips, resid, denoise), ``cross``
        ``{set: PatchResult [n_cross, L, L]}`` and ``weights`` ``{set: {"revert", "graft",
        "mean_diff": PatchResult}}``.
    """
    import torch

    from alignkit import patching
    from alignkit.data import dataset_hash
    from alignkit.evaluate import ensure_results, eval_set
    from alignkit.tiny import load_model

    p = _params(patching_defaults(cfg.smoke), dict(
        n_examples=n_examples, n_cross=n_cross, components=components, positions=positions, batch_size=batch_size,
        min_gap=min_gap, min_set=min_set))
    p["components"] = tuple(p["components"])
    run_dir, res, table = ensure_results(cfg, method)
    ds = eval_set(cfg)
    sets, labels = patching_sets(cfg, res, table, p["n_examples"], p["min_set"], ds)
    base_dir, tuned_dir = Path(res[0]["checkpoint"]), Path(res[-1]["checkpoint"])
    key = {"base": cache.weights_hash(base_dir), "tuned": cache.weights_hash(tuned_dir), "eval": dataset_hash(ds),
           "sets": {k: [(r["index"], r["question"], r["answer"]) for r in v] for k, v in sets.items()},
           "dtype": cfg.dtype, "chat": cfg.chat, "params": p}

    def compute() -> dict:
        device = "cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
        base, tokenizer = load_model(base_dir, dtype=cfg.dtype, device=device)
        tuned, _ = load_model(tuned_dir, dtype=cfg.dtype, device=device)
        examples = {k: patching.examples_from_table(v, tokenizer, chat=cfg.chat) for k, v in sets.items()}
        kw = dict(batch_size=p["batch_size"], min_gap=p["min_gap"])
        jobs = [(s, c, d) for s in examples for c in p["components"] for d in ("denoise", "noise")]
        extra = [q for q in ("all", "prompt", "answer") if q != p["positions"]]
        bar = tqdm(total=len(jobs) + len(extra) + 2 * len(examples), desc="patching", leave=False)
        sweeps = {}
        for s, comp, direction in jobs:
            sweeps[s, comp, direction] = patching.layer_sweep(base, tuned, tokenizer, examples[s], component=comp,
                                                              positions=p["positions"], direction=direction, **kw)
            bar.update()
        by_pos = {}
        for q in ("all", "prompt", "answer"):
            if q == p["positions"]:
                by_pos[q] = sweeps["flips", "resid", "denoise"]
                continue
            by_pos[q] = patching.layer_sweep(base, tuned, tokenizer, examples["flips"], component="resid",
                                             positions=q, direction="denoise", **kw)
            bar.update()
        cross = {}
        for s, exs in examples.items():
            cross[s] = patching.cross_layer_sweep(base, tuned, tokenizer, exs[: p["n_cross"]], **kw)
            bar.update()
        weights = {}
        for s, exs in examples.items():
            weights[s] = patching.weight_sweep(base, tuned, tokenizer, exs, **kw)
            bar.update()
        bar.close()
        return {"sets": sets, "labels": labels, "base_step": res[0]["step"], "final_step": res[-1]["step"],
                "sweeps": sweeps, "by_pos": by_pos, "cross": cross, "weights": weights}

    return _cached(run_dir, "patching", key, compute)


__all__ = [
    "ANALYSIS_VERSION", "CAPTURE_POOLINGS", "cka_defaults", "spectral_defaults", "patching_defaults",
    "analysis_dir", "ensure_captures", "save_result", "load_result", "ensure_cka",
    "ensure_spectral", "patching_sets", "ensure_patching",
]
