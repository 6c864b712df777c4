"""One module per analysis (docs/layout.md), each with its knobs (a section of ``Config``), its
result (fields, and derived quantities as methods), ``ensure(cfg, checkpoints)`` (cached) and
``summarize(results, cfg=None)`` over a list of training seeds (one seed is the list of one).
``checkpoints`` is a ``common.Checkpoints``: a training run's (``common.from_run``), the three
methods' runs (``common.from_methods``) or given models (``common.from_models``, ``--models``).
A module imports only those before it in ``LAYERS``; ``REGISTRY`` makes a subcommand of each.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

LAYERS = ("common", "behaviour", "cka", "spectral", "patching", "lens", "observations", "weights",
          "compare", "summaries")


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A subcommand: the analysis module (imported when used, so ``--help`` loads no torch), what
    it does, its notebook, and the runs it reads by default (a method's run, or the three
    methods' runs for the comparison)."""

    name: str
    module_name: str
    help: str
    notebook: str
    methods: str | tuple[str, ...] = "sft"

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"alignkit.analyses.{self.module_name}")


REGISTRY: dict[str, Analysis] = {a.name: a for a in (
    Analysis("evaluate", "behaviour", "evaluate every checkpoint and write the flip table", "01"),
    Analysis("cka", "cka", "layerwise and cross-layer CKA with bands and controls", "02"),
    Analysis("spectral", "spectral", "effective ranks per layer and checkpoint", "03"),
    Analysis("patching", "patching", "activation patching, cross-layer patching and weight "
             "ablation", "04"),
    Analysis("lens", "lens", "what changed: the difference lens (tokens the mean activation "
             "difference promotes, steering with it against a shuffled control) and per-token "
             "KL", "04"),
    Analysis("weights", "weights", "weight drift of every checkpoint: size, sparsity, rank and "
             "directions of each update", "05"),
    Analysis("compare", "compare", "SFT, DPO and GRPO against one base and their own inits, and "
             "the published claims", "05", ("sft", "dpo", "grpo")),
)}
