"""Context managers that read or overwrite module outputs by hook-point name.

Hook points (TransformerLens-style names):

* ``embed``              output of the token embedding          ``[batch, seq, d_model]``
* ``layers.{l}.resid``   output of decoder layer ``l`` (residual stream after it)
* ``layers.{l}.attn``    self-attention output before it is added to the residual
* ``layers.{l}.mlp``     MLP output before it is added to the residual

In transformers 5 a decoder layer returns a plain tensor and attention returns a tuple
``(attn_output, attn_weights)``; hooks here handle both and always remove themselves.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator

import torch

# class name -> attribute paths (relative to the CausalLM) of the parts hooks need
ARCHITECTURES: dict[str, dict[str, str]] = {
    name: {"embed": "model.embed_tokens", "layers": "model.layers", "norm": "model.norm", "head": "lm_head",
           "attn": "self_attn", "mlp": "mlp"}
    for name in ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
}

_NAME = re.compile(r"^(embed|layers\.(\d+)\.(resid|attn|mlp))$")


def _spec(model) -> dict[str, str]:
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


def n_layers(model) -> int:
    """Number of decoder layers of a supported model."""
    return len(_get(model, _spec(model)["layers"]))


def hook_points(model, kinds: Iterable[str] = ("resid",), include_embed: bool = True) -> list[str]:
    """All hook-point names of ``model`` of the given kinds, in depth order."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in ("resid", "attn", "mlp")]
    if bad:
        raise ValueError(f"unknown hook kind(s) {bad}; use resid, attn or mlp")
    names = ["embed"] if include_embed else []
    for layer in range(n_layers(model)):
        names += [f"layers.{layer}.{k}" for k in kinds]
    return names


def module_for(model, name: str) -> torch.nn.Module:
    """The module whose output is hook point ``name``; ValueError for a bad name or layer."""
    spec = _spec(model)
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"bad hook point {name!r}: use 'embed' or 'layers.<l>.resid|attn|mlp'")
    if name == "embed":
        return _get(model, spec["embed"])
    layer, kind = int(m.group(2)), m.group(3)
    layers = _get(model, spec["layers"])
    if layer >= len(layers):
        raise ValueError(f"{name}: model has {len(layers)} layers (0..{len(layers) - 1})")
    block = layers[layer]
    return block if kind == "resid" else _get(block, spec[kind])


def _select(model, names) -> list[str]:
    if callable(names):
        return [n for n in hook_points(model, ("resid", "attn", "mlp")) if names(n)]
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        module_for(model, n)  # validates
    return names


def _main(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_main(output, new):
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


@contextlib.contextmanager
def record(model, names, reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Iterator[dict]:
    """Record outputs of hook points during forward passes inside the block.

    Args:
        names: hook-point names, or a predicate on names (``names_filter``).
        reduce: optional ``fn(name, tensor) -> tensor`` applied inside the hook (e.g. pooling), so
            full ``[batch, seq, d]`` tensors need not be kept.

    Yields:
        A dict filled on each forward with ``name -> detached tensor`` (the latest call wins).
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in _select(model, names):
            def hook(_mod, _inp, out, name=name):
                t = _main(out).detach()
                store[name] = reduce(name, t) if reduce else t
            handles.append(module_for(model, name).register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def overwrite(model, edits: dict[str, torch.Tensor | Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Replace hook-point outputs inside the block.

    Args:
        edits: ``name -> tensor`` (replaces the whole output; shapes must match) or
            ``name -> fn(output) -> new_output``.
    """
    handles = []
    try:
        for name, edit in edits.items():
            def hook(_mod, _inp, out, name=name, edit=edit):
                main = _main(out)
                if callable(edit):
                    new = edit(main)
                else:
                    if edit.shape != main.shape:
                        raise ValueError(f"{name}: replacement has shape {tuple(edit.shape)}, "
                                         f"output has {tuple(main.shape)}")
                    new = edit.to(main.dtype).to(main.device)
                return _replace_main(out, new)
            handles.append(module_for(model, name).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
