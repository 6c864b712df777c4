"""``python -m alignkit <command>``: training, every analysis of the notebooks (a subcommand per
entry of ``alignkit.analyses.REGISTRY``) and the figures, headless, through the same cached calls,
so a notebook opened after the CLI reads its results.

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

from alignkit.analyses import REGISTRY

logger = logging.getLogger("alignkit.cli")

METHODS = ("sft", "dpo", "grpo")  # alignkit.runs.METHODS, spelled out: --help imports no torch
STAGES = ("train", "evaluate", "capture", *[n for n in REGISTRY if n != "evaluate"], "figures")
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


TOP_EPILOG = """\
examples:
  python -m alignkit all --smoke                 # whole pipeline at smoke sizes (minutes on a CPU)
  python -m alignkit train sft                   # tiny preset: build the base, SFT with checkpoints
  python -m alignkit --preset qwen3-0.6b-base --model /data/Qwen3-0.6B-Base \\
      --data /data/gsm8k/train.jsonl --eval-data /data/gsm8k/test.jsonl all --skip compare
  python -m alignkit --set sft.max_steps=50 --set cka.n_boot=500 --root /scratch/runs cka
  python -m alignkit lens --models base=DIR sft=DIR --set lens.steer_layers=[0,4,8]
  accelerate launch -m alignkit --preset qwen3-0.6b-base train sft  # several GPUs, then 1 process

Global options may come before or after the command; every knob of every analysis is a config
field (--set SECTION.FIELD=VALUE). Results are cached under ROOT (default $ALIGNKIT_HOME or the
repository's runs/); docs/cli.md lists what each command writes there.
"""

COMMANDS = {  # the commands that are not analyses: (what it does, an example, what it writes)
    "train": ("fine-tune the base with SFT, DPO or GRPO on the checkpoint schedule",
              "train dpo --set dpo.beta=0.2   # trains SFT first (DPO starts from it)",
              "<method>/<preset>-<key>/checkpoints/step-NNNNNN/ (from_pretrained directories "
              "with manifest.json) and train_log.json; an interrupted run resumes"),
    "capture": ("capture pooled residual-stream activations of every checkpoint",
                "capture --method dpo --pooling mean", "activations/ (notebooks 02-05)"),
    "figures": ("execute the notebooks headless on the cached results (README figures)",
                "figures --smoke --notebooks 02 03",
                "reports/<preset>[-smoke]/NN_*.ipynb (the notebooks, run with this preset and "
                "overrides) and their figures and summaries: <root>/images/ for the default run "
                "(make publish copies them to the README's), else reports/.../images/"),
    "all": ("run every stage in order: " + ", ".join(STAGES) + " (compare also trains DPO and "
            "GRPO), logging each stage's time", "all --smoke --skip compare figures",
            "everything above"),
}


def _describe(name: str) -> tuple[str, str, str]:
    if name in COMMANDS:
        return COMMANDS[name]
    a = REGISTRY[name]
    where = ("compare/<preset>/compare-<key>/" if name == "compare" else
             f"<run>/analysis/{a.module_name}-<key>/")
    return (f"{a.help} (notebook {a.notebook}); with --models, of any checkpoints",
            f"{name} --method dpo" if name != "compare" else
            "compare --models base=Qwen/Qwen3-0.6B-Base sft=Qwen/Qwen3-0.6B",
            f"{where} (alignkit.analyses.{a.module_name}); with --models, models/")


def _add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Global options; on subcommands with SUPPRESS defaults, never overwriting the top level."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--preset", default=d("tiny"), metavar="NAME",
                   help="tiny (offline, CPU; default), smollm2-135m (a real model from PyPI, "
                        "offline, CPU), qwen3-0.6b-base (plain prompts) or qwen3-0.6b (chat "
                        "template, no thinking); the two Qwen3 presets want a GPU")
    g.add_argument("--smoke", action="store_true", default=d(False),
                   help="shrink every size (CI)")
    g.add_argument("--set", dest="overrides", action="append", default=d([]), metavar="KEY=VALUE",
                   help="override a config field, e.g. sft.max_steps=50 or lens.steer_layers="
                        "[0,4]; VALUE is JSON when it parses, else a string (repeatable)")
    g.add_argument("--model", default=d(None), metavar="PATH",
                   help="a local from_pretrained directory as the base (hub id: --set model=ID)")
    g.add_argument("--data", default=d(None), metavar="PATH",
                   help="local GSM8K-format .jsonl (question/answer per line) for training")
    g.add_argument("--eval-data", dest="eval_data", default=d(None), metavar="PATH",
                   help="local GSM8K-format .jsonl for evaluation and probes (default: --data)")
    g.add_argument("--root", default=d(None), metavar="DIR",
                   help="where runs live (default: $ALIGNKIT_HOME, else the repository's runs/)")
    g.add_argument("--seeds", type=int, default=d(None), metavar="N",
                   help="training seeds: every stage runs once per seed (default: the preset's "
                        "n_seeds: 3 for tiny, 2 with --smoke, 1 for the real presets)")
    g.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="debug logging, and tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m alignkit`` argument parser: a subcommand per command and analysis."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m alignkit", formatter_class=fmt, epilog=TOP_EPILOG,
        description="alignkit, headless: train, evaluate and analyse post-training (SFT, DPO, "
                    "GRPO) with the same cached pipeline as the notebooks.")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in ("train", "capture", *REGISTRY, "figures", "all"):
        what, example, writes = _describe(name)
        p = sub.add_parser(name, help=what, description=what[:1].upper() + what[1:] + ".",
                           formatter_class=fmt,
                           epilog=f"examples:\n  python -m alignkit {example}\n\nWrites {writes}.")
        _add_common(p, suppress=True)
        if name == "train":
            p.add_argument("method", choices=METHODS, help="post-training method")
        elif name not in ("figures", "compare"):
            p.add_argument("--method", choices=METHODS, default="sft", help="the post-training run "
                           "to analyse (default: sft; dpo and grpo start from the SFT run)")
        if name == "capture":
            p.add_argument("--pooling", nargs="+", choices=("question", "mean", "last"),
                           default=["question", "mean", "last"],
                           help="poolings (default: question mean last; question: the mean over "
                                "the question's own tokens, the shared template left out)")
        if name in REGISTRY:
            p.add_argument("--models", nargs="+", metavar="NAME=MODEL", default=None,
                           help="analyse these checkpoints instead of a run (directories or hub "
                                "ids), the first the reference ('base'), e.g. base=DIR sft=DIR")
            p.add_argument("--revision", action="append", default=[], metavar="NAME=REV",
                           help="hub revision of one --models entry (repeatable)")
            p.add_argument("--inits", choices=("series", "reference"), default="series",
                           help="with --models, each model's own init: the model listed before "
                                "it (a published series; default) or the reference for all")
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


def _coerce(key: str, text: str, current: Any) -> Any:
    """A ``--set`` value (JSON when it parses, else the string) converted to the type of the
    field's preset value, or UsageError naming both."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if key == "gradient_checkpointing":  # true, false or "auto"
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
        out[key] = _coerce(key, text, current)
    return out


def config_from_args(args: argparse.Namespace):
    """``(cfg, overrides)`` from the global options (``get_config(preset, smoke, overrides)`` gives
    ``cfg`` again); every check runs before anything is loaded or trained."""
    from alignkit.config import get_config
    from alignkit.models import check_model_dir

    overrides = parse_overrides(args.overrides, args.preset, args.smoke)
    if args.model is not None:
        try:
            overrides["model"] = str(check_model_dir(args.model).resolve())
        except ValueError as e:
            raise UsageError(f"--model: {e}") from None
    for flag, path, key in (("--data", args.data, "data_source"),
                            ("--eval-data", args.eval_data, "eval_source")):
        if path is not None and not Path(path).expanduser().is_file():
            raise UsageError(f"{flag} {path}: no such file")
        if path is not None:
            overrides[key] = str(Path(path).expanduser().resolve())
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


def stage_capture(cfg, method: str, poolings: Sequence[str] = ("question", "mean", "last")):
    """Capture (cached) what the notebooks read, for every seed."""
    from alignkit.analyses import common
    from alignkit.config import seed_configs

    for c in seed_configs(cfg):
        ckpts = common.from_run(c, method)
        for p in poolings:  # the first call captures every pooling in one pass per checkpoint
            a = next(iter(common.captures(c, ckpts, p, together=poolings).values()))
            logger.info("capture %s (%s pooling): %d checkpoints x %d hook points x %d probes x "
                        "width %d", method, p, len(ckpts.paths), *a.acts.shape)


def stage_analysis(name: str, cfg, method: str = "sft", models: dict | None = None,
                   revisions: dict | None = None, inits: str = "series") -> list:
    """One analysis of ``REGISTRY`` (cached) on every training seed's run of ``method`` (the
    comparison: the three methods' runs), or on the given ``models``; logs its summary."""
    from alignkit.analyses import common
    from alignkit.analyses.compare import report_models

    a = REGISTRY[name]
    if models and name == "compare":  # any depths and families: cross-layer CKA at least
        logger.info("compare --models %s:\n%s", ", ".join(models),
                    report_models(cfg, models, revisions, inits))
        return []
    if models:
        results = [a.module.ensure(cfg, common.from_models(cfg, models, revisions, inits))]
    else:
        results = common.over_seeds(a.module.ensure, cfg, a.methods if name == "compare"
                                    else method)
    logger.info("%s (%s, %d seeds):\n%s", name, ", ".join(models) if models else method,
                len(results), a.module.summarize(results, cfg))
    return results


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


def warn_if_slow(cfg, cmd: str) -> None:
    """A warning, before any work, when a model other than the embedded one runs at full size on
    the CPU, where the real study takes days (benchmarks/RESULTS_real.md). Not an error: a large
    CPU machine may be meant."""
    from alignkit.config import CPU_PRESETS
    from alignkit.models import device_for

    if cfg.preset in CPU_PRESETS or cfg.smoke or cmd == "figures" or device_for(cfg).type != "cpu":
        return
    logger.warning("%s at full size on the CPU: an SFT step of the real preset takes minutes on "
                   "a small CPU (benchmarks/RESULTS_real.md), so %d steps take days; use a GPU, "
                   "--smoke, or smaller sizes (--set sft.max_steps=... eval.n_eval=...)",
                   cfg.preset, cfg.sft.max_steps)


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
    if cmd == "train":
        stage_train(cfg, method)
    elif cmd == "capture":
        stage_capture(cfg, method, args.pooling)
    elif cmd == "figures":
        stage_figures(cfg, overrides, args.notebooks, args.notebook_dir)
    elif cmd in REGISTRY:
        stage_analysis(cmd, cfg, method, parse_pairs(args.models or [], "--models"),
                       parse_pairs(args.revision, "--revision"), args.inits)
    else:
        if "figures" not in args.skip:
            _select_notebooks(args.notebook_dir, None)  # fail before hours of work, not after
        t0 = time.time()
        for name in (s for s in STAGES if s not in args.skip):
            t = time.time()
            if name == "figures":
                stage_figures(cfg, overrides, None, args.notebook_dir)
            elif name in ("train", "capture"):
                (stage_train if name == "train" else stage_capture)(cfg, method)
            else:
                stage_analysis(name, cfg, method)
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
