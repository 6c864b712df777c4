"""Loading any checkpoint, choosing its device, and the one table of supported architectures.

``ARCHITECTURES`` maps a model class to the attribute paths of the parts alignkit touches (patching
recomputes a pre-norm block ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))`` from them); any
other class raises ``NotImplementedError`` naming it and the supported list.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from alignkit.config import Config

_CAUSAL = {"decoder": "model", "embed": "model.embed_tokens", "layers": "model.layers",
           "norm": "model.norm", "head": "lm_head", "attn": "self_attn", "mlp": "mlp",
           "post_attn_norm": "post_attention_layernorm"}
_BARE = dict(_CAUSAL, decoder=None, embed="embed_tokens", layers="layers", norm="norm", head=None)
ARCHITECTURES: dict[str, dict[str, str | None]] = {
    "Qwen3ForCausalLM": _CAUSAL, "Qwen2ForCausalLM": _CAUSAL, "LlamaForCausalLM": _CAUSAL,
    "Qwen3Model": _BARE, "Qwen2Model": _BARE, "LlamaModel": _BARE,
}
# config fields that must agree for one model's activations (and layers) to fit the other
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rope_parameters", "rope_theta",
                "layer_types", "sliding_window", "use_sliding_window")


def architecture(model: torch.nn.Module) -> dict[str, str | None]:
    """The table entry (attribute paths) of ``model``'s class; NotImplementedError otherwise."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise NotImplementedError(
            f"alignkit does not support {name}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def part(model: torch.nn.Module, name: str, obj=None):
    """The submodule ``name`` (a key of the table) of ``model`` (or of ``obj``, e.g. a layer)."""
    path = architecture(model)[name]
    if path is None:
        what = "LM head" if name == "head" else name
        raise ValueError(f"{type(model).__name__} has no {what}; load the *ForCausalLM class")
    obj = model if obj is None else obj
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head: the same hook values without ``[b, T, vocab]``."""
    return model if architecture(model)["decoder"] is None else part(model, "decoder")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers (``model.model.layers`` for a causal LM)."""
    return part(model, "layers")


def n_layers(model: torch.nn.Module) -> int:
    return len(part(model, "layers"))


def unembed(model: torch.nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., vocab]`` from the residual after the last layer (before the final norm)."""
    return part(model, "head")(part(model, "norm")(resid))


def device_for(cfg: Config, rank: int | None = None) -> torch.device:
    """The one device chooser: ``cfg.device`` when explicit (``"cuda:1"`` is honoured), else
    ``cuda:<local rank>`` when a GPU is present (rank from ``LOCAL_RANK`` under a launcher), else
    the CPU."""
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank = int(os.environ.get("LOCAL_RANK", 0)) if rank is None else rank
    return torch.device("cuda", rank % torch.cuda.device_count())


def load_model(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    """A causal LM and its tokenizer from a directory or hub id, in eval mode on ``device``."""
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory (no config.json)")
        path = p
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # neither a directory nor a hub id
        raise ValueError(f"model path does not exist: {path}")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def check_model_dir(path: str | Path) -> Path:
    """``path`` when it is a complete ``from_pretrained`` directory: ValueError naming what is
    missing (config.json, weights, tokenizer files)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"model directory {path} does not exist" if not p.exists() else
                         f"{path} is a file, not a model directory")
    missing = [what for what, globs in (
        ("config.json", ["config.json"]), ("weights (*.safetensors or *.bin)",
                                           ["*.safetensors", "*.bin"]),
        ("a tokenizer (tokenizer.json or tokenizer_config.json)",
         ["tokenizer.json", "tokenizer_config.json"])) if not any(any(p.glob(g)) for g in globs)]
    if missing:
        raise ValueError(f"model directory {path} is missing {', '.join(missing)}")
    return p


def preflight(path: str | Path, chat: bool) -> None:
    """The checks a base model must pass before any long work, each a ValueError (or
    NotImplementedError) naming the problem: a complete model directory (a hub id is checked
    after download), a supported architecture, a tokenizer with a pad token and, for a chat
    config, a chat template."""
    p = Path(path).expanduser()
    if p.exists() or str(path).startswith((".", "/", "~")):
        check_model_dir(p)
    config = AutoConfig.from_pretrained(str(path))
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise NotImplementedError(f"{path}: alignkit does not support {arch} (model_type "
                                  f"{config.model_type!r}); supported: "
                                  f"{', '.join(sorted(ARCHITECTURES))}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer of {path} has no pad token (batched training and "
                         "evaluation need one): set it and save, e.g. tokenizer.pad_token = "
                         "tokenizer.eos_token; tokenizer.save_pretrained(...)")
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"chat=True but the tokenizer of {path} has no chat template: use a "
                         "plain-prompt preset (qwen3-0.6b-base) or --set chat=false")


def check_same_shape(a: torch.nn.Module, b: torch.nn.Module, names=("base", "tuned")) -> None:
    """ValueError unless two models have one architecture, shape and device (for pairing layers)."""
    architecture(a), architecture(b)
    if type(a) is not type(b):
        raise ValueError(f"{names[0]} and {names[1]} must be one architecture, got "
                         f"{type(a).__name__} and {type(b).__name__}")
    for f in SHAPE_FIELDS:
        va, vb = getattr(a.config, f, None), getattr(b.config, f, None)
        if va != vb:
            raise ValueError(f"{names[0]} and {names[1]} differ in config.{f}: {va!r} vs {vb!r}")
    da, db = next(a.parameters()).device, next(b.parameters()).device
    if da != db:
        raise ValueError(f"{names[0]} is on {da}, {names[1]} on {db}: put both on one device")


def special_tokens(tokenizer) -> dict[str, str]:
    return {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}


def check_same_tokenizer(tok_a, tok_b) -> None:
    """ValueError unless two tokenizers have the same vocabulary and special tokens."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        diff = sorted(t for t in set(va) | set(vb) if va.get(t) != vb.get(t))
        t = diff[0]
        raise ValueError(f"tokenizers differ: vocabularies of {len(va)} and {len(vb)} tokens, "
                         f"{len(diff)} entries differ (e.g. {t!r}: {va.get(t, 'absent')} vs "
                         f"{vb.get(t, 'absent')})")
    sa, sb = special_tokens(tok_a), special_tokens(tok_b)
    if sa != sb:
        k = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))[0]
        raise ValueError(f"tokenizers differ in special tokens: {k} {sa.get(k)!r} vs {sb.get(k)!r}")
