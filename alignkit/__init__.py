"""alignkit: where inside a language model does post-training change it?

The import graph is the pipeline: a module imports only modules listed before it in ``LAYERS``
(``tests/test_layout.py`` enforces it and forbids cycles); docs/layout.md says what each holds.
"""

LAYERS = ("config", "data", "models", "hooks", "runs", "pretrained", "tiny", "evaluate", "train",
          "capture", "stats", "cka", "controls", "layers", "spectral", "weights", "patching",
          "lens", "claims", "analyses", "plots", "figures", "cli", "__main__")

__version__ = "0.1.0"
