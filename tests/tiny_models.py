"""Tiny random models and a word-level BPE tokenizer shared by the hook and capture tests."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CORPUS = ["Tom has 5 apples and buys 3 more .", "Mia reads 12 pages each day for a week .",
          "How many apples does Tom have now ?", "Answer : 8", "A train goes 60 miles in 2 hours ."]
ARCHS = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
         "llama": (LlamaConfig, LlamaForCausalLM)}


def make_tokenizer(corpus=CORPUS, padding_side="right", pad="<pad>") -> PreTrainedTokenizerFast:
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=100, special_tokens=["<pad>", "<eos>", "<unk>"],
                                                      show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token=pad, eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = padding_side
    return tok


def make_model(arch: str = "qwen3", seed: int = 0, **over):
    """A 3-layer random model; initializer_range 0.2 keeps activations O(1) so 1e-5 checks bite."""
    cfg_cls, cls = ARCHS[arch]
    kw = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(seed)
    return cls(cfg_cls(**{**kw, **over})).eval()
