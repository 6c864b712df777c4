"""What changed (notebook 04 section 7, ``python -m alignkit lens``): the mean tuned − reference
residual difference on the flips, at their first tokens and at the positions predicting the scored
tokens (``cfg.patching.metric``), read through each model's final norm and head
(``alignkit.lens``), added back to the reference (steering, cross-fitted) against random directions
of its norm; and the per-token KL of tuned against reference."""

from __future__ import annotations

import dataclasses

import numpy as np

from alignkit import lens, patching
from alignkit.analyses import behaviour, common
from alignkit.analyses.common import k_of_n, mode_sentence, per_seed, seed_values
from alignkit.config import Config, LensParams
from alignkit.data import dataset_hash, eval_set
from alignkit.patching import PatchResult
from alignkit.stats import Band, gap_fraction

NAMES = {"first": "first tokens", "answer": "positions predicting the scored tokens"}


@dataclasses.dataclass
class LensResult:
    """``positions``: ``{"first": token indices, "answer": "answer"}``; per position set,
    ``diff`` ``[L, d_model]`` (mean tuned − reference residual after each decoder layer),
    ``tokens`` (it read by each model's norm and head: ``{"base" | "tuned": [L] x
    lens.top_tokens}``), ``steer`` (``PatchResult [n, 1 + n_random, L]``: added to the reference
    there, row 0 the mean difference of the other half of the flips (cross-fitted), the rest
    random directions of its norm, ``patching.random_directions``); ``texts`` (prompt + gold
    solution) with ``n_prompt`` tokens of prompt each, ``token_kl`` (per text ``[n_tokens]``
    KL(P_tuned ‖ P_ref)), ``ranked`` (``lens.rank_positions``), ``label`` (the flips or their
    substitute)."""

    positions: dict
    diff: dict[str, np.ndarray]
    tokens: dict
    steer: dict[str, PatchResult]
    texts: list[str]
    n_prompt: list[int]
    token_kl: list[np.ndarray]
    ranked: list[dict]
    label: str

    def steering(self, name: str, n_boot: int = 1000, seed: int = 0) -> dict:
        """One position set's steering as gap fractions (mean Δ / mean gap) over the steered
        ``layers``: ``steer`` (the held-out mean difference, paired bootstrap over examples);
        ``control`` (the random directions: median and 2.5–97.5 % range per layer);
        ``threshold``, the 95th percentile of the random directions' maximum over layers (a
        layer above it is above chance with the maximum over layers corrected); ``p_max``, the
        max-statistic p-value of steering's own maximum; ``above``, the layers over the threshold;
        ``at``: the index where steering carries most, ``peak``: that layer."""
        s = self.steer[name]
        gap = s.lp_donor - s.lp_receiver
        frac = np.nanmean(s.delta, 0) / np.mean(gap)  # [K, L]
        null, null_max = frac[1:], frac[1:].max(1)
        out = {"steer": gap_fraction(s.delta[:, 0], gap, n_boot, seed),
               "control": Band(np.median(null, 0), *np.percentile(null, [2.5, 97.5], axis=0)),
               "threshold": float(np.percentile(null_max, 95)),
               "p_max": float((1 + np.sum(null_max >= frac[0].max())) / (1 + len(null))),
               "n_random": len(null)}
        out["layers"] = np.asarray(s.meta.get("layers", range(s.delta.shape[-1])), dtype=int)
        out["above"] = [int(x) for x, v in zip(out["layers"], frac[0]) if v > out["threshold"]]
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
        exs = patching.examples_from_table(sets["flips"], tokenizer, chat=cfg.chat,
                                           metric=cfg.patching.metric)
        positions = {"first": list(range(p.n_first)), "answer": "answer"}
        kw = dict(batch_size=cfg.patching.batch_size, progress=False, metric=cfg.patching.metric)
        steered = exs[: p.n_steer]
        if len(steered) < 2:
            raise ValueError(f"cross-fitted steering needs at least 2 {labels['flips']}, got "
                             f"{len(steered)}")
        halves = [steered[0::2], steered[1::2]]  # each half steered with the other half's mean
        n_layers = base.config.num_hidden_layers
        layers = p.steer_layers if p.steer_layers is not None else \
            list(range(n_layers - 1, -1, -max(1, p.steer_every)))[::-1]
        diff, tokens, steer = {}, {}, {}
        for name, q in positions.items():
            diff[name] = patching.mean_difference(base, tuned, tokenizer, exs, positions=q, **kw)
            tokens[name] = {who: lens.top_tokens(lens.lens_logits(m, diff[name]), tokenizer, p.k)
                            for who, m in (("base", base), ("tuned", tuned))}
            parts = []
            for h, (held, fit) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
                v = patching.mean_difference(base, tuned, tokenizer, fit, positions=q, **kw)
                vecs = np.concatenate([v[None], patching.random_directions(
                    v, p.n_random, seed=p.seed + h)])
                parts.append(patching.steer_sweep(base, tuned, tokenizer, held, vecs,
                                                  positions=q, layers=layers,
                                                  min_gap=cfg.patching.min_gap, **kw))
            steer[name] = patching.concat(parts)
        spans = patching.tokenize_examples(tokenizer, exs[: p.n_texts])
        texts = [tokenizer.decode(s["input_ids"]) for s in spans]
        kls = lens.token_kl(base, tuned, tokenizer, texts, batch_size=kw["batch_size"],
                            progress=False)
        return LensResult(positions, diff, tokens, steer, texts,
                          [s["n_prompt"] for s in spans], kls,
                          lens.rank_positions(kls, tokenizer, texts, p.top), labels["flips"])

    return common.cached(cfg, pair, "lens", p, compute, eval=dataset_hash(ds),
                         sets=behaviour.set_key({"flips": sets["flips"]}),
                         batch_size=cfg.patching.batch_size, min_gap=cfg.patching.min_gap,
                         metric=cfg.patching.metric)


def _tokens(items, n: int = 5) -> str:
    return ", ".join(f"`{t!r}`" for t, _ in items[:n])


def summarize(results: list[LensResult], cfg: Config | None = None) -> str:
    """Notebook 04, what changed, over training seeds: steering against random directions,
    the tokens the difference promotes, where the per-token KL is (``cfg.lens``' bootstrap)."""
    p = cfg.lens if cfg is not None else LensParams()
    n = len(results)
    lines = [f"- Steering examples: the first of the {results[0].label} ("
             + per_seed([len(r.steer["answer"].lp_receiver) for r in results])
             + "), cross-fitted: each half steered with the mean tuned − reference difference of "
             "the other half, added to the reference at the positions it was measured on, against "
             + per_seed([r.steer["answer"].delta.shape[1] - 1 for r in results])
             + " random directions of the same norm (the control, a distribution)."]
    for name in results[0].positions:
        sts = [r.steering(name, p.n_boot, p.seed) for r in results]
        shared = sorted(set.intersection(*[{t for t, _ in r.tokens[name]["base"][st["peak"]][
            "promoted"]} for r, st in zip(results, sts)]))
        tops = results[0].tokens[name]["base"][sts[0]["peak"]]
        above = [st["above"] for st in sts]
        lines.append(
            f"- **Steering at the {NAMES[name]}**: largest at layer "
            f"{mode_sentence([st['peak'] for st in sts])}, carrying "
            + per_seed([f"{st['steer'].point[st['at']]:.2f} ({st['steer'].lo[st['at']]:.2f}–"
                        f"{st['steer'].hi[st['at']]:.2f})" for st in sts])
            + " of the gap; the random directions' maximum over layers reaches "
            + per_seed([f"{st['threshold']:.2f}" for st in sts])
            + " (95th percentile), so the max-statistic p-value of steering's maximum is "
            + per_seed([f"{st['p_max']:.3f}" for st in sts])
            + f" (below 0.05 {k_of_n(sum(st['p_max'] < 0.05 for st in sts), n)}); layers above "
            "that corrected threshold: "
            + per_seed([", ".join(map(str, a)) or "none" for a in above])
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
