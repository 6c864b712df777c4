"""Every summary the README quotes, in one place: the cached results it reads and the words it
computes from them. The notebooks publish them (``publish``) beside their figures;
``regenerate`` recomputes them read-only from the cache (nothing trained or computed) so that
``tools/readme.py`` can check that a published summary is what its results give."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from alignkit import runs
from alignkit.analyses import behaviour, cka, compare, lens, observations, patching, spectral
from alignkit.analyses.common import each_seed, over_seeds, summary_text, write_summary
from alignkit.config import Config


@dataclasses.dataclass(frozen=True)
class Summary:
    """``load(cfg)``: the cached results (one per training seed); ``words(results, cfg)``: the
    summary's text."""

    load: Callable[[Config], Any]
    words: Callable[[Any, Config], str]


def _sft(ensure: Callable) -> Callable[[Config], list]:
    def load(cfg: Config) -> list:
        return over_seeds(ensure, cfg, "sft")
    return load


def _pooling(cfg: Config) -> tuple[list, list]:
    return over_seeds(cka.ensure, cfg, "sft"), over_seeds(cka.ensure_old_pooling, cfg, "sft")


def _methods(cfg: Config) -> list:
    return over_seeds(compare.ensure, cfg, runs.METHODS)


def _observations(cfg: Config) -> tuple[list, str]:
    pats = over_seeds(patching.ensure, cfg, "sft")
    table = observations.table(over_seeds(cka.ensure, cfg, "sft"),
                               over_seeds(spectral.ensure, cfg, "sft"), pats)
    return table, pats[0].metric


_BEHAVIOUR, _CKA, _SPECTRAL = _sft(behaviour.ensure), _sft(cka.ensure), _sft(spectral.ensure)
_PATCHING, _LENS = _sft(patching.ensure), _sft(lens.ensure)

SUMMARIES: dict[str, Summary] = {
    "00_observations": Summary(_observations,
                               lambda r, cfg: observations.summarize(r[0], metric=r[1])),
    "01_sft_train": Summary(_BEHAVIOUR, lambda r, cfg: behaviour.summarize(r)),
    "01_sft_train_seeds": Summary(_BEHAVIOUR, lambda r, cfg: each_seed(r, behaviour.summarize)),
    "02_cka": Summary(_CKA, lambda r, cfg: cka.summarize(r)),
    "02_cka_seeds": Summary(_CKA, lambda r, cfg: each_seed(r, cka.summarize)),
    "02_cka_pooling": Summary(_pooling, lambda r, cfg: cka.summarize_pooling(*r)),
    "03_spectral": Summary(_SPECTRAL, lambda r, cfg: spectral.summarize(r)),
    "03_spectral_seeds": Summary(_SPECTRAL, lambda r, cfg: each_seed(r, spectral.summarize)),
    "04_patching": Summary(_PATCHING, lambda r, cfg: patching.summarize(r, cfg)),
    "04_patching_seeds": Summary(_PATCHING, lambda r, cfg: each_seed(
        r, lambda one: patching.summarize(one, cfg))),
    "04_lens": Summary(_LENS, lambda r, cfg: lens.summarize(r, cfg)),
    "04_lens_seeds": Summary(_LENS, lambda r, cfg: each_seed(
        r, lambda one: lens.summarize(one, cfg))),
    "05_post_training_compare": Summary(_methods, lambda r, cfg: compare.summarize(r, cfg)),
    "05_post_training_compare_seeds": Summary(_methods, lambda r, cfg: each_seed(
        r, lambda one: compare.summarize(one, cfg, with_claims=False))),
}


def publish(name: str, results: Any, cfg: Config, out_dir: str | Path, smoke: bool = False) -> str:
    """The summary ``name`` of ``results`` (what ``SUMMARIES[name].load(cfg)`` returns) written
    atomically as ``<out_dir>/<name>.md``, what the README and docs/ quote; returns its text for
    the notebook to show."""
    if name not in SUMMARIES:
        raise KeyError(f"unknown summary {name!r}; known: {sorted(SUMMARIES)}")
    return write_summary(SUMMARIES[name].words(results, cfg), name, out_dir, smoke)


def regenerate(cfg: Config, names: list[str] | None = None) -> tuple[dict[str, str], list[Path]]:
    """``({name: text as published}, cache entries read)``: every summary (or ``names``)
    recomputed from the cached results of ``cfg``'s runs, reading only (``runs.read_only``):
    ``runs.NotCached`` names the first result or run that is not cached."""
    names = list(SUMMARIES) if names is None else names
    loaded: dict[Callable, Any] = {}
    texts = {}
    with runs.read_only() as read:
        for name in names:
            s = SUMMARIES[name]
            if s.load not in loaded:
                loaded[s.load] = s.load(cfg)
            texts[name] = summary_text(s.words(loaded[s.load], cfg), cfg.smoke)
    return texts, list(dict.fromkeys(read))
