"""Causal localisation: activation patching, cross-layer patching and weight ablation.

A ``base`` and a ``tuned`` model of one architecture and tokenizer read the same examples, scored
by ``alignkit.evaluate``'s answer log-prob. A *patch* runs one model (the **receiver**) with some
activations replaced by the other's (the **donor**) on the same input ids: ``"denoise"`` puts
tuned activations into the base (is the site *sufficient*?), ``"noise"`` base ones into the tuned
model (*necessary*?). Per example and site: ``lp_patched``, ``delta = lp_patched - lp_receiver``,
the normalised effect ``npe = delta / (lp_donor - lp_receiver)`` (NaN where the gap is below
``min_gap`` nats) and ``kl = KL(P_donor || P_patched)`` summed over the answer-predicting rows.

Positions: ``"all"``, ``"prompt"``, ``"answer"`` (the answer-predicting positions
``answer_positions - 1``) or token indices (negative from the end). Components: ``"resid"``
(``layers.{i}.resid``), ``"attn"``, ``"mlp"`` (sublayer outputs before the residual add). Each
batch captures both models' activations and each decoder layer's call arguments once; a patch at
layer ``i`` reruns only layers ``i+1 ..`` from the receiver's cached residual, and the final norm
and head only at the answer-predicting rows: patching a model's own activations back reproduces
its log-probs bit for bit. Right padding without a padding mask (every real token precedes every
pad) makes the batch size change results by round-off only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit import runs
from alignkit.data import format_prompt
from alignkit.evaluate import answer_spans
from alignkit.hooks import KINDS, record
from alignkit.models import (
    check_same_shape,
    check_same_tokenizer,
    input_device,
    mlp_branch,
    n_layers,
    parallel,
    part,
    unembed,
)

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
    """Per-example results of one sweep (quantities defined in the module docstring, in nats).

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

    def save(self, path: str | Path) -> None:
        runs.save_arrays(path, {k: v for k, v in vars(self).items() if k != "meta"}, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> PatchResult:
        arrays, meta = runs.load_arrays(path)
        return cls(**arrays, meta=meta)


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
    (zero-shot prompts as probes and training format them; ``chat``: the solution follows the
    chat template's assistant header, as in training)."""
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
                             "solution (BPE merged across the boundary); start the solution with a "
                             "space")
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
    """The examples ``index`` (into the list), right-padded: ``ids`` and ``patch`` ``[b, T]``;
    ``rows_b``, ``rows_p``, ``targets``: ``[k]`` row, position, target of each answer row."""

    index: list[int]
    ids: torch.Tensor
    rows_b: torch.Tensor
    rows_p: torch.Tensor
    targets: torch.Tensor
    patch: torch.Tensor


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
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i]["input_ids"]))  # little padding
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(spans[i]["input_ids"]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        patch = torch.zeros((len(idx), width), dtype=torch.bool)
        rb, rp, tg = [], [], []
        for r, i in enumerate(idx):
            s = spans[i]
            ids[r, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
            patch[r] = _patch_mask(s, positions, width, i)
            rb += [r] * len(s["answer_positions"])
            rp += [p - 1 for p in s["answer_positions"]]
            tg += [s["input_ids"][p] for p in s["answer_positions"]]
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        out.append(_Batch(index=idx, ids=ids.to(device), rows_b=t(rb), rows_p=t(rp), targets=t(tg),
                          patch=patch.to(device)))
    return out


@dataclasses.dataclass
class _Cache:
    """One model's forward on one batch: per-layer activations and decoder-layer call arguments."""

    model: torch.nn.Module
    layers: torch.nn.ModuleList
    calls: list[tuple[tuple, dict]]  # [L] each decoder layer's call arguments besides its
    # input (mask, rotary embeddings, ...), positional and keyword
    embed: torch.Tensor  # [b, T, d]
    resid: list[torch.Tensor]  # [L] x [b, T, d], output of layer i
    attn: list[torch.Tensor] | None
    mlp: list[torch.Tensor] | None
    logp: torch.Tensor  # [k, vocab] float64 log-probs at the answer-predicting rows

    def resid_in(self, layer: int) -> torch.Tensor:
        return self.embed if layer == 0 else self.resid[layer - 1]

    def run(self, layer: int, h: torch.Tensor, module: torch.nn.Module | None = None):
        """Decoder layer ``layer`` (or ``module``, the other model's) on ``h`` with this
        model's call arguments."""
        args, kwargs = self.calls[layer]
        out = (self.layers[layer] if module is None else module)(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _layer_call_args(model) -> Iterator[list[tuple[tuple, dict]]]:
    """Each decoder layer's call arguments besides its input (mask, rotary embeddings ...;
    GPT-2 passes some positionally), for partial reruns."""
    layers = part(model, "layers")
    store: list[tuple[tuple, dict]] = [((), {}) for _ in layers]
    handles = []
    try:
        for i, layer in enumerate(layers):
            def pre(_mod, args, kwargs, i=i):
                store[i] = (tuple(args[1:]),
                            {k: v for k, v in kwargs.items() if k != "hidden_states"})
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


def _forward(model, batch: _Batch, kinds: Sequence[str] = ("resid",)) -> _Cache:
    n = n_layers(model)
    kinds = [k for k in KINDS if k in set(kinds) | {"resid"}]
    names = ["embed"] + [f"layers.{i}.{k}" for i in range(n) for k in kinds]
    position_ids = torch.arange(batch.ids.shape[1], device=batch.ids.device).expand_as(batch.ids)
    with _layer_call_args(model) as calls, record(model, names) as store:
        # right padding: no padding mask needed (see the module docstring)
        part(model, "decoder")(input_ids=batch.ids, attention_mask=None,
                               position_ids=position_ids, use_cache=False)
    per_layer = {k: [store[f"layers.{i}.{k}"] for i in range(n)] for k in kinds}
    return _Cache(model=model, layers=part(model, "layers"), calls=calls, embed=store["embed"],
                  resid=per_layer["resid"], attn=per_layer.get("attn"), mlp=per_layer.get("mlp"),
                  logp=_answer_logp(model, per_layer["resid"][-1], batch))


def _answer_logp(model, final_resid: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """``[k, vocab]`` float64 log-probs from the final residual at the answer-predicting rows."""
    dev = final_resid.device  # a model spread over GPUs ends on its last layer's device
    rows = final_resid[batch.rows_b.to(dev), batch.rows_p.to(dev)]
    return torch.log_softmax(unembed(model, rows).double(), dim=-1)


def _score(logp: torch.Tensor, donor_logp: torch.Tensor, batch: _Batch) -> tuple:
    """Per-example answer log-prob and KL(donor || this), float64 ``[b]`` arrays."""
    dev = logp.device
    b, rows = batch.ids.shape[0], batch.rows_b.to(dev)
    tok = logp.gather(1, batch.targets[:, None].to(dev))[:, 0]
    donor_logp = donor_logp.to(dev)
    p = donor_logp.exp()
    kl_rows = torch.where(p > 0, p * (donor_logp - logp), 0.0).sum(-1)  # 0 log 0 = 0
    lp = torch.zeros(b, dtype=torch.float64, device=logp.device).index_add_(0, rows, tok)
    kl = torch.zeros(b, dtype=torch.float64, device=logp.device).index_add_(0, rows, kl_rows)
    return lp.cpu().numpy(), kl.cpu().numpy()


def _finish(cache: _Cache, start: int, h: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Answer log-probs ``[k, vocab]`` after the cached model's layers ``start ..`` on ``h``."""
    for i in range(start, len(cache.layers)):
        h = cache.run(i, h)
    return _answer_logp(cache.model, h, batch)


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
    if parallel(recv.model):  # GPT-NeoX adds both to the input, in this order
        return mlp + attn + x
    h = x + attn  # the layer's own mid-residual, bit for bit
    return h + (mlp_branch(recv.model, recv.layers[layer], h) if component == "attn" else mlp)


class _Session:
    """Shared setup of every sweep: checks, tokenisation and batches."""

    def __init__(self, base, tuned, tokenizer, examples, positions, batch_size, tuned_tokenizer):
        check_same_shape(base, tuned)  # NotImplementedError naming an unsupported class
        part(base, "head")  # a bare decoder (no LM head) cannot be scored
        n = base.config.num_hidden_layers
        for name, m in (("base", base), ("tuned", tuned)):
            if n_layers(m) != n:
                raise ValueError(f"{name} has {n_layers(m)} decoder layers, its config says {n}")
        if tuned_tokenizer is not None:
            check_same_tokenizer(tokenizer, tuned_tokenizer)
        if len(tokenizer) > base.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models' "
                             f"vocabulary has {base.config.vocab_size}: not the models' tokenizer")
        self.positions = _check_positions(positions)
        self.spans = tokenize_examples(tokenizer, examples)
        device = input_device(base)
        self.batches = _batches(self.spans, self.positions, batch_size, tokenizer, device)
        self.models = (base, tuned)

    @contextlib.contextmanager
    def running(self, desc: str, cells: int, progress: bool) -> Iterator[tqdm]:
        """Both models in eval mode (modes restored) under no_grad; a bar over batches x cells."""
        modes = [m.training for m in self.models]
        try:
            for m in self.models:
                m.eval()
            with torch.no_grad(), tqdm(total=len(self.batches) * cells, desc=desc, leave=False,
                                       disable=not progress) as bar:
                yield bar
        finally:
            for m, t in zip(self.models, modes):
                m.train(t)


def layer_sweep(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                examples: Sequence[Mapping], component: str = "resid", positions: Positions = "all",
                direction: str = "denoise", layers: Sequence[int] | None = None,
                batch_size: int = 16, min_gap: float = 0.1, tuned_tokenizer=None,
                progress: bool = True) -> PatchResult:
    """Patch one component at one layer at a time, for every layer (``[n_examples, n_layers]``).

    Args:
        base, tuned: causal LMs of one supported architecture and shape, on one device.
        examples: ``[{"prompt": formatted prompt, "answer": gold solution ending "#### N"}, ...]``
            (``examples_from_table`` builds them from flip-table rows).
        component, positions, direction, min_gap: see the module docstring.
        tuned_tokenizer: optional second tokenizer, checked to be identical to ``tokenizer``.

    Raises ValueError for mismatched models or tokenizers, an answer that cannot be located or a
    bad argument; NotImplementedError for an unsupported architecture."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    receiver, donor_model, rname, dname = _roles(base, tuned, direction)
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size, tuned_tokenizer)
    layers = _check_layers(layers, n_layers(base))
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
                      min_gap: float = 0.1, tuned_tokenizer=None,
                      progress: bool = True) -> PatchResult:
    """Patch the donor's residual after layer ``j`` into the receiver's residual after layer ``i``.

    ``direction="denoise"`` tests a layer remapping causally: does base's stack from ``i + 1`` on
    use what tuned layer ``j`` computes? The diagonal ``i == j`` is ``layer_sweep``'s ``"resid"``.
    ``layers`` are the ``i``, ``donor_layers`` the ``j`` (default all), arrays ``[n_examples,
    n_layers, n_donor_layers]``; the other arguments are ``layer_sweep``'s."""
    receiver, donor_model, rname, dname = _roles(base, tuned, direction)
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size, tuned_tokenizer)
    rows = _check_layers(layers, n_layers(base))
    cols = _check_layers(donor_layers, n_layers(base), "donor_layers")
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
    """``[n_layers, d_model]`` float64: mean tuned - base residual after each layer over the
    session's positions (every example's selected tokens pooled)."""
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
                    batch_size: int = 16, tuned_tokenizer=None,
                    progress: bool = True) -> np.ndarray:
    """The mean activation difference: ``[n_layers, d_model]`` float64, tuned - base residual
    after each decoder layer, averaged over the ``positions`` of every example (the
    difference lens reads it, ``weight_sweep``'s steering adds it back)."""
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size, tuned_tokenizer)
    return _mean_difference(sess, progress).cpu().numpy()


def shuffled(diff: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``diff [n_layers, d]`` with each row's coordinates permuted (one seeded permutation per
    row): the same norm and values in a random direction, the steering control."""
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(diff.shape[-1], generator=g) for _ in range(len(diff))])
    return torch.gather(diff, 1, perms.to(diff.device))


def weight_sweep(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer,
                 examples: Sequence[Mapping], layers: Sequence[int] | None = None,
                 mean_positions: Positions = "all", batch_size: int = 16, min_gap: float = 0.1,
                 tuned_tokenizer=None, progress: bool = True,
                 kinds: Sequence[str] = ABLATION_KINDS, seed: int = 0) -> dict[str, PatchResult]:
    """Per layer ``i``: revert its weights, graft them, mean-ablate the residual difference, or
    steer the base with it (``kinds``: which to run; the mean difference is computed only when
    one of ``MEAN_KINDS`` is asked for).

    No model is modified: a swapped decoder layer is the other model's module run on the
    receiver's cached input and call arguments (one config: the same arguments), then the
    receiver's own later layers, norm and head. Each result holds ``[n_examples, n_layers]``:

    * ``"revert"`` (necessity): tuned with layer ``i`` reverted to base's (receiver tuned, donor
      base): ``npe`` is the fraction of the tuned-over-base gain this alone removes.
    * ``"graft"`` (sufficiency): base with tuned's layer ``i`` (receiver base, donor tuned):
      ``npe`` is the fraction of the gain the tuned layer alone brings.
    * ``"mean_diff"``: tuned with its residual after layer ``i`` replaced, at ``mean_positions``,
      by base's plus the *mean* tuned − base difference there (receiver tuned, donor base): the
      fraction of the gain lost when only the example-specific part of the difference is removed
      (``layer_sweep(component="resid", direction="noise")`` removes all of it); near 0, a
      constant shift (a steering vector) carries the change. With ``"all"`` the mean includes the
      first tokens, whose residuals can be far larger than the rest.
    * ``"steer"`` (sufficiency of a constant shift): base with the mean tuned − base difference
      after layer ``i`` added at ``mean_positions`` (receiver base, donor tuned): ``npe`` is the
      fraction of the gain the steering vector alone brings, ``kl`` the next-token KL to tuned.
    * ``"steer_shuffled"``: the control, the same vector with its coordinates permuted
      (``shuffled``, ``seed``): same norm, random direction.
    """
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(WEIGHT_KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {WEIGHT_KINDS}, got {kinds}")
    sess = _Session(base, tuned, tokenizer, examples, mean_positions, batch_size, tuned_tokenizer)
    layers = _check_layers(layers, n_layers(base))
    vectors: dict[str, torch.Tensor] = {}
    if set(kinds) & set(MEAN_KINDS):  # pass 1: the mean difference, [n_layers, d_model] f64
        mean_d = _mean_difference(sess, progress)
        vectors = {"steer": mean_d, "steer_shuffled": shuffled(mean_d, seed)}
    scores = {k: _Scores(len(sess.spans), len(layers)) for k in kinds}
    with sess.running("weight ablation", len(layers), progress) as bar:
        for batch in sess.batches:
            cb, ct = _forward(base, batch), _forward(tuned, batch)
            for k, s in scores.items():  # receiver tuned, donor base; graft, steer the other way
                s.unpatched(batch, cb, ct) if k in SUFFICIENCY else s.unpatched(batch, ct, cb)
            for c, i in enumerate(layers):
                if "revert" in scores:  # base's layer i inside tuned
                    h = ct.run(i, ct.resid_in(i), module=cb.layers[i])
                    scores["revert"].patched(batch, (c,), _finish(ct, i + 1, h, batch), cb)
                if "graft" in scores:  # tuned's layer i inside base
                    h = cb.run(i, cb.resid_in(i), module=ct.layers[i])
                    scores["graft"].patched(batch, (c,), _finish(cb, i + 1, h, batch), ct)
                if "mean_diff" in scores:
                    r = cb.resid[i]
                    shifted = (r.double() + mean_d[i].to(r.device)).to(ct.resid[i].dtype)
                    h = _mix(batch.patch, shifted, ct.resid[i])
                    scores["mean_diff"].patched(batch, (c,), _finish(ct, i + 1, h, batch), cb)
                for k in set(scores) & set(vectors):  # base plus the (shuffled) mean difference
                    r = cb.resid[i]
                    shifted = (r.double() + vectors[k][i].to(r.device)).to(r.dtype)
                    h = _mix(batch.patch, shifted, cb.resid[i])
                    scores[k].patched(batch, (c,), _finish(cb, i + 1, h, batch), ct)
                bar.update()
    weights = dict(component="weights", positions="all", layers=layers)
    noise = dict(receiver="tuned", donor="base", direction="noise")
    make = {"revert": lambda s: s.result(min_gap, sweep="weight_revert", **weights, **noise),
            "graft": lambda s: s.result(min_gap, sweep="weight_graft", **weights,
                                        receiver="base", donor="tuned", direction="denoise"),
            "mean_diff": lambda s: s.result(min_gap, sweep="mean_diff", component="resid",
                                            positions=sess.positions, layers=layers, **noise)}
    for k in ("steer", "steer_shuffled"):
        make[k] = lambda s, k=k: s.result(min_gap, sweep=k, component="resid", seed=seed,
                                          positions=sess.positions, layers=layers,
                                          receiver="base", donor="tuned", direction="denoise")
    return {k: make[k](s) for k, s in scores.items()}
