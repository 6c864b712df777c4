"""``python -m alignkit <command>``: every stage of the notebooks, headless, through the same
cached ``alignkit.stages`` calls, so a notebook opened after the CLI reads its results.

Bad input exits with status 2 and a one-line message; any other failure with status 1 and one
line (the traceback with ``-v``). Package imports are deferred so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("alignkit.cli")

METHODS = ("sft", "dpo", "grpo")  # alignkit.runs.METHODS, spelled out: --help imports no torch
STAGES = ("train", "evaluate", "capture", "cka", "spectral", "patching", "lens", "compare",
          "figures")
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


TOP_EPILOG = """\
examples:
  python -m alignkit all --smoke                 # whole pipeline at smoke sizes (minutes on a CPU)
  python -m alignkit train sft                   # tiny preset: build the base, SFT with checkpoints
  python -m alignkit --preset qwen3-0.6b-base --model /data/Qwen3-0.6B-Base \\
      --data /data/gsm8k/train.jsonl --eval-data /data/gsm8k/test.jsonl all --skip compare
  python -m alignkit --set sft.max_steps=50 --root /scratch/runs cka
  accelerate launch -m alignkit --preset qwen3-0.6b-base train sft  # several GPUs, then 1 process

Global options may come before or after the command. Stages are cached under ROOT (default
$ALIGNKIT_HOME or the repository's runs/): base/tiny-<key>/ (the embedded base),
<method>/<preset>[-smoke]-<key>/ (checkpoints/, flips.json, activations/, analysis/),
compare/<preset>[-smoke]/ and reports/<preset>[-smoke]/ (notebooks executed by `figures`; the
figures of any run but the default one under reports/<preset>[-smoke]-<hash>/images/).
"""

COMMANDS = {  # command: (what it does, an example, what it writes; under ROOT)
    "train": ("fine-tune the base with SFT, DPO or GRPO on the checkpoint schedule",
              "train dpo --set dpo.beta=0.2   # trains SFT first (DPO starts from it)",
              "<method>/<preset>-<key>/checkpoints/step-NNNNNN/ (from_pretrained directories "
              "with manifest.json) and train_log.json; an interrupted run resumes"),
    "evaluate": ("evaluate every checkpoint of a run and write the flip table",
                 "evaluate --method grpo --set eval.n_eval=100",
                 "eval-<key>.json in every checkpoint and flips.json in the run (notebook 01)"),
    "capture": ("capture pooled residual-stream activations of every checkpoint",
                "capture --method dpo --pooling mean", "<run>/activations/ (notebooks 02-04)"),
    "cka": ("layerwise and cross-layer CKA with bands and controls (notebook 02)",
            "cka --method grpo", "<run>/analysis/cka-<key>/ (alignkit.stages.ensure_cka)"),
    "spectral": ("effective ranks per layer and checkpoint (notebook 03)", "spectral --smoke",
                 "<run>/analysis/spectral-<key>/ (alignkit.stages.ensure_spectral)"),
    "patching": ("activation patching, cross-layer patching and weight ablation (notebook 04)",
                 "patching --method dpo",
                 "<run>/analysis/patching-<key>/ (alignkit.stages.ensure_patching)"),
    "lens": ("what changed: the difference lens (tokens the mean activation difference promotes, "
             "steering with it against a shuffled control) and per-token KL (notebook 04)",
             "lens --method dpo", "<run>/analysis/lens-<key>/ (alignkit.stages.ensure_lens)"),
    "compare": ("SFT, DPO and GRPO against one base and their own inits (notebook 05); with "
                "--models, any checkpoints (directories or hub ids) against the first, no "
                "training",
                "compare --models base=Qwen/Qwen3-0.6B-Base sft=Qwen/Qwen3-0.6B "
                "--preset qwen3-0.6b-base",
                "compare/<preset>/compare-<key>/ (alignkit.stages.ensure_compare), after training "
                "and evaluating what is missing; with --models, models/compare/compare-<key>/ "
                "(alignkit.stages.ensure_models_compare)"),
    "figures": ("execute the notebooks headless on the cached results (README figures)",
                "figures --smoke --notebooks 02 03",
                "reports/<preset>[-smoke]/NN_*.ipynb, the notebooks run with this command's "
                "preset and overrides injected after their parameters cell, and their figures: "
                "images/ (the README's) for the default run only (tiny preset, full size, no "
                "override but --root), reports/<preset>[-smoke]-<hash>/images/ otherwise"),
    "all": ("run every stage in order: " + ", ".join(STAGES) + " (SFT is trained by train; "
            "compare also trains DPO and GRPO from it), logging each stage's time",
            "all --smoke --skip compare figures", "everything above"),
}


def _add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Global options; on subcommands with SUPPRESS defaults, never overwriting the top level."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--preset", default=d("tiny"), metavar="NAME",
                   help="config preset: tiny (offline, CPU; default), qwen3-0.6b-base "
                        "(Qwen/Qwen3-0.6B-Base, plain prompts) or qwen3-0.6b (Qwen/Qwen3-0.6B, "
                        "its chat template without thinking); real presets want a GPU")
    g.add_argument("--smoke", action="store_true", default=d(False),
                   help="shrink every size (CI); smoke runs never write images/")
    g.add_argument("--set", dest="overrides", action="append", default=d([]), metavar="KEY=VALUE",
                   help="override a config field by dotted key, e.g. --set sft.max_steps=50 or "
                        "--set sft.schedule=[0,0.5,1]; VALUE is parsed as JSON when it can be, "
                        "else taken as a string (repeatable)")
    g.add_argument("--model", default=d(None), metavar="PATH",
                   help="a local from_pretrained model directory (config.json, weights, "
                        "tokenizer) as the base (for a hub id use --set model=ID)")
    g.add_argument("--data", default=d(None), metavar="PATH",
                   help="local GSM8K-format .jsonl (question/answer per line) for training")
    g.add_argument("--eval-data", dest="eval_data", default=d(None), metavar="PATH",
                   help="local GSM8K-format .jsonl for evaluation and probes (default: --data)")
    g.add_argument("--root", default=d(None), metavar="DIR",
                   help="where runs live (default: $ALIGNKIT_HOME, else the repository's runs/)")
    g.add_argument("--seeds", type=int, default=d(None), metavar="N",
                   help="training seeds: every stage runs once per seed and the summaries say "
                        "what holds in how many (default: the preset's n_seeds, 3 for tiny, 2 "
                        "with --smoke, 1 for the real presets); same as --set n_seeds=N")
    g.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="debug logging, and tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m alignkit`` argument parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m alignkit", formatter_class=fmt, epilog=TOP_EPILOG,
        description="alignkit, headless: train, evaluate and analyse post-training (SFT, DPO, "
                    "GRPO) with the same cached pipeline as the notebooks.")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name):
        what, example, writes = COMMANDS[name]
        p = sub.add_parser(name, help=what, description=what[:1].upper() + what[1:] + ".",
                           formatter_class=fmt,
                           epilog=f"examples:\n  python -m alignkit {example}\n\nWrites {writes}.")
        _add_common(p, suppress=True)
        if name not in ("train", "figures", "compare"):
            p.add_argument("--method", choices=METHODS, default="sft", help="the post-training run "
                           "to analyse (default: sft; dpo and grpo start from the SFT run)")
        return p

    for name in COMMANDS:
        p = add(name)
        if name == "train":
            p.add_argument("method", choices=METHODS, help="post-training method")
        elif name == "capture":
            p.add_argument("--pooling", nargs="+", choices=("question", "mean", "last"),
                           default=["question", "mean", "last"],
                           help="poolings (default: question mean last; question: the mean over "
                                "the question's own tokens, the shared template left out)")
        elif name == "compare":
            p.add_argument("--models", nargs="+", metavar="NAME=MODEL", default=None,
                           help="compare these checkpoints instead of training: NAME=directory or "
                                "hub id, the first the reference, e.g. base=Qwen/Qwen3-0.6B-Base "
                                "sft=Qwen/Qwen3-0.6B (the reference is reported as 'base')")
            p.add_argument("--revision", action="append", default=[], metavar="NAME=REV",
                           help="hub revision (branch, tag or commit) of one --models entry "
                                "(repeatable)")
            p.add_argument("--inits", choices=("series", "reference"), default="series",
                           help="each model's own init: the model listed before it (a published "
                                "series; default) or the reference for all")
        if name in ("lens", "compare"):
            p.add_argument("--steer-layers", nargs="+", type=int, default=None, metavar="L",
                           help="decoder layers the difference lens steers at (default: every "
                                "one; each reruns the layers after it, so e.g. 0 4 8 12 16 20 24 "
                                "27 cuts the lens's cost on a CPU)" + (
                                    "; with --models only" if name == "compare" else ""))
        if name == "figures":
            p.add_argument("--notebooks", nargs="+", metavar="NN", default=None,
                           help="notebook numbers or names to run, e.g. 02 03 (default: all)")
        elif name == "all":
            p.add_argument("--skip", nargs="+", choices=STAGES, default=[], metavar="STAGE",
                           help="stages to leave out, e.g. --skip figures")
        if name in ("figures", "all"):
            p.add_argument("--notebook-dir", type=Path, default=NOTEBOOK_DIR, metavar="DIR",
                           help=f"where the .ipynb files are (default: {NOTEBOOK_DIR})"
                           if name == "figures" else argparse.SUPPRESS)
    return parser


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, booleans, null, lists), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


BOOL_OR_AUTO = {"gradient_checkpointing"}  # fields that take true, false or "auto"


def _coerce(key: str, value: Any, current: Any) -> Any:
    """``value`` converted to the type of the field's preset value, or UsageError naming both."""
    if key in BOOL_OR_AUTO:
        if isinstance(value, bool) or value == "auto":
            return value
        raise UsageError(f"config key {key!r} expects true, false or auto, got {value!r}")
    if dataclasses.is_dataclass(current):
        raise UsageError(f"config key {key!r} is a section; set one of its fields, e.g. "
                         f"{key}.{dataclasses.fields(current)[0].name}=...")
    if current is None:
        return value
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, bool) != isinstance(value, bool) or not isinstance(value, type(current)):
        raise UsageError(f"config key {key!r} expects {type(current).__name__} (preset value "
                         f"{current!r}), got {value!r}")
    return value


def parse_overrides(items: Sequence[str], preset: str = "tiny",
                    smoke: bool = False) -> dict[str, Any]:
    """``["sft.max_steps=50"]`` -> ``{"sft.max_steps": 50}``, typed like the preset's fields;
    UsageError for an item without ``=``, an unknown preset or key, or a value of another type."""
    from alignkit.config import get_config, get_value

    try:
        ref = get_config(preset, smoke=smoke)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            current = get_value(ref, key)
        except ValueError as e:
            raise UsageError(str(e)) from None
        out[key] = _coerce(key, parse_value(text), current)
    return out


def check_model_dir(path: str | os.PathLike) -> Path:
    """The absolute path of a complete from_pretrained directory (``models.check_model_dir``), or
    UsageError saying what is missing."""
    from alignkit.models import check_model_dir as check

    try:
        return check(path).resolve()
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None


def check_data_file(path: str | os.PathLike, flag: str) -> Path:
    """The absolute path of an existing data file, or UsageError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    return p.resolve()


def config_from_args(args: argparse.Namespace):
    """``(cfg, overrides)`` from the global options (``get_config(preset, smoke, overrides)`` gives
    ``cfg`` again); every check runs before anything is loaded or trained."""
    from alignkit.config import get_config

    overrides = parse_overrides(args.overrides, args.preset, args.smoke)
    if args.model is not None:
        overrides["model"] = str(check_model_dir(args.model))
    if args.data is not None:
        overrides["data_source"] = str(check_data_file(args.data, "--data"))
    if args.eval_data is not None:
        overrides["eval_source"] = str(check_data_file(args.eval_data, "--eval-data"))
    if args.seeds is not None:
        if args.seeds < 1:
            raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
        overrides["n_seeds"] = args.seeds
    if args.root is not None:
        overrides["root"] = str(Path(args.root).expanduser().resolve())
    for key in ("data_source", "eval_source"):  # a local file given through --set
        src = overrides.get(key)
        hub = ("synthetic", "openai/gsm8k")
        if isinstance(src, str) and src not in hub and not Path(src).is_file():
            raise UsageError(f"{key} {src}: no such file")
    try:
        cfg = get_config(args.preset, smoke=args.smoke, overrides=overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.data is not None and args.eval_data is None and cfg.eval_source is None:
        logger.warning("--data without --eval-data: evaluation and probes read the first %s rows "
                       "of %s, the training file", cfg.eval.n_eval, cfg.data_source)
    return cfg, overrides


def stage_train(cfg, method: str) -> list[Path]:
    """Train every seed's run (cached) and log the checkpoints."""
    from alignkit.config import seed_configs
    from alignkit.runs import list_checkpoints
    from alignkit.train import train

    out = []
    for c in seed_configs(cfg):
        run_dir = train(c, method)
        steps = [s for s, _ in list_checkpoints(run_dir)]
        logger.info("train %s (seed %d): %d checkpoints (steps %s) in %s", method,
                    getattr(c, method).seed, len(steps), steps, run_dir / "checkpoints")
        out.append(run_dir)
    return out


def stage_evaluate(cfg, method: str):
    """Evaluate every seed's checkpoints (cached), write the flip tables, log notebook 01's text."""
    from alignkit.report import summarize_sft
    from alignkit.stages import ensure_results, over_seeds

    res = over_seeds(ensure_results, cfg, method)
    logger.info("evaluate %s: wrote eval-*.json in each checkpoint and flips.json in %s\n%s",
                method, ", ".join(str(r.run_dir) for r in res), summarize_sft(res))
    return res


def stage_capture(cfg, method: str, poolings: Sequence[str] = ("question", "mean", "last")):
    """Capture (cached) what notebooks 02-04 read, for every seed."""
    from alignkit.stages import ensure_captures, over_seeds

    out = over_seeds(ensure_captures, cfg, method, tuple(poolings))
    for p, by_step in out[0].items():
        a = next(iter(by_step.values()))
        logger.info("capture %s (%s pooling, %d seeds): %d checkpoints x %d hook points x %d "
                    "probes x width %d", method, p, len(out), len(by_step), len(a.hook_points),
                    *a.acts.shape[1:])
    return out


def stage_analysis(stage: str, cfg, method: str, **params):
    """``stages.ensure_<stage>`` (cached; ``params``: its parameters, e.g. the lens's
    ``steer_layers``) of cka, spectral, patching, lens or compare (which compares every method,
    whatever ``method``) for every seed, logging ``report.summarize_<stage>`` of all of them."""
    from alignkit import report, stages

    res = stages.over_seeds(getattr(stages, f"ensure_{stage}"), cfg,
                            METHODS if stage == "compare" else method, **params)
    if stage == "compare":
        n_boot = stages.compare_defaults(cfg.smoke)["n_boot"]
        text = report.summarize_compare(res, stages.claims_over_seeds(res, n_boot=n_boot))
    else:
        text = getattr(report, f"summarize_{stage}")(res)
    logger.info("%s %s (%d seeds):\n%s", stage, method, len(res), text)
    return res


def parse_pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    """``["base=Qwen/Qwen3-0.6B-Base", ...]`` -> ``{"base": "Qwen/Qwen3-0.6B-Base", ...}`` in order;
    UsageError for an item without ``=`` or a repeated name."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"{flag} expects NAME=VALUE, got {item!r}")
        if name.strip() in out:
            raise UsageError(f"{flag}: {name.strip()!r} given twice")
        out[name.strip()] = value.strip()
    return out


def stage_models_compare(cfg, models: dict[str, str], revisions: dict[str, str], inits: str,
                         steer_layers: Sequence[int] | None = None):
    """Any checkpoints: accuracy and cross-layer CKA against the reference
    (``stages.ensure_models_cka``, any depth or width); when every model has the reference's
    shape, also ``stages.ensure_models_compare`` and ``ensure_models_lens``; else the same-layer
    measures are skipped, naming the config fields that differ. All cached; logs the summaries."""
    from alignkit import report, stages
    from alignkit.evaluate import summary

    cross = stages.ensure_models_cka(cfg, models, revisions)
    logger.info("compare --models %s, cross-layer:\n%s", ", ".join(models),
                report.summarize_cross(cross))
    other = {m: f for m, f in cross.shape.items() if f}
    if other:
        paths = stages.given_models(cfg, models, revisions, same_shape=False)
        evals = stages.models_evals(cfg, paths)
        acc = "\n".join(f"- {k}: {100 * r['accuracy']:.1f} % [{100 * r['acc_lo']:.1f}, "
                        f"{100 * r['acc_hi']:.1f}] of {e.n} problems"
                        for k, e in evals.items() for r in summary([e]))
        logger.info("accuracy (95 %% Wilson):\n%s", acc)
        logger.warning("same-layer measures (layerwise CKA, Δ RankMe per layer, patching, weight "
                       "drift, difference lens, per-token KL) need the reference's shape: %s",
                       "; ".join(f"{m} differs in {', '.join(f)}" for m, f in other.items()))
        return cross, None, None
    res = stages.ensure_models_compare(cfg, models, revisions, inits)
    logger.info("compare --models %s:\n%s", ", ".join(models),
                report.summarize_compare([res], list(res.claims)))
    lenses = stages.ensure_models_lens(cfg, models, revisions, steer_layers=steer_layers)
    for name, lz in lenses.items():
        logger.info("what changed, %s against the reference:\n%s", name, report.summarize_lens(lz))
    return cross, res, lenses


def stage(name: str, cfg, method: str, **params):
    """Run one stage other than ``figures`` (``params``: an analysis stage's parameters)."""
    if name in ("train", "evaluate", "capture"):
        return globals()[f"stage_{name}"](cfg, method)
    return stage_analysis(name, cfg, method, **params)


def _select_notebooks(nb_dir: Path, wanted: Sequence[str] | None) -> list[Path]:
    paths = sorted(nb_dir.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise UsageError(f"figures needs the repository's notebooks: no NN_*.ipynb in {nb_dir}")
    out = []
    for w in wanted or []:
        hit = [p for p in paths if p.stem == w or p.stem.startswith(f"{w}_") or p.name == w]
        if not hit:
            names = [p.stem for p in paths]
            raise UsageError(f"no notebook {w!r} in {nb_dir}; choose from {names}")
        out.extend(h for h in hit if h not in out)
    return out or paths


def inject_parameters(nb, preset: str, overrides: dict) -> None:
    """Insert a cell setting ``PRESET`` and ``OVERRIDES`` after the ``parameters`` cell (as
    papermill does)."""
    import nbformat

    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if not tagged:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    src = (f"# injected by python -m alignkit figures\nPRESET = {preset!r}\n"
           f"OVERRIDES = {overrides!r}")
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
        src, metadata={"tags": ["injected-parameters"]}))


def stage_figures(cfg, overrides: dict, notebooks: Sequence[str] | None = None,
                  nb_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Execute notebooks headless with this config; return the executed copies' paths."""
    import nbformat
    from nbclient import NotebookClient
    from tqdm.auto import tqdm

    from alignkit.plots import figure_dir

    paths = _select_notebooks(Path(nb_dir), notebooks)
    overrides = dict(overrides, root=str(cfg.run_root.resolve()))
    out_dir = cfg.run_root / "reports" / f"{cfg.preset}{'-smoke' if cfg.smoke else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ALIGNKIT_SMOKE="1" if cfg.smoke else "0", ALIGNKIT_STATIC="1")
    written = []
    for path in tqdm(paths, desc="figures", unit="notebook"):
        nb = nbformat.read(path, as_version=4)
        inject_parameters(nb, cfg.preset, overrides)
        client = NotebookClient(nb, timeout=None, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        t0 = time.time()
        try:
            client.execute(env=env)
        finally:
            nbformat.write(nb, out_dir / path.name)
        logger.info("figures: %s ran in %.0f s; wrote %s and its figures in %s", path.name,
                    time.time() - t0, out_dir / path.name, figure_dir(cfg))
        written.append(out_dir / path.name)
    return written


CPU_SECONDS_PER_STEP = 261  # one real-preset SFT step of batch 16, 2-core CPU (RESULTS_real.md)


def warn_if_slow(cfg, cmd: str) -> None:
    """A warning, before any work, when a model other than the embedded one runs at full size on
    the CPU: the full-size rehearsal measured one SFT step of Qwen3-0.6B in ~4 minutes on a
    2-core CPU, so the real study would take days. Not an error: a large CPU machine may be
    meant."""
    from alignkit.models import device_for

    if cfg.model == "tiny" or cfg.smoke or cmd == "figures" or device_for(cfg).type != "cpu":
        return
    logger.warning(
        "%s at full size on the CPU: the rehearsal (benchmarks/RESULTS_real.md) took %d s per SFT "
        "step of batch 16 on a 2-core CPU (%d steps: ~%.1f days) and 162 s to score 64 problems; "
        "use a GPU, --smoke, or smaller sizes (--set sft.max_steps=... eval.n_eval=...)",
        cfg.preset, CPU_SECONDS_PER_STEP, cfg.sft.max_steps,
        cfg.sft.max_steps * CPU_SECONDS_PER_STEP / 86400)


def run(args: argparse.Namespace) -> None:
    """Dispatch a parsed command line (raises UsageError for bad input)."""
    cmd = args.command
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and cmd != "train":
        raise UsageError(f"only `train` runs under a distributed launch (WORLD_SIZE={world}); "
                         f"run `{cmd}` in one process: python -m alignkit ...")
    cfg, overrides = config_from_args(args)
    warn_if_slow(cfg, cmd)
    method = getattr(args, "method", "sft")
    if cmd == "compare" and args.models:
        stage_models_compare(cfg, parse_pairs(args.models, "--models"),
                             parse_pairs(args.revision, "--revision"), args.inits,
                             args.steer_layers)
    elif cmd == "capture":
        stage_capture(cfg, method, args.pooling)
    elif cmd == "figures":
        stage_figures(cfg, overrides, args.notebooks, args.notebook_dir)
    elif cmd == "compare" and args.steer_layers is not None:
        raise UsageError("--steer-layers goes with compare --models (the lens of any checkpoints) "
                         "or the lens command")
    elif cmd == "lens":
        stage(cmd, cfg, method, steer_layers=args.steer_layers)
    elif cmd != "all":
        stage(cmd, cfg, method)
    else:
        if "figures" not in args.skip:
            _select_notebooks(args.notebook_dir, None)  # fail before hours of work, not after
        t0 = time.time()
        for name in (s for s in STAGES if s not in args.skip):
            t = time.time()
            if name == "figures":
                stage_figures(cfg, overrides, None, args.notebook_dir)
            else:
                stage(name, cfg, method)
            logger.info("all: %s done in %.1f s", name, time.time() - t)
        logger.info("all: every stage done in %.1f s (skipped: %s)", time.time() - t0,
                    ", ".join(args.skip) or "none")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m alignkit``: exit status 0, 1 (failure) or 2 (bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alignkit").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        run(args)
    except UsageError as e:
        if args.verbose:
            logger.exception("bad input")
        sys.stderr.write(f"{parser.prog}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{parser.prog}: interrupted (cached stages resume where they stopped)\n")
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every failure becomes one line
        if args.verbose:
            logger.exception("%s failed", args.command)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "" if args.verbose else " (run with -v for the traceback)"
        sys.stderr.write(f"{parser.prog}: error: {args.command} failed: {type(e).__name__}: "
                         f"{msg}{hint}\n")
        return 1
    return 0
