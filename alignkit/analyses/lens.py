"""What changed (notebook 04 section 7, ``python -m alignkit lens``): the mean tuned − reference
residual difference on the flips, at their first tokens and at their answer-predicting positions,
read through each model's final norm and head (``alignkit.lens``), added back to the reference
(steering) against its shuffled control; and the per-token KL of tuned against reference."""

from __future__ import annotations

import dataclasses

import numpy as np

from alignkit import lens, patching
from alignkit.analyses import behaviour, common
from alignkit.analyses.common import k_of_n, mode_sentence, per_seed, seed_values
from alignkit.config import Config, LensParams
from alignkit.data import dataset_hash, eval_set
from alignkit.patching import PatchResult
from alignkit.stats import gap_fraction

NAMES = {"first": "first tokens", "answer": "answer-predicting positions"}


@dataclasses.dataclass
class LensResult:
    """``positions``: ``{"first": token indices, "answer": "answer"}``; per position set,
    ``diff`` ``[L, d_model]`` (mean tuned − reference residual after each decoder layer),
    ``tokens`` (it read by each model's norm and head: ``{"base" | "tuned": [L] x
    lens.top_tokens}``), ``steer`` and ``control`` (``PatchResult [n, L]``: it added to the
    reference there, and shuffled); ``texts`` (prompt + gold solution) with ``n_prompt`` tokens of
    prompt each, ``token_kl`` (per text ``[n_tokens]`` KL(P_tuned ‖ P_ref)), ``ranked``
    (``lens.rank_positions``), ``label`` (the flips or their substitute)."""

    positions: dict
    diff: dict[str, np.ndarray]
    tokens: dict
    steer: dict[str, PatchResult]
    control: dict[str, PatchResult]
    texts: list[str]
    n_prompt: list[int]
    token_kl: list[np.ndarray]
    ranked: list[dict]
    label: str

    def steering(self, name: str, n_boot: int = 1000, seed: int = 0) -> dict:
        """One position set's curves as gap fractions (mean Δ / mean gap, paired bootstrap):
        ``steer``, ``control`` and ``excess`` (steer − control, one resample) over the steered
        ``layers``; ``at``: the index where steering carries most, ``peak``: that layer."""
        s, c = self.steer[name], self.control[name]
        gap = s.lp_donor - s.lp_receiver
        out = {k: gap_fraction(d, gap, n_boot, seed) for k, d in
               (("steer", s.delta), ("control", c.delta), ("excess", s.delta - c.delta))}
        out["layers"] = np.asarray(s.meta.get("layers", range(s.delta.shape[1])), dtype=int)
        out["at"] = int(np.nanargmax(out["steer"].point))
        out["peak"] = int(out["layers"][out["at"]])
        return out

    def kl_split(self) -> tuple[float, float]:
        """Mean per-token KL (nats) over the prompt tokens and over the solution tokens."""
        prompt = np.concatenate([k[:n] for k, n in zip(self.token_kl, self.n_prompt)])
        solution = np.concatenate([k[n:] for k, n in zip(self.token_kl, self.n_prompt)])
        return float(prompt.mean()), float(solution.mean())


def ensure(cfg: Config, ckpts: common.Checkpoints) -> LensResult:
    """The lens, steering and per-token KL of the tuned model (the last checkpoint) against the
    reference on that pair's flips. Knobs: ``cfg.lens``; examples, batch, ``min_gap``:
    ``cfg.patching``'s."""
    p, pair, ds = cfg.lens, ckpts.pair(ckpts.tuned), eval_set(cfg)
    sets, labels = behaviour.example_sets(cfg, behaviour.ensure(cfg, pair), ds)

    def compute() -> LensResult:
        base, tuned, tokenizer = common.load_pair(cfg, pair)
        exs = patching.examples_from_table(sets["flips"], tokenizer, chat=cfg.chat)
        positions = {"first": list(range(p.n_first)), "answer": "answer"}
        kw = dict(batch_size=cfg.patching.batch_size, progress=False)
        diff, tokens, steer, control = {}, {}, {}, {}
        for name, q in positions.items():
            diff[name] = patching.mean_difference(base, tuned, tokenizer, exs, positions=q, **kw)
            tokens[name] = {who: lens.top_tokens(lens.lens_logits(m, diff[name]), tokenizer, p.k)
                            for who, m in (("base", base), ("tuned", tuned))}
            r = patching.weight_sweep(base, tuned, tokenizer, exs, layers=p.steer_layers,
                                      mean_positions=q, kinds=("steer", "steer_shuffled"),
                                      min_gap=cfg.patching.min_gap, seed=p.seed, **kw)
            steer[name], control[name] = r["steer"], r["steer_shuffled"]
        spans = patching.tokenize_examples(tokenizer, exs[: p.n_texts])
        texts = [tokenizer.decode(s["input_ids"]) for s in spans]
        kls = lens.token_kl(base, tuned, tokenizer, texts, **kw)
        return LensResult(positions, diff, tokens, steer, control, texts,
                          [s["n_prompt"] for s in spans], kls,
                          lens.rank_positions(kls, tokenizer, texts, p.top), labels["flips"])

    return common.cached(cfg, pair, "lens", p, compute, eval=dataset_hash(ds),
                         sets=behaviour.set_key({"flips": sets["flips"]}),
                         batch_size=cfg.patching.batch_size, min_gap=cfg.patching.min_gap)


def _tokens(items, n: int = 5) -> str:
    return ", ".join(f"`{t!r}`" for t, _ in items[:n])


def summarize(results: list[LensResult], cfg: Config | None = None) -> str:
    """Notebook 04, what changed, over training seeds: steering against its shuffled control,
    the tokens the difference promotes, where the per-token KL is (``cfg.lens``' bootstrap)."""
    p = cfg.lens if cfg is not None else LensParams()
    n = len(results)
    lines = [f"- Examples: the {results[0].label} ("
             + per_seed([len(r.steer["answer"].lp_receiver) for r in results])
             + "); the mean tuned − reference difference added to the reference at the positions "
             "it was measured on, against the same vector with its coordinates shuffled."]
    for name in results[0].positions:
        sts = [r.steering(name, p.n_boot, p.seed) for r in results]
        at = [(st["steer"], st["control"], st["excess"], st["at"]) for st in sts]
        shared = sorted(set.intersection(*[{t for t, _ in r.tokens[name]["base"][st["peak"]][
            "promoted"]} for r, st in zip(results, sts)]))
        tops = results[0].tokens[name]["base"][sts[0]["peak"]]
        lines.append(
            f"- **Steering at the {NAMES[name]}**: largest at layer "
            f"{mode_sentence([st['peak'] for st in sts])}, carrying "
            + per_seed([f"{s.point[i]:.2f} ({s.lo[i]:.2f}–{s.hi[i]:.2f})"
                              for s, _, _, i in at])
            + " of the gap (maxima over layers, not corrected; the shuffled control "
            + seed_values([c.point[i] for _, c, _, i in at]) + "); steer − control "
            + seed_values([e.point[i] for _, _, e, i in at], "{:.3f}")
            + ", its interval above 0 " + k_of_n(sum(e.lo[i] > 0 for _, _, e, i in at), n)
            + ". Over all layers (no selection), the layers where steer − control lies above / "
            "below 0: " + per_seed([f"{int((e.lo > 0).sum())} / {int((e.hi < 0).sum())} of "
                                         f"{len(e.point)}" for _, _, e, _ in at])
            + ". Read through the reference's head there it promotes "
            + (_tokens(tops["promoted"]) + " and suppresses " + _tokens(tops["suppressed"])
               if n == 1 else "(top 10, every seed) "
               + (", ".join(f"`{t!r}`" for t in shared) or "no common token")) + ".")
    splits = [r.kl_split() for r in results]
    lines.append("- **Per-token KL** (tuned ‖ reference): mean "
                 + seed_values([s for _, s in splits], "{:.3f}")
                 + " nats on the solution tokens against "
                 + seed_values([q for q, _ in splits], "{:.3f}")
                 + " on the prompt tokens; higher on the solution "
                 + k_of_n(sum(s > q for q, s in splits), n)
                 + f"; the largest{' (seed 1)' if n > 1 else ''} at "
                 + "; ".join(f"`{r['token']!r}` before `{r['next']!r}` ({r['kl']:.2f})"
                             for r in results[0].ranked[:5]) + ".")
    return "\n".join(lines)
