"""Hooks and the activation capture path, on tiny random models (no network)."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from alignkit.activations import capture, capture_cached, check_comparable, check_same_tokenizer
from alignkit.hooks import hook_points, module_for, n_layers, overwrite, record

TEXTS = ["Tom has 5 apples.", "A train goes 12 miles in the first hour and then more.", "Mia has 3.",
         "Question: How many pages?\nAnswer:", "Sam buys 7 more cookies and gives 2 away today."]
KW = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<eos>")


def make(cls, cfg_cls, seed=0, **extra):
    torch.manual_seed(seed)
    return cls(cfg_cls(**KW, **extra)).eval()


@pytest.fixture(scope="module")
def qwen3():
    return make(Qwen3ForCausalLM, Qwen3Config, head_dim=8)


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def any_model(request):
    if request.param == "qwen3":
        return make(Qwen3ForCausalLM, Qwen3Config, head_dim=8)
    if request.param == "qwen2":
        return make(Qwen2ForCausalLM, Qwen2Config)
    return make(LlamaForCausalLM, LlamaConfig)


def ids_of(tok, text):
    return torch.tensor([tok(text)["input_ids"]])


def test_hook_point_names(qwen3):
    assert n_layers(qwen3) == 3
    assert hook_points(qwen3) == ["embed", "layers.0.resid", "layers.1.resid", "layers.2.resid"]
    assert hook_points(qwen3, ("attn", "mlp"), include_embed=False)[:2] == ["layers.0.attn", "layers.0.mlp"]
    with pytest.raises(ValueError, match=r"layers.3.resid: model has 3 layers \(0..2\)"):
        module_for(qwen3, "layers.3.resid")
    with pytest.raises(ValueError, match="bad hook point"):
        module_for(qwen3, "layers.x.resid")
    with pytest.raises(ValueError, match="unknown hook kind"):
        hook_points(qwen3, ("mlp_out",))


def test_unsupported_architecture():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="does not support GPT2LMHeadModel"):
        hook_points(gpt2)


def no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def test_hooks_removed_on_exit_and_error(qwen3, tok):
    with record(qwen3, ["layers.1.resid"]):
        assert not no_hooks(qwen3)
    assert no_hooks(qwen3)
    with pytest.raises(RuntimeError):
        with overwrite(qwen3, {"layers.0.resid": lambda x: x}):
            raise RuntimeError("boom")
    assert no_hooks(qwen3)


def test_record_matches_hidden_states_and_residual_identity(any_model, tok):
    ids = ids_of(tok, TEXTS[1])
    names = hook_points(any_model, ("resid", "attn", "mlp"))
    with record(any_model, names) as store:
        hs = any_model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(store["embed"], hs[0])
    for layer in range(n_layers(any_model) - 1):  # the last hidden state is taken after the final norm
        torch.testing.assert_close(store[f"layers.{layer}.resid"], hs[layer + 1])
    prev = store["embed"]
    for layer in range(n_layers(any_model)):  # pre-norm block: resid = prev + attn + mlp
        s = store
        torch.testing.assert_close(s[f"layers.{layer}.resid"], prev + s[f"layers.{layer}.attn"] + s[f"layers.{layer}.mlp"],
                                   atol=1e-5, rtol=1e-5)
        prev = s[f"layers.{layer}.resid"]


def test_overwrite(qwen3, tok):
    ids = ids_of(tok, TEXTS[0])
    ref = qwen3(ids).logits
    with overwrite(qwen3, {"layers.1.resid": lambda x: x, "layers.0.attn": lambda x: x}):
        same = qwen3(ids).logits
    assert torch.equal(ref, same)
    x = torch.randn(1, ids.shape[1], 32)
    with overwrite(qwen3, {"layers.2.resid": x}):
        got = qwen3(ids).logits
    torch.testing.assert_close(got, qwen3.lm_head(qwen3.model.norm(x)))
    with pytest.raises(ValueError, match="replacement has shape"):
        with overwrite(qwen3, {"layers.2.resid": torch.zeros(1, 1, 32)}):
            qwen3(ids)


@pytest.mark.parametrize("pooling", ["last", "mean", "tokens"])
def test_capture_padding_invariant(qwen3, tok, pooling):
    one = capture(qwen3, tok, TEXTS, pooling=pooling, batch_size=1, max_rows=20)
    many = capture(qwen3, tok, TEXTS, pooling=pooling, batch_size=4, max_rows=20)
    assert one.acts.shape == many.acts.shape
    torch.testing.assert_close(one.acts, many.acts, atol=1e-5, rtol=1e-5)
    if pooling != "tokens":
        # against a direct unbatched computation
        for i, text in enumerate(TEXTS):
            with record(qwen3, ["layers.1.resid"]) as s:
                qwen3(ids_of(tok, text))
            h = s["layers.1.resid"][0].double()
            ref = h[-1] if pooling == "last" else h.mean(0)
            torch.testing.assert_close(one.acts[2, i].double(), ref, atol=1e-5, rtol=1e-5)
    else:
        assert one.acts.shape[1] == 20 and one.meta["row_text"] == many.meta["row_text"]
        other = capture(qwen3, tok, TEXTS, pooling="tokens", batch_size=2, max_rows=20, seed=1)
        assert other.meta["row_text"] != one.meta["row_text"] or not torch.equal(other.acts, one.acts)


def test_capture_errors(qwen3, tok):
    with pytest.raises(ValueError, match="at least one text"):
        capture(qwen3, tok, [])
    with pytest.raises(ValueError, match="zero tokens"):
        capture(qwen3, tok, ["ok", ""])
    with pytest.raises(ValueError, match="pooling must be"):
        capture(qwen3, tok, TEXTS, pooling="max")
    with overwrite(qwen3, {"layers.1.mlp": lambda x: x * float("nan")}):
        with pytest.raises(ValueError, match="NaN or Inf in layers.1.resid"):
            capture(qwen3, tok, TEXTS)


def test_constant_points_recorded(qwen3, tok):
    same_end = [t + " apples." for t in ["Tom has", "Mia buys"]]
    a = capture(qwen3, tok, same_end, pooling="last")
    assert "embed" in a.meta["constant_points"]


def test_cache_hit_miss_and_corruption(tmp_path, qwen3, tok, monkeypatch):
    model_dir = tmp_path / "m"
    qwen3.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    import alignkit.activations as act

    calls = []
    real = act.capture
    monkeypatch.setattr(act, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = capture_cached(model_dir, TEXTS, pooling="mean", cache_dir=tmp_path / "c")
    b = capture_cached(model_dir, TEXTS, pooling="mean", cache_dir=tmp_path / "c")
    assert len(calls) == 1 and torch.equal(a.acts, b.acts)
    capture_cached(model_dir, TEXTS, pooling="last", cache_dir=tmp_path / "c")
    capture_cached(model_dir, TEXTS[:3], pooling="mean", cache_dir=tmp_path / "c")
    assert len(calls) == 3
    for p in (tmp_path / "c").glob("acts-*.safetensors"):  # damage every cache file
        with open(p, "r+b") as fh:
            fh.truncate(p.stat().st_size // 2)
    c = capture_cached(model_dir, TEXTS, pooling="mean", cache_dir=tmp_path / "c")
    assert len(calls) == 4 and torch.equal(c.acts, a.acts)
    # new weights -> miss
    with torch.no_grad():
        qwen3.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    qwen3.save_pretrained(model_dir)
    capture_cached(model_dir, TEXTS, pooling="mean", cache_dir=tmp_path / "c")
    assert len(calls) == 5
    with torch.no_grad():
        qwen3.model.layers[0].mlp.down_proj.weight.div_(1.01)


def test_check_comparable(qwen3, tok):
    a = capture(qwen3, tok, TEXTS, pooling="mean")
    b = capture(make(Qwen2ForCausalLM, Qwen2Config), tok, TEXTS[:4], pooling="mean")
    with pytest.raises(ValueError, match="different probe texts"):
        check_comparable(a, b)
    c = capture(qwen3, tok, TEXTS, pooling="last")
    with pytest.raises(ValueError, match="pooling"):
        check_comparable(a, c)
    d = dict(KW, num_hidden_layers=4)
    torch.manual_seed(0)
    e = capture(Qwen3ForCausalLM(Qwen3Config(**d, head_dim=8)), tok, TEXTS, pooling="mean")
    with pytest.raises(ValueError, match="a has 4 hook points, b has 5"):
        check_comparable(a, e)
    check_same_tokenizer(tok, tok)
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<eos>")
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(tok, other)
