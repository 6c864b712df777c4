"""Causal localisation: activation patching, cross-layer patching and weight ablation.

Two models of one architecture and tokenizer, a ``base`` and a ``tuned`` (e.g. the SFT result),
read the same examples: a formatted prompt plus the gold solution. The metric is the project's
answer log-prob (``alignkit.evaluate``): the teacher-forced log-probability, summed over tokens, of
the gold final answer given the prompt and the solution up to and including ``"#### "``.

A *patch* runs one model (the **receiver**) with some of its activations replaced by the other
model's (the **donor**) on the same input ids, so every token position lines up:

* ``direction="denoise"``: receiver = base, donor = tuned. Does the tuned activation at this
  site *suffice* to bring the base's answer log-prob up to the tuned one's?
* ``direction="noise"``: receiver = tuned, donor = base. Is the tuned activation at this site
  *necessary*: does putting the base's back destroy the gain?

Per example and site the sweeps report ``lp_patched``, ``delta = lp_patched - lp_receiver``, the
normalised patching effect ``npe = (lp_patched - lp_receiver) / (lp_donor - lp_receiver)`` (0: no
effect, 1: the patch moves the receiver all the way to the donor) and ``kl``, the KL divergence
``KL(P_donor || P_patched)`` of the next-token distributions at the answer-predicting positions,
summed over them (0: the patched model predicts the answer exactly as the donor does).

**NPE masking.** Where ``|lp_donor - lp_receiver| < min_gap`` (default 0.1 nats) the ratio is
ill-defined (a tiny denominator turns round-off into huge NPE values): those examples get NaN in
``npe`` (for every site), are counted in ``meta["n_npe_masked"]`` and logged, and
``bootstrap_mean`` leaves NaNs out. ``delta`` and ``kl`` are never masked.

**Positions** (``positions=``), token indices into prompt + gold solution:

* ``"all"``: every token;
* ``"prompt"``: the prompt's tokens (the prompt must tokenise to a prefix of the whole text);
* ``"answer"``: the *answer-predicting* positions ``answer_positions - 1``, i.e. the inputs whose
  outputs are the logits the metric reads (the last token of ``"#### "`` up to the answer's
  second-to-last token). The answer tokens themselves are not included: at the last layer their
  outputs do not enter the metric at all;
* a sequence of ints: the same indices in every example, negative ones counted from the end of
  each example's tokens (``-1`` = the last answer token).

**Components** (``component=``): ``"resid"`` patches the residual stream after decoder layer
``l`` (hook point ``layers.{l}.resid``), ``"attn"`` / ``"mlp"`` the attention / MLP output of layer
``l`` before it is added to the residual (``layers.{l}.attn`` / ``layers.{l}.mlp``).

**How it is computed.** For each batch of examples, the donor's and the receiver's activations at
every layer are captured in one forward each (``hooks.record``), together with the arguments the
model passes to each decoder layer (rotary position embeddings, mask: reused, never rebuilt). A
patch at layer ``l`` then starts from the receiver's cached residual: it recomputes only what the
patch changes (the rest of layer ``l`` for ``attn``, nothing for ``mlp``) and runs layers
``l+1 .. L-1``, then the final norm and the LM head *at the answer-predicting rows only*. A full
resid sweep costs ``L (L - 1) / 2`` layer calls per batch besides the two capturing forwards,
instead of ``L^2`` plus ``L`` full-vocabulary heads (see ``benchmarks/RESULTS_patching.md``).
Every path runs the same modules on the same shapes as the capturing forward, so patching a
model's own activations back in reproduces its log-probs bit for bit.

Examples are batched by length with right padding and no padding mask: every real token comes
before every pad, so the causal mask alone gives it exactly the keys it sees unpadded (the pads'
own rows are never read). The batch size changes results by float round-off only.

Supported: ``Qwen3ForCausalLM``, ``Qwen2ForCausalLM``, ``LlamaForCausalLM`` (the pre-norm block
``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``); anything else raises
``NotImplementedError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit.activations import check_same_tokenizer
from alignkit.data import format_prompt
from alignkit.evaluate import answer_spans
from alignkit.hooks import KINDS, architecture, decoder, decoder_layers, n_layers, record, unembed

logger = logging.getLogger(__name__)

__all__ = [
    "PatchResult",
    "examples_from_table",
    "layer_sweep",
    "cross_layer_sweep",
    "weight_sweep",
    "bootstrap_mean",
    "tokenize_examples",
    "COMPONENTS",
    "DIRECTIONS",
    "POSITIONS",
]

COMPONENTS = KINDS  # ("resid", "attn", "mlp")
DIRECTIONS = ("denoise", "noise")
POSITIONS = ("all", "prompt", "answer")
# classes whose decoder layer is x -> h = x + attn(input_layernorm(x)) -> h + mlp(post_attention_layernorm(h))
SUPPORTED = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
# config fields that must agree for activations (and layers) of one model to fit the other
_SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rope_parameters", "rope_theta",
                 "layer_types", "sliding_window", "use_sliding_window")

Positions = Union[str, Sequence[int]]


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class PatchResult:
    """Per-example results of one sweep.

    Attributes:
        lp_patched: ``[n_examples, *grid]`` answer log-prob (nats, summed over answer tokens) of
            the patched receiver; ``grid`` is ``[n_layers]`` for ``layer_sweep`` and
            ``weight_sweep``, ``[n_receiver_layers, n_donor_layers]`` for ``cross_layer_sweep``.
        delta: ``lp_patched - lp_receiver``, same shape.
        npe: normalised patching effect ``delta / (lp_donor - lp_receiver)``, same shape; NaN for
            the examples with ``|lp_donor - lp_receiver| < min_gap`` (see ``npe_valid``).
        kl: ``KL(P_donor || P_patched)`` at the answer-predicting positions, summed over them
            (nats), same shape.
        lp_receiver: ``[n_examples]`` answer log-prob of the unpatched receiver.
        lp_donor: ``[n_examples]`` answer log-prob of the donor.
        kl_receiver: ``[n_examples]`` ``KL(P_donor || P_receiver)``: the KL before any patch.
        npe_valid: ``[n_examples]`` bool, False where NPE is masked.
        meta: plain facts: ``sweep``, ``component``, ``positions``, ``direction``, ``receiver``
            and ``donor`` ("base"/"tuned"), ``layers`` (the grid's layer indices; ``donor_layers``
            too for cross-layer), ``min_gap``, ``n_npe_masked``, ``n_examples``.
    """

    lp_patched: np.ndarray
    delta: np.ndarray
    npe: np.ndarray
    kl: np.ndarray
    lp_receiver: np.ndarray
    lp_donor: np.ndarray
    kl_receiver: np.ndarray
    npe_valid: np.ndarray
    meta: dict


def _result(lp_patched: np.ndarray, kl: np.ndarray, lp_recv: np.ndarray, lp_donor: np.ndarray,
            kl_recv: np.ndarray, min_gap: float, meta: dict) -> PatchResult:
    extra = (1,) * (lp_patched.ndim - 1)
    gap = lp_donor - lp_recv
    valid = np.abs(gap) >= min_gap
    delta = lp_patched - lp_recv.reshape(-1, *extra)
    npe = np.full_like(delta, np.nan)
    npe[valid] = delta[valid] / gap[valid].reshape(-1, *extra)
    n_masked = int((~valid).sum())
    if n_masked:
        logger.info("%s: NPE masked (NaN) for %d of %d examples with |lp_donor - lp_receiver| < %g nats",
                    meta.get("sweep"), n_masked, len(valid), min_gap)
    meta = dict(meta, min_gap=float(min_gap), n_npe_masked=n_masked, n_examples=len(valid))
    return PatchResult(lp_patched=lp_patched, delta=delta, npe=npe, kl=kl, lp_receiver=lp_recv,
                       lp_donor=lp_donor, kl_receiver=kl_recv, npe_valid=valid, meta=meta)


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, np.ndarray]:
    """Mean over examples with a percentile bootstrap interval (examples resampled with replacement).

    NaN entries (masked NPE) are left out of every mean; a column that is all NaN gives NaN.

    Args:
        values: ``[n_examples, ...]`` per-example values (e.g. ``PatchResult.delta``).
        n_boot: bootstrap resamples.
        seed: seed of the resampling.
        ci: coverage of the interval, in (0, 1).

    Returns:
        ``{"point", "lo", "hi"}``, each ``[...]`` float64 (the shape of one example's values), and
        ``"n"``: ``[...]`` number of non-NaN examples behind each point.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 1 or v.shape[0] == 0:
        raise ValueError(f"bootstrap_mean needs values of shape [n_examples, ...] with n_examples >= 1, got {v.shape}")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")
    n = v.shape[0]
    flat = v.reshape(n, -1)
    ok = np.isfinite(flat)
    if np.isinf(flat).any():
        raise ValueError("bootstrap_mean got infinite values")
    filled = np.where(ok, flat, 0.0)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = filled.sum(0) / ok.sum(0)
        boots = (counts @ filled) / (counts @ ok)  # [n_boot, cols]; NaN where a resample has no valid row
    lo, hi = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    some = ok.any(0)  # columns with at least one value (else NaN throughout)
    if some.any():
        alpha = (1 - ci) / 2
        lo[some], hi[some] = np.nanquantile(boots[:, some], [alpha, 1 - alpha], axis=0)
    shape = v.shape[1:]
    return {"point": point.reshape(shape), "lo": lo.reshape(shape), "hi": hi.reshape(shape), "n": ok.sum(0).reshape(shape)}


# ----------------------------------------------------------------------------- inputs


def examples_from_table(rows: Sequence[Mapping], tokenizer=None, chat: bool = False) -> list[dict]:
    """Flip-table rows (``evaluate.flip_table``) as patching examples.

    Returns:
        ``[{"prompt": format_prompt(question), "answer": gold solution, "index": eval index}, ...]``.
    """
    return [{"prompt": format_prompt(r["question"], tokenizer, chat=chat), "answer": r["answer"],
             "index": r.get("index", k)} for k, r in enumerate(rows)]


def _check_examples(examples) -> tuple[list[str], list[str]]:
    if isinstance(examples, (str, Mapping)):
        raise TypeError(f"examples must be a list of {{'prompt', 'answer'}} dicts, got a single {type(examples).__name__}")
    examples = list(examples)
    if not examples:
        raise ValueError("patching needs at least one example, got an empty list")
    prompts, answers = [], []
    for k, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "prompt" not in ex or "answer" not in ex:
            raise ValueError(f"example {k} must be a dict with 'prompt' and 'answer', got {type(ex).__name__}"
                             + (f" with keys {sorted(ex)}" if isinstance(ex, Mapping) else ""))
        if not isinstance(ex["prompt"], str) or not isinstance(ex["answer"], str):
            raise TypeError(f"example {k}: 'prompt' and 'answer' must be str")
        prompts.append(ex["prompt"])
        answers.append(ex["answer"])
    return prompts, answers


def tokenize_examples(tokenizer, examples: Sequence[Mapping]) -> list[dict]:
    """Token ids of prompt + gold solution, the answer's positions and the prompt's length.

    Returns:
        Per example ``{"input_ids": [int], "answer_positions": [int], "n_prompt": int}``
        (``answer_spans`` plus the number of prompt tokens).

    Raises:
        ValueError: empty list, a malformed example, a gold answer that cannot be located in the
            tokenisation, or a prompt whose tokens are not a prefix of the whole text's.
    """
    prompts, answers = _check_examples(examples)
    spans = answer_spans(tokenizer, prompts, answers)  # raises "cannot be located"
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    for k, (s, p) in enumerate(zip(spans, prompt_ids)):
        if list(s["input_ids"][: len(p)]) != list(p):
            raise ValueError(f"example {k}: the prompt's tokens are not a prefix of prompt + solution "
                             "(BPE merged across the boundary); start the solution with a space")
        s["n_prompt"] = len(p)
        if s["answer_positions"][0] < 1:
            raise ValueError(f"example {k}: the answer starts at token 0, nothing predicts it")
    return spans


def _check_models(base, tuned, tokenizer, tuned_tokenizer=None) -> None:
    for name, m in (("base", base), ("tuned", tuned)):
        architecture(m)  # NotImplementedError naming unsupported classes
        if type(m).__name__ not in SUPPORTED:
            raise NotImplementedError(f"patching supports {', '.join(SUPPORTED)}; {name} is {type(m).__name__}")
    if type(base) is not type(tuned):
        raise ValueError(f"base and tuned must be one architecture, got {type(base).__name__} and {type(tuned).__name__}")
    cb, ct = base.config, tuned.config
    for f in _SHAPE_FIELDS:
        a, b = getattr(cb, f, None), getattr(ct, f, None)
        if a != b:
            raise ValueError(f"base and tuned differ in config.{f}: {a!r} vs {b!r}")
    for name, m in (("base", base), ("tuned", tuned)):
        if len(decoder_layers(m)) != cb.num_hidden_layers:
            raise ValueError(f"{name} has {len(decoder_layers(m))} decoder layers, its config says {cb.num_hidden_layers}")
    if tuned_tokenizer is not None:
        check_same_tokenizer(tokenizer, tuned_tokenizer)
    size = len(tokenizer)
    if size > cb.vocab_size:
        raise ValueError(f"the tokenizer has {size} tokens but the models' vocabulary has {cb.vocab_size}: "
                         "not the models' tokenizer")
    if next(base.parameters()).device != next(tuned.parameters()).device:
        raise ValueError(f"base is on {next(base.parameters()).device}, tuned on {next(tuned.parameters()).device}: "
                         "put both on one device")


def _check_positions(positions: Positions) -> Positions:
    if isinstance(positions, str):
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS} or a list of token indices, got {positions!r}")
        return positions
    try:
        idx = [int(p) for p in positions]
    except (TypeError, ValueError):
        raise TypeError(f"positions must be one of {POSITIONS} or a sequence of ints, got {positions!r}") from None
    if not idx or any(isinstance(p, bool) or int(p) != p for p in positions):
        raise ValueError(f"explicit positions must be a non-empty sequence of ints, got {positions!r}")
    return tuple(idx)


def _check_layers(layers, n: int, what: str = "layers") -> list[int]:
    if layers is None:
        return list(range(n))
    out = [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x < n]
    if not out or bad:
        raise ValueError(f"{what} must be indices in 0..{n - 1}, got {list(layers)!r}")
    return out


def _roles(base, tuned, direction: str):
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' (tuned into base) or 'noise' (base into tuned), got {direction!r}")
    return (base, tuned, "base", "tuned") if direction == "denoise" else (tuned, base, "tuned", "base")


# ----------------------------------------------------------------------------- batches and caches


@dataclasses.dataclass
class _Batch:
    """One batch of examples, right-padded.

    ``rows_b``/``rows_p``: batch row and position of each answer-predicting row (``[k]``);
    ``targets``: the answer token each of them predicts; ``patch``: ``[b, T]`` positions to patch.
    """

    index: list[int]  # example indices (into the examples list)
    ids: torch.Tensor  # [b, T], right-padded
    rows_b: torch.Tensor
    rows_p: torch.Tensor
    targets: torch.Tensor
    patch: torch.Tensor  # [b, T] bool


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


def _batches(spans: list[dict], positions: Positions, batch_size: int, pad_id: int, device) -> list[_Batch]:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
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
            for p in s["answer_positions"]:
                rb.append(r)
                rp.append(p - 1)
                tg.append(s["input_ids"][p])
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        out.append(_Batch(index=idx, ids=ids.to(device), rows_b=t(rb), rows_p=t(rp), targets=t(tg),
                          patch=patch.to(device)))
    return out


def _position_ids(batch: _Batch) -> torch.Tensor:
    return torch.arange(batch.ids.shape[1], device=batch.ids.device).expand_as(batch.ids)


@dataclasses.dataclass
class _Cache:
    """One model's forward on one batch: per-layer activations and decoder-layer call arguments."""

    model: torch.nn.Module
    layers: torch.nn.ModuleList
    kwargs: list[dict]  # [L] what the model passed to each decoder layer (mask, rotary, ...)
    embed: torch.Tensor  # [b, T, d]
    resid: list[torch.Tensor]  # [L] x [b, T, d], output of layer l
    attn: list[torch.Tensor] | None
    mlp: list[torch.Tensor] | None
    logp: torch.Tensor  # [k, vocab] float64 log-probs at the answer-predicting rows

    def resid_in(self, layer: int) -> torch.Tensor:
        return self.embed if layer == 0 else self.resid[layer - 1]


@contextlib.contextmanager
def _layer_call_args(model) -> Iterator[list[dict]]:
    """Record the keyword arguments each decoder layer is called with (attention mask, rotary
    position embeddings, position ids ...), so later partial runs reuse exactly what the model built."""
    layers = decoder_layers(model)
    store: list[dict] = [{} for _ in layers]
    handles = []
    try:
        for i, layer in enumerate(layers):
            def pre(_mod, args, kwargs, i=i):
                kw = dict(kwargs)
                kw.pop("hidden_states", None)
                store[i] = kw
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


def _forward(model, batch: _Batch, kinds: Sequence[str] = ("resid",)) -> _Cache:
    L = n_layers(model)
    kinds = [k for k in KINDS if k in set(kinds) | {"resid"}]
    names = ["embed"] + [f"layers.{l}.{k}" for l in range(L) for k in kinds]
    with _layer_call_args(model) as kwargs, record(model, names) as store:
        # right padding: no padding mask needed (see the module docstring)
        decoder(model)(input_ids=batch.ids, attention_mask=None, position_ids=_position_ids(batch), use_cache=False)
    resid = [store[f"layers.{l}.resid"] for l in range(L)]
    return _Cache(
        model=model, layers=decoder_layers(model), kwargs=kwargs, embed=store["embed"], resid=resid,
        attn=[store[f"layers.{l}.attn"] for l in range(L)] if "attn" in kinds else None,
        mlp=[store[f"layers.{l}.mlp"] for l in range(L)] if "mlp" in kinds else None,
        logp=_answer_logp(model, resid[-1], batch),
    )


def _answer_logp(model, final_resid: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """``[k, vocab]`` float64 log-probs from the final residual at the answer-predicting rows only."""
    rows = final_resid[batch.rows_b, batch.rows_p]
    return torch.log_softmax(unembed(model, rows).double(), dim=-1)


def _score(logp: torch.Tensor, donor_logp: torch.Tensor, batch: _Batch) -> tuple[np.ndarray, np.ndarray]:
    """Per-example answer log-prob and KL(donor || this), float64, ``[b]`` each."""
    b = batch.ids.shape[0]
    tok = logp.gather(1, batch.targets[:, None])[:, 0]
    p = donor_logp.exp()
    kl_rows = torch.where(p > 0, p * (donor_logp - logp), 0.0).sum(-1)  # 0 log 0 = 0
    lp = torch.zeros(b, dtype=torch.float64, device=logp.device).index_add_(0, batch.rows_b, tok)
    kl = torch.zeros(b, dtype=torch.float64, device=logp.device).index_add_(0, batch.rows_b, kl_rows)
    return lp.cpu().numpy(), kl.cpu().numpy()


def _finish(cache: _Cache, start: int, h: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Answer log-probs ``[k, vocab]`` after running the cached model's layers ``start .. L-1`` on ``h``.

    The final norm and the head run at the answer-predicting rows only.
    """
    for l in range(start, len(cache.layers)):
        h = cache.layers[l](h, **cache.kwargs[l])
    return _answer_logp(cache.model, h, batch)


def _mix(patch: torch.Tensor, donor: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
    return torch.where(patch[..., None], donor, receiver)


def _patched_output(recv: _Cache, donor: _Cache, layer: int, component: str, patch: torch.Tensor) -> torch.Tensor:
    """The receiver's residual after ``layer`` with the donor's ``component`` output patched in."""
    if component == "resid":
        return _mix(patch, donor.resid[layer], recv.resid[layer])
    block = recv.layers[layer]
    if component == "attn":
        h = recv.resid_in(layer) + _mix(patch, donor.attn[layer], recv.attn[layer])
        return h + block.mlp(block.post_attention_layernorm(h))
    h = recv.resid_in(layer) + recv.attn[layer]  # the layer's own mid-residual, bit for bit
    return h + _mix(patch, donor.mlp[layer], recv.mlp[layer])


class _Session:
    """Shared setup of every sweep: checks, tokenisation, batches, eval mode, no_grad."""

    def __init__(self, base, tuned, tokenizer, examples, positions, batch_size, tuned_tokenizer=None):
        _check_models(base, tuned, tokenizer, tuned_tokenizer)
        self.positions = _check_positions(positions)
        self.spans = tokenize_examples(tokenizer, examples)
        self.n = len(self.spans)
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self.batches = _batches(self.spans, self.positions, batch_size, pad, next(base.parameters()).device)
        self.models = (base, tuned)

    @contextlib.contextmanager
    def running(self):
        modes = [m.training for m in self.models]
        try:
            for m in self.models:
                m.eval()
            with torch.no_grad():
                yield
        finally:
            for m, t in zip(self.models, modes):
                m.train(t)


# ----------------------------------------------------------------------------- sweeps


def layer_sweep(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    tokenizer,
    examples: Sequence[Mapping],
    component: str = "resid",
    positions: Positions = "all",
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    min_gap: float = 0.1,
    tuned_tokenizer=None,
    progress: bool = True,
) -> PatchResult:
    """Patch one component at one layer at a time, for every layer.

    Args:
        base, tuned: causal LMs of one supported architecture and shape, on one device.
        tokenizer: their tokenizer.
        examples: ``[{"prompt": formatted prompt, "answer": gold solution ending "#### N"}, ...]``
            (``examples_from_table`` builds them from flip-table rows).
        component: ``"resid"``, ``"attn"`` or ``"mlp"`` (see the module docstring).
        positions: ``"all"``, ``"prompt"``, ``"answer"`` (answer-predicting positions) or explicit
            token indices.
        direction: ``"denoise"`` (tuned activations into base: sufficiency) or ``"noise"`` (base
            activations into tuned: necessity).
        layers: layer indices to patch (default: all).
        batch_size: examples per forward; does not change the result beyond round-off.
        min_gap: NPE is masked (NaN) for examples with ``|lp_donor - lp_receiver| < min_gap`` nats.
        tuned_tokenizer: optional second tokenizer, checked to be identical to ``tokenizer``.
        progress: show a tqdm bar.

    Returns:
        ``PatchResult`` with ``[n_examples, n_layers]`` arrays.

    Raises:
        ValueError: mismatched models or tokenizers, empty examples, an answer that cannot be
            located, bad positions, component, direction or layers.
        NotImplementedError: an unsupported architecture.
    """
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    receiver, donor_model, rname, dname = _roles(base, tuned, direction)
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size, tuned_tokenizer)
    layers = _check_layers(layers, n_layers(base))
    lp = np.zeros((sess.n, len(layers)))
    kl = np.zeros((sess.n, len(layers)))
    lp_r, lp_d, kl_r = np.zeros(sess.n), np.zeros(sess.n), np.zeros(sess.n)
    with sess.running(), tqdm(total=len(sess.batches) * len(layers), desc=f"patch {component} ({direction})",
                              leave=False, disable=not progress) as bar:
        for batch in sess.batches:
            recv = _forward(receiver, batch, (component, "attn") if component == "mlp" else (component,))
            donor = _forward(donor_model, batch, (component,))
            lp_r[batch.index], kl_r[batch.index] = _score(recv.logp, donor.logp, batch)
            lp_d[batch.index] = _score(donor.logp, donor.logp, batch)[0]
            for c, layer in enumerate(layers):
                logp = _finish(recv, layer + 1, _patched_output(recv, donor, layer, component, batch.patch), batch)
                lp[batch.index, c], kl[batch.index, c] = _score(logp, donor.logp, batch)
                bar.update()
    meta = {"sweep": "layer", "component": component, "positions": _jsonable(sess.positions), "direction": direction,
            "receiver": rname, "donor": dname, "layers": layers}
    return _result(lp, kl, lp_r, lp_d, kl_r, min_gap, meta)


def cross_layer_sweep(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    tokenizer,
    examples: Sequence[Mapping],
    positions: Positions = "all",
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    donor_layers: Sequence[int] | None = None,
    batch_size: int = 16,
    min_gap: float = 0.1,
    tuned_tokenizer=None,
    progress: bool = True,
) -> PatchResult:
    """Patch the donor's residual after layer ``j`` into the receiver's residual after layer ``i``.

    With ``direction="denoise"`` this puts tuned layer ``j``'s output into base layer ``i``: a
    causal test of a layer remapping (does the base's stack from ``i + 1`` on make use of what
    tuned layer ``j`` computes?). The diagonal ``i == j`` is ``layer_sweep(component="resid")``.

    Args:
        layers: receiver layers ``i`` (default all); donor_layers: donor layers ``j`` (default all).
        Others: as ``layer_sweep``.

    Returns:
        ``PatchResult`` with ``[n_examples, n_layers, n_donor_layers]`` arrays (rows: receiver
        layer ``i``, columns: donor layer ``j``); ``meta["layers"]``, ``meta["donor_layers"]``.
    """
    receiver, donor_model, rname, dname = _roles(base, tuned, direction)
    sess = _Session(base, tuned, tokenizer, examples, positions, batch_size, tuned_tokenizer)
    L = n_layers(base)
    rows, cols = _check_layers(layers, L), _check_layers(donor_layers, L, "donor_layers")
    lp = np.zeros((sess.n, len(rows), len(cols)))
    kl = np.zeros_like(lp)
    lp_r, lp_d, kl_r = np.zeros(sess.n), np.zeros(sess.n), np.zeros(sess.n)
    with sess.running(), tqdm(total=len(sess.batches) * len(rows) * len(cols), desc=f"cross-layer ({direction})",
                              leave=False, disable=not progress) as bar:
        for batch in sess.batches:
            recv, donor = _forward(receiver, batch), _forward(donor_model, batch)
            lp_r[batch.index], kl_r[batch.index] = _score(recv.logp, donor.logp, batch)
            lp_d[batch.index] = _score(donor.logp, donor.logp, batch)[0]
            for a, i in enumerate(rows):
                for c, j in enumerate(cols):
                    logp = _finish(recv, i + 1, _mix(batch.patch, donor.resid[j], recv.resid[i]), batch)
                    lp[batch.index, a, c], kl[batch.index, a, c] = _score(logp, donor.logp, batch)
                    bar.update()
    meta = {"sweep": "cross_layer", "component": "resid", "positions": _jsonable(sess.positions),
            "direction": direction, "receiver": rname, "donor": dname, "layers": rows, "donor_layers": cols}
    return _result(lp, kl, lp_r, lp_d, kl_r, min_gap, meta)


def weight_sweep(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    tokenizer,
    examples: Sequence[Mapping],
    layers: Sequence[int] | None = None,
    mean_positions: Positions = "all",
    batch_size: int = 16,
    min_gap: float = 0.1,
    tuned_tokenizer=None,
    progress: bool = True,
) -> dict[str, PatchResult]:
    """Per layer: revert its weights, graft them, and mean-ablate the residual difference.

    No model is modified: a swapped layer is run as the other model's layer module on the
    receiver's cached input, followed by the receiver's own later layers, norm and head.

    * ``"revert"`` (necessity): tuned with decoder layer ``l``'s weights reverted to base's.
      Receiver tuned, donor base: ``npe`` = fraction of the tuned-over-base gain that reverting
      layer ``l`` alone removes.
    * ``"graft"`` (sufficiency): base with tuned's decoder layer ``l`` grafted in. Receiver base,
      donor tuned: ``npe`` = fraction of the gain the tuned layer alone brings.
    * ``"mean_diff"``: tuned with its residual after layer ``l`` replaced, at ``mean_positions``,
      by base's residual plus the *mean* tuned − base difference ``mean_d[l]`` (mean over those
      positions of all examples). Receiver tuned, donor base: ``npe`` = fraction of the gain lost
      when only the example-specific part of the difference is removed; compare with
      ``layer_sweep(component="resid", direction="noise")``, which removes all of it. A value
      near 0 means a constant shift (a steering vector) carries the change at that layer.

    Embeddings, the final norm and the LM head are not swapped. ``mean_positions`` uses the
    positions of ``layer_sweep`` (with ``"all"`` the mean includes the first tokens, whose
    residuals can be far larger than the rest: pass e.g. ``"prompt"`` or indices to choose).

    Returns:
        ``{"revert": PatchResult, "graft": PatchResult, "mean_diff": PatchResult}``, each with
        ``[n_examples, n_layers]`` arrays.
    """
    sess = _Session(base, tuned, tokenizer, examples, mean_positions, batch_size, tuned_tokenizer)
    L = n_layers(base)
    layers = _check_layers(layers, L)
    d = base.config.hidden_size
    # pass 1: mean tuned - base residual difference per layer over the selected positions (float64)
    diff_sum = torch.zeros((L, d), dtype=torch.float64, device=next(base.parameters()).device)
    count = 0
    names = [f"layers.{l}.resid" for l in range(L)]
    with sess.running():
        for batch in tqdm(sess.batches, desc="mean residual difference", leave=False, disable=not progress):
            sums = []
            for m in (base, tuned):
                with record(m, names, reduce=lambda _n, t, p=batch.patch: t[p].double().sum(0)) as store:
                    decoder(m)(input_ids=batch.ids, attention_mask=None, position_ids=_position_ids(batch),
                               use_cache=False)
                sums.append(torch.stack([store[n] for n in names]))
            diff_sum += sums[1] - sums[0]
            count += int(batch.patch.sum())
    mean_d = diff_sum / count

    out = {k: np.zeros((sess.n, len(layers))) for k in ("revert", "graft", "mean_diff")}
    kls = {k: np.zeros((sess.n, len(layers))) for k in out}
    lp_b, lp_t, kl_tb, kl_bt = (np.zeros(sess.n) for _ in range(4))
    with sess.running(), tqdm(total=len(sess.batches) * len(layers), desc="weight ablation", leave=False,
                              disable=not progress) as bar:
        for batch in sess.batches:
            cb, ct = _forward(base, batch), _forward(tuned, batch)
            idx = batch.index
            lp_b[idx], kl_tb[idx] = _score(cb.logp, ct.logp, batch)  # base, KL(tuned || base)
            lp_t[idx], kl_bt[idx] = _score(ct.logp, cb.logp, batch)  # tuned, KL(base || tuned)
            for c, l in enumerate(layers):
                # revert: base's layer l inside tuned (same call arguments: same config)
                logp = _finish(ct, l + 1, cb.layers[l](ct.resid_in(l), **ct.kwargs[l]), batch)
                out["revert"][idx, c], kls["revert"][idx, c] = _score(logp, cb.logp, batch)
                # graft: tuned's layer l inside base
                logp = _finish(cb, l + 1, ct.layers[l](cb.resid_in(l), **cb.kwargs[l]), batch)
                out["graft"][idx, c], kls["graft"][idx, c] = _score(logp, ct.logp, batch)
                # mean-ablate the difference: base residual + mean difference, inside tuned
                shifted = (cb.resid[l].double() + mean_d[l]).to(ct.resid[l].dtype)
                logp = _finish(ct, l + 1, _mix(batch.patch, shifted, ct.resid[l]), batch)
                out["mean_diff"][idx, c], kls["mean_diff"][idx, c] = _score(logp, cb.logp, batch)
                bar.update()
    pos = _jsonable(sess.positions)
    common = {"component": "weights", "layers": layers}
    return {
        "revert": _result(out["revert"], kls["revert"], lp_t, lp_b, kl_bt, min_gap,
                          dict(common, sweep="weight_revert", receiver="tuned", donor="base", direction="noise",
                               positions="all")),
        "graft": _result(out["graft"], kls["graft"], lp_b, lp_t, kl_tb, min_gap,
                         dict(common, sweep="weight_graft", receiver="base", donor="tuned", direction="denoise",
                              positions="all")),
        "mean_diff": _result(out["mean_diff"], kls["mean_diff"], lp_t, lp_b, kl_bt, min_gap,
                             dict(common, sweep="mean_diff", receiver="tuned", donor="base", direction="noise",
                                  component="resid", positions=pos)),
    }


def _jsonable(positions: Positions):
    return positions if isinstance(positions, str) else list(positions)
