"""What changed (notebook 04 section 7, ``python -m alignkit lens``): the mean tuned − reference
residual difference on the flips, at their first tokens and at the positions predicting the scored
tokens (``cfg.patching.metric``), read through each model's final norm and head
(``alignkit.lens``), added back to the reference (steering, cross-fitted) against random directions
of its norm; and the per-token KL of tuned against reference."""

from __future__ import annotations

import dataclasses

import numpy as np
from transformers import AutoConfig

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
    substitute); ``readout`` per position set, the read-out's cross-fitted control
    (``readout_overlap``: ``"halves"`` ``[L]``, ``"random"`` ``[n_random, L]``)."""

    positions: dict
    diff: dict[str, np.ndarray]
    tokens: dict
    steer: dict[str, PatchResult]
    texts: list[str]
    n_prompt: list[int]
    token_kl: list[np.ndarray]
    ranked: list[dict]
    label: str
    readout: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

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
        out["layers"] = self.layers(name)
        out["above"] = [int(x) for x, v in zip(out["layers"], frac[0]) if v > out["threshold"]]
        out["at"] = int(np.nanargmax(out["steer"].point))
        out["peak"] = int(out["layers"][out["at"]])
        return out

    def layers(self, name: str) -> np.ndarray:
        """The decoder layers a position set was steered (and read out) at."""
        s = self.steer[name]
        return np.asarray(s.meta.get("layers", range(s.delta.shape[-1])), dtype=int)

    def readout_control(self, name: str, layer: int) -> dict:
        """The read-out at decoder ``layer`` held out: ``halves``, how many of its top ``k``
        promoted tokens the two halves' differences share; ``random`` the mean and 95th
        percentile of that overlap for random directions of a half's norm; ``p`` (one-sided,
        ``(1 + #random >= halves) / (1 + n_random)``)."""
        r = self.readout[name]
        i = list(self.layers(name)).index(layer)
        halves, null = int(r["halves"][i]), np.asarray(r["random"])[:, i]
        return {"halves": halves, "k": int(r["k"]), "random": float(null.mean()),
                "q95": float(np.percentile(null, 95)),
                "p": float((1 + np.sum(null >= halves)) / (1 + len(null)))}

    def kl_split(self) -> tuple[float, float]:
        """Mean per-token KL (nats) over the prompt tokens and over the solution tokens."""
        prompt = np.concatenate([k[:n] for k, n in zip(self.token_kl, self.n_prompt)])
        solution = np.concatenate([k[n:] for k, n in zip(self.token_kl, self.n_prompt)])
        return float(prompt.mean()), float(solution.mean())


def readout_overlap(model, n_tokens: int, fit_a: np.ndarray, fit_b: np.ndarray,
                    random: np.ndarray, layers, k: int) -> dict[str, np.ndarray]:
    """The lens read-out held out: at each of ``layers``, how many of the top ``k`` tokens that
    half A's difference ``fit_a [L, d]`` promotes through ``model``'s final norm and head half
    B's ``fit_b`` also promotes (``"halves"`` ``[len(layers)]``), and the same overlap with half
    B for each of ``random [R, L, d]`` (directions of half A's norm: ``"random"`` ``[R,
    len(layers)]``); tokens past ``n_tokens`` (padded vocabulary rows) are never counted."""
    layers = list(layers)

    def top(vectors: np.ndarray) -> np.ndarray:  # [n, d] -> [n, k] token ids
        logits = lens.lens_logits(model, vectors)[:, :n_tokens]
        return np.argsort(-logits, axis=1, kind="stable")[:, :k]

    a, b = top(fit_a[layers]), top(fit_b[layers])
    rand = top(random[:, layers].reshape(-1, random.shape[-1])).reshape(len(random), len(layers), k)

    def shared(x, y):
        return len(set(x.tolist()) & set(y.tolist()))

    return {"halves": np.array([shared(x, y) for x, y in zip(a, b)]),
            "random": np.array([[shared(x, y) for x, y in zip(r, b)] for r in rand]),
            "k": k}


def steer_layers(p: LensParams, n_layers: int) -> list[int]:
    """The decoder layers steering runs at: ``p.steer_layers``, else every ``p.steer_every``-th
    counted back from the last of ``n_layers`` (the last always in)."""
    if p.steer_layers is not None:
        return list(p.steer_layers)
    return list(range(n_layers - 1, -1, -max(1, p.steer_every)))[::-1]


def ensure(cfg: Config, ckpts: common.Checkpoints) -> LensResult:
    """The lens, steering and per-token KL of the tuned model (the last checkpoint) against the
    reference on that pair's flips. Knobs: ``cfg.lens``; examples, batch, ``min_gap``:
    ``cfg.patching``'s."""
    p, pair, ds = cfg.lens, ckpts.pair(ckpts.tuned), eval_set(cfg)
    sets, labels = behaviour.example_sets(cfg, behaviour.ensure(cfg, pair), ds)
    layers = steer_layers(p, AutoConfig.from_pretrained(
        str(pair.paths[pair.reference])).num_hidden_layers)

    def compute() -> LensResult:
        base, tuned, tokenizer = common.load_pair(cfg, pair)
        exs = behaviour.patch_examples(cfg, tokenizer, sets["flips"])
        positions = {"first": list(range(p.n_first)), "answer": "answer"}
        kw = dict(batch_size=cfg.patching.batch_size, progress=False, metric=cfg.patching.metric)
        steered = exs[: p.n_steer]
        if len(steered) < 2:
            raise ValueError(f"cross-fitted steering needs at least 2 {labels['flips']}, got "
                             f"{len(steered)}")
        halves = [steered[0::2], steered[1::2]]  # each half steered with the other half's mean
        diff, tokens, steer, readout = {}, {}, {}, {}
        for name, q in positions.items():
            diff[name] = patching.mean_difference(base, tuned, tokenizer, exs, positions=q, **kw)
            tokens[name] = {who: lens.top_tokens(lens.lens_logits(m, diff[name]), tokenizer, p.k)
                            for who, m in (("base", base), ("tuned", tuned))}
            parts, fits = [], []
            for h, (held, fit) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
                v = patching.mean_difference(base, tuned, tokenizer, fit, positions=q, **kw)
                fits.append((v, patching.random_directions(v, p.n_random, seed=p.seed + h)))
                parts.append(patching.steer_sweep(base, tuned, tokenizer, held,
                                                  np.concatenate([v[None], fits[-1][1]]),
                                                  positions=q, layers=layers,
                                                  min_gap=cfg.patching.min_gap, **kw))
            steer[name] = patching.concat(parts)
            readout[name] = readout_overlap(base, len(tokenizer), fits[0][0], fits[1][0],
                                            fits[0][1], layers, p.k)
        spans = patching.tokenize_examples(tokenizer, exs[: p.n_texts])
        texts = [tokenizer.decode(s["input_ids"]) for s in spans]
        kls = lens.token_kl(base, tuned, tokenizer, texts, batch_size=kw["batch_size"],
                            progress=False)
        return LensResult(positions, diff, tokens, steer, texts,
                          [s["n_prompt"] for s in spans], kls,
                          lens.rank_positions(kls, tokenizer, texts, p.top), labels["flips"],
                          readout)

    # keyed by the layers steered, however they were named (steer_layers or steer_every), and by
    # the two models' weights alone (the labels are not in the result)
    return common.cached(cfg, pair, "lens", dataclasses.replace(p, steer_layers=tuple(layers)),
                         compute, pair=True, eval=dataset_hash(ds),
                         sets=behaviour.set_key({"flips": sets["flips"]}),
                         batch_size=cfg.patching.batch_size, min_gap=cfg.patching.min_gap,
                         metric=cfg.patching.metric, readout="cross-fitted")


def _readout_sentence(controls: list[dict]) -> str:
    """The read-out's held-out control in words ("" for results without one)."""
    if not controls:
        return ""
    n = len(controls)
    return ("; held out, the two halves' differences share "
            + per_seed([f"{c['halves']} of their top {c['k']}" for c in controls])
            + " promoted tokens there, random directions of a half's norm "
            + per_seed([f"{c['random']:.1f} (95th percentile {c['q95']:.0f})" for c in controls])
            + ", p = " + per_seed([f"{c['p']:.3f}" for c in controls])
            + f" (below 0.05 {k_of_n(sum(c['p'] < 0.05 for c in controls), n)})")


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
               + (", ".join(f"`{t!r}`" for t in shared) or "no common token"))
            + _readout_sentence([r.readout_control(name, st["peak"]) for r, st in zip(results, sts)
                                 if name in r.readout]) + ".")
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
