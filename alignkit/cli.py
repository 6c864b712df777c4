"""Headless pipeline: ``python -m alignkit <command>``.

Every stage runs the notebooks' pipeline through the package's cached functions and writes
exactly the artifacts the notebooks read, so a notebook pointed at a CLI run (same preset and
overrides) shows its results without recomputing, and a second call of a stage does nothing
expensive. ``python -m alignkit --help`` lists the commands; each has its own ``--help``.

Bad input (unknown preset, unknown config key or a value of the wrong type, a ``--model`` that is
not a model directory, a missing data file) exits with status 2 and a one-line message; any other
failure exits with status 1 and a one-line message (the traceback with ``-v``).
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

METHODS = ("sft", "dpo", "grpo")  # alignkit.train.METHODS, spelled out so --help imports no torch
STAGES = ("train", "evaluate", "capture", "cka", "spectral", "patching", "figures")
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------- parser

TOP_EPILOG = """\
examples:
  python -m alignkit all --smoke                      # whole pipeline, smoke sizes (~1-2 min on a CPU)
  python -m alignkit train sft                        # tiny preset: build the base, SFT with checkpoints
  python -m alignkit evaluate && python -m alignkit patching
  python -m alignkit --preset qwen3-0.6b --model /data/Qwen3-0.6B \\
      --data /data/gsm8k/train.jsonl --eval-data /data/gsm8k/test.jsonl all
  python -m alignkit --set sft.max_steps=50 --set eval.n_eval=100 --root /scratch/runs cka
  accelerate launch -m alignkit --preset qwen3-0.6b --model /data/Qwen3-0.6B train sft   # several GPUs

Global options may come before or after the command. Stages are cached: a second call reuses
what the first wrote. Results live under ROOT (default $ALIGNKIT_HOME or the repository's runs/):
  base/tiny-<key>/                         the embedded base (tiny preset)
  <method>/<preset>[-smoke]-<key>/         a run: checkpoints/step-NNNNNN/ (with eval-*.json),
                                           flips.json, activations/, analysis/{cka,spectral,patching}-<key>/
  reports/<preset>[-smoke]/NN_*.ipynb      notebooks executed by `figures`
"""

SUB_EPILOGS = {
    "train": """\
examples:
  python -m alignkit train sft --smoke
  python -m alignkit train dpo --set dpo.beta=0.2        # trains SFT first (DPO starts from it)
  accelerate launch -m alignkit --preset qwen3-0.6b --model /data/Qwen3-0.6B train sft

Writes <root>/<method>/<preset>-<key>/checkpoints/step-NNNNNN/ (from_pretrained directories with
manifest.json) on the config's schedule, and train_log.json. Resumes an interrupted run.""",
    "evaluate": """\
examples:
  python -m alignkit evaluate --smoke
  python -m alignkit evaluate --method grpo --set eval.n_eval=100

Trains if needed, then writes eval-<key>.json in every checkpoint (greedy accuracy, answer
log-prob, outputs) and flips.json in the run (the flip table of notebook 01).""",
    "capture": """\
examples:
  python -m alignkit capture --smoke
  python -m alignkit capture --method dpo --pooling mean

Writes <run>/activations/acts-<key>.safetensors (+ .json): the residual stream after every layer
and the embedding output of every checkpoint on the probe prompts, mean- and last-token pooled
(what notebooks 02-04 read).""",
    "cka": """\
examples:
  python -m alignkit cka --smoke
  python -m alignkit cka --method grpo

Writes <run>/analysis/cka-<key>/ (result.json + arrays.npz; read with alignkit.pipeline.ensure_cka):
layerwise CKA of every checkpoint vs the base with bootstrap bands, noise floors, the cross-layer
matrix with its permutation baseline, alignment path and transition layer (notebook 02).""",
    "spectral": """\
examples:
  python -m alignkit spectral --smoke

Writes <run>/analysis/spectral-<key>/ (read with alignkit.pipeline.ensure_spectral): RankMe and
Renyi effective ranks per layer and checkpoint with bootstrap intervals, rank vs probe size
(notebook 03).""",
    "patching": """\
examples:
  python -m alignkit patching --smoke
  python -m alignkit patching --method dpo

Evaluates if needed, then writes <run>/analysis/patching-<key>/ (read with
alignkit.pipeline.ensure_patching): layer sweeps (resid/attn/mlp x denoise/noise on flips and
controls), positions, cross-layer patching and weight ablation (notebook 04).""",
    "figures": """\
examples:
  python -m alignkit figures                          # full runs: writes the README figures to images/
  python -m alignkit figures --smoke --notebooks 02 03

Executes the notebooks headless (nbclient; the figures are drawn by the notebooks' own cells) with
this command's preset and overrides injected after their parameters cell. They read every result
from the caches above. Executed copies go to <root>/reports/<preset>[-smoke]/; full (non-smoke)
runs write the README figures to images/, smoke runs never do.""",
    "all": """\
examples:
  python -m alignkit all --smoke
  python -m alignkit all --method dpo --skip figures

Runs train, evaluate, capture, cka, spectral, patching and figures in that order.""",
}


def _add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Global options; on subcommands with SUPPRESS defaults so they never overwrite the top level."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--preset", default=d("tiny"), metavar="NAME",
                   help="config preset: tiny (offline, CPU) or qwen3-0.6b (real path) (default: tiny)")
    g.add_argument("--smoke", action="store_true", default=d(False),
                   help="shrink every size (CI); smoke runs never write images/")
    g.add_argument("--set", dest="overrides", action="append", default=d([]), metavar="KEY=VALUE",
                   help="override a config field by dotted key, e.g. --set sft.max_steps=50 or "
                        "--set sft.schedule=[0,0.5,1]; VALUE is parsed as JSON when it can be, else taken "
                        "as a string (repeatable)")
    g.add_argument("--model", default=d(None), metavar="PATH",
                   help="a local from_pretrained model directory (config.json, weights, tokenizer) used as "
                        "the base instead of the preset's (for a hub id use --set model=ID)")
    g.add_argument("--data", default=d(None), metavar="PATH",
                   help="local GSM8K-format .jsonl (question/answer per line) for training")
    g.add_argument("--eval-data", dest="eval_data", default=d(None), metavar="PATH",
                   help="local GSM8K-format .jsonl for evaluation and probes (default: --data)")
    g.add_argument("--root", default=d(None), metavar="DIR",
                   help="where runs live (default: $ALIGNKIT_HOME, else the repository's runs/)")
    g.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="debug logging, and tracebacks on errors")


def _add_method(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="sft",
                   help="which post-training run to analyse (default: sft; dpo and grpo start from the SFT run)")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m alignkit`` argument parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m alignkit", formatter_class=fmt, epilog=TOP_EPILOG,
        description="alignkit, headless: train, evaluate and analyse post-training (SFT, DPO, GRPO) with the "
                    "same cached pipeline as the notebooks.")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, help_):
        p = sub.add_parser(name, help=help_, description=help_[:1].upper() + help_[1:] + ".",
                           formatter_class=fmt, epilog=SUB_EPILOGS[name])
        _add_common(p, suppress=True)
        return p

    p = add("train", "fine-tune the base with SFT, DPO or GRPO on the checkpoint schedule")
    p.add_argument("method", choices=METHODS, help="post-training method")
    _add_method(add("evaluate", "evaluate every checkpoint of a run and write the flip table"))
    p = add("capture", "capture pooled residual-stream activations of every checkpoint")
    _add_method(p)
    p.add_argument("--pooling", nargs="+", choices=("mean", "last"), default=["mean", "last"],
                   help="poolings to capture (default: mean last, as notebooks 02-04)")
    _add_method(add("cka", "layerwise and cross-layer CKA with bootstrap bands and controls (notebook 02)"))
    _add_method(add("spectral", "effective ranks per layer and checkpoint with intervals (notebook 03)"))
    _add_method(add("patching", "activation patching, cross-layer patching and weight ablation (notebook 04)"))
    p = add("figures", "execute the notebooks headless on the cached results (README figures)")
    p.add_argument("--notebooks", nargs="+", metavar="NN", default=None,
                   help="notebook numbers or names to run, e.g. 02 03 (default: all in notebooks/)")
    p.add_argument("--notebook-dir", type=Path, default=NOTEBOOK_DIR, metavar="DIR",
                   help=f"where the .ipynb files are (default: {NOTEBOOK_DIR})")
    p = add("all", "run every stage in order: " + ", ".join(STAGES))
    _add_method(p)
    p.add_argument("--skip", nargs="+", choices=STAGES, default=[], metavar="STAGE",
                   help="stages to leave out, e.g. --skip figures")
    p.add_argument("--notebook-dir", type=Path, default=NOTEBOOK_DIR, metavar="DIR", help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------- config


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true/false/null, lists, quoted strings), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _coerce(key: str, value: Any, current: Any) -> Any:
    """``value`` converted to the type of the field's preset value, or UsageError naming both."""
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
        raise UsageError(f"config key {key!r} expects {type(current).__name__} (preset value {current!r}), "
                         f"got {value!r}")
    return value


def parse_overrides(items: Sequence[str], preset: str = "tiny", smoke: bool = False) -> dict[str, Any]:
    """``["sft.max_steps=50", ...]`` -> ``{"sft.max_steps": 50, ...}``, typed like the preset's fields.

    Raises:
        UsageError: an item without ``=``, an unknown preset or key, or a value of the wrong type.
    """
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
    """The absolute path of a from_pretrained model directory, or UsageError saying what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"--model {path}: no such directory")
    if not p.is_dir():
        raise UsageError(f"--model {path} is not a model directory (it is a file)")
    if not (p / "config.json").is_file():
        raise UsageError(f"--model {path} is not a model directory: no config.json")
    if not (any(p.glob("*.safetensors")) or any(p.glob("*.bin"))):
        raise UsageError(f"--model {path} is not a model directory: no weights (*.safetensors or *.bin)")
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        raise UsageError(f"--model {path} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    return p.resolve()


def check_data_file(path: str | os.PathLike, flag: str) -> Path:
    """The absolute path of an existing data file, or UsageError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    return p.resolve()


def config_from_args(args: argparse.Namespace):
    """``(cfg, overrides)`` from the global options; the overrides reproduce ``cfg`` with ``get_config``.

    Every check runs before anything is loaded or trained.
    """
    from alignkit.config import get_config

    overrides = parse_overrides(args.overrides, args.preset, args.smoke)
    if args.model is not None:
        overrides["model"] = str(check_model_dir(args.model))
    if args.data is not None:
        overrides["data_source"] = str(check_data_file(args.data, "--data"))
    if args.eval_data is not None:
        overrides["eval_source"] = str(check_data_file(args.eval_data, "--eval-data"))
    if args.root is not None:
        overrides["root"] = str(Path(args.root).expanduser().resolve())
    for key in ("data_source", "eval_source"):  # a local file given through --set
        src = overrides.get(key)
        if isinstance(src, str) and src not in ("synthetic", "openai/gsm8k") and not Path(src).is_file():
            raise UsageError(f"{key} {src}: no such file")
    try:
        cfg = get_config(args.preset, smoke=args.smoke, overrides=overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.data is not None and args.eval_data is None and cfg.eval_source is None:
        logger.warning("--data without --eval-data: evaluation and probes read the first %d rows of %s, "
                       "the training file", cfg.eval.n_eval, cfg.data_source)
    return cfg, overrides


# ----------------------------------------------------------------------------- stages


def stage_train(cfg, method: str) -> Path:
    """Train (cached) and log the checkpoints."""
    from alignkit.train import list_checkpoints, train

    run_dir = train(cfg, method)
    steps = [s for s, _ in list_checkpoints(run_dir)]
    logger.info("train %s: %d checkpoints (steps %s) in %s", method, len(steps), steps, run_dir / "checkpoints")
    return run_dir


def stage_evaluate(cfg, method: str) -> Path:
    """Evaluate every checkpoint (cached), write the flip table, log accuracy per step."""
    from alignkit.evaluate import ensure_results, summary

    run_dir, results, table = ensure_results(cfg, method)
    for r in summary(results):
        logger.info("evaluate %s: step %6d  accuracy %.3f [%.3f, %.3f]  answer log-prob %.3f", method, r["step"],
                    r["accuracy"], r["acc_lo"], r["acc_hi"], r["answer_logprob"])
    logger.info("evaluate %s: %d flips, %d controls; wrote eval-*.json in each checkpoint and %s", method,
                len(table["flips"]), len(table["controls"]), run_dir / "flips.json")
    return run_dir


def stage_capture(cfg, method: str, poolings: Sequence[str] = ("mean", "last")) -> Path:
    """Capture (cached) what notebooks 02-04 read."""
    from alignkit.pipeline import ensure_captures
    from alignkit.train import run_dir as method_dir

    caps = ensure_captures(cfg, method, tuple(poolings))
    run_dir = method_dir(cfg, method)
    for p, by_step in caps.items():
        a = next(iter(by_step.values()))
        logger.info("capture %s (%s pooling): %d checkpoints x %d hook points x %d probes x width %d in %s", method,
                    p, len(by_step), len(a.hook_points), a.acts.shape[1], a.acts.shape[2], run_dir / "activations")
    return run_dir


def stage_cka(cfg, method: str) -> dict:
    from alignkit.pipeline import ensure_cka

    res = ensure_cka(cfg, method)
    lw = res["curves"][False][res["steps"][-1]]["point"]
    i = int(lw.argmin())
    logger.info("cka %s (%s pooling): base vs step %d: layerwise CKA %.3f..%.3f, lowest at %s; transition into %s; "
                "remapping index %.2f", method, res["pooling"], res["steps"][-1], lw.max(), lw.min(), res["labels"][i],
                res["labels"][res["transition"]["point"]], res["remap"])
    return res


def stage_spectral(cfg, method: str) -> dict:
    from alignkit.pipeline import ensure_spectral

    res = ensure_spectral(cfg, method)
    s0, s1 = res["steps"][0], res["steps"][-1]
    logger.info("spectral %s (%s pooling): mean RankMe over layers %.2f (step %d) -> %.2f (step %d)", method,
                res["pooling"], res["boot"][s0]["rankme"]["point"].mean(), s0,
                res["boot"][s1]["rankme"]["point"].mean(), s1)
    return res


def stage_patching(cfg, method: str) -> dict:
    import numpy as np

    from alignkit.pipeline import ensure_patching

    res = ensure_patching(cfg, method)
    r = res["sweeps"]["flips", "resid", "denoise"]
    mean = np.nanmean(r.delta, 0)
    logger.info("patching %s: %d %s, %d %s; resid denoise on the flips: largest mean delta %+.3f nats at layer %d",
                method, len(res["sets"]["flips"]), res["labels"]["flips"], len(res["sets"]["controls"]),
                res["labels"]["controls"], mean[int(np.nanargmax(np.abs(mean)))], int(np.nanargmax(np.abs(mean))))
    return res


def _select_notebooks(nb_dir: Path, wanted: Sequence[str] | None) -> list[Path]:
    paths = sorted(nb_dir.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise UsageError(f"figures needs the repository's notebooks: no NN_*.ipynb in {nb_dir}")
    if not wanted:
        return paths
    out = []
    for w in wanted:
        hit = [p for p in paths if p.stem == w or p.stem.startswith(f"{w}_") or p.name == w]
        if not hit:
            raise UsageError(f"no notebook {w!r} in {nb_dir}; choose from {[p.stem for p in paths]}")
        out.extend(h for h in hit if h not in out)
    return out


def inject_parameters(nb, preset: str, overrides: dict) -> None:
    """Insert a cell setting ``PRESET`` and ``OVERRIDES`` right after the ``parameters`` cell (papermill style)."""
    import nbformat

    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if idx is None:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    src = f"# injected by python -m alignkit figures\nPRESET = {preset!r}\nOVERRIDES = {overrides!r}"
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(idx + 1, cell)


def stage_figures(cfg, overrides: dict, notebooks: Sequence[str] | None = None,
                  nb_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Execute notebooks headless with this config; return the executed copies' paths."""
    import nbformat
    from nbclient import NotebookClient
    from tqdm.auto import tqdm

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
            out = out_dir / path.name
            nbformat.write(nb, out)
        n_png = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
        logger.info("figures: %s ran in %.0f s, %d figures; wrote %s%s", path.name, time.time() - t0, n_png, out,
                    "" if cfg.smoke else " and its images/ figures")
        written.append(out)
    return written


# ----------------------------------------------------------------------------- main


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alignkit").setLevel(level)


def run(args: argparse.Namespace) -> None:
    """Dispatch a parsed command line (raises UsageError for bad input)."""
    cmd = args.command
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and cmd != "train":
        raise UsageError(f"only `train` runs under a distributed launch (WORLD_SIZE={world}); run `{cmd}` "
                         "in one process: python -m alignkit ...")
    cfg, overrides = config_from_args(args)
    method = getattr(args, "method", "sft")
    if cmd == "train":
        stage_train(cfg, method)
    elif cmd == "evaluate":
        stage_evaluate(cfg, method)
    elif cmd == "capture":
        stage_capture(cfg, method, args.pooling)
    elif cmd == "cka":
        stage_cka(cfg, method)
    elif cmd == "spectral":
        stage_spectral(cfg, method)
    elif cmd == "patching":
        stage_patching(cfg, method)
    elif cmd == "figures":
        stage_figures(cfg, overrides, args.notebooks, args.notebook_dir)
    elif cmd == "all":
        if "figures" not in args.skip:
            _select_notebooks(args.notebook_dir, None)  # fail before hours of work, not after
        t0 = time.time()
        for stage in STAGES:
            if stage in args.skip:
                logger.info("all: skipping %s", stage)
                continue
            t = time.time()
            if stage == "figures":
                stage_figures(cfg, overrides, None, args.notebook_dir)
            else:
                globals()[f"stage_{stage}"](cfg, method)
            logger.info("all: %s done in %.1f s", stage, time.time() - t)
        logger.info("all: every stage done in %.1f s", time.time() - t0)
    else:  # pragma: no cover - argparse restricts the choices
        raise UsageError(f"unknown command {cmd!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m alignkit``; returns the exit status (0, 1 failure, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
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
    except Exception as e:  # noqa: BLE001 - the one place every failure becomes a one-line message
        if args.verbose:
            logger.exception("%s failed", args.command)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        sys.stderr.write(f"{parser.prog}: error: {args.command} failed: {type(e).__name__}: {msg}"
                         + ("" if args.verbose else " (run with -v for the traceback)") + "\n")
        return 1
    return 0


__all__ = ["build_parser", "main", "run", "parse_value", "parse_overrides", "check_model_dir", "check_data_file",
           "config_from_args", "inject_parameters", "stage_train", "stage_evaluate", "stage_capture", "stage_cka",
           "stage_spectral", "stage_patching", "stage_figures", "UsageError"]
