"""Loading any checkpoint, choosing its device, and the one table of supported architectures.

``ARCHITECTURES`` maps a model class to the attribute paths of the parts alignkit touches: the
decoder stack, its layers, the final norm and LM head, and inside a layer the modules whose outputs
the attention and the MLP add to the residual stream (``attn``, ``mlp``) and the MLP branch
(``mlp_branch``, the modules that turn the mid-layer residual into the MLP's contribution), which
patching reruns after an attention patch. Block layouts covered:

* pre-norm ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))`` (Qwen2/2.5, Qwen3, Llama 3.x,
  Mistral, Phi-3, GPT-2, GPT-NeoX with ``use_parallel_residual=False``);
* sandwich norms ``h = x + norm_a(attn(norm1(x))); out = h + norm_m(mlp(norm2(h)))`` (Gemma 2
  and 3, whose embedding is scaled by sqrt(d) and whose logits may be soft-capped);
* norms after the sublayers ``h = x + norm_a(attn(x)); out = h + norm_m(mlp(h))`` (OLMo 2);
* parallel ``out = mlp(norm2(x)) + attn(norm1(x)) + x`` (GPT-NeoX/Pythia by default).

The residual entering layer 0 (hook point ``embed``) is read at layer 0's input, so scaled and
positional embeddings (Gemma, GPT-2's ``wpe``) are included. Any other class raises
``NotImplementedError`` naming it, its ``model_type`` and the supported list.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from alignkit.config import Config

logger = logging.getLogger(__name__)

_PRE_NORM = dict(attn="self_attn", mlp="mlp", mlp_branch=("post_attention_layernorm", "mlp"))
_SANDWICH = dict(attn="post_attention_layernorm", mlp="post_feedforward_layernorm",
                 mlp_branch=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"))
_POST_NORM = dict(attn="post_attention_layernorm", mlp="post_feedforward_layernorm",
                  mlp_branch=("mlp", "post_feedforward_layernorm"))


def _family(causal: str, bare: str, block: dict, decoder: str = "model",
            embed: str = "embed_tokens", layers: str = "layers", norm: str = "norm",
            head: str = "lm_head", parallel: str | None = None,
            softcap: str | None = None) -> dict[str, dict]:
    """Table entries of one family: its causal LM class and its bare decoder class."""
    full = dict(decoder=decoder, embed=f"{decoder}.{embed}", layers=f"{decoder}.{layers}",
                norm=f"{decoder}.{norm}", head=head, parallel=parallel, softcap=softcap, **block)
    return {causal: full, bare: dict(full, decoder=None, embed=embed, layers=layers, norm=norm,
                                     head=None)}


ARCHITECTURES: dict[str, dict] = {
    **_family("Qwen3ForCausalLM", "Qwen3Model", _PRE_NORM),
    **_family("Qwen2ForCausalLM", "Qwen2Model", _PRE_NORM),
    **_family("LlamaForCausalLM", "LlamaModel", _PRE_NORM),
    **_family("MistralForCausalLM", "MistralModel", _PRE_NORM),
    **_family("Phi3ForCausalLM", "Phi3Model", _PRE_NORM),
    **_family("Gemma2ForCausalLM", "Gemma2Model", _SANDWICH, softcap="final_logit_softcapping"),
    **_family("Gemma3ForCausalLM", "Gemma3TextModel", _SANDWICH,
              softcap="final_logit_softcapping"),
    **_family("Olmo2ForCausalLM", "Olmo2Model", _POST_NORM),
    **_family("GPTNeoXForCausalLM", "GPTNeoXModel",
              dict(attn="attention", mlp="mlp", mlp_branch=("post_attention_layernorm", "mlp")),
              decoder="gpt_neox", embed="embed_in", norm="final_layer_norm",
              parallel="use_parallel_residual"),
    **_family("GPT2LMHeadModel", "GPT2Model", dict(attn="attn", mlp="mlp",
                                                   mlp_branch=("ln_2", "mlp")),
              decoder="transformer", embed="wte", layers="h", norm="ln_f"),
}
# config fields that must agree for one model's activations (and layers) to fit the other
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rope_parameters", "rope_theta",
                "layer_types", "sliding_window", "use_sliding_window", "use_parallel_residual",
                "final_logit_softcapping")


def _unsupported(name: str, model_type: str | None) -> NotImplementedError:
    return NotImplementedError(
        f"alignkit does not support {name} (model_type {model_type!r}); supported: "
        f"{', '.join(sorted(ARCHITECTURES))}")


def architecture(model: torch.nn.Module) -> dict[str, str | None]:
    """The table entry (attribute paths) of ``model``'s class; NotImplementedError otherwise."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise _unsupported(name, getattr(getattr(model, "config", None), "model_type", None))
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


def parallel(model: torch.nn.Module) -> bool:
    """Whether the MLP reads the layer's input rather than the mid-layer residual (GPT-NeoX)."""
    field = architecture(model)["parallel"]
    return bool(field and getattr(model.config, field, False))


def mlp_branch(model: torch.nn.Module, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The MLP's contribution to the residual of ``layer`` computed from its input ``h``."""
    for name in architecture(model)["mlp_branch"]:
        h = getattr(layer, name)(h)
    return h[0] if isinstance(h, tuple) else h


def head_logits(model: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., vocab]`` from final-norm outputs: the LM head, soft-capped where the model's
    config caps its logits (Gemma 2: ``cap * tanh(logits / cap)``), as its own forward does."""
    logits = part(model, "head")(normed)
    field = architecture(model)["softcap"]
    cap = getattr(model.config, field, None) if field else None
    return torch.tanh(logits / cap) * cap if cap else logits


def unembed(model: torch.nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., vocab]`` from the residual after the last layer (before the final norm)."""
    return head_logits(model, part(model, "norm")(resid))


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its token embedding's device (a model spread by a device map
    starts there; one offloaded to disk runs on the CPU)."""
    d = next(part(model, "embed").parameters()).device
    return torch.device("cpu") if d.type == "meta" else d


def device_for(cfg: Config, rank: int | None = None) -> torch.device:
    """The one device chooser: ``cfg.device`` when explicit (``"cuda:1"`` is honoured), else
    ``cuda:<local rank>`` when a GPU is present (rank from ``LOCAL_RANK`` under a launcher), else
    the CPU. With ``cfg.device == "map"`` (models spread over the GPUs, ``placement``): the first
    GPU (or the CPU), where inputs and pooled results go."""
    if cfg.device not in ("auto", "map"):
        return torch.device(cfg.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if cfg.device == "map":
        return torch.device("cuda", 0)
    rank = int(os.environ.get("LOCAL_RANK", 0)) if rank is None else rank
    return torch.device("cuda", rank % torch.cuda.device_count())


def placement(cfg: Config) -> dict:
    """``load_model``'s ``device`` and ``device_map`` for the analyses under ``cfg``: the whole
    model on ``device_for(cfg)``; with ``cfg.device == "map"`` (``--set device=map``) each model is
    spread over every visible GPU by transformers' ``device_map="auto"`` (accelerate's balanced
    placement, the same for models of one shape; what does not fit goes to the CPU), for models
    larger than one GPU. Training never uses a map (one model per process)."""
    return {"device": device_for(cfg), "device_map": "auto" if cfg.device == "map" else None}


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: the CPU, ROCm, a CUDA GPU of compute
    capability 8 or more (Ampere on). Not Colab's T4 (7.5), where ``torch.cuda.is_bf16_supported()``
    still says yes because bf16 tensors can be made there (emulated, and refused by the Trainer)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


_WARNED: set[str] = set()


def compute_dtype(dtype: str, device: str | torch.device) -> str:
    """``dtype`` for models analysed on ``device``, except that ``"bfloat16"`` on a GPU without
    native bf16 becomes ``"float32"`` (logged once per device): correct first (fp16 can overflow
    Qwen's residual stream), and a 0.6B model in float32 fits a 16 GB T4."""
    if dtype == "bfloat16" and not native_bf16(device):
        if str(device) not in _WARNED:
            _WARNED.add(str(device))
            logger.warning("%s has no native bfloat16 (compute capability %s): analysing in "
                           "float32", device,
                           ".".join(map(str, torch.cuda.get_device_capability(device))))
        return "float32"
    return dtype


def analysis_dtype(cfg: Config) -> str:
    """The dtype analyses load checkpoints in: ``cfg.dtype`` on ``device_for(cfg)`` as
    ``compute_dtype`` resolves it. Cache keys use it, so activations computed in float32 on a T4
    are never read as bfloat16 ones."""
    return compute_dtype(cfg.dtype, device_for(cfg))


def dims(config) -> dict[str, int]:
    """A decoder config's sizes under one set of names, whatever the family calls them:
    ``d`` (width), ``layers``, ``ffn`` (MLP width; GPT-2's ``n_inner`` or 4 d), ``vocab``,
    ``heads``, ``kv`` (key-value heads; all heads where the family has no GQA), ``head_dim``."""
    d, heads = config.hidden_size, config.num_attention_heads
    ffn = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
           or 4 * d)
    return {"d": d, "layers": config.num_hidden_layers, "ffn": ffn, "vocab": config.vocab_size,
            "heads": heads, "kv": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or d // heads}


def load_model(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
               device_map: str | dict | None = None, offload_folder: str | Path | None = None):
    """A causal LM and its tokenizer from a directory or hub id, in eval mode on ``device``, or
    spread by ``device_map`` (``"auto"`` or an explicit ``{module: device}``, accelerate's
    dispatch: each module runs where its weights are; ``offload_folder`` for ``"disk"``
    entries)."""
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory (no config.json)")
        path = p
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # neither a directory nor a hub id
        raise ValueError(f"model path does not exist: {path}")
    extra = {} if device_map is None else {"device_map": device_map}
    if offload_folder is not None:
        extra["offload_folder"] = str(offload_folder)
    dtype = compute_dtype(dtype, device)  # device: where a map's inputs go (the first GPU)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), **extra)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is None:
        model.to(device)
    model.eval()
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
        err = _unsupported(arch, config.model_type)
        raise NotImplementedError(f"{path}: {err}")
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


def _merges(tokenizer) -> list | None:
    """The BPE merges of a fast tokenizer (None for other models or slow tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    merges = json.loads(backend.to_str())["model"].get("merges")
    return None if merges is None else [m if isinstance(m, str) else " ".join(m) for m in merges]


def check_same_tokenizer(tok_a, tok_b) -> None:
    """ValueError unless two tokenizers have the same vocabulary, BPE merges (one vocabulary can
    split text differently) and special tokens: the condition for pairing token positions."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        diff = sorted(t for t in set(va) | set(vb) if va.get(t) != vb.get(t))
        t = diff[0]
        raise ValueError(f"tokenizers differ: vocabularies of {len(va)} and {len(vb)} tokens, "
                         f"{len(diff)} entries differ (e.g. {t!r}: {va.get(t, 'absent')} vs "
                         f"{vb.get(t, 'absent')})")
    ma, mb = _merges(tok_a), _merges(tok_b)
    if ma != mb:
        k = next((i for i, (a, b) in enumerate(zip(ma or [], mb or [])) if a != b),
                 min(len(ma or []), len(mb or [])))
        raise ValueError(f"tokenizers differ in their BPE merges ({len(ma or [])} vs "
                         f"{len(mb or [])}; first difference at merge {k}): the same vocabulary "
                         "splits text differently, so token positions do not pair up")
    sa, sb = special_tokens(tok_a), special_tokens(tok_b)
    if sa != sb:
        k = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))[0]
        raise ValueError(f"tokenizers differ in special tokens: {k} {sa.get(k)!r} vs {sb.get(k)!r}")


def resolve_model(spec: str | Path, revision: str | None = None) -> Path:
    """A local ``from_pretrained`` directory for a model given as a directory or a hub id: a
    directory is checked (``check_model_dir``); a hub id is fetched with
    ``huggingface_hub.snapshot_download`` at ``revision`` (its cache's snapshot directory, named
    after the commit). ValueError naming the problem otherwise."""
    p = Path(spec).expanduser()
    if p.exists() or str(spec).startswith((".", "/", "~")):
        if revision is not None:
            raise ValueError(f"{spec} is a local directory: a revision applies to hub ids only")
        return check_model_dir(p).resolve()
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)):
        raise ValueError(f"model {spec!r} is neither a directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(spec), revision=revision))
    except Exception as e:  # noqa: BLE001 - offline, unknown id or revision: one named error
        raise ValueError(f"could not fetch {spec}@{revision or 'main'} from the hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "download it where the hub is reachable and pass the directory") from None


def shape_differences(configs: dict) -> dict[str, list[str]]:
    """``{model: [config fields that differ from the first's]}`` for every model after the first
    of ``configs`` (``{label: PretrainedConfig}``): the architecture class, then each of
    ``SHAPE_FIELDS`` (empty: one shape)."""
    ref = configs[next(iter(configs))]
    return {k: ([] if c.architectures == ref.architectures else ["architectures"])
            + [f for f in SHAPE_FIELDS if getattr(ref, f, None) != getattr(c, f, None)]
            for k, c in list(configs.items())[1:]}


def check_compatible(paths: dict[str, Path], same_shape: bool = True) -> None:
    """Before any long work: every model against the first (the reference) has a supported
    architecture and the same tokenizer (vocabulary, merges, special tokens: the probes and their
    pooled positions must be the same tokens); with ``same_shape`` also the same architecture and
    shape (``SHAPE_FIELDS``, ``shape_differences``: same-layer comparisons pair layers and
    positions). ValueError or NotImplementedError naming the model and the difference.
    """
    names = list(paths)
    configs = {k: AutoConfig.from_pretrained(str(v)) for k, v in paths.items()}
    for k, c in configs.items():
        arch = (getattr(c, "architectures", None) or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise NotImplementedError(f"{k} ({paths[k]}): {_unsupported(arch, c.model_type)}")
    ref, tok = names[0], AutoTokenizer.from_pretrained(str(paths[names[0]]))
    differs = shape_differences(configs)
    for k in names[1:]:
        if same_shape and differs[k]:
            f = differs[k][0]
            va, vb = getattr(configs[ref], f, None), getattr(configs[k], f, None)
            raise ValueError(f"{k} differs from the reference {ref} in config.{f}: {va!r} vs "
                             f"{vb!r}; same-layer comparisons need one shape (cross-layer CKA runs "
                             "across shapes: stages.ensure_models_cka)")
        try:
            check_same_tokenizer(tok, AutoTokenizer.from_pretrained(str(paths[k])))
        except ValueError as e:
            raise ValueError(f"{k} and the reference {ref}: {e}") from None
