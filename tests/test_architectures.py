"""Every decoder family of ``alignkit.models.ARCHITECTURES`` on a tiny random model built from its
transformers config class (no network): capture, patching and weight drift, each checked against
what the model's own forward computes or against a reference written here with plain hooks on the
family's own modules (a table of its own below, not alignkit's). Each family has what sets it
apart switched on (tests/tiny_models.py): Gemma's sandwich norms, scaled embedding, sliding layers
and soft-capped logits, OLMo 2's norms after the sublayers, GPT-NeoX's parallel residual, GPT-2's
Conv1D weights and position embeddings."""

import copy

import numpy as np
import pytest
import torch
from tiny_models import ARCHS, make_model, make_unsupported

from alignkit import models, patching
from alignkit.capture import capture
from alignkit.data import format_prompt, generate_problems
from alignkit.evaluate import answer_logprob
from alignkit.tiny import train_tokenizer
from alignkit.weights import weight_drift

L = 3
TOL = 1e-5
# the test's own table: per family, the decoder layers and, inside a layer, the modules whose
# outputs the attention and the MLP add to the residual stream
REF = {a: ("model.layers", "self_attn", "mlp") for a in ("qwen3", "qwen2", "llama", "mistral", "phi3")}
REF.update({a: ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm")
            for a in ("gemma2", "gemma3", "olmo2")})
REF.update(gpt_neox=("gpt_neox.layers", "attention", "mlp"), gpt2=("transformer.h", "attn", "mlp"))
FAMILIES = sorted(ARCHS)


def test_the_table_covers_the_families():
    assert set(REF) == set(ARCHS)
    for arch in FAMILIES:
        assert type(make_model(arch)).__name__ in models.ARCHITECTURES


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([p["question"] + " " + p["answer"] for p in generate_problems(200, "train")], 300)


@pytest.fixture(scope="module")
def examples():
    return [{"prompt": format_prompt(p["question"]), "answer": p["answer"]} for p in generate_problems(4, "test")]


def get(obj, path):
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tok):
    """(family, base, tuned): tuned is base with noise on the decoder layers only, so both share
    the embedding, the final norm and the head (a last-layer patch must then reproduce tuned)."""
    arch = request.param
    base = make_model(arch, vocab_size=len(tok))
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    layers = get(tuned, REF[arch][0])
    with torch.no_grad():
        for p in layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return arch, base, tuned


def reference_patch(arch, recv, donor, ids, answer, layer, component):
    """Answer log-prob of ``recv`` on one example with ``component`` of ``layer`` replaced by the
    donor's at every position: full forwards and plain hooks on the family's own modules."""
    path, attn, mlp = REF[arch]
    block = get(recv, path)[layer]
    module = {"resid": block, "attn": getattr(block, attn), "mlp": getattr(block, mlp)}[component]
    donor_module = {"resid": get(donor, path)[layer], "attn": getattr(get(donor, path)[layer], attn),
                    "mlp": getattr(get(donor, path)[layer], mlp)}[component]
    x = torch.tensor([ids])
    store = {}
    h = donor_module.register_forward_hook(lambda _m, _i, out: store.__setitem__("d", first(out)))
    with torch.no_grad():
        donor(x)
    h.remove()

    def swap(_m, _i, out):
        return (store["d"],) + tuple(out[1:]) if isinstance(out, tuple) else store["d"]

    h = module.register_forward_hook(swap)
    with torch.no_grad():
        logp = torch.log_softmax(recv(x).logits[0].double(), -1)
    h.remove()
    rows = torch.tensor(answer) - 1
    return logp[rows, torch.tensor(ids)[answer]].sum().item()


def test_capture_is_the_models_own_hidden_states(pair, tok, examples):
    """Every hook point equals the model's own ``output_hidden_states`` (the residual entering each
    layer: Gemma's scaled and GPT-2's positional embeddings included), and the residual stream
    decomposes: resid(l) = resid(l-1) + attn(l) + mlp(l)."""
    arch, base, _ = pair
    texts = [e["prompt"] for e in examples]
    acts = capture(base, tok, texts, hook_points=lambda n: True, pooling="last", batch_size=3)
    idx = {n: i for i, n in enumerate(acts.hook_points)}
    assert acts.acts.shape == (1 + 3 * L, len(texts), base.config.hidden_size)
    for k, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hs = base(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in range(L):  # hidden_states[l] is the input of layer l (the last is normed)
            name = "embed" if layer == 0 else f"layers.{layer - 1}.resid"
            np.testing.assert_allclose(acts.acts[idx[name], k], hs[layer][0, -1], rtol=0, atol=TOL)
    for layer in range(L):
        prev = acts.acts[idx["embed" if layer == 0 else f"layers.{layer - 1}.resid"]]
        parts = acts.acts[idx[f"layers.{layer}.attn"]] + acts.acts[idx[f"layers.{layer}.mlp"]]
        np.testing.assert_allclose(acts.acts[idx[f"layers.{layer}.resid"]], prev + parts, rtol=0, atol=TOL)


def test_scoring_reads_the_models_own_logits(pair, tok, examples):
    """answer_logprob (head on the answer rows only) equals the model's full forward, soft-cap
    included (Gemma)."""
    arch, base, _ = pair
    got = answer_logprob(base, tok, [e["prompt"] for e in examples], [e["answer"] for e in examples], batch_size=3)
    r = patching.layer_sweep(base, base, tok, examples, layers=[0], progress=False)
    np.testing.assert_allclose(got, r.lp_receiver, rtol=0, atol=TOL)
    spans = patching.tokenize_examples(tok, examples)
    for k, s in enumerate(spans):
        with torch.no_grad():
            logp = torch.log_softmax(base(torch.tensor([s["input_ids"]])).logits[0].double(), -1)
        rows = torch.tensor(s["answer_positions"]) - 1
        ref = logp[rows, torch.tensor(s["input_ids"])[s["answer_positions"]]].sum().item()
        assert abs(got[k] - ref) < TOL


@pytest.mark.parametrize("component", ["resid", "attn", "mlp"])
def test_self_patch_changes_nothing(pair, tok, examples, component):
    arch, base, _ = pair
    twin = copy.deepcopy(base)
    r = patching.layer_sweep(base, twin, tok, examples, component=component, batch_size=2, progress=False)
    np.testing.assert_array_equal(r.lp_patched, np.repeat(r.lp_receiver[:, None], L, 1))
    assert (r.kl == 0).all()


def test_patches_match_the_reference(pair, tok, examples):
    """Each component's patch at each layer equals the full-forward reference (the MLP rerun after
    an attention patch goes through the family's own branch: sandwich norms, post norms, the
    parallel residual), and patching the last layer's residual at every position reproduces the
    donor exactly (NPE = 1)."""
    arch, base, tuned = pair
    spans = patching.tokenize_examples(tok, examples)
    for component in ("resid", "attn", "mlp"):
        r = patching.layer_sweep(base, tuned, tok, examples, component=component, batch_size=3, progress=False)
        assert np.abs(r.delta).max() > 1e-3  # the patches do something
        for k, s in enumerate(spans):
            for layer in range(L):
                ref = reference_patch(arch, base, tuned, s["input_ids"], s["answer_positions"], layer, component)
                assert abs(r.lp_patched[k, layer] - ref) < TOL, (component, k, layer)
    last = patching.layer_sweep(base, tuned, tok, examples, layers=[L - 1], progress=False)
    np.testing.assert_allclose(last.lp_patched[:, 0], last.lp_donor, rtol=0, atol=1e-9)
    np.testing.assert_allclose(last.npe[last.npe_valid], 1.0, rtol=0, atol=1e-6)
    assert last.npe_valid.any()
    # a grafted layer (tuned's layer run with base's call arguments) equals copying its weights
    w = patching.weight_sweep(base, tuned, tok, examples, kinds=("graft",), progress=False)["graft"]
    for layer in range(L):
        hybrid = copy.deepcopy(base)
        get(hybrid, REF[arch][0])[layer].load_state_dict(get(tuned, REF[arch][0])[layer].state_dict())
        ref = answer_logprob(hybrid, tok, [e["prompt"] for e in examples], [e["answer"] for e in examples])
        np.testing.assert_allclose(w.lp_patched[:, layer], ref, rtol=0, atol=TOL)


def test_weight_drift_against_a_perturbed_copy(pair):
    arch, base, tuned = pair
    df = weight_drift(base, tuned, progress=False)
    inside = df["layer"].between(0, L - 1)
    assert inside.any() and set(df.loc[inside, "layer"]) == set(range(L))
    assert (df.loc[inside & (df["numel"] > 1), "rel_change"] > 0).all()  # every decoder tensor moved
    assert (df.loc[~inside, "rel_change"] == 0).all()  # embedding, final norm, head did not
    assert (df["module"] == "embed").sum() == 1 and (df.loc[df["module"] == "embed", "layer"] == -1).all()
    if arch == "gpt2":  # Conv1D [d_in, d_out] read as [d_out, d_in]: c_fc maps 32 -> 64
        row = df[df["name"] == "transformer.h.0.mlp.c_fc.weight"].iloc[0]
        assert row["shape"] == (64, 32) and row["chance_left"] == pytest.approx(row["k_base"] / 64)


def test_unsupported_family_names_its_model_type(tok, examples):
    bloom = make_unsupported(len(tok))
    with pytest.raises(NotImplementedError, match=r"BloomForCausalLM \(model_type 'bloom'\); supported: .*Gemma2"):
        patching.layer_sweep(bloom, bloom, tok, examples, progress=False)
    with pytest.raises(NotImplementedError, match="model_type 'bloom'"):
        capture(bloom, tok, ["a b"])


def test_tokenizers_with_one_vocabulary_but_other_merges(tok, tmp_path):
    """Same vocabulary, fewer merges (tokenizer.json edited): the same text splits differently, so
    token positions do not pair up; check_same_tokenizer names the merges."""
    import json

    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    state = json.loads((tmp_path / "tokenizer.json").read_text())
    state["model"]["merges"] = state["model"]["merges"][:-5]
    (tmp_path / "tokenizer.json").write_text(json.dumps(state))
    other = AutoTokenizer.from_pretrained(tmp_path)
    assert other.get_vocab() == tok.get_vocab()
    text = " ".join(p["question"] for p in generate_problems(20, "train"))
    assert other(text)["input_ids"] != tok(text)["input_ids"]
    with pytest.raises(ValueError, match="differ in their BPE merges"):
        models.check_same_tokenizer(tok, other)
    models.check_same_tokenizer(tok, copy.deepcopy(tok))  # the same tokenizer passes


def test_what_changed_runs_on_every_family(pair, tok, examples):
    """Per-token KL equals the models' own full forwards (soft-cap included), and the mean
    difference is read through the family's own final norm and head."""
    from alignkit import lens

    arch, base, tuned = pair
    texts = [e["prompt"] + " " + e["answer"] for e in examples[:2]]
    got = lens.token_kl(base, tuned, tok, texts, batch_size=2, progress=False)
    for t, k in zip(texts, got):
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lq, lp = (torch.log_softmax(m(ids).logits[0].double(), -1) for m in (base, tuned))
        np.testing.assert_allclose(k, (lp.exp() * (lp - lq)).sum(-1).numpy(), rtol=0, atol=TOL)
    diff = patching.mean_difference(base, tuned, tok, examples, positions="answer", progress=False)
    logits = lens.lens_logits(base, diff)
    with torch.no_grad():
        ref = models.unembed(base, torch.tensor(diff, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(logits, ref, rtol=0, atol=TOL)
    assert logits.shape == (L, base.config.vocab_size)
