"""The rehearsal inputs of the real path (benchmarks/rehearsal.py): a tokenizer that splits like
Qwen's, GSM8K-format rows with GSM8K's quirks, and a model of Qwen3-0.6B's shape."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import rehearsal  # noqa: E402

from alignkit.data import check_solution, extract_answer, normalize_number  # noqa: E402


def test_splits_like_qwen(qwen_tok):
    """Qwen's pre-tokenisation: single digits, the minus sign of a negative answer shares a piece
    with the space before it (why a token-boundary answer locator fails on ``#### -10``)."""
    assert type(qwen_tok).__name__ == "Qwen2Tokenizer"
    toks = qwen_tok.convert_ids_to_tokens(qwen_tok("#### -10 and 2,125")["input_ids"])
    assert toks[:4] == ["####", "Ġ-", "1", "0"]
    assert toks[-5:] == ["2", ",", "1", "2", "5"]
    assert qwen_tok.eos_token == qwen_tok.pad_token == "<|endoftext|>"
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert qwen_tok.convert_tokens_to_ids(t) != qwen_tok.unk_token_id
        assert qwen_tok.convert_ids_to_tokens(qwen_tok(t)["input_ids"]) == [t]


def test_chat_template_with_thinking_switch(qwen_tok):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    off = qwen_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
    assert off == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    on = qwen_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert on == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_quirky_rows_are_consistent_gsm8k():
    rows = rehearsal.quirky_rows(60, "test")
    finals = [extract_answer(r["answer"]) for r in rows]
    written = [r["answer"].split("#### ")[-1] for r in rows]
    assert any(f.startswith("-") for f in finals)  # negative
    assert any("," in w for w in written)  # thousands comma
    assert any("." in f for f in finals)  # decimal
    for r, w, f in zip(rows, written, finals):
        assert check_solution(r["answer"]) == [], r["answer"]
        assert normalize_number(w) == f


def test_real_shaped_model(qwen_tok):
    model = rehearsal.real_shaped_model(qwen_tok, layers=1)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.num_hidden_layers) == (151936, 1024, 3072, 16, 8, 128, 1)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.generation_config.eos_token_id == qwen_tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


QUIRKS = ["#### -10", "It costs $1,250.50.\n#### 1,250.5", "Answer: 12\n\nQuestion: (a) x?\nAnswer:",
          "<<3*4=12>>12 apples.\nThen", "it's 5%.", "  two  spaces\r\n\tand a tab"]


def test_embedded_tokenizer_splits_like_qwen(smoke_base):
    """The embedded base's tokenizer (alignkit.tiny.train_tokenizer) pre-tokenises exactly as
    Qwen2/Qwen3's rule does, so the daily path meets the real one's quirks (``" -"`` is one piece,
    ``".\\n"`` too), and carries the ChatML and thinking tokens and the enable_thinking switch."""
    from transformers import AutoTokenizer, Qwen2Tokenizer

    tok = AutoTokenizer.from_pretrained(smoke_base)
    qwen = Qwen2Tokenizer()._tokenizer.pre_tokenizer
    for text in QUIRKS:
        assert tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) == qwen.pre_tokenize_str(text), text
        assert tok.decode(tok(text)["input_ids"]) == text
    pieces = [p for p, _ in qwen.pre_tokenize_str("#### -10.\nQuestion")]
    assert pieces == ["####", "Ġ-", "1", "0", ".Ċ", "Question"]
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tok.convert_ids_to_tokens(tok(t)["input_ids"]) == [t]
        assert tok.convert_tokens_to_ids(t) < len(tok)
    off = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                  add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_the_gpu_check_never_falls_back_to_the_cpu(monkeypatch):
    """``gpu_check.py`` stops naming the torch build when CUDA is asked for and torch sees no
    GPU (a CPU-only build on a GPU machine); ``--device cpu`` is the explicit dry run."""
    import gpu_check
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"needs a GPU, but torch .* sees none"):
        gpu_check.check_device("cuda")
    gpu_check.check_device("cpu")
