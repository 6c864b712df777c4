"""Hook points, record and overwrite on tiny random Qwen3 / Qwen2 / Llama models (no network).

The models use ``initializer_range=0.2`` so activations are O(1): a 1e-5 tolerance is a real
relative test, not a comparison of near-zero numbers.
"""

import pytest
import torch
from tiny_models import CORPUS, make_model, make_unsupported

from alignkit.hooks import hook_points, module_for, overwrite, parse_hook_point, record
from alignkit.models import ARCHITECTURES, decoder, n_layers, part, unembed


def final_norm(model):
    return part(model, "norm")


def lm_head(model):
    return part(model, "head")



def ids_of(tok, text):
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def hook_ids(model):
    """Every forward hook id on every module (transformers adds its own, see below)."""
    return {name: list(m._forward_hooks) for name, m in model.named_modules()}


def test_supported_table():
    assert {"Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"} <= set(ARCHITECTURES)


def test_hook_point_names(qwen3):
    assert n_layers(qwen3) == 3
    assert hook_points(qwen3) == ["embed", "layers.0.resid", "layers.1.resid", "layers.2.resid"]
    assert hook_points(qwen3, ("mlp", "attn"), include_embed=False) == [
        "layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp", "layers.2.attn", "layers.2.mlp"]
    assert len(hook_points(qwen3, ("resid", "attn", "mlp"))) == 1 + 3 * 3
    assert parse_hook_point("embed") == (None, "embed")
    assert parse_hook_point("layers.11.attn") == (11, "attn")
    assert module_for(qwen3, "embed") is qwen3.model.layers[0]  # the residual entering layer 0: its input
    assert module_for(qwen3, "layers.1.resid") is qwen3.model.layers[1]
    assert module_for(qwen3, "layers.1.attn") is qwen3.model.layers[1].self_attn
    assert module_for(qwen3, "layers.2.mlp") is qwen3.model.layers[2].mlp
    assert final_norm(qwen3) is qwen3.model.norm and lm_head(qwen3) is qwen3.lm_head
    assert decoder(qwen3) is qwen3.model


@pytest.mark.parametrize("name, message", [
    ("layers.3.resid", r"^layers\.3\.resid: model has 3 layers \(0\.\.2\)$"),
    ("layers.12.mlp", r"^layers\.12\.mlp: model has 3 layers \(0\.\.2\)$"),
    ("layers.x.resid", r"bad hook point 'layers\.x\.resid'"),
    ("layers.-1.resid", r"bad hook point"),
    ("layers.1.mlp_out", r"bad hook point"),
    ("blocks.1.resid", r"bad hook point"),
    ("embed.out", r"bad hook point"),
])
def test_bad_hook_points(qwen3, name, message):
    with pytest.raises(ValueError, match=message):
        module_for(qwen3, name)
    with pytest.raises(ValueError, match=message):
        with record(qwen3, ["embed", name]):
            pass
    with pytest.raises(ValueError, match="unknown hook kind"):
        hook_points(qwen3, ("mlp_out",))
    with pytest.raises(ValueError, match="duplicate hook point"):
        with record(qwen3, ["embed", "embed"]):
            pass


def test_unsupported_architecture():
    bloom = make_unsupported(50)
    msg = (r"alignkit does not support BloomForCausalLM \(model_type 'bloom'\); supported: "
           r".*GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM")
    for call in (lambda: hook_points(bloom), lambda: n_layers(bloom), lambda: module_for(bloom, "embed")):
        with pytest.raises(NotImplementedError, match=msg):
            call()
    with pytest.raises(NotImplementedError, match="BloomForCausalLM"):
        with record(bloom, ["embed"]):
            pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in bloom.modules())


def test_bare_decoder_class(qwen3, tok):
    bare = qwen3.model  # Qwen3Model: the same weights without the LM head
    assert type(bare).__name__ == "Qwen3Model"
    assert hook_points(bare) == hook_points(qwen3) and decoder(bare) is bare
    ids = ids_of(tok, CORPUS[0])
    with record(qwen3, ["layers.2.resid"]) as full:
        qwen3(ids)
    with record(bare, ["layers.2.resid"]) as bare_store:
        bare(ids)
    assert torch.equal(full["layers.2.resid"], bare_store["layers.2.resid"])
    with pytest.raises(ValueError, match="Qwen3Model has no LM head"):
        lm_head(bare)


def n_hooks(module):
    """Forward hooks and pre-hooks (``embed`` is read at layer 0's input) on one module."""
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def test_hooks_removed_on_exit_and_error(tok):
    model = make_model("qwen3")  # never run: no transformers hooks yet
    names = hook_points(model, ("resid", "attn", "mlp"))
    assert all(not n_hooks(m) for m in model.modules())
    with record(model, names):
        assert sum(n_hooks(m) for m in model.modules()) == len(names)
    with overwrite(model, {n: (lambda x: x) for n in names}):
        assert sum(n_hooks(m) for m in model.modules()) == len(names)
    assert all(not n_hooks(m) for m in model.modules())
    for ctx in (lambda: record(model, names), lambda: overwrite(model, {"layers.0.resid": lambda x: x})):
        with pytest.raises(RuntimeError, match="boom"):
            with ctx():
                raise RuntimeError("boom")
        assert all(not n_hooks(m) for m in model.modules())
    # a bad name after good ones: the good ones' hooks are removed too
    with pytest.raises(ValueError):
        with overwrite(model, {"layers.0.resid": lambda x: x, "layers.9.resid": lambda x: x}):
            pass
    assert all(not n_hooks(m) for m in model.modules())
    # an error raised inside a hook during the forward
    with pytest.raises(ValueError, match="replacement has shape"):
        with overwrite(model, {"layers.1.resid": torch.zeros(1, 1, 32)}), record(model, names):
            model(ids_of(tok, CORPUS[0]))
    # a forward asking for hidden states makes transformers add its own output-capturing hooks
    model(ids_of(tok, CORPUS[0]), output_hidden_states=True)
    before = hook_ids(model)
    assert any(before.values())
    with record(model, names), overwrite(model, {"layers.0.attn": lambda x: x}):
        model(ids_of(tok, CORPUS[0]))
    assert hook_ids(model) == before


def test_transformers5_output_types(qwen3, tok):
    """Pins the facts hooks.py relies on: layers return a Tensor, attention a tuple."""
    raw = {}
    handles = [module_for(qwen3, n).register_forward_hook(lambda m, i, o, n=n: raw.__setitem__(n, o))
               for n in ("embed", "layers.0.resid", "layers.0.attn", "layers.0.mlp")]
    try:
        qwen3(ids_of(tok, CORPUS[0]))
    finally:
        for h in handles:
            h.remove()
    assert isinstance(raw["layers.0.resid"], torch.Tensor)
    assert isinstance(raw["layers.0.attn"], tuple) and isinstance(raw["layers.0.attn"][0], torch.Tensor)
    assert isinstance(raw["layers.0.mlp"], torch.Tensor) and isinstance(raw["embed"], torch.Tensor)
    with record(qwen3, ["layers.0.attn"]) as s:
        qwen3(ids_of(tok, CORPUS[0]))
    assert torch.equal(s["layers.0.attn"], raw["layers.0.attn"][0])


def test_record_matches_hidden_states_and_residual_identity(any_model):
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    names = hook_points(any_model, ("resid", "attn", "mlp"))
    with record(any_model, names) as s:
        hs = any_model(ids, output_hidden_states=True).hidden_states
    L = n_layers(any_model)
    assert len(hs) == L + 1 and s["embed"].shape == (2, ids.shape[1], 32)
    torch.testing.assert_close(s["embed"], hs[0], rtol=0, atol=0)
    for layer in range(L - 1):
        torch.testing.assert_close(s[f"layers.{layer}.resid"], hs[layer + 1], rtol=0, atol=0)
    # transformers' last hidden state is taken after the final norm; the hook gives the pre-norm value
    torch.testing.assert_close(final_norm(any_model)(s[f"layers.{L - 1}.resid"]), hs[L], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(s[f"layers.{L - 1}.resid"], hs[L], atol=1e-2)
    prev = s["embed"]
    for layer in range(L):  # pre-norm block: resid = prev + attn + mlp
        attn, mlp, resid = (s[f"layers.{layer}.{k}"] for k in ("attn", "mlp", "resid"))
        assert attn.abs().mean() > 0.1 and mlp.abs().mean() > 0.1  # O(1) terms: the identity is not vacuous
        torch.testing.assert_close(resid, prev + attn + mlp, atol=1e-5, rtol=1e-5)
        prev = resid


def test_record_filter_reduce_and_detach(qwen3, tok):
    ids = ids_of(tok, CORPUS[2])
    with record(qwen3, lambda n: n.endswith(".mlp")) as s:
        qwen3(ids)
    assert list(s) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    with record(qwen3, "layers.1.resid") as full, \
            record(qwen3, ["layers.1.resid"], reduce=lambda name, t: t[:, -1].double()) as last:
        qwen3(ids)
    assert last["layers.1.resid"].shape == (1, 32) and last["layers.1.resid"].dtype == torch.float64
    torch.testing.assert_close(last["layers.1.resid"], full["layers.1.resid"][:, -1].double())
    assert not full["layers.1.resid"].requires_grad
    with record(qwen3, ["layers.1.resid"], detach=False) as live:
        qwen3(ids)
    assert live["layers.1.resid"].requires_grad
    with pytest.raises(ValueError, match="selected no hook point"):
        with record(qwen3, lambda n: False):
            pass


def test_overwrite_identity_leaves_logits_unchanged(any_model, tok):
    ids = ids_of(tok, CORPUS[0])
    ref = any_model(ids).logits
    every = hook_points(any_model, ("resid", "attn", "mlp"))
    with overwrite(any_model, {n: (lambda x: x) for n in every}):
        same = any_model(ids).logits
    assert torch.equal(ref, same)


def test_overwrite_final_resid_with_tensor(any_model, tok):
    ids = ids_of(tok, CORPUS[0])
    L = n_layers(any_model)
    x = torch.randn(1, ids.shape[1], 32, dtype=torch.float64)  # cast to the model's dtype by overwrite
    with overwrite(any_model, {f"layers.{L - 1}.resid": x}):
        got = any_model(ids).logits
    expect = any_model.lm_head(any_model.model.norm(x.float()))
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, unembed(any_model, x.float()), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, any_model(ids).logits, atol=1e-2)


def test_overwrite_attention_tuple_output(qwen3, tok):
    """Attention returns a tuple: the edit replaces attn_output and the block adds the new value."""
    ids = ids_of(tok, CORPUS[3])
    with overwrite(qwen3, {"layers.1.attn": torch.zeros(1, ids.shape[1], 32)}), \
            record(qwen3, ["layers.0.resid", "layers.1.attn", "layers.1.mlp", "layers.1.resid"]) as s:
        patched = qwen3(ids).logits
    assert torch.equal(s["layers.1.attn"], torch.zeros_like(s["layers.1.attn"]))
    torch.testing.assert_close(s["layers.1.resid"], s["layers.0.resid"] + s["layers.1.mlp"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(patched, qwen3(ids).logits, atol=1e-3)


def test_overwrite_is_seen_by_every_reader(qwen3, tok):
    ids = ids_of(tok, CORPUS[1])
    with record(qwen3, ["layers.0.resid"]) as plain:
        qwen3(ids)
    double = 2 * plain["layers.0.resid"]
    with record(qwen3, ["layers.0.resid"]) as outer:
        with overwrite(qwen3, {"layers.0.resid": lambda x: 2 * x}), record(qwen3, ["layers.0.resid"]) as inner:
            hs = qwen3(ids, output_hidden_states=True).hidden_states
    for got in (outer["layers.0.resid"], inner["layers.0.resid"], hs[1]):
        torch.testing.assert_close(got, double, rtol=0, atol=0)


def test_patching_clean_resid_restores_clean_logits(any_model):
    """Activation patching sanity: a corrupted run with every position of layer l's residual taken
    from the clean run reproduces the clean logits exactly."""
    clean, corrupt = torch.randint(3, 99, (2, 2, 8), generator=torch.Generator().manual_seed(1))
    with record(any_model, ["layers.1.resid"]) as s:
        clean_logits = any_model(clean).logits
    with overwrite(any_model, {"layers.1.resid": s["layers.1.resid"]}):
        patched = any_model(corrupt).logits
    torch.testing.assert_close(patched, clean_logits, rtol=1e-6, atol=1e-6)
    # patching one position only changes the logits from that position on (causal)
    pos = 3

    def one(x):
        x = x.clone()
        x[:, pos] = s["layers.1.resid"][:, pos]
        return x

    corrupt_logits = any_model(corrupt).logits
    with overwrite(any_model, {"layers.1.resid": one}):
        partial = any_model(corrupt).logits
    torch.testing.assert_close(partial[:, :pos], corrupt_logits[:, :pos], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(partial[:, pos], corrupt_logits[:, pos], atol=1e-3)


def test_overwrite_errors(qwen3, tok):
    ids = ids_of(tok, CORPUS[0])
    n = ids.shape[1]
    with pytest.raises(ValueError, match=rf"layers\.2\.resid: replacement has shape \(1, 1, 32\), "
                                         rf"the module output has \(1, {n}, 32\)"):
        with overwrite(qwen3, {"layers.2.resid": torch.zeros(1, 1, 32)}):
            qwen3(ids)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp: edit function output has shape"):
        with overwrite(qwen3, {"layers.0.mlp": lambda x: x[:, :-1]}):
            qwen3(ids)
    with pytest.raises(TypeError, match="edit function returned tuple"):
        with overwrite(qwen3, {"layers.0.attn": lambda x: (x,)}):
            qwen3(ids)
    with pytest.raises(TypeError, match="edit must be a tensor or a callable, got float"):
        with overwrite(qwen3, {"layers.0.attn": 0.0}):
            pass
    with pytest.raises(ValueError, match="model has 3 layers"):
        with overwrite(qwen3, {"layers.3.resid": lambda x: x}):
            pass
