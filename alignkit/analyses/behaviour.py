"""Behaviour (notebook 01, ``python -m alignkit evaluate``): every checkpoint's accuracy and answer
log-prob, the flips (wrong at the reference, right when tuned) and the controls (both right)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from alignkit import patching, runs
from alignkit.analyses.common import Checkpoints, k_of_n, mode_sentence, per_seed, seed_values
from alignkit.config import Config
from alignkit.data import eval_set, eval_shots
from alignkit.evaluate import CheckpointEval, FlipTable, evaluate_checkpoint, flip_table, summary
from alignkit.stats import mcnemar

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BehaviourResult:
    """``evals [C]``: each checkpoint's evaluation in ``labels`` order (the reference first);
    ``table``: flips and controls between the reference and the tuned model (the last);
    ``run_dir``: the training run, if any (its loss history)."""

    labels: list[str]
    evals: list[CheckpointEval]
    table: FlipTable
    run_dir: Path | None = None

    @property
    def steps(self) -> list[int]:
        return [e.step for e in self.evals]

    def summary(self) -> list[dict]:
        """Per checkpoint: step, accuracy with its Wilson interval, answer log-prob ± s.e."""
        return summary(self.evals)

    def loss(self) -> list[tuple[int, float]]:
        """The training-loss history ``[(step, loss)]`` from ``train_log.json`` (empty if none)."""
        path = self.run_dir / "train_log.json" if self.run_dir else None
        return [tuple(x) for x in json.loads(path.read_text())["loss"]] if path and \
            path.is_file() else []

    def mcnemar(self) -> dict:
        """McNemar's exact test of the tuned model against the reference on the same problems."""
        return mcnemar(self.evals[0].correct, self.evals[-1].correct)


def ensure(cfg: Config, ckpts: Checkpoints) -> BehaviourResult:
    """Every checkpoint evaluated (``evaluate_checkpoint``: cached by weights and protocol; of a
    training run without ``cfg.eval.intermediate``, its start and final checkpoint only) and
    the flip table of the reference against the tuned model, also written to the run's
    ``flips.json`` when the checkpoints are a training run's."""
    ds = eval_set(cfg)
    labels = ckpts.labels if ckpts.run_dir is None or cfg.eval.intermediate else list(
        dict.fromkeys((ckpts.reference, ckpts.tuned)))
    evals = [evaluate_checkpoint(ckpts.paths[k], cfg, ds) for k in labels]
    table = flip_table(evals, cfg, ds)
    if ckpts.run_dir is not None:
        runs.write_json_atomic(ckpts.run_dir / "flips.json", dataclasses.asdict(table))
    return BehaviourResult(labels, evals, table, ckpts.run_dir)


def example_sets(cfg: Config, res: BehaviourResult,
                 ds=None) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """``({"flips": rows, "controls": rows}, labels)``: at most ``cfg.patching.n_examples`` of
    each. A set under ``cfg.patching.min_set`` rows is replaced by the held-out problems whose
    answer log-prob rose most (flips) or changed least (controls), labelled as substitutes."""
    n_examples, min_set = cfg.patching.n_examples, cfg.patching.min_set
    ds = ds if ds is not None else eval_set(cfg)
    gain = np.array(res.evals[-1].answer_logprob) - np.array(res.evals[0].answer_logprob)
    sets: dict[str, list[dict]] = {}
    labels: dict[str, str] = {}
    for name in ("flips", "controls"):
        rows = getattr(res.table, name)
        if len(rows) >= min_set:
            sets[name], labels[name] = rows[:n_examples], name
            continue
        order = np.argsort(-gain) if name == "flips" else np.argsort(np.abs(gain))
        taken = {r["index"] for r in sets.get("flips", [])}
        room = n_examples if name == "controls" else min(n_examples, max(1, len(gain) // 2))
        idx = [int(i) for i in order if int(i) not in taken][:room]  # leave controls some rows
        if not idx:
            raise ValueError(f"too few evaluation problems ({len(gain)}) to patch both flips and "
                             "controls: evaluate at least 2")
        sets[name] = [{"index": i, "question": ds[i]["question"], "answer": ds[i]["answer"]}
                      for i in idx]
        labels[name] = f"{name} (substitute)"
        logger.info("only %d %s: using the %d held-out problems with the %s change in answer "
                    "log-prob as a substitute", len(rows), name, len(idx),
                    "largest" if name == "flips" else "smallest")
    return sets, labels


def patch_examples(cfg: Config, tokenizer, rows: list[dict],
                   metric: str | None = None) -> list[dict]:
    """``patching.examples_from_table`` of ``example_sets`` rows with the prompts evaluation chose
    them under (``cfg.chat``'s format after ``eval_shots``); ``metric``: ``cfg.patching.metric``."""
    return patching.examples_from_table(rows, tokenizer, chat=cfg.chat,
                                        metric=metric or cfg.patching.metric, shots=eval_shots(cfg))


def set_key(sets: dict) -> dict:
    """Example sets as a cache key (index, question, answer of each row)."""
    return {k: [(r["index"], r["question"], r["answer"]) for r in v] for k, v in sets.items()}


def summarize(results: list[BehaviourResult], cfg: Config | None = None) -> str:
    """Notebook 01 over training seeds (one result per seed): base and final accuracy, the paired
    test against the base, the best checkpoint, answer log-prob, flips."""
    n, first = len(results), results[0].summary()[0]
    finals = [r.summary()[-1] for r in results]
    acc = [100 * f["accuracy"] for f in finals]
    tests = [r.mcnemar() for r in results]
    up = sum(t["p"] < 0.05 and t["diff"] > 0 for t in tests)
    down = sum(t["p"] < 0.05 and t["diff"] < 0 for t in tests)
    same_base = len({r.evals[0].weights_hash for r in results}) == 1
    spread = (f" (95 % CI {100 * finals[0]['acc_lo']:.1f}–{100 * finals[0]['acc_hi']:.1f})"
              if n == 1 else f", from {min(acc):.1f} to {max(acc):.1f} % across {n} training "
              "seeds")
    return "\n".join([
        f"- Base accuracy **{100 * first['accuracy']:.1f} %** (95 % CI "
        f"{100 * first['acc_lo']:.1f}–{100 * first['acc_hi']:.1f}) on {results[0].evals[0].n} "
        "held-out problems" + ("" if n == 1 else " (the same base for every seed)" if same_base
                               else " (seed 1's base: the seeds start from different bases)")
        + f"; after {finals[0]['step']} training steps **{seed_values(acc, '{:.1f} %')}**"
        + f"{spread}, a change of "
        + seed_values([a - 100 * first["accuracy"] for a in acc], "{:+.1f}") + " points.",
        (f"- Against the base by McNemar's paired test: p = {tests[0]['p']:.2g} ("
         + ("higher" if up else "lower" if down else "no difference") + " at p < 0.05)."
         if n == 1 else f"- Against the base by McNemar's paired test (p < 0.05): higher "
         f"{k_of_n(up, n)}" + (f", lower {k_of_n(down, n)}" if down else "") + "; p "
         + per_seed([t["p"] for t in tests], "{:.2g}".format) + "."),
        "- Best checkpoint: step " + mode_sentence([max(r.summary(), key=lambda x: x["accuracy"])
                                                    ["step"] for r in results])
        + (" (of the start and the final checkpoint: those between not evaluated, "
           "`eval.intermediate`)" if len(results[0].evals) == 2 else "") + ".",
        f"- Mean answer log-prob moved from {first['answer_logprob']:.2f} to "
        f"{seed_values([f['answer_logprob'] for f in finals])} nats.",
        f"- Flips: {per_seed([len(r.table.flips) for r in results])}; controls: "
        f"{per_seed([len(r.table.controls) for r in results])} (each run's `flips.json`)."])
