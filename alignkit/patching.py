"""Causal localisation: activation patching (``"denoise"``: tuned into base; ``"noise"``: base
into tuned), cross-layer patching and weight ablation, scored by the answer log-prob.
Formulas, controls and pitfalls: docs/measures.md#activation-patching"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from typing import Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit import models
from alignkit.data import cut_at_stop, extract_answer, format_prompt
from alignkit.evaluate import TARGETS, answer_logp, answer_spans, end_tokens, scorable
from alignkit.hooks import KINDS, overwrite, record

logger = logging.getLogger(__name__)

COMPONENTS = KINDS  # ("resid", "attn", "mlp")
DIRECTIONS = ("denoise", "noise")
POSITIONS = ("all", "prompt", "answer")
WEIGHT_KINDS = ("revert", "graft", "mean_diff")  # weight_sweep's: notebook 04's ablation
Positions = Union[str, Sequence[int]]


@dataclasses.dataclass
class PatchResult:
    """Per-example results of one sweep (in nats; defined in docs/measures.md#activation-patching).

    ``lp_patched``, ``delta``, ``npe``, ``kl``: ``[n_examples, *grid]``, ``grid`` being
    ``[n_layers]`` or, for ``cross_layer_sweep``, ``[n_receiver_layers, n_donor_layers]``.
    ``lp_receiver``, ``lp_donor``, ``kl_receiver`` (before any patch), ``npe_valid`` (False where
    NPE is masked): ``[n_examples]``. ``meta``: ``sweep``, ``component``, ``positions``,
    ``direction``, ``receiver`` and ``donor`` ("base"/"tuned"), ``layers`` (and ``donor_layers``),
    ``min_gap``, ``n_npe_masked``, ``n_examples``."""

    lp_patched: np.ndarray
    delta: np.ndarray
    npe: np.ndarray
    kl: np.ndarray
    lp_receiver: np.ndarray
    lp_donor: np.ndarray
    kl_receiver: np.ndarray
    npe_valid: np.ndarray
    meta: dict


class _Scores:
    """A sweep's raw ``PatchResult`` arrays, filled batch by batch."""

    def __init__(self, n: int, *grid: int):
        self.lp_patched, self.kl = np.zeros((n, *grid)), np.zeros((n, *grid))
        self.lp_receiver, self.lp_donor, self.kl_receiver = np.zeros(n), np.zeros(n), np.zeros(n)

    def unpatched(self, batch: _Batch, recv: _Cache, donor: _Cache) -> None:
        i = batch.index
        self.lp_receiver[i], self.kl_receiver[i] = _score(recv.logp, donor.logp, batch)
        self.lp_donor[i] = _score(donor.logp, donor.logp, batch)[0]

    def patched(self, batch: _Batch, cell: tuple, logp: torch.Tensor, donor: _Cache) -> None:
        at = (batch.index, *cell)  # cell: the grid indices of this patch
        self.lp_patched[at], self.kl[at] = _score(logp, donor.logp, batch)

    def result(self, min_gap: float, **meta) -> PatchResult:
        extra = (1,) * (self.lp_patched.ndim - 1)
        gap = self.lp_donor - self.lp_receiver
        valid = np.abs(gap) >= min_gap
        delta = self.lp_patched - self.lp_receiver.reshape(-1, *extra)
        npe = np.full_like(delta, np.nan)
        npe[valid] = delta[valid] / gap[valid].reshape(-1, *extra)
        n_masked = int((~valid).sum())
        if n_masked:
            logger.info("%s: NPE masked (NaN) for %d of %d examples with |lp_donor - lp_receiver| "
                        "< %g nats", meta.get("sweep"), n_masked, len(valid), min_gap)
        meta = dict(meta, min_gap=float(min_gap), n_npe_masked=n_masked, n_examples=len(valid))
        return PatchResult(delta=delta, npe=npe, npe_valid=valid, meta=meta, **vars(self))


def examples_from_table(rows: Sequence[Mapping], tokenizer=None, chat: bool = False,
                        metric: str = "answer",
                        shots: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """``evaluate.flip_table`` rows as patching examples ``{"prompt", "answer", "index", "chat"}``
    with the prompts they were evaluated with (``shots``: ``data.eval_shots``, the worked examples
    before each question; ``chat``: the solution follows the chat template's assistant header),
    those with nothing to score under ``metric`` left out (logged; ``evaluate.scorable``)."""
    out = [{"prompt": format_prompt(r["question"], tokenizer, chat=chat, shots=shots),
            "answer": r["answer"], "index": r.get("index", k), "chat": chat}
           for k, r in enumerate(rows)]
    ok = scorable([e["prompt"] for e in out], [e["answer"] for e in out], metric)
    if not all(ok):
        logger.info("metric %r: %d of %d examples have nothing to score and are left out",
                    metric, len(ok) - sum(ok), len(ok))
    return [e for e, keep in zip(out, ok) if keep]


def tokenize_examples(tokenizer, examples: Sequence[Mapping], metric: str = "answer") -> list[dict]:
    """Per example ``answer_spans``'s ``{"input_ids", "answer_positions"}`` of prompt + solution
    (``metric``: its ``targets``, the tokens scored), plus ``"n_prompt"``, the number of prompt
    tokens (they must be a prefix of the whole's)."""
    if isinstance(examples, (str, Mapping)):
        raise TypeError("examples must be a list of {'prompt', 'answer'} dicts, got a single "
                        f"{type(examples).__name__}")
    examples = list(examples)
    if not examples:
        raise ValueError("patching needs at least one example, got an empty list")
    for k, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "prompt" not in ex or "answer" not in ex:
            keys = f" with keys {sorted(ex)}" if isinstance(ex, Mapping) else ""
            raise ValueError(f"example {k} must be a dict with 'prompt' and 'answer', got "
                             f"{type(ex).__name__}{keys}")
        if not isinstance(ex["prompt"], str) or not isinstance(ex["answer"], str):
            raise TypeError(f"example {k}: 'prompt' and 'answer' must be str")
    prompts, answers = [ex["prompt"] for ex in examples], [ex["answer"] for ex in examples]
    chat = {bool(ex.get("chat", False)) for ex in examples}
    if len(chat) > 1:
        raise ValueError("examples mix chat and plain prompts; patch one format at a time")
    spans = answer_spans(tokenizer, prompts, answers, chat.pop(), targets=metric)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    for k, (s, p) in enumerate(zip(spans, prompt_ids)):
        if list(s["input_ids"][: len(p)]) != list(p):
            raise ValueError(f"example {k}: the prompt's tokens are not a prefix of prompt + "
                             "solution (BPE merged across the boundary); start it with a space")
        s["n_prompt"] = len(p)
        if s["answer_positions"][0] < 1:
            raise ValueError(f"example {k}: the answer starts at token 0, nothing predicts it")
    return spans


def _check_positions(positions: Positions) -> Positions:
    if isinstance(positions, str):
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS} or a list of token indices, "
                             f"got {positions!r}")
        return positions
    try:
        idx = [int(p) for p in positions]
    except (TypeError, ValueError):
        raise TypeError(f"positions must be one of {POSITIONS} or a sequence of ints, "
                        f"got {positions!r}") from None
    if not idx or any(isinstance(p, bool) or int(p) != p for p in positions):
        raise ValueError(f"explicit positions must be a non-empty sequence of ints, "
                         f"got {positions!r}")
    return idx


def _check_layers(layers, n: int, what: str = "layers") -> list[int]:
    out = list(range(n)) if layers is None else [int(x) for x in layers]
    if not out or any(not 0 <= x < n for x in out):
        raise ValueError(f"{what} must be indices in 0..{n - 1}, got {list(layers)!r}")
    return out


def _roles(base, tuned, direction: str):
    if direction not in DIRECTIONS:
        raise ValueError("direction must be 'denoise' (tuned into base) or 'noise' (base into "
                         f"tuned), got {direction!r}")
    roles = (base, tuned, "base", "tuned")
    return roles if direction == "denoise" else (tuned, base, "tuned", "base")


@dataclasses.dataclass
class _Batch:
    """The examples ``index`` (into the list), right-padded; ``k`` answer rows."""

    index: list[int]
    ids: torch.Tensor  # [b, T]
    rows_b: torch.Tensor  # [k] batch row of each answer row
    rows_p: torch.Tensor  # [k] its position
    targets: torch.Tensor  # [k] its target token
    patch: torch.Tensor  # [b, T] where the donor's activations go

    def logp(self, model, final_resid: torch.Tensor) -> torch.Tensor:
        """``[k, vocab]`` float64 log-probs from the final residual at the answer rows."""
        return answer_logp(model, final_resid, self.rows_b, self.rows_p, normed=False)


def _patch_mask(span: dict, positions: Positions, width: int, k: int) -> torch.Tensor:
    n = len(span["input_ids"])
    m = torch.zeros(width, dtype=torch.bool)
    if positions == "all":
        m[:n] = True
    elif positions == "prompt":
        m[: span["n_prompt"]] = True
    elif positions == "answer":
        m[torch.tensor(span["answer_positions"]) - 1] = True
    else:
        for p in positions:
            q = p + n if p < 0 else p
            if not 0 <= q < n:
                raise ValueError(f"position {p} is outside example {k} ({n} tokens)")
            m[q] = True
    return m


def _batches(spans: list[dict], positions: Positions, batch_size: int, tokenizer,
             device) -> list[_Batch]:
    out = []
    for idx in models.by_length([len(s["input_ids"]) for s in spans], batch_size):
        ids, _ = models.pad([spans[i]["input_ids"] for i in idx], models.pad_id(tokenizer))
        patch = torch.stack([_patch_mask(spans[i], positions, ids.shape[1], i) for i in idx])
        rows = [(r, p - 1, spans[i]["input_ids"][p]) for r, i in enumerate(idx)
                for p in spans[i]["answer_positions"]]
        rb, rp, tg = (torch.tensor(c, dtype=torch.long, device=device) for c in zip(*rows))
        out.append(_Batch(index=idx, ids=ids.to(device), rows_b=rb, rows_p=rp, targets=tg,
                          patch=patch.to(device)))
    return out


@dataclasses.dataclass
class _Cache:
    """One model's forward on one batch: per-layer activations and decoder-layer call arguments."""

    model: torch.nn.Module
    layers: torch.nn.ModuleList
    calls: list[tuple[tuple, dict]]  # [L] (args, kwargs) besides the input: mask, rotary, ...
    embed: torch.Tensor  # [b, T, d]
    resid: list[torch.Tensor]  # [L] x [b, T, d], output of layer i
    attn: list[torch.Tensor] | None
    mlp: list[torch.Tensor] | None
    logp: torch.Tensor  # [k, vocab] float64 log-probs at the answer-predicting rows

    def resid_in(self, layer: int) -> torch.Tensor:
        return self.embed if layer == 0 else self.resid[layer - 1]

    def run(self, layer: int, h: torch.Tensor, module: torch.nn.Module | None = None):
        """Layer ``layer`` (or ``module``, the other model's) on ``h`` with this model's args."""
        args, kwargs = self.calls[layer]
        out = (self.layers[layer] if module is None else module)(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _forward(model, batch: _Batch, kinds: Sequence[str] = ("resid",)) -> _Cache:
    """``model`` on ``batch``: hook points of ``kinds`` (and resid), each layer's call arguments."""
    n, layers = models.n_layers(model), models.part(model, "layers")
    kinds = [k for k in KINDS if k in set(kinds) | {"resid"}]
    names = ["embed"] + [f"layers.{i}.{k}" for i in range(n) for k in kinds]
    calls: list[tuple[tuple, dict]] = [((), {}) for _ in layers]
    position_ids = torch.arange(batch.ids.shape[1], device=batch.ids.device).expand_as(batch.ids)
    with contextlib.ExitStack() as hooks:  # removes every hook added, also on error
        for i, layer in enumerate(layers):
            def keep(_mod, args, kwargs, i=i):  # mask, rotary ...; GPT-2 passes some positionally
                calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            hooks.callback(layer.register_forward_pre_hook(keep, with_kwargs=True).remove)
        store = hooks.enter_context(record(model, names))
        models.part(model, "decoder")(input_ids=batch.ids, attention_mask=None,
                                      position_ids=position_ids, use_cache=False)
    per_layer = {k: [store[f"layers.{i}.{k}"] for i in range(n)] for k in kinds}
    return _Cache(model=model, layers=layers, calls=calls, embed=store["embed"],
                  resid=per_layer["resid"], attn=per_layer.get("attn"), mlp=per_layer.get("mlp"),
                  logp=batch.logp(model, per_layer["resid"][-1]))


def _score(logp: torch.Tensor, donor_logp: torch.Tensor, batch: _Batch) -> tuple:
    """Per-example answer log-prob and KL(donor || this), float64 ``[b]`` arrays."""
    dev = logp.device
    tok = logp.gather(1, batch.targets[:, None].to(dev))[:, 0]
    donor_logp = donor_logp.to(dev)
    p = donor_logp.exp()
    kl_rows = torch.where(p > 0, p * (donor_logp - logp), 0.0).sum(-1)  # 0 log 0 = 0
    zeros = torch.zeros(batch.ids.shape[0], dtype=torch.float64, device=dev)
    return tuple(zeros.index_add(0, batch.rows_b.to(dev), x).cpu().numpy() for x in (tok, kl_rows))


def _finish(cache: _Cache, start: int, h: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Answer log-probs ``[k, vocab]`` after the cached model's layers ``start ..`` on ``h``."""
    for i in range(start, len(cache.layers)):
        h = cache.run(i, h)
    return batch.logp(cache.model, h)


def _mix(patch: torch.Tensor, donor: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
    dev = receiver.device  # one device but for models spread over GPUs (cross-layer patches)
    return torch.where(patch[..., None].to(dev), donor.to(dev), receiver)


def _patched_output(recv: _Cache, donor: _Cache, layer: int, component: str,
                    patch: torch.Tensor) -> torch.Tensor:
    """The receiver's residual after ``layer`` with the donor's ``component`` output patched in."""
    if component == "resid":
        return _mix(patch, donor.resid[layer], recv.resid[layer])
    x, attn, mlp = recv.resid_in(layer), recv.attn[layer], recv.mlp[layer]
    if component == "attn":
        attn = _mix(patch, donor.attn[layer], attn)
    else:
        mlp = _mix(patch, donor.mlp[layer], mlp)
    if models.parallel(recv.model):  # GPT-NeoX adds both to the input, in this order
        return mlp + attn + x
    h = x + attn  # the layer's own mid-residual, bit for bit
    return h + (models.mlp_branch(recv.model, recv.layers[layer], h) if component == "attn"
                else mlp)


class _Session:
    """Shared setup of every sweep: checks, tokenisation and batches."""

    def __init__(self, base, tuned, tokenizer, examples, positions, batch_size, metric):
        models.check_same_shape(base, tuned)  # NotImplementedError naming an unsupported class
        models.part(base, "head")  # a bare decoder (no LM head) cannot be scored
        n = base.config.num_hidden_layers
        for name, m in (("base", base), ("tuned", tuned)):
            if models.n_layers(m) != n:
                raise ValueError(f"{name} has {models.n_layers(m)} decoder layers, "
                                 f"its config says {n}")
        if len(tokenizer) > base.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models' "
                             f"vocabulary has {base.config.vocab_size}: not the models' tokenizer")
        if metric not in TARGETS:
            raise ValueError(f"metric must be one of {TARGETS}, got {metric!r}")
        self.positions, self.metric = _check_positions(positions), metric
        self.spans = tokenize_examples(tokenizer, examples, metric)
        device = models.input_device(base)
        self.batches = _batches(self.spans, self.positions, batch_size, tokenizer, device)
        self.models = (base, tuned)

    @contextlib.contextmanager
    def running(self, desc: str, cells: int, progress: bool) -> Iterator[tqdm]:
        """Both models in eval mode (modes restored) under no_grad; a bar over batches x cells."""
        with models.eval_mode(*self.models), tqdm(total=len(self.batches) * cells, desc=desc,
                                           leave=False, disable=not progress) as bar:
            yield bar


def layer_sweep(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                examples: Sequence[Mapping], component: str = "resid", positions: Positions = "all",
                direction: str = "denoise", layers: Sequence[int] | None = None,
                batch_size: int = 16, min_gap: float = 0.1, progress: bool = True,
                metric: str = "answer") -> PatchResult:
    """Patch one component at one layer at a time, for every layer (``[n_examples, n_layers]``).

    Args:
        base, tuned: causal LMs of one supported architecture and shape, on one device.
        examples: ``[{"prompt": formatted prompt, "answer": gold solution ending "#### N"}, ...]``
            (``examples_from_table`` builds them from flip-table rows).
        component, direction: one of ``COMPONENTS``, ``DIRECTIONS`` (denoise: tuned into base).
        positions: one of ``POSITIONS`` or token indices (negative from the end).
        min_gap: NPE is NaN where ``|lp_donor - lp_receiver|`` is below it (nats).
        metric: the tokens scored (``evaluate.TARGETS``): ``"answer"``, the final answer after
            ``"#### "``; ``"computed"``, the results the solution computes; ``"copy"``, the final
            answer after the last result is corrupted (the copy control).

    Raises ValueError for mismatched models or tokenizers, an answer that cannot be located or a
    bad argument; NotImplementedError for an unsupported architecture."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    receiver, donor_model, rname, dname = _roles(base, tuned, direction)
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size, metric)
    layers = _check_layers(layers, models.n_layers(base))
    kinds = ("attn", "mlp") if component != "resid" else ("resid",)  # a block needs both
    scores = _Scores(len(sess.spans), len(layers))
    with sess.running(f"patch {component} ({direction})", len(layers), progress) as bar:
        for batch in sess.batches:
            recv = _forward(receiver, batch, kinds)
            donor = _forward(donor_model, batch, (component,))
            scores.unpatched(batch, recv, donor)
            for c, layer in enumerate(layers):
                h = _patched_output(recv, donor, layer, component, batch.patch)
                scores.patched(batch, (c,), _finish(recv, layer + 1, h, batch), donor)
                bar.update()
    return scores.result(min_gap, sweep="layer", component=component, positions=sess.positions,
                         direction=direction, receiver=rname, donor=dname, layers=layers,
                         metric=metric)


def cross_layer_sweep(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                      examples: Sequence[Mapping], positions: Positions = "all",
                      direction: str = "denoise", layers: Sequence[int] | None = None,
                      donor_layers: Sequence[int] | None = None, batch_size: int = 16,
                      min_gap: float = 0.1, progress: bool = True,
                      metric: str = "answer") -> PatchResult:
    """Patch the donor's residual after layer ``j`` in ``donor_layers`` into the receiver's after
    layer ``i`` in ``layers`` (default all): arrays ``[n_examples, n_layers, n_donor_layers]``; the
    other arguments are ``layer_sweep``'s (docs/measures.md#activation-patching)."""
    receiver, donor_model, rname, dname = _roles(base, tuned, direction)
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size, metric)
    rows = _check_layers(layers, models.n_layers(base))
    cols = _check_layers(donor_layers, models.n_layers(base), "donor_layers")
    scores = _Scores(len(sess.spans), len(rows), len(cols))
    with sess.running(f"cross-layer ({direction})", len(rows) * len(cols), progress) as bar:
        for batch in sess.batches:
            recv, donor = _forward(receiver, batch), _forward(donor_model, batch)
            scores.unpatched(batch, recv, donor)
            for a, i in enumerate(rows):
                for c, j in enumerate(cols):
                    h = _mix(batch.patch, donor.resid[j], recv.resid[i])
                    scores.patched(batch, (a, c), _finish(recv, i + 1, h, batch), donor)
                    bar.update()
    return scores.result(min_gap, sweep="cross_layer", component="resid", positions=sess.positions,
                         direction=direction, receiver=rname, donor=dname, layers=rows,
                         donor_layers=cols, metric=metric)


def _mean_difference(sess: _Session, progress: bool) -> torch.Tensor:
    """``mean_difference`` over a session's batches, as a tensor on the models' device."""
    base, tuned = sess.models
    diff_sum, count = 0.0, 0
    with sess.running("mean residual difference", 1, progress) as bar:
        for batch in sess.batches:
            sums = [torch.stack([r[batch.patch.to(r.device)].double().sum(0).to(batch.ids.device)
                                 for r in _forward(m, batch).resid]) for m in (base, tuned)]
            diff_sum += sums[1] - sums[0]
            count += int(batch.patch.sum())
            bar.update()
    return diff_sum / count


def mean_difference(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                    examples: Sequence[Mapping], positions: Positions = "all",
                    batch_size: int = 16, progress: bool = True,
                    metric: str = "answer") -> np.ndarray:
    """The mean activation difference: ``[n_layers, d_model]`` float64, tuned - base residual
    after each decoder layer, averaged over the ``positions`` of every example (the difference
    lens reads it, ``weight_sweep``'s steering adds it back)."""
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size, metric)
    return _mean_difference(sess, progress).cpu().numpy()


def random_directions(diff: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``[n, n_layers, d]`` float64: ``n`` random directions per layer (isotropic Gaussian,
    seeded), each scaled to the norm of ``diff``'s row there: the steering control."""
    diff = np.asarray(diff, dtype=np.float64)
    g = np.random.default_rng(seed).standard_normal((n, *diff.shape))
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    return g * np.linalg.norm(diff, axis=-1, keepdims=True)


def steer_sweep(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                examples: Sequence[Mapping], vectors: np.ndarray, positions: Positions = "all",
                layers: Sequence[int] | None = None, batch_size: int = 16, min_gap: float = 0.1,
                progress: bool = True, metric: str = "answer") -> PatchResult:
    """Steering: the reference with ``vectors[k, i]`` added to its residual after layer ``i`` at
    ``positions``, for each of ``K`` vectors (``vectors: [K, n_layers, d]``) and each layer in
    ``layers``; arrays ``[n_examples, K, n_layers]``, the tuned model the donor (its log-prob
    the gap's end). A mean difference and ``random_directions`` of its norm side by side."""
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size, metric)
    layers = _check_layers(layers, models.n_layers(base))
    vecs = torch.as_tensor(np.asarray(vectors), dtype=torch.float64)
    if vecs.ndim != 3 or vecs.shape[1] != models.n_layers(base) or \
            vecs.shape[2] != base.config.hidden_size:
        raise ValueError(f"vectors must be [K, {models.n_layers(base)}, "
                         f"{base.config.hidden_size}], got {list(vecs.shape)}")
    scores = _Scores(len(sess.spans), len(vecs), len(layers))
    with sess.running("steering", len(layers), progress) as bar:
        for batch in sess.batches:
            ct = _forward(tuned, batch)
            scores.unpatched(batch, _forward(base, batch), ct)
            group = _steer_group(len(vecs), len(batch.targets), ct.logp.shape[-1])
            for g0 in range(0, len(vecs), group):  # `group` vectors side by side in one batch
                chunk = vecs[g0: g0 + group]
                big = _repeat(batch, len(chunk))
                cb = _forward(base, big)
                donor_logp = ct.logp.repeat(len(chunk), 1)
                for c, i in enumerate(layers):
                    r = cb.resid[i]
                    add = chunk[:, i].to(r.device).repeat_interleave(len(batch.index), 0)
                    h = _mix(big.patch, (r.double() + add[:, None, :]).to(r.dtype), r)
                    lp, kl = _score(_finish(cb, i + 1, h, big), donor_logp, big)
                    for g in range(len(chunk)):
                        rows = slice(g * len(batch.index), (g + 1) * len(batch.index))
                        scores.lp_patched[batch.index, g0 + g, c] = lp[rows]
                        scores.kl[batch.index, g0 + g, c] = kl[rows]
                bar.update(len(layers) * len(chunk) / len(vecs))
    return scores.result(min_gap, sweep="steer", component="resid", positions=sess.positions,
                         layers=layers, receiver="base", donor="tuned", direction="denoise",
                         metric=metric, n_vectors=len(vecs))


def _steer_group(n_vectors: int, n_rows: int, vocab: int, budget: int = 2**25) -> int:
    """How many steering vectors share one batch: the repeated donor log-probs ``[rows, vocab]``
    float64 stay under ``budget`` values (256 MiB)."""
    return max(1, min(n_vectors, budget // max(1, n_rows * vocab)))


def _repeat(batch: _Batch, times: int) -> _Batch:
    """``batch`` stacked ``times`` over (block ``g``: rows ``g * b .. (g + 1) * b - 1``)."""
    b = batch.ids.shape[0]
    offsets = torch.arange(times, device=batch.rows_b.device).repeat_interleave(len(batch.rows_b))
    return _Batch(index=list(range(b * times)), ids=batch.ids.repeat(times, 1),
                  rows_b=batch.rows_b.repeat(times) + b * offsets,
                  rows_p=batch.rows_p.repeat(times), targets=batch.targets.repeat(times),
                  patch=batch.patch.repeat(times, 1))


def concat(results: Sequence[PatchResult]) -> PatchResult:
    """Sweeps of one kind on disjoint examples as one (examples stacked in order)."""
    arrays = {f.name: np.concatenate([getattr(r, f.name) for r in results])
              for f in dataclasses.fields(PatchResult) if f.name != "meta"}
    meta = dict(results[0].meta, n_examples=sum(r.meta["n_examples"] for r in results),
                n_npe_masked=sum(r.meta["n_npe_masked"] for r in results))
    return PatchResult(**arrays, meta=meta)


def weight_sweep(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                 examples: Sequence[Mapping], layers: Sequence[int] | None = None,
                 mean_positions: Positions = "all", batch_size: int = 16, min_gap: float = 0.1,
                 progress: bool = True, kinds: Sequence[str] = WEIGHT_KINDS,
                 metric: str = "answer") -> dict[str, PatchResult]:
    """One ``[n_examples, n_layers]`` result per kind in ``kinds`` (``WEIGHT_KINDS``: layer swaps
    ``"revert"``, ``"graft"``; ``"mean_diff"``, the tuned residual with its difference from the
    reference replaced by its mean at ``mean_positions``), patching at each layer ``i``;
    ``"graft"`` runs in base with tuned as donor, the others in tuned with base as donor
    (docs/measures.md#activation-patching; steering: ``steer_sweep``)."""
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(WEIGHT_KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {WEIGHT_KINDS}, got {kinds}")
    sess = _Session(base, tuned, tokenizer, examples, mean_positions, batch_size, metric)
    layers = _check_layers(layers, models.n_layers(base))
    mean_d = _mean_difference(sess, progress) if "mean_diff" in kinds else None  # [L, d] f64
    direction = {k: "denoise" if k == "graft" else "noise" for k in kinds}
    scores = {k: _Scores(len(sess.spans), len(layers)) for k in kinds}
    with sess.running("weight ablation", len(layers), progress) as bar:
        for batch in sess.batches:
            cb, ct = _forward(base, batch), _forward(tuned, batch)
            for k, s in scores.items():
                s.unpatched(batch, *_roles(cb, ct, direction[k])[:2])
            for c, i in enumerate(layers):
                for k, s in scores.items():
                    recv, donor = _roles(cb, ct, direction[k])[:2]  # graft: into base
                    if k in ("revert", "graft"):  # the donor's layer i inside the receiver
                        h = recv.run(i, recv.resid_in(i), module=donor.layers[i])
                    else:  # base's residual plus the mean difference, in tuned
                        r = cb.resid[i]
                        shifted = (r.double() + mean_d[i].to(r.device)).to(recv.resid[i].dtype)
                        h = _mix(batch.patch, shifted, recv.resid[i])
                    s.patched(batch, (c,), _finish(recv, i + 1, h, batch), donor)
                bar.update()
    out = {}
    for k, s in scores.items():
        swap = k in ("revert", "graft")  # a whole decoder layer, at every position
        meta = dict(sweep=f"weight_{k}" if swap else k, component="weights" if swap else "resid")
        rname, dname = _roles(base, tuned, direction[k])[2:]
        out[k] = s.result(min_gap, **meta, positions="all" if swap else sess.positions,
                          layers=layers, receiver=rname, donor=dname, direction=direction[k],
                          metric=metric)
    return out


@dataclasses.dataclass
class GenerationResult:
    """``generation_sweep``'s per-example results: ``correct [n, n_layers]`` whether the receiver,
    generating with the donor's residual stream after that layer held in place of its own, ends
    on the gold answer; ``receiver``, ``donor`` ``[n]``: each model generating alone;
    ``predictions``, ``outputs`` ``[n][n_layers]``: the extracted answers (None: no number) and
    the completions (cut at the stop strings); ``meta``: ``sweep``,
    ``direction``, ``receiver``, ``donor``, ``layers``, ``max_new_tokens``, ``n_examples``."""

    correct: np.ndarray
    receiver: np.ndarray
    donor: np.ndarray
    predictions: list[list]
    outputs: list[list[str]]
    meta: dict


def _kv(out):
    """The KV cache a forward returned (``cache`` in newer transformers, else
    ``past_key_values``)."""
    kv = getattr(out, "cache", None)
    return kv if kv is not None else out.past_key_values


@torch.no_grad()
def generation_sweep(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                     examples: Sequence[Mapping], direction: str = "denoise",
                     layers: Sequence[int] | None = None, max_new_tokens: int = 112,
                     stop: Sequence[str] = ("\nQuestion:",),
                     progress: bool = True) -> GenerationResult:
    """Solving with the patch held: per example and layer ``l``, the receiver generates greedily
    from the prompt while, at every position (prompt and generated tokens alike), its residual
    stream after layer ``l`` is the donor's on the same tokens; scored like evaluation (end tokens,
    stop strings, ``data.extract_answer`` against the gold ``#### N``). Both models keep KV
    caches: the donor is never patched, and the receiver's cache holds its patched states. One
    example at a time, its layers (and both models alone) as the rows of one batch."""
    receiver, donor, rname, dname = _roles(base, tuned, direction)
    models.check_same_shape(base, tuned)
    examples = list(examples)
    if not examples:
        raise ValueError("generation_sweep needs at least one example, got an empty list")
    layers = _check_layers(layers, models.n_layers(base))
    gold = [extract_answer(ex["answer"]) for ex in examples]
    rows = len(layers) + 2  # a row per layer, then the receiver alone, the donor alone
    ends = set(end_tokens(receiver, tokenizer)) | set(end_tokens(donor, tokenizer))
    window = max((len(s) for s in stop), default=0) + 4  # tokens: at least a byte each
    device = models.input_device(receiver)
    names = [f"layers.{i}.resid" for i in layers]  # row c holds the donor's output at names[c]
    masks = {n: torch.tensor([c == j for j in range(rows)], device=device)[:, None, None]
             for c, n in enumerate(names)}
    # transformers renamed past_key_values to cache (5.2x); both spellings work where they exist
    key = "cache" if "cache" in inspect.signature(receiver.forward).parameters \
        else "past_key_values"
    correct = np.zeros((len(examples), len(layers)), dtype=bool)
    alone = np.zeros((len(examples), 2), dtype=bool)
    preds: list[list] = []
    texts: list[list[str]] = []
    with models.eval_mode(receiver, donor):
        for k, ex in enumerate(tqdm(examples, desc=f"generate patched ({direction})",
                                    leave=False, disable=not progress)):
            ids = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
            new = torch.tensor([ids] * rows, device=device)
            cache_d = cache_r = None
            gen: list[list[int]] = [[] for _ in range(rows)]
            done = [False] * rows
            for _ in range(max_new_tokens):
                with record(donor, names) as store:  # the donor alone, then the receiver
                    out_d = donor(input_ids=new, use_cache=True, **{key: cache_d})
                edits = {n: lambda h, n=n: torch.where(masks[n].to(h.device), store[n], h)
                         for n in names}
                with overwrite(receiver, edits):
                    out_r = receiver(input_ids=new, use_cache=True, **{key: cache_r})
                logits = out_r.logits[:, -1].clone()
                logits[-1] = out_d.logits[-1, -1].to(logits.device)
                nxt = logits.argmax(-1)
                for r in range(rows):
                    if done[r]:
                        continue
                    t = int(nxt[r])
                    if t in ends:
                        done[r] = True
                        continue
                    gen[r].append(t)
                    done[r] = any(s in tokenizer.decode(gen[r][-window:]) for s in stop)
                if all(done):
                    break
                new, cache_d, cache_r = nxt[:, None].to(device), _kv(out_d), _kv(out_r)
            done_texts = [cut_at_stop(tokenizer.decode(g, skip_special_tokens=True), stop)
                          for g in gen]
            answers = [extract_answer(t) for t in done_texts]
            ok = [a is not None and a == gold[k] for a in answers]
            correct[k], alone[k] = ok[: len(layers)], ok[len(layers):]
            preds.append(answers[: len(layers)])
            texts.append(done_texts[: len(layers)])
    return GenerationResult(correct=correct, receiver=alone[:, 0], donor=alone[:, 1],
                            predictions=preds, outputs=texts, meta=dict(
                                sweep="generation", direction=direction, receiver=rname,
                                donor=dname, layers=layers, max_new_tokens=max_new_tokens,
                                n_examples=len(examples)))
