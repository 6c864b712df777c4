"""Tiny random models and a word-level BPE tokenizer shared by the hook and capture tests."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CORPUS = ["Tom has 5 apples and buys 3 more .", "Mia reads 12 pages each day for a week .",
          "How many apples does Tom have now ?", "Answer : 8", "A train goes 60 miles in 2 hours ."]
ARCHS = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
         "llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
         "phi3": (Phi3Config, Phi3ForCausalLM), "gemma2": (Gemma2Config, Gemma2ForCausalLM),
         "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM), "olmo2": (Olmo2Config, Olmo2ForCausalLM),
         "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM), "gpt2": (GPT2Config, GPT2LMHeadModel)}
# the families of alignkit.models.ARCHITECTURES, each with what sets it apart switched on:
# Gemma's sandwich norms, scaled embedding, sliding layers and soft-capped logits (a cap low enough
# to bite), OLMo 2's norms after the sublayers, NeoX's parallel residual, GPT-2's Conv1D and wpe
_FAMILY = {
    "phi3": dict(head_dim=None),
    "gemma2": dict(final_logit_softcapping=3.0, attn_logit_softcapping=5.0, sliding_window=4,
                   query_pre_attn_scalar=8),
    "gemma3": dict(final_logit_softcapping=3.0, sliding_window=4, query_pre_attn_scalar=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "gpt_neox": dict(head_dim=None, num_key_value_heads=None, use_parallel_residual=True,
                     rotary_pct=0.5, tie_word_embeddings=False),
    "gpt2": dict(head_dim=None, num_key_value_heads=None, hidden_size=None, intermediate_size=None,
                 num_hidden_layers=None, num_attention_heads=None, n_embd=32, n_inner=64, n_layer=3,
                 n_head=4, n_positions=1024, initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),
}


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
              num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, initializer_range=0.2, pad_token_id=0,
              bos_token_id=1, eos_token_id=1)
    kw = {k: v for k, v in {**kw, **_FAMILY.get(arch, {}), **over}.items() if v is not None}
    torch.manual_seed(seed)
    return cls(cfg_cls(**kw)).eval()


def perturbed_copy(model, scale: float = 0.05, seed: int = 1):
    """A copy of a Qwen-layout ``model`` with N(0, scale^2) noise on its decoder layers' weights
    only (embedding, final norm and head kept): a "tuned" model for pair tests."""
    import copy

    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.model.layers.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return tuned


def make_unsupported(vocab_size: int = 100) -> BloomForCausalLM:
    """A decoder family alignkit does not support (BLOOM: ALiBi, fused QKV, no table entry)."""
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=vocab_size)).eval()
