"""What each stage returns: small classes with named fields, shapes and their own save/load
(arrays to ``arrays.npz``, no pickle; the rest to ``result.json``). ``S``: checkpoints after the
base; ``L``: hook points kept (those not constant across the probe prompts)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from alignkit import runs, spectral, weights
from alignkit.claims import Verdict
from alignkit.evaluate import CheckpointEval, FlipTable, summary
from alignkit.patching import PatchResult
from alignkit.stats import Band


def _bands(arrays: dict, prefix: str, bands: dict) -> None:
    """Store ``{key: Band}`` as one ``[n, 3, ...]`` array (the keys are stored by the caller)."""
    arrays[prefix] = np.stack([b.stack() for b in bands.values()])


def _unbands(arrays: dict, prefix: str, keys: list) -> dict:
    return {k: Band(*a) for k, a in zip(keys, arrays[prefix])}


@dataclasses.dataclass
class RunResults:
    """A trained run: ``evals`` ``[S + 1]`` of its checkpoints by step (``evals[0]``: its start),
    ``table``: flips and controls between the first and the last (each cached on its own)."""

    run_dir: Path
    evals: list[CheckpointEval]
    table: FlipTable

    @property
    def steps(self) -> list[int]:
        return [e.step for e in self.evals]

    def summary(self) -> list[dict]:
        return summary(self.evals)

    def loss(self) -> list[tuple[int, float]]:
        """The training-loss history ``[(step, loss)]`` from ``train_log.json`` (empty if none)."""
        path = self.run_dir / "train_log.json"
        return [tuple(x) for x in json.loads(path.read_text())["loss"]] if path.is_file() else []


_CKA_ARRAYS = ("noise_classic", "noise_debiased", "matrix", "chance", "best", "departure",
               "alt_curve")


@dataclasses.dataclass
class CKAResult:
    """Notebook 02: layerwise CKA (base vs every checkpoint) and the base x final comparison.

    Attributes:
        steps: ``[S + 1]`` checkpoint steps, base first.
        labels: ``[L]`` kept hook points (``"embed"``, ``"0"``, ...); ``dropped`` the others.
        classic, debiased: ``{step: Band [L]}`` bootstrap 95 % bands for every step after the base.
        noise_classic, noise_debiased: ``[L]`` split-half noise-floor half-widths (base vs final).
        matrix, chance: ``[L, L]`` classic CKA base layer i x final layer j, and its shuffled-rows
            mean (permutation baseline).
        path: DTW alignment ``[(i, j)]``; best: ``[L]`` best-matching final layer; remap: float.
        transition: ``(point, lo, hi)`` layer index after the steepest drop with its interval.
        departure: ``[L]`` first step outside the noise band (-1: never).
        alt_pooling, alt_labels, alt_curve: the final layerwise classic CKA with the other pooling.
    """

    steps: list[int]
    labels: list[str]
    dropped: list[str]
    pooling: str
    classic: dict[int, Band]
    debiased: dict[int, Band]
    noise_classic: np.ndarray
    noise_debiased: np.ndarray
    matrix: np.ndarray
    chance: np.ndarray
    path: list[tuple[int, int]]
    best: np.ndarray
    remap: float
    transition: tuple[int, int, int]
    departure: np.ndarray
    alt_pooling: str
    alt_labels: list[str]
    alt_curve: np.ndarray

    def by_step(self) -> np.ndarray:
        """``[S + 1, L]`` classic CKA of every checkpoint vs the base (1 for the base itself)."""
        rows = [self.classic[s].point for s in self.steps[1:]]
        return np.stack([np.ones(len(self.labels))] + rows)

    def save(self, path: Path) -> None:
        arrays = {k: np.asarray(getattr(self, k)) for k in _CKA_ARRAYS}
        _bands(arrays, "classic", self.classic)
        _bands(arrays, "debiased", self.debiased)
        meta = {k: getattr(self, k) for k in (
            "steps", "labels", "dropped", "pooling", "path", "remap", "transition", "alt_pooling",
            "alt_labels")}
        runs.save_arrays(path, arrays, meta)

    @classmethod
    def load(cls, path: Path) -> CKAResult:
        a, m = runs.load_arrays(path)
        steps = m["steps"]
        return cls(
            **{k: m[k] for k in ("steps", "labels", "dropped", "pooling", "remap", "alt_pooling",
                                 "alt_labels")},
            classic=_unbands(a, "classic", steps[1:]), debiased=_unbands(a, "debiased", steps[1:]),
            path=[tuple(p) for p in m["path"]], transition=tuple(m["transition"]),
            **{k: a[k] for k in _CKA_ARRAYS})


@dataclasses.dataclass
class SpectralResult:
    """Notebook 03: effective ranks per layer of every checkpoint, with paired bootstraps.

    Attributes:
        metrics: metric names (``"rankme"``, ``"renyi_0.5"``, ... from ``spectral.metric_key``).
        point, lo, hi: ``{metric: [S + 1, L]}`` full-sample value and 95 % interval.
        samples: ``{metric: [S + 1, n_boot, L]}``: the same row subsamples for every checkpoint,
            so differences between checkpoints have paired intervals (``delta``).
        n, m, width, scale, ci: rows, rows per subsample, d_model, the spread's rescaling and
            the coverage of the intervals.
        ns, rank_vs_n: probe sizes and ``[2, len(ns), L]`` RankMe of base and final on nested
            subsets of the probe set.
        cka_drift: ``[L]`` 1 - CKA(base, final) per layer (same pooling), for comparison.
    """

    steps: list[int]
    labels: list[str]
    dropped: list[str]
    pooling: str
    alphas: tuple[float, ...]
    metrics: list[str]
    point: dict[str, np.ndarray]
    lo: dict[str, np.ndarray]
    hi: dict[str, np.ndarray]
    samples: dict[str, np.ndarray]
    n: int
    m: int
    width: int
    scale: float
    ci: float
    ns: list[int]
    rank_vs_n: np.ndarray
    cka_drift: np.ndarray

    @classmethod
    def from_bootstraps(cls, boot: dict[int, dict], **fields) -> SpectralResult:
        """From ``{step: spectral.bootstrap_layer_metrics(...)}`` (one setting for every step)."""
        steps = sorted(boot)
        metrics = list(boot[steps[0]])
        first = boot[steps[0]][metrics[0]]
        return cls(steps=steps, metrics=metrics, n=int(first["n"]), m=int(first["m"]),
                   scale=float(first["scale"]), ci=float(first["ci"]), **fields,
                   **{f: {k: np.stack([boot[s][k][f] for s in steps]) for k in metrics}
                      for f in ("point", "lo", "hi", "samples")})

    def band(self, metric: str, step: int) -> Band:
        i = self.steps.index(step)
        return Band(self.point[metric][i], self.lo[metric][i], self.hi[metric][i])

    def _boot(self, metric: str, i: int) -> dict:
        return {metric: {"point": self.point[metric][i], "samples": self.samples[metric][i],
                         "n": self.n, "m": self.m, "ci": self.ci, "scale": self.scale}}

    def delta(self, metric: str, step: int, ref: int | None = None) -> Band:
        """Paired change ``step - ref`` (ref: the base) with its interval."""
        i, j = self.steps.index(step), self.steps.index(self.steps[0] if ref is None else ref)
        return Band.of(spectral.paired_delta(self._boot(metric, i), self._boot(metric, j))[metric])

    def save(self, path: Path) -> None:
        arrays = {f"{f}.{k}": v for f in ("point", "lo", "hi", "samples")
                  for k, v in getattr(self, f).items()}
        arrays.update(rank_vs_n=self.rank_vs_n, cka_drift=self.cka_drift)
        meta = {k: getattr(self, k) for k in ("steps", "labels", "dropped", "pooling", "alphas",
                                              "metrics", "n", "m", "width", "scale", "ci", "ns")}
        runs.save_arrays(path, arrays, meta)

    @classmethod
    def load(cls, path: Path) -> SpectralResult:
        a, m = runs.load_arrays(path)
        fields = {f: {k: a[f"{f}.{k}"] for k in m["metrics"]} for f in ("point", "lo", "hi",
                                                                         "samples")}
        return cls(**dict(m, alphas=tuple(m["alphas"])), **fields, rank_vs_n=a["rank_vs_n"],
                   cka_drift=a["cka_drift"])


_PATCH_GROUPS = ("sweeps", "by_pos", "cross", "ablation")


@dataclasses.dataclass
class PatchingResult:
    """Notebook 04: patching sweeps of base (first checkpoint) vs tuned (last).

    Attributes:
        sets, labels: ``{"flips" | "controls": rows}`` patched and their labels.
        sweeps: ``{"<set>/<component>/<direction>": PatchResult [n, L]}`` (``sweep()``).
        by_pos: ``{"all" | "prompt" | "answer": PatchResult [n, L]}`` flips, resid, denoise.
        cross: ``{set: PatchResult [n_cross, L, L]}`` cross-layer denoise.
        ablation: ``{"<set>/<revert|graft|mean_diff>": PatchResult [n, L]}`` weight ablation,
            and on the flips ``"flips/mean_diff@<prompt|answer>"`` (the mean difference of those
            rows put back there) with ``"flips/noise@<prompt|answer>"`` (all of it removed there).
        cka_matrix: ``[L, L]`` CKA of base x tuned decoder layers (question pooling), for the
            path.
    """

    sets: dict[str, list[dict]]
    labels: dict[str, str]
    base_step: int
    final_step: int
    sweeps: dict[str, PatchResult]
    by_pos: dict[str, PatchResult]
    cross: dict[str, PatchResult]
    ablation: dict[str, PatchResult]
    cka_matrix: np.ndarray

    def sweep(self, set_: str, component: str, direction: str) -> PatchResult:
        return self.sweeps[f"{set_}/{component}/{direction}"]

    def save(self, path: Path) -> None:
        path.mkdir(parents=True)
        for group in _PATCH_GROUPS:
            for name, r in getattr(self, group).items():
                r.save(path / group / name.replace("/", "-"))
        np.save(path / "cka_matrix.npy", self.cka_matrix)
        meta = {k: getattr(self, k) for k in ("sets", "labels", "base_step", "final_step")}
        meta["names"] = {g: list(getattr(self, g)) for g in _PATCH_GROUPS}
        runs.write_json_atomic(path / "result.json", meta, sort_keys=False)

    @classmethod
    def load(cls, path: Path) -> PatchingResult:
        meta = json.loads((path / "result.json").read_text())
        groups = {g: {n: PatchResult.load(path / g / n.replace("/", "-")) for n in names}
                  for g, names in meta.pop("names").items()}
        return cls(**meta, **groups, cka_matrix=np.load(path / "cka_matrix.npy"))


@dataclasses.dataclass
class LensResult:
    """What changed between base (first checkpoint) and tuned (last), ``alignkit.lens``.

    Attributes:
        positions: ``{name: positions}``: ``"first"`` (the first tokens of every example, a list
            of indices) and ``"answer"`` (the answer-predicting positions).
        diff: ``{name: [L, d_model]}`` mean tuned - base residual after each decoder layer there.
        tokens: ``{name: {"base" | "tuned": [L] x {"promoted" | "suppressed": [(token, z)]}}}``
            the difference read through each model's final norm and head (``lens.top_tokens``).
        steer, control: ``{name: PatchResult [n, L]}``: the difference added to base at those
            positions, and the same with its coordinates shuffled (``weight_sweep``'s ``"steer"``
            and ``"steer_shuffled"``).
        texts: the probe texts (prompt + gold solution) of the per-token KL; ``n_prompt``: each
            one's prompt length in tokens.
        token_kl: ``[len(texts)]`` arrays ``[n_tokens]``, ``KL(P_tuned || P_base)`` per position.
        ranked: ``lens.rank_positions`` over the texts.
        label: which examples (``"flips"`` or its substitute).
    """

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

    def save(self, path: Path) -> None:
        path.mkdir(parents=True)
        for group in ("steer", "control"):
            for name, r in getattr(self, group).items():
                r.save(path / group / name)
        lengths = np.array([len(k) for k in self.token_kl])
        np.savez(path / "arrays.npz", token_kl=np.concatenate(self.token_kl), lengths=lengths,
                 **{f"diff_{k}": v for k, v in self.diff.items()})
        meta = {k: getattr(self, k) for k in ("positions", "tokens", "texts", "n_prompt",
                                              "ranked", "label")}
        runs.write_json_atomic(path / "result.json", meta, sort_keys=False)

    @classmethod
    def load(cls, path: Path) -> LensResult:
        meta = json.loads((path / "result.json").read_text())
        names = list(meta["positions"])
        with np.load(path / "arrays.npz", allow_pickle=False) as f:
            kl = np.split(f["token_kl"], np.cumsum(f["lengths"])[:-1])
            diff = {k: f[f"diff_{k}"] for k in names}
        groups = {g: {k: PatchResult.load(path / g / k) for k in names}
                  for g in ("steer", "control")}
        return cls(**meta, **groups, diff=diff, token_kl=kl)


def _save_frame(df: pd.DataFrame) -> dict:
    """A ``weights.weight_drift`` table as JSON-able columns (its ``shape`` tuples as lists)."""
    columns = df.to_dict(orient="list")
    columns["shape"] = [list(s) for s in columns["shape"]]
    return {"columns": columns, "order": list(df.columns), "attrs": df.attrs}


def _load_frame(d: dict) -> pd.DataFrame:
    df = pd.DataFrame(d["columns"])[d["order"]]
    df["shape"] = [tuple(s) for s in df["shape"]]
    df.attrs.update(d["attrs"])
    return df


@dataclasses.dataclass
class CompareResult:
    """Notebook 05: SFT, DPO and GRPO against one base and against each method's own init.

    Attributes:
        methods: the compared methods; init: ``{method: label of the model it started from}``.
        accuracy: ``{"base" | method: summary row}`` (accuracy with its Wilson interval ...).
        labels, dropped: hook points kept / dropped (probe activations, ``pooling``).
        cka: ``{method: Band [L]}`` CKA(base, final) with bootstrap bands; cka_floor: ``[L]`` the
            widest split-half noise half-width of the comparisons.
        rank_vs_base, rank_vs_init: ``{method: Band [L]}`` paired Δ RankMe.
        patch_set, patches: the SFT flips label and ``{method: PatchResult [n, L]}`` resid denoise
            of the final model into the base; patch_curves ``{method: Band [L]}`` their mean Δ
            with bootstrap intervals over examples.
        drift, own: ``{method: weights.weight_drift table}`` vs the base and vs the own init.
        structure: ``{group: {method: Band}}`` own-update means over weight matrices with
            bootstrap intervals over matrices; structure_controls: ``{group: control value}``.
        correct: ``{"base" | method: [n_eval] bool}`` per-problem exact match (paired tests).
        last_states: ``{model label: [n, d]}`` last-token states of the last decoder layer on the
            probes (``claims.effective_rank_claim``).
        matched_unchanged: ``{rl method: bf16-unchanged share of SFT's own update rescaled to
            that method's update norm}`` (``claims.sparsity_claim``'s size control).
        claims: the published claims tested on this comparison (``stages.compare_claims``).
    """

    methods: list[str]
    init: dict[str, str]
    accuracy: dict[str, dict]
    n_eval: int
    pooling: str
    labels: list[str]
    dropped: list[str]
    cka: dict[str, Band]
    cka_floor: np.ndarray
    rank_vs_base: dict[str, Band]
    rank_vs_init: dict[str, Band]
    patch_set: str
    patches: dict[str, PatchResult]
    patch_curves: dict[str, Band]
    drift: dict[str, pd.DataFrame]
    own: dict[str, pd.DataFrame]
    structure: dict[str, dict[str, Band]]
    structure_controls: dict[str, float]
    correct: dict[str, list[bool]]
    last_states: dict[str, np.ndarray]
    matched_unchanged: dict[str, float]
    claims: list[Verdict]

    def save(self, path: Path) -> None:
        arrays = {"cka_floor": self.cka_floor}
        arrays |= {f"last.{k}": v for k, v in self.last_states.items()}
        for name in ("cka", "rank_vs_base", "rank_vs_init", "patch_curves"):
            _bands(arrays, name, getattr(self, name))
        for g, by_method in self.structure.items():
            _bands(arrays, f"structure.{g}", by_method)
        meta = {k: getattr(self, k) for k in ("methods", "init", "accuracy", "n_eval", "pooling",
                                              "labels", "dropped", "patch_set",
                                              "structure_controls", "correct",
                                              "matched_unchanged")}
        meta["state_labels"] = list(self.last_states)
        meta["claims"] = [v.to_dict() for v in self.claims]
        meta["frames"] = {f"{k}.{m}": _save_frame(getattr(self, k)[m]) for k in ("drift", "own")
                          for m in self.methods}
        runs.save_arrays(path, arrays, meta)
        for m, r in self.patches.items():
            r.save(path / f"patch-{m}")

    @classmethod
    def load(cls, path: Path) -> CompareResult:
        a, meta = runs.load_arrays(path)
        frames = meta.pop("frames")
        methods = meta["methods"]
        last = {k: a[f"last.{k}"] for k in meta.pop("state_labels")}
        meta["claims"] = [Verdict.from_dict(v) for v in meta["claims"]]
        return cls(
            **meta, cka_floor=a["cka_floor"], last_states=last,
            **{k: _unbands(a, k, methods)
               for k in ("cka", "rank_vs_base", "rank_vs_init", "patch_curves")},
            structure={g: _unbands(a, f"structure.{g}", methods)
                       for g in meta["structure_controls"]},
            patches={m: PatchResult.load(path / f"patch-{m}") for m in methods},
            **{k: {m: _load_frame(frames[f"{k}.{m}"]) for m in methods} for k in ("drift", "own")})

    def gap(self, method: str) -> float:
        """Mean LP(final) − LP(base) on the patched flips."""
        r = self.patches[method]
        return float(np.mean(r.lp_donor - r.lp_receiver))

    def own_by_module(self) -> pd.DataFrame:
        """``[module, method]`` relative change ‖ΔW‖/‖W‖ of each own update, pooled per module."""
        return pd.DataFrame({m: weights.summarize_drift(self.own[m], "module")["rel_change"]
                             for m in self.methods})

    def drift_by_layer(self) -> dict[str, pd.DataFrame]:
        """``{"<method> vs base" | "<method> own update": summarize_drift(table, "layer")}``."""
        out = {f"{m} vs base": weights.summarize_drift(self.drift[m], "layer")
               for m in self.methods}
        out |= {f"{m} own update": weights.summarize_drift(self.own[m], "layer")
                for m in self.methods if self.init[m] != "base"}
        return out


@dataclasses.dataclass
class CrossCKAResult:
    """Cross-layer CKA of given models against the reference, any depths and widths
    (``stages.ensure_models_cka``).

    Attributes:
        models: the compared labels (the reference ``"base"`` not among them).
        labels: ``{"base" | model: [L_m]}`` kept hook points of each model.
        dropped: ``{"base" | model: [...]}`` hook points constant across the probes.
        shape: ``{model: [config fields differing from the reference]}`` (empty: one shape).
        pooling: probe pooling; n_probes: probe prompts.
        cka: ``{model: [L_ref, L_m]}`` biased CKA of reference layer i and the model's layer j;
            lo, hi: its bootstrap 95 % interval; chance: the shuffled-rows mean (unrelated
            examples paired: what CKA gives by geometry alone).
        best: ``{model: [L_m]}`` the best-matching reference layer of each of the model's layers;
            ties: ``{model: [L_ref, L_m]}`` reference layers tied with it (bootstrap).
    """

    models: list[str]
    labels: dict[str, list[str]]
    dropped: dict[str, list[str]]
    shape: dict[str, list[str]]
    pooling: str
    n_probes: int
    cka: dict[str, np.ndarray]
    lo: dict[str, np.ndarray]
    hi: dict[str, np.ndarray]
    chance: dict[str, np.ndarray]
    best: dict[str, np.ndarray]
    ties: dict[str, np.ndarray]

    _ARRAYS = ("cka", "lo", "hi", "chance", "best", "ties")

    def save(self, path: Path) -> None:
        arrays = {f"{k}.{m}": getattr(self, k)[m] for k in self._ARRAYS for m in self.models}
        meta = {k: getattr(self, k) for k in ("models", "labels", "dropped", "shape", "pooling",
                                              "n_probes")}
        runs.save_arrays(path, arrays, meta)

    @classmethod
    def load(cls, path: Path) -> CrossCKAResult:
        a, meta = runs.load_arrays(path)
        return cls(**meta, **{k: {m: a[f"{k}.{m}"] for m in meta["models"]} for k in cls._ARRAYS})
