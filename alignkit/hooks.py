"""Context managers that read or overwrite module outputs by hook-point name, ``[batch, seq,
d_model]``: ``embed``, ``layers.{l}.resid|attn|mlp`` (``resid(l) = resid(l-1) + attn(l) + mlp(l)``).
Definitions and pitfalls: docs/measures.md#hook-points"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator, Union

import torch

from alignkit.models import decoder_layers, n_layers, part

KINDS = ("resid", "attn", "mlp")
_NAME = re.compile(r"^(?:embed|layers\.(\d+)\.(resid|attn|mlp))$")

Names = Union[str, Iterable[str], Callable[[str], bool]]
Edit = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def hook_points(model: torch.nn.Module, kinds: Iterable[str] = ("resid",),
                include_embed: bool = True) -> list[str]:
    """Hook-point names of ``kinds`` in depth order, e.g. ``["embed", "layers.0.resid", ...]``."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown hook kind(s) {bad}; use any of {list(KINDS)}")
    layers = [f"layers.{i}.{k}" for i in range(n_layers(model)) for k in KINDS if k in kinds]
    return (["embed"] if include_embed else []) + layers


def parse_hook_point(name: str) -> tuple[int | None, str]:
    """``(layer, kind)`` of a hook-point name; ``"embed"`` gives ``(None, "embed")``."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if not m:
        raise ValueError(f"bad hook point {name!r}: use 'embed' or 'layers.<l>.resid|attn|mlp'")
    return (None, "embed") if name == "embed" else (int(m.group(1)), m.group(2))


def module_for(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module whose output (``embed``: layer 0's input) is ``name``; ValueError if none."""
    layer, kind = parse_hook_point(name)
    layers = decoder_layers(model)
    if kind == "embed":
        return layers[0]
    if layer >= len(layers):
        raise ValueError(f"{name}: model has {len(layers)} layers (0..{len(layers) - 1})")
    return layers[layer] if kind == "resid" else part(model, kind, layers[layer])


def select(model: torch.nn.Module, names: Names) -> list[str]:
    """A ``names_filter``-style selector (a name, a list, or a predicate) as validated names;
    ValueError for a bad or out-of-range name, a duplicate, or nothing selected."""
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


def _hook(model: torch.nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor | None],
          prepend: bool = False):
    """Register ``fn`` on hook point ``name``; what it returns (unless None) replaces the value."""
    module = module_for(model, name)
    if name == "embed":
        def pre(_mod, args, kwargs):
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre, with_kwargs=True, prepend=prepend)

    def post(_mod, _inp, out):
        new = fn(out[0] if isinstance(out, tuple) else out)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return module.register_forward_hook(post, prepend=prepend)


@contextlib.contextmanager
def record(model: torch.nn.Module, names: Names,
           reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
           detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record hook-point outputs, ``{name: [batch, seq, d_model]}``, of the forwards in the block
    (a later forward overwrites): ``with record(model, ["layers.3.resid"]) as cache: model(ids)``.
    ``names`` as in ``select``; ``reduce(name, output)`` runs inside the hook (e.g. pooling
    ``[b, T, d] -> [b, d]``) so the full output is never kept; ``detach=False`` keeps the graph."""
    store: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as hooks:  # removes every hook added, also on error
        for name in select(model, names):
            def read(t, name=name):
                t = t.detach() if detach else t
                store[name] = reduce(name, t) if reduce is not None else t

            hooks.callback(_hook(model, name, read).remove)
        yield store


@contextlib.contextmanager
def overwrite(model: torch.nn.Module, edits: dict[str, Edit]) -> Iterator[None]:
    """Replace hook-point outputs of the forwards in the block: ``edits`` maps a name to a tensor
    (the whole output, cast to its dtype and device) or to ``fn(output) -> new_output``.
    ValueError for a bad name or a replacement of the wrong shape; TypeError for an edit neither
    a tensor nor a callable returning one."""
    with contextlib.ExitStack() as hooks:  # removes every hook added, also on error
        for name, edit in edits.items():
            module_for(model, name)  # validates
            if not callable(edit) and not isinstance(edit, torch.Tensor):
                raise TypeError(f"{name}: edit must be a tensor or a callable, "
                                f"got {type(edit).__name__}")

            def apply(main, name=name, edit=edit):
                new = edit if isinstance(edit, torch.Tensor) else edit(main)
                what = "replacement" if isinstance(edit, torch.Tensor) else "edit function output"
                if not isinstance(new, torch.Tensor):
                    raise TypeError(f"{name}: edit function returned {type(new).__name__}, "
                                    "expected a Tensor")
                if new.shape != main.shape:
                    raise ValueError(f"{name}: {what} has shape {tuple(new.shape)}, "
                                     f"the module output has {tuple(main.shape)}")
                return new.to(device=main.device, dtype=main.dtype)

            hooks.callback(_hook(model, name, apply, prepend=True).remove)
        yield
