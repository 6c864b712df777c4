"""alignkit: where inside a language model does post-training change it?

The import graph is the pipeline, read bottom to top: a module imports only modules listed
before it here (``tests/test_layout.py`` enforces it, and forbids cycles).

    config     presets and every knob
    data       GSM8K rows, the generator, the one prompt format, eval/probe sets, stop rules
    models     loading any checkpoint, ``device_for``, the one architecture table
    hooks      reading and overwriting hook points
    runs       run and checkpoint directories, manifests, the content-keyed cache
    tiny       the embedded base (tokenizer + small Qwen3 pretrained here)
    evaluate   generation, accuracy, answer log-prob, flips
    train      SFT / DPO / GRPO through TRL (glue only)
    capture    pooled activations of hook points, cached
    stats      input checks, intervals and summaries shared by the measures (gap fraction, tied
               best candidates, McNemar, the across-seed verdict rule)
    cka, controls, layers, spectral, weights, patching
               the measures: functions of arrays (and, for patching and weights, of two models)
    lens       what changed: the activation-difference lens and per-token KL of two models
    claims     verdicts on published claims, each computing the paper's own quantity
    results    what each stage returns: small classes with save/load
    stages     one cached ``ensure_*`` per notebook
    report     ``summarize_*``: the sentences under each notebook, from a stage's result
    plots      figures only
    cli        ``python -m alignkit``
"""

LAYERS = ("config", "data", "models", "hooks", "runs", "tiny", "evaluate", "train", "capture",
          "stats", "cka", "controls", "layers", "spectral", "weights", "patching", "lens", "claims",
          "results", "stages", "report", "plots", "cli", "__main__")

__version__ = "0.1.0"
