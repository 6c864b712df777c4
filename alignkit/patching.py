"""Causal localisation: activation patching (``"denoise"``: tuned into base; ``"noise"``: base
into tuned), cross-layer patching and weight ablation, scored by the answer log-prob.
Formulas, controls and pitfalls: docs/measures.md#activation-patching"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit import models
from alignkit.data import format_prompt
from alignkit.evaluate import answer_logp, answer_spans
from alignkit.hooks import KINDS, record

logger = logging.getLogger(__name__)

COMPONENTS = KINDS  # ("resid", "attn", "mlp")
DIRECTIONS = ("denoise", "noise")
POSITIONS = ("all", "prompt", "answer")
WEIGHT_KINDS = ("revert", "graft", "mean_diff", "steer", "steer_shuffled")  # weight_sweep's
MEAN_KINDS = ("mean_diff", "steer", "steer_shuffled")  # those that need the mean difference
SUFFICIENCY = ("graft", "steer", "steer_shuffled")  # receiver base, donor tuned
ABLATION_KINDS = ("revert", "graft", "mean_diff")  # weight_sweep's default: notebook 04's ablation
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


def examples_from_table(rows: Sequence[Mapping], tokenizer=None, chat: bool = False) -> list[dict]:
    """``evaluate.flip_table`` rows as patching examples ``{"prompt", "answer", "index", "chat"}``
    with zero-shot prompts (``chat``: the solution follows the chat template's assistant header)."""
    return [{"prompt": format_prompt(r["question"], tokenizer, chat=chat), "answer": r["answer"],
             "index": r.get("index", k), "chat": chat} for k, r in enumerate(rows)]


def tokenize_examples(tokenizer, examples: Sequence[Mapping]) -> list[dict]:
    """Per example ``answer_spans``'s ``{"input_ids", "answer_positions"}`` of prompt + solution,
    plus ``"n_prompt"``, the number of prompt tokens (they must be a prefix of the whole's)."""
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
    spans = answer_spans(tokenizer, prompts, answers, chat.pop())
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

    def __init__(self, base, tuned, tokenizer, examples, positions, batch_size):
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
        self.positions = _check_positions(positions)
        self.spans = tokenize_examples(tokenizer, examples)
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
                batch_size: int = 16, min_gap: float = 0.1, progress: bool = True) -> PatchResult:
    """Patch one component at one layer at a time, for every layer (``[n_examples, n_layers]``).

    Args:
        base, tuned: causal LMs of one supported architecture and shape, on one device.
        examples: ``[{"prompt": formatted prompt, "answer": gold solution ending "#### N"}, ...]``
            (``examples_from_table`` builds them from flip-table rows).
        component, direction: one of ``COMPONENTS``, ``DIRECTIONS`` (denoise: tuned into base).
        positions: one of ``POSITIONS`` or token indices (negative from the end).
        min_gap: NPE is NaN where ``|lp_donor - lp_receiver|`` is below it (nats).

    Raises ValueError for mismatched models or tokenizers, an answer that cannot be located or a
    bad argument; NotImplementedError for an unsupported architecture."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    receiver, donor_model, rname, dname = _roles(base, tuned, direction)
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size)
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
                         direction=direction, receiver=rname, donor=dname, layers=layers)


def cross_layer_sweep(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                      examples: Sequence[Mapping], positions: Positions = "all",
                      direction: str = "denoise", layers: Sequence[int] | None = None,
                      donor_layers: Sequence[int] | None = None, batch_size: int = 16,
                      min_gap: float = 0.1, progress: bool = True) -> PatchResult:
    """Patch the donor's residual after layer ``j`` in ``donor_layers`` into the receiver's after
    layer ``i`` in ``layers`` (default all): arrays ``[n_examples, n_layers, n_donor_layers]``; the
    other arguments are ``layer_sweep``'s (docs/measures.md#activation-patching)."""
    receiver, donor_model, rname, dname = _roles(base, tuned, direction)
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size)
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
                         donor_layers=cols)


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
                    batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """The mean activation difference: ``[n_layers, d_model]`` float64, tuned - base residual
    after each decoder layer, averaged over the ``positions`` of every example (the difference
    lens reads it, ``weight_sweep``'s steering adds it back)."""
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size)
    return _mean_difference(sess, progress).cpu().numpy()


def shuffled(diff: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``diff: [n_layers, d]`` with each row's coordinates permuted (one seeded permutation per
    row), the steering control."""
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(diff.shape[-1], generator=g) for _ in range(len(diff))])
    return torch.gather(diff, 1, perms.to(diff.device))


def weight_sweep(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                 examples: Sequence[Mapping], layers: Sequence[int] | None = None,
                 mean_positions: Positions = "all", batch_size: int = 16, min_gap: float = 0.1,
                 progress: bool = True,
                 kinds: Sequence[str] = ABLATION_KINDS, seed: int = 0) -> dict[str, PatchResult]:
    """One ``[n_examples, n_layers]`` result per kind in ``kinds`` (``WEIGHT_KINDS``: layer swaps
    ``"revert"``, ``"graft"``; mean-difference shifts ``"mean_diff"``, ``"steer"``,
    ``"steer_shuffled"`` by ``shuffled(.., seed)``), patching at each layer ``i``;
    ``SUFFICIENCY`` kinds run in base with tuned as donor, the others in tuned with base as donor
    (docs/measures.md#activation-patching)."""
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(WEIGHT_KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {WEIGHT_KINDS}, got {kinds}")
    sess = _Session(base, tuned, tokenizer, examples, mean_positions, batch_size)
    layers = _check_layers(layers, models.n_layers(base))
    vectors: dict[str, torch.Tensor] = {}
    if set(kinds) & set(MEAN_KINDS):  # pass 1: the mean difference, [n_layers, d_model] f64
        mean_d = _mean_difference(sess, progress)
        vectors = {"mean_diff": mean_d, "steer": mean_d, "steer_shuffled": shuffled(mean_d, seed)}
    direction = {k: "denoise" if k in SUFFICIENCY else "noise" for k in kinds}
    scores = {k: _Scores(len(sess.spans), len(layers)) for k in kinds}
    with sess.running("weight ablation", len(layers), progress) as bar:
        for batch in sess.batches:
            cb, ct = _forward(base, batch), _forward(tuned, batch)
            for k, s in scores.items():
                s.unpatched(batch, *_roles(cb, ct, direction[k])[:2])
            for c, i in enumerate(layers):
                for k, s in scores.items():
                    recv, donor = _roles(cb, ct, direction[k])[:2]  # graft, steer: into base
                    if k in ("revert", "graft"):  # the donor's layer i inside the receiver
                        h = recv.run(i, recv.resid_in(i), module=donor.layers[i])
                    else:  # base's residual plus the (shuffled) mean difference
                        r = cb.resid[i]
                        shifted = (r.double() + vectors[k][i].to(r.device)).to(recv.resid[i].dtype)
                        h = _mix(batch.patch, shifted, recv.resid[i])
                    s.patched(batch, (c,), _finish(recv, i + 1, h, batch), donor)
                bar.update()
    out = {}
    for k, s in scores.items():
        swap = k in ("revert", "graft")  # a whole decoder layer, at every position
        meta = dict(sweep=f"weight_{k}" if swap else k, component="weights" if swap else "resid")
        if k in ("steer", "steer_shuffled"):
            meta["seed"] = seed
        rname, dname = _roles(base, tuned, direction[k])[2:]
        out[k] = s.result(min_gap, **meta, positions="all" if swap else sess.positions,
                          layers=layers, receiver=rname, donor=dname, direction=direction[k])
    return out
