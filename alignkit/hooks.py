"""Context managers that read or overwrite module outputs by hook-point name.

Hook points (TransformerLens-style names), all ``[batch, seq, d_model]``:

* ``embed``              output of the token embedding (``hidden_states[0]``)
* ``layers.{l}.resid``   output of decoder layer ``l``: the residual stream after it
* ``layers.{l}.attn``    self-attention output, before it is added to the residual
* ``layers.{l}.mlp``     MLP output, before it is added to the residual

For the supported (pre-norm) blocks ``resid(l) = resid(l-1) + attn(l) + mlp(l)`` with
``resid(-1) = embed``. The last ``layers.{L-1}.resid`` is *before* the final norm; transformers'
``output_hidden_states`` gives its last entry after the norm.

transformers 5 facts these hooks rely on (checked on 5.24):

* a decoder layer returns a plain tensor; self-attention returns a tuple
  ``(attn_output, attn_weights)`` (weights ``None`` under SDPA); MLP and embedding return tensors.
  Hooks read and replace element 0 of a tuple, the whole output otherwise.
* transformers registers its own output-capturing forward hooks on decoder layers and attention
  modules at the first forward that asks for ``output_hidden_states`` or ``output_attentions``,
  and leaves them there, so ``module._forward_hooks`` is not empty afterwards even with no hook of
  ours. Our overwrite hooks are *prepended*: they run before any other hook, so
  ``record``, transformers' capture and the rest of the forward all see the edited value.

Every context manager removes exactly the hooks it added when the block exits, also on error.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator, Union

import torch

# class name -> attribute paths (relative to the model object) of the parts the hooks need.
# ``decoder`` (the stack without the LM head) and ``head`` are None for the bare decoder classes.
_CAUSAL = {"decoder": "model", "embed": "model.embed_tokens", "layers": "model.layers", "norm": "model.norm",
           "head": "lm_head", "attn": "self_attn", "mlp": "mlp"}
_BARE = {"decoder": None, "embed": "embed_tokens", "layers": "layers", "norm": "norm",
         "head": None, "attn": "self_attn", "mlp": "mlp"}
ARCHITECTURES: dict[str, dict[str, str | None]] = {
    "Qwen3ForCausalLM": _CAUSAL,
    "Qwen2ForCausalLM": _CAUSAL,
    "LlamaForCausalLM": _CAUSAL,
    "Qwen3Model": _BARE,
    "Qwen2Model": _BARE,
    "LlamaModel": _BARE,
}

KINDS = ("resid", "attn", "mlp")
_NAME = re.compile(r"^(?:embed|layers\.(\d+)\.(resid|attn|mlp))$")

Names = Union[str, Iterable[str], Callable[[str], bool]]
Edit = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def architecture(model: torch.nn.Module) -> dict[str, str | None]:
    """The table entry (attribute paths) for ``model``'s class.

    Raises:
        NotImplementedError: the class is not in ``ARCHITECTURES``.
    """
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise NotImplementedError(
            f"alignkit does not support {name}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (``model.model``; the model itself when bare).

    Running it instead of the causal LM gives the same hook-point values without computing
    ``[batch, seq, vocab]`` logits.
    """
    path = architecture(model)["decoder"]
    return model if path is None else _get(model, path)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a supported model, ``model.model.layers`` for a causal LM."""
    return _get(model, architecture(model)["layers"])


def n_layers(model: torch.nn.Module) -> int:
    """Number of decoder layers of a supported model."""
    return len(decoder_layers(model))


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied after the last decoder layer (``model.model.norm``)."""
    return _get(model, architecture(model)["norm"])


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The unembedding (``model.lm_head``); ValueError for a bare decoder without one."""
    head = architecture(model)["head"]
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head; load the *ForCausalLM class")
    return _get(model, head)


def unembed(model: torch.nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """Logits the model would produce from a final residual stream.

    Args:
        resid: ``[..., d_model]`` value of ``layers.{L-1}.resid`` (before the final norm).

    Returns:
        ``[..., vocab]`` logits ``lm_head(final_norm(resid))``.
    """
    return lm_head(model)(final_norm(model)(resid))


def hook_points(model: torch.nn.Module, kinds: Iterable[str] = ("resid",), include_embed: bool = True) -> list[str]:
    """All hook-point names of ``model`` of the given kinds, in depth order.

    Args:
        kinds: any of ``"resid"``, ``"attn"``, ``"mlp"``; within a layer they appear in this order.
        include_embed: put ``"embed"`` first.

    Returns:
        e.g. ``["embed", "layers.0.resid", ..., "layers.{L-1}.resid"]``.
    """
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown hook kind(s) {bad}; use any of {list(KINDS)}")
    kinds = [k for k in KINDS if k in kinds]
    names = ["embed"] if include_embed else []
    for layer in range(n_layers(model)):
        names += [f"layers.{layer}.{k}" for k in kinds]
    return names


def parse_hook_point(name: str) -> tuple[int | None, str]:
    """Split a hook-point name into ``(layer, kind)``; ``("embed")`` gives ``(None, "embed")``.

    Raises:
        ValueError: ``name`` is not ``embed`` or ``layers.<l>.resid|attn|mlp``.
    """
    m = _NAME.match(name) if isinstance(name, str) else None
    if not m:
        raise ValueError(f"bad hook point {name!r}: use 'embed' or 'layers.<l>.resid|attn|mlp'")
    if name == "embed":
        return None, "embed"
    return int(m.group(1)), m.group(2)


def module_for(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module whose output is hook point ``name``.

    Raises:
        NotImplementedError: unsupported architecture.
        ValueError: bad name, or a layer out of range ("layers.12.resid: model has 12 layers (0..11)").
    """
    spec = architecture(model)
    layer, kind = parse_hook_point(name)
    if kind == "embed":
        return _get(model, spec["embed"])
    layers = _get(model, spec["layers"])
    if layer >= len(layers):
        raise ValueError(f"{name}: model has {len(layers)} layers (0..{len(layers) - 1})")
    block = layers[layer]
    return block if kind == "resid" else _get(block, spec[kind])


def select(model: torch.nn.Module, names: Names) -> list[str]:
    """Resolve a ``names_filter``-style selector to a validated list of hook-point names.

    Args:
        names: one name, a list of names (order kept), or a predicate ``fn(name) -> bool`` over
            every hook point of every kind (result in depth order).

    Raises:
        ValueError: a bad or out-of-range name, a duplicate, or nothing selected.
    """
    if callable(names):
        out = [n for n in hook_points(model, KINDS) if names(n)]
        if not out:
            raise ValueError("the hook-point filter selected no hook point")
        return out
    out = [names] if isinstance(names, str) else list(names)
    for n in out:
        module_for(model, n)  # validates
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate hook point(s) {dup}")
    return out


def _main(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_main(output, new):
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


@contextlib.contextmanager
def record(
    model: torch.nn.Module,
    names: Names,
    reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    detach: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record hook-point outputs during the forward passes run inside the block.

    Example::

        with record(model, ["embed", "layers.3.resid"]) as cache:
            model(input_ids)
        cache["layers.3.resid"]  # [batch, seq, d_model]

    Args:
        model: a supported model.
        names: hook-point names, or a predicate on names (``names_filter``); see ``select``.
        reduce: optional ``fn(name, output) -> tensor`` applied inside the hook (e.g. pooling
            ``[batch, seq, d] -> [batch, d]``) so the full output need not be kept.
        detach: store detached tensors (default); ``False`` keeps the autograd graph.

    Yields:
        A dict filled on each forward with ``name -> [batch, seq, d_model]`` (or what ``reduce``
        returns). A later forward inside the block overwrites the entries of an earlier one.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in select(model, names):
            def hook(_mod, _inp, out, name=name):
                t = _main(out)
                if detach:
                    t = t.detach()
                store[name] = reduce(name, t) if reduce is not None else t

            handles.append(module_for(model, name).register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def overwrite(model: torch.nn.Module, edits: dict[str, Edit]) -> Iterator[None]:
    """Replace hook-point outputs during the forward passes run inside the block.

    The edited value flows downstream (the rest of the forward, logits) and is what every other
    hook on the module sees: overwrite hooks are prepended, so ``record`` shows the edited value
    whether it is entered inside or outside this block.

    Args:
        model: a supported model.
        edits: ``name -> tensor`` replaces the whole output (``[batch, seq, d_model]``, same shape
            as the output; cast to its dtype and device) or ``name -> fn(output) -> new_output``
            edits it (same shape). For attention the edit applies to ``attn_output``, element 0
            of the tuple the module returns.

    Raises:
        ValueError: a bad hook-point name (on entry), or a replacement of the wrong shape (at the
            forward).
        TypeError: a callable that does not return a tensor.
    """
    handles = []
    try:
        for name, edit in edits.items():
            module = module_for(model, name)
            if not callable(edit) and not isinstance(edit, torch.Tensor):
                raise TypeError(f"{name}: edit must be a tensor or a callable, got {type(edit).__name__}")

            def hook(_mod, _inp, out, name=name, edit=edit):
                main = _main(out)
                if isinstance(edit, torch.Tensor):
                    new, what = edit, "replacement"
                else:
                    new, what = edit(main), "edit function output"
                    if not isinstance(new, torch.Tensor):
                        raise TypeError(f"{name}: edit function returned {type(new).__name__}, expected a Tensor")
                if new.shape != main.shape:
                    raise ValueError(f"{name}: {what} has shape {tuple(new.shape)}, "
                                     f"the module output has {tuple(main.shape)}")
                return _replace_main(out, new.to(device=main.device, dtype=main.dtype))

            handles.append(module.register_forward_hook(hook, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
