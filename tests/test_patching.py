"""Activation patching, cross-layer patching and weight ablation on tiny random models (no network).

Every sweep is checked against an independent reference written here with plain
``register_forward_hook`` calls and full forwards, one example at a time (no alignkit hooks, no
cache, no batching). The models use ``initializer_range=0.2`` so activations and log-probs are
O(1)-O(10): a 1e-5 tolerance is a real test. ``tuned`` is ``base`` plus weight noise.
"""

import copy
import logging

import numpy as np
import pytest
import torch
from tiny_models import make_unsupported
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from alignkit import patching
from alignkit.data import format_prompt, generate_problems
from alignkit.evaluate import answer_logprob
from alignkit.stats import bootstrap_mean
from alignkit.tiny import train_tokenizer

TOL = 1e-5
L = 3
ARCHS = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
         "llama": (LlamaConfig, LlamaForCausalLM)}


@pytest.fixture(scope="module")
def tok():
    corpus = [p["question"] + " " + p["answer"] for p in generate_problems(200, "train")]
    return train_tokenizer(corpus, 300)  # the project's recipe: byte-level BPE, single digits


def make_model(arch, vocab, seed=0, **over):
    cfg_cls, cls = ARCHS[arch]
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(seed)
    return cls(cfg_cls(**{**kw, **over})).eval()


def make_pair(arch, vocab):
    base = make_model(arch, vocab)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return base, tuned


@pytest.fixture(scope="module")
def pairs(tok):
    return {a: make_pair(a, len(tok)) for a in ARCHS}


@pytest.fixture(scope="module")
def examples():
    return [{"prompt": format_prompt(p["question"]), "answer": p["answer"]} for p in generate_problems(5, "test")]


# ------------------------------------------------------------------------------------------
# Independent reference: plain forward hooks, one example at a time, full forward per patch
# ------------------------------------------------------------------------------------------


def module_of(model, layer, component):
    block = model.model.layers[layer]
    return {"resid": block, "attn": block.self_attn, "mlp": block.mlp}[component]


def first(out):
    return out[0] if isinstance(out, tuple) else out


def positions_of(tok, ex, positions, n):
    ids = tok(ex["prompt"] + " " + ex["answer"], add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(ex["prompt"], add_special_tokens=False)["input_ids"])
    final = ex["answer"].rsplit("#### ", 1)[1]
    n_answer = len(tok(final, add_special_tokens=False)["input_ids"])  # digits: one token each
    answer = list(range(n - n_answer, n))
    if positions == "all":
        pos = list(range(n))
    elif positions == "prompt":
        pos = list(range(n_prompt))
    elif positions == "answer":
        pos = [p - 1 for p in answer]
    else:
        pos = [p % n for p in positions]
    return ids, answer, pos


def run_logp(model, ids, edit=None):
    """log-softmax (float64) of a full forward, optionally with ``edit = (module, fn(output))`` hooked."""
    handle = None
    if edit is not None:
        module, fn = edit
        handle = module.register_forward_hook(
            lambda _m, _i, out: (fn(first(out)),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out))
    try:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    finally:
        if handle is not None:
            handle.remove()


def capture(model, ids, module):
    store = {}
    h = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("x", first(out).detach()))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        h.remove()
    return store["x"]


def metric(logp, donor_logp, ids, answer):
    rows = torch.tensor(answer) - 1
    lp = logp[rows, torch.tensor(ids)[answer]].sum().item()
    kl = (donor_logp[rows].exp() * (donor_logp[rows] - logp[rows])).sum().item()
    return lp, kl


def reference_sweep(tok, recv, donor, examples, component, positions, pairs_ij):
    """lp, kl [n, len(pairs_ij)] for patches of donor's (layer j) output into recv's layer i."""
    lp = np.zeros((len(examples), len(pairs_ij)))
    kl = np.zeros_like(lp)
    for k, ex in enumerate(examples):
        n = len(tok(ex["prompt"] + " " + ex["answer"], add_special_tokens=False)["input_ids"])
        ids, answer, pos = positions_of(tok, ex, positions, n)
        donor_logp = run_logp(donor, ids)
        for c, (i, j) in enumerate(pairs_ij):
            d = capture(donor, ids, module_of(donor, j, component))
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[pos] = True
            fn = lambda out, d=d, mask=mask: torch.where(mask[None, :, None], d, out)  # noqa: E731
            logp = run_logp(recv, ids, (module_of(recv, i, component), fn))
            lp[k, c], kl[k, c] = metric(logp, donor_logp, ids, answer)
    return lp, kl


# ------------------------------------------------------------------------------------------
# Agreement with the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["resid", "attn", "mlp"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_layer_sweep_matches_reference(tok, pairs, examples, component, direction):
    base, tuned = pairs["qwen3"]
    r = patching.layer_sweep(base, tuned, tok, examples, component=component, direction=direction, batch_size=2,
                             progress=False)
    recv, donor = (base, tuned) if direction == "denoise" else (tuned, base)
    lp, kl = reference_sweep(tok, recv, donor, examples, component, "all", [(l, l) for l in range(L)])
    assert r.lp_patched.shape == (len(examples), L) and r.lp_patched.dtype == np.float64
    np.testing.assert_allclose(r.lp_patched, lp, rtol=0, atol=TOL)
    np.testing.assert_allclose(r.kl, kl, rtol=0, atol=TOL)
    assert np.abs(r.delta).max() > 1e-2  # the patches do something
    assert r.meta["receiver"] == ("base" if direction == "denoise" else "tuned")


@pytest.mark.parametrize("positions", ["prompt", "answer", [0, 5, -2]])
@pytest.mark.parametrize("component", ["resid", "attn"])
def test_positions_match_reference(tok, pairs, examples, positions, component):
    base, tuned = pairs["qwen3"]
    r = patching.layer_sweep(base, tuned, tok, examples, component=component, positions=positions, batch_size=3,
                             progress=False)
    lp, kl = reference_sweep(tok, base, tuned, examples, component, positions, [(l, l) for l in range(L)])
    np.testing.assert_allclose(r.lp_patched, lp, rtol=0, atol=TOL)
    np.testing.assert_allclose(r.kl, kl, rtol=0, atol=TOL)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_other_architectures_match_reference(tok, pairs, examples, arch):
    base, tuned = pairs[arch]
    for component in ("attn", "mlp"):
        r = patching.layer_sweep(base, tuned, tok, examples[:3], component=component, direction="noise",
                                 positions="answer", batch_size=2, progress=False)
        lp, _ = reference_sweep(tok, tuned, base, examples[:3], component, "answer", [(l, l) for l in range(L)])
        np.testing.assert_allclose(r.lp_patched, lp, rtol=0, atol=TOL)


def test_receiver_and_donor_logprob_are_the_project_metric(tok, pairs, examples):
    base, tuned = pairs["qwen3"]
    r = patching.layer_sweep(base, tuned, tok, examples, layers=[0], progress=False)
    prompts, answers = [e["prompt"] for e in examples], [e["answer"] for e in examples]
    np.testing.assert_allclose(r.lp_receiver, answer_logprob(base, tok, prompts, answers), rtol=0, atol=TOL)
    np.testing.assert_allclose(r.lp_donor, answer_logprob(tuned, tok, prompts, answers), rtol=0, atol=TOL)
    np.testing.assert_allclose(r.delta[:, 0], r.lp_patched[:, 0] - r.lp_receiver, rtol=0, atol=0)
    gap = r.lp_donor - r.lp_receiver
    assert r.npe_valid.all()
    np.testing.assert_allclose(r.npe[:, 0], r.delta[:, 0] / gap, rtol=1e-12)


def test_batch_size_and_order_do_not_change_results(tok, pairs, examples):
    base, tuned = pairs["qwen3"]
    a = patching.layer_sweep(base, tuned, tok, examples, component="mlp", batch_size=1, progress=False)
    b = patching.layer_sweep(base, tuned, tok, examples[::-1], component="mlp", batch_size=4, progress=False)
    np.testing.assert_allclose(a.lp_patched, b.lp_patched[::-1], rtol=0, atol=TOL)
    np.testing.assert_allclose(a.kl, b.kl[::-1], rtol=0, atol=TOL)


def test_cross_layer_matches_reference_and_diagonal(tok, pairs, examples):
    base, tuned = pairs["qwen3"]
    r = patching.cross_layer_sweep(base, tuned, tok, examples[:3], batch_size=2, progress=False)
    assert r.lp_patched.shape == (3, L, L)
    cells = [(0, 2), (2, 0), (1, 2)]
    lp, kl = reference_sweep(tok, base, tuned, examples[:3], "resid", "all", cells)
    for c, (i, j) in enumerate(cells):
        np.testing.assert_allclose(r.lp_patched[:, i, j], lp[:, c], rtol=0, atol=TOL)
        np.testing.assert_allclose(r.kl[:, i, j], kl[:, c], rtol=0, atol=TOL)
    diag = patching.layer_sweep(base, tuned, tok, examples[:3], batch_size=2, progress=False)
    np.testing.assert_array_equal(np.diagonal(r.lp_patched, axis1=1, axis2=2), diag.lp_patched)


def test_weight_sweep_matches_copied_weights(tok, pairs, examples):
    base, tuned = pairs["qwen3"]
    ex = examples[:3]
    res = patching.weight_sweep(base, tuned, tok, ex, batch_size=2, progress=False)
    prompts, answers = [e["prompt"] for e in ex], [e["answer"] for e in ex]
    for layer in range(L):
        for kind, recv, donor in (("revert", tuned, base), ("graft", base, tuned)):
            model = copy.deepcopy(recv)
            model.model.layers[layer].load_state_dict(donor.model.layers[layer].state_dict())
            np.testing.assert_allclose(res[kind].lp_patched[:, layer], answer_logprob(model, tok, prompts, answers),
                                       rtol=0, atol=TOL)
    np.testing.assert_allclose(res["revert"].lp_receiver, answer_logprob(tuned, tok, prompts, answers), atol=TOL)
    # mean-ablation reference: mean (tuned - base) residual over every token of every example
    ids = [tok(p + " " + a, add_special_tokens=False)["input_ids"] for p, a in zip(prompts, answers)]
    for layer in range(L):
        diffs = [capture(tuned, i, tuned.model.layers[layer])[0] - capture(base, i, base.model.layers[layer])[0]
                 for i in ids]
        mean_d = torch.cat(diffs).double().mean(0)
        lp = []
        for k, i in enumerate(ids):
            b = capture(base, i, base.model.layers[layer])
            logp = run_logp(tuned, i, (tuned.model.layers[layer], lambda out, b=b: (b.double() + mean_d).float()))
            _, answer, _ = positions_of(tok, ex[k], "all", len(i))
            lp.append(metric(logp, logp, i, answer)[0])
        np.testing.assert_allclose(res["mean_diff"].lp_patched[:, layer], lp, rtol=0, atol=TOL)
    assert res["graft"].meta["receiver"] == "base" and res["revert"].meta["receiver"] == "tuned"


def test_position_specific_mean_ablation_and_kinds(tok, pairs, examples):
    """``mean_positions="answer"``: the mean difference over the answer-predicting rows only, put
    back at those rows only; ``kinds`` runs a subset without changing it."""
    base, tuned = pairs["qwen3"]
    ex = examples[:3]
    full = patching.weight_sweep(base, tuned, tok, ex, mean_positions="answer", batch_size=2, progress=False)
    only = patching.weight_sweep(base, tuned, tok, ex, mean_positions="answer", batch_size=2, progress=False,
                                 kinds=("mean_diff",))
    assert list(only) == ["mean_diff"] and list(full) == list(patching.WEIGHT_KINDS)
    np.testing.assert_array_equal(only["mean_diff"].lp_patched, full["mean_diff"].lp_patched)
    ids = [tok(e["prompt"] + " " + e["answer"], add_special_tokens=False)["input_ids"] for e in ex]
    rows = [positions_of(tok, e, "answer", len(i))[2] for e, i in zip(ex, ids)]
    for layer in range(L):
        diffs = [(capture(tuned, i, tuned.model.layers[layer])[0] - capture(base, i, base.model.layers[layer])[0])[r]
                 for i, r in zip(ids, rows)]
        mean_d = torch.cat(diffs).double().mean(0)
        lp = []
        for k, i in enumerate(ids):
            b, t, r = capture(base, i, base.model.layers[layer]), capture(tuned, i, tuned.model.layers[layer]), rows[k]

            def edit(out, b=b, t=t, r=r):
                mixed = t.clone()
                mixed[0, r] = (b[0, r].double() + mean_d).float()
                return mixed

            logp = run_logp(tuned, i, (tuned.model.layers[layer], edit))
            _, answer, _ = positions_of(tok, ex[k], "all", len(i))
            lp.append(metric(logp, logp, i, answer)[0])
        np.testing.assert_allclose(full["mean_diff"].lp_patched[:, layer], lp, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        patching.weight_sweep(base, tuned, tok, ex, kinds=("steering",))


# ------------------------------------------------------------------------------------------
# Exact invariants
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["resid", "attn", "mlp"])
def test_patching_own_activations_changes_nothing(tok, pairs, examples, component, caplog):
    base, _ = pairs["qwen3"]
    twin = copy.deepcopy(base)  # a distinct object with identical weights
    with caplog.at_level(logging.INFO, logger="alignkit.patching"):
        r = patching.layer_sweep(base, twin, tok, examples, component=component, batch_size=2, progress=False)
    np.testing.assert_array_equal(r.lp_patched, np.repeat(r.lp_receiver[:, None], L, 1))
    assert (r.delta == 0).all() and (r.kl == 0).all() and (r.kl_receiver == 0).all()
    # |lp_donor - lp_receiver| = 0 < min_gap: NPE is masked, not 0/0
    assert np.isnan(r.npe).all() and not r.npe_valid.any() and r.meta["n_npe_masked"] == len(examples)
    assert f"NPE masked (NaN) for {len(examples)} of {len(examples)}" in caplog.text
    w = patching.weight_sweep(base, twin, tok, examples[:2], progress=False)
    assert all((w[k].delta == 0).all() for k in w)


def test_last_layer_resid_is_base_head_on_tuned_residual(tok, pairs, examples):
    base, tuned = pairs["qwen3"]
    r = patching.layer_sweep(base, tuned, tok, examples, layers=[L - 1], batch_size=1, progress=False)
    for k, ex in enumerate(examples):
        n = len(tok(ex["prompt"] + " " + ex["answer"], add_special_tokens=False)["input_ids"])
        ids, answer, _ = positions_of(tok, ex, "all", n)
        resid = capture(tuned, ids, tuned.model.layers[L - 1])[0]  # before the final norm
        rows = torch.tensor(answer) - 1
        with torch.no_grad():
            logp = torch.log_softmax(base.lm_head(base.model.norm(resid[rows])).double(), -1)
        assert r.lp_patched[k, 0] == logp[torch.arange(len(answer)), torch.tensor(ids)[answer]].sum().item()


def test_answer_positions_are_what_the_last_layer_metric_reads(tok, pairs, examples):
    """At the last layer only the answer-predicting rows reach the metric: patching them equals patching all."""
    base, tuned = pairs["qwen3"]
    a = patching.layer_sweep(base, tuned, tok, examples, layers=[L - 1], positions="answer", progress=False)
    b = patching.layer_sweep(base, tuned, tok, examples, layers=[L - 1], positions="all", progress=False)
    np.testing.assert_array_equal(a.lp_patched, b.lp_patched)
    c = patching.layer_sweep(base, tuned, tok, examples, layers=[L - 1], positions="prompt", progress=False)
    assert (c.delta == 0).all()  # the prompt's last-layer outputs predict nothing the metric reads


# ------------------------------------------------------------------------------------------
# Bootstrap
# ------------------------------------------------------------------------------------------


def test_bootstrap_mean():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(40, 4)) + np.arange(4)
    v[3, 1] = np.nan
    v[:, 3] = np.nan
    b = bootstrap_mean(v, n_boot=500, seed=0)
    np.testing.assert_allclose(b["point"][:3], np.nanmean(v[:, :3], 0), rtol=1e-12)
    assert (b["lo"][:3] < b["point"][:3]).all() and (b["point"][:3] < b["hi"][:3]).all()
    assert np.isnan(b["point"][3]) and np.isnan(b["lo"][3]) and list(b["n"]) == [40, 39, 40, 0]
    se = v[:, 0].std(ddof=1) / np.sqrt(40)  # the percentile interval is about +- 1.96 s.e.
    assert 0.7 < (b["hi"][0] - b["lo"][0]) / (2 * 1.96 * se) < 1.3
    again = bootstrap_mean(v, n_boot=500, seed=0)
    np.testing.assert_array_equal(again["lo"][:3], b["lo"][:3])
    grid = bootstrap_mean(rng.normal(size=(10, 3, 3)), n_boot=50)
    assert grid["point"].shape == (3, 3) and grid["hi"].shape == (3, 3)
    with pytest.raises(ValueError, match="n_examples >= 1"):
        bootstrap_mean(np.zeros((0, 3)))


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_mismatched_architectures(tok, pairs, examples):
    base, _ = pairs["qwen3"]
    with pytest.raises(ValueError, match="one architecture.*Qwen3ForCausalLM and LlamaForCausalLM"):
        patching.layer_sweep(base, pairs["llama"][0], tok, examples)
    deeper = make_model("qwen3", len(tok), num_hidden_layers=L + 1)
    with pytest.raises(ValueError, match=f"num_hidden_layers: {L} vs {L + 1}"):
        patching.layer_sweep(base, deeper, tok, examples)
    wider = make_model("qwen3", len(tok), intermediate_size=96)
    with pytest.raises(ValueError, match="intermediate_size"):
        patching.weight_sweep(base, wider, tok, examples)
    bloom = make_unsupported(len(tok))
    with pytest.raises(NotImplementedError, match="BloomForCausalLM"):
        patching.layer_sweep(bloom, bloom, tok, examples)


def test_a_tokenizer_that_is_not_the_models(tok, pairs, examples):
    base, tuned = pairs["qwen3"]
    bigger = train_tokenizer([p["question"] + " " + p["answer"] for p in generate_problems(200, "train")], 400)
    with pytest.raises(ValueError, match="tokenizer has 400 tokens but the models' vocabulary has 300"):
        patching.cross_layer_sweep(base, tuned, bigger, examples)


def test_bad_examples(tok, pairs, examples):
    base, tuned = pairs["qwen3"]
    with pytest.raises(ValueError, match="at least one example, got an empty list"):
        patching.layer_sweep(base, tuned, tok, [])
    with pytest.raises(ValueError, match="at least one example"):
        patching.weight_sweep(base, tuned, tok, [])
    bad = dict(examples[0], answer=examples[0]["answer"].rsplit("####", 1)[0] + "####")  # no answer
    with pytest.raises(ValueError, match="example 1: the gold solution has nothing after '####'"):
        patching.layer_sweep(base, tuned, tok, [examples[1], bad])
    with pytest.raises(ValueError, match="must be a dict with 'prompt' and 'answer'"):
        patching.layer_sweep(base, tuned, tok, [{"question": "q"}])


def test_bad_arguments(tok, pairs, examples):
    base, tuned = pairs["qwen3"]
    with pytest.raises(ValueError, match="component must be one of"):
        patching.layer_sweep(base, tuned, tok, examples, component="embed")
    with pytest.raises(ValueError, match="direction must be 'denoise'"):
        patching.layer_sweep(base, tuned, tok, examples, direction="forward")
    with pytest.raises(ValueError, match="positions must be one of"):
        patching.layer_sweep(base, tuned, tok, examples, positions="last")
    with pytest.raises(ValueError, match="position 999 is outside example"):
        patching.layer_sweep(base, tuned, tok, examples, positions=[999])
    with pytest.raises(ValueError, match=r"layers must be indices in 0..2, got \[3\]"):
        patching.layer_sweep(base, tuned, tok, examples, layers=[3])


def test_examples_from_table():
    rows = [{"index": 7, "question": "Tom has 2 apples. How many? ", "answer": "2+0=2\n#### 2", "final_answer": "2"}]
    assert patching.examples_from_table(rows) == [
        {"prompt": "Question: Tom has 2 apples. How many?\nAnswer:", "answer": "2+0=2\n#### 2", "index": 7,
         "chat": False}]


# ------------------------------------------------------------------------------------------
# Metrics: what the scored tokens are, and a planted copy effect
# ------------------------------------------------------------------------------------------

PLANT_EXAMPLES = [  # every computed result's digits are new where computed; the answer repeats them
    {"prompt": format_prompt("Tom has 2 pens. He buys 5 more. How many pens does Tom have now?"),
     "answer": "Tom buys 5 more, so Tom has 2+5=<<2+5=7>>7 pens.\n#### 7"},
    {"prompt": format_prompt("Mia has 3 cups. She gets 4 times as many. How many cups?"),
     "answer": "4 times as many is 3*4=<<3*4=12>>12 cups.\n#### 12"},
]


def plant_copy(model, alpha=6.0):
    """``model`` made to copy: at each row, its last layer's output gains ``alpha`` residual norms
    along the unembedding of the true next token whenever that token already occurred (a pure
    copy effect, planted with the answer known; nothing else changes)."""
    state = {}
    model.model.register_forward_pre_hook(
        lambda _m, args, kwargs: state.__setitem__("ids", kwargs.get("input_ids", args[0] if args else None)),
        with_kwargs=True)
    w = model.get_output_embeddings().weight.detach()

    def hook(_m, _inp, out):
        h = first(out)
        ids, add = state["ids"], torch.zeros_like(h)
        for b in range(ids.shape[0]):
            seq = ids[b].tolist()
            for p in range(len(seq) - 1):
                if seq[p + 1] in seq[: p + 1]:
                    add[b, p] = alpha * h[b, p].norm() * w[seq[p + 1]] / w[seq[p + 1]].norm()
        h = h + add
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    model.model.layers[-1].register_forward_hook(hook)
    return model


def test_targets_are_the_computed_results_and_the_copy(tok):
    from alignkit.evaluate import answer_spans, scorable

    ex = PLANT_EXAMPLES[1]
    spans = {t: answer_spans(tok, [ex["prompt"]], [ex["answer"]], targets=t)[0]
             for t in ("answer", "computed", "copy")}
    read = {t: "".join(tok.decode(s["input_ids"][p]) for p in s["answer_positions"]) for t, s in spans.items()}
    assert read == {"answer": "12", "computed": "12", "copy": "13"}
    text = {t: tok.decode(s["input_ids"]) for t, s in spans.items()}
    assert text["computed"] == text["answer"] and "<<3*4=13>>13 cups.\n#### 13" in text["copy"]
    before = tok.decode(spans["computed"]["input_ids"][: spans["computed"]["answer_positions"][0]])
    assert before.endswith("3*4=<<3*4=")  # the result inside the annotation, not the copy after it
    # a result already written (the operand 4 of "8/2=<<8/2=4>>", "4" in the question) is not scored
    assert scorable(["Question: 4 kids\nAnswer:"], ["8/2=<<8/2=4>>4\n#### 4"], "computed") == [False]
    with pytest.raises(ValueError, match="computes nothing that is not already written"):
        answer_spans(tok, ["Question: 4 kids\nAnswer:"], ["8/2=<<8/2=4>>4\n#### 4"], targets="computed")
    with pytest.raises(ValueError, match="copy control needs"):
        answer_spans(tok, ["Question: q\nAnswer:"], ["no steps\n#### 4"], targets="copy")
    with pytest.raises(ValueError, match="targets must be one of"):
        scorable(["q"], ["a"], "gold")
    rows = [{"question": "4 kids", "answer": "8/2=<<8/2=4>>4\n#### 4"},
            {"question": "2 kids", "answer": "8/2=<<8/2=4>>4\n#### 4"}]
    assert [e["index"] for e in patching.examples_from_table(rows, metric="computed")] == [1]


def test_a_planted_copy_effect_shows_in_the_answer_metric_not_the_computed_one(tok):
    base = make_model("qwen3", len(tok))
    tuned = plant_copy(copy.deepcopy(base))
    gap = {m: (lambda r: r.lp_donor - r.lp_receiver)(patching.layer_sweep(
        base, tuned, tok, PLANT_EXAMPLES, layers=[L - 1], progress=False, metric=m))
        for m in ("answer", "computed", "copy")}
    assert (gap["answer"] > 1).all() and (gap["copy"] > 1).all(), gap
    np.testing.assert_allclose(gap["computed"], 0, atol=1e-9)  # nothing computed was copyable


def test_carried_share():
    from types import SimpleNamespace

    from alignkit.analyses.patching import carried_share

    def res(gaps):
        gaps = np.asarray(gaps, float)
        return SimpleNamespace(lp_donor=gaps - 3.0, lp_receiver=np.full(len(gaps), -3.0))

    rng = np.random.default_rng(0)
    flips, ctrl = rng.normal(2.0, 1.0, 40), rng.normal(0.5, 1.0, 25)
    band = carried_share(res(flips), res(ctrl), n_boot=500)
    assert band.point[0] == pytest.approx(ctrl.mean() / flips.mean(), rel=1e-12)
    assert band.lo[0] < band.point[0] < band.hi[0]
    slow = []  # the same resamples, drawn and averaged one at a time
    g = np.random.default_rng(0)
    fi, ci = g.integers(0, 40, (500, 40)), g.integers(0, 25, (500, 25))
    for k in range(500):
        slow.append(sum(ctrl[j] for j in ci[k]) / 25 / (sum(flips[j] for j in fi[k]) / 40))
    assert band.lo[0] == pytest.approx(np.percentile(slow, 2.5)) and band.hi[0] == pytest.approx(np.percentile(slow, 97.5))
    scaled = carried_share(res(7 * flips), res(7 * ctrl), n_boot=500)  # units cancel
    np.testing.assert_allclose([scaled.point, scaled.lo, scaled.hi], [band.point, band.lo, band.hi])
    same = carried_share(res(flips), res(flips), n_boot=200)
    assert same.point[0] == pytest.approx(1.0)
    none = carried_share(res(flips), res(np.zeros(10)), n_boot=200)
    assert none.point[0] == 0 and none.lo[0] == 0 and none.hi[0] == 0


# ------------------------------------------------------------------------------------------
# Solving with the patch held (generation_sweep) against a slow reference
# ------------------------------------------------------------------------------------------


def reference_generation(tok, recv, donor, prompt, layer, max_new_tokens, stop, ends):
    """Greedy generation one token at a time, full forwards without caches, donor's layer output
    captured and written over the receiver's whole layer output (plain hooks)."""
    from alignkit.data import cut_at_stop

    seq = tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(max_new_tokens):
        d = capture(donor, seq, module_of(donor, layer, "resid"))
        logp = run_logp(recv, seq, (module_of(recv, layer, "resid"), lambda o, d=d: d))
        t = int(logp[-1].argmax())
        if t in ends:
            break
        out.append(t)
        seq = seq + [t]
        if any(s in tok.decode(out) for s in stop):
            break
    return cut_at_stop(tok.decode(out, skip_special_tokens=True), stop)


def test_generation_sweep_matches_reference(tok):
    from alignkit.evaluate import end_tokens

    base, tuned = (m.double() for m in make_pair("qwen3", len(tok)))
    exs = [{"prompt": format_prompt(p["question"]), "answer": p["answer"]} for p in generate_problems(3, "test")]
    stop = ("ing",)  # random models: a stop string that does occur
    ends = set(end_tokens(base, tok))
    for direction, (recv, donor) in (("denoise", (base, tuned)), ("noise", (tuned, base))):
        r = patching.generation_sweep(base, tuned, tok, exs, direction=direction, layers=[0, 2],
                                      max_new_tokens=12, stop=stop, progress=False)
        assert r.correct.shape == (3, 2) and r.meta["receiver"] == ("base" if direction == "denoise" else "tuned")
        for k, ex in enumerate(exs):
            for c, layer in enumerate([0, 2]):
                assert r.outputs[k][c] == reference_generation(tok, recv, donor, ex["prompt"], layer, 12, stop, ends)
    # patching a model into itself changes nothing: every layer generates the model's own text
    same = patching.generation_sweep(tuned, tuned, tok, exs, max_new_tokens=12, stop=stop, progress=False)
    alone = [reference_generation(tok, tuned, tuned, ex["prompt"], 0, 12, stop, ends) for ex in exs]
    assert all(o == [a] * L for o, a in zip(same.outputs, alone))
    assert (same.receiver == same.donor).all()


def test_generation_sweep_scores_the_gold_answer(tok, monkeypatch):
    """Correctness is ``extract_answer`` of the completion against the gold ``#### N``: with the
    extraction planted to read "12" from completions that contain a digit, exactly those count."""
    from alignkit.data import extract_answer

    base, tuned = make_pair("qwen3", len(tok))
    exs = [{"prompt": format_prompt(p["question"]), "answer": "x\n#### 12"} for p in generate_problems(4, "test")]
    r = patching.generation_sweep(base, tuned, tok, exs, max_new_tokens=6, progress=False)
    assert [[extract_answer(o) for o in row] for row in r.outputs] == r.predictions
    planted = lambda t: "12" if any(ch.isdigit() for ch in t) else None  # noqa: E731
    monkeypatch.setattr(patching, "extract_answer", planted)
    r2 = patching.generation_sweep(base, tuned, tok, exs, max_new_tokens=6, progress=False)
    want = np.array([[planted(o) == "12" for o in row] for row in r2.outputs])
    np.testing.assert_array_equal(r2.correct, want)
    with pytest.raises(ValueError, match="at least one example"):
        patching.generation_sweep(base, tuned, tok, [], progress=False)
