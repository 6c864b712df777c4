"""The difference lens, steering with the mean difference, and per-token KL, each checked against a
slow reference written here (plain hooks, full forwards, one text at a time) and against known
answers and invariances."""

import copy

import numpy as np
import pytest
import torch
from tiny_models import make_model, perturbed_copy

from alignkit import lens, patching
from alignkit.data import format_prompt, generate_problems
from alignkit.tiny import train_tokenizer

L = 3
TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([p["question"] + " " + p["answer"] for p in generate_problems(200, "train")], 300)


@pytest.fixture(scope="module")
def pair(tok):
    base = make_model("qwen3", vocab_size=len(tok))
    return base, perturbed_copy(base)


@pytest.fixture(scope="module")
def examples():
    return [{"prompt": format_prompt(p["question"]), "answer": p["answer"]} for p in generate_problems(5, "test")]


def resid_after(model, ids):
    """[L, T, d] residual after each decoder layer, by plain hooks on a full forward."""
    store = []
    hs = [layer.register_forward_hook(lambda _m, _i, out: store.append(out[0] if isinstance(out, tuple) else out))
          for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hs:
        h.remove()
    return torch.stack([s[0] for s in store])


def test_mean_difference_matches_reference(tok, pair, examples):
    base, tuned = pair
    spans = patching.tokenize_examples(tok, examples)
    for positions in ("answer", [0, 1, 2], "all"):
        got = patching.mean_difference(base, tuned, tok, examples, positions=positions, batch_size=2, progress=False)
        total, count = 0.0, 0
        for s in spans:
            n = len(s["input_ids"])
            pos = {"answer": [p - 1 for p in s["answer_positions"]], "all": list(range(n))}.get(
                positions if isinstance(positions, str) else "", positions)
            d = (resid_after(tuned, s["input_ids"]) - resid_after(base, s["input_ids"])).double()
            total = total + d[:, pos].sum(1)
            count += len(pos)
        np.testing.assert_allclose(got, (total / count).numpy(), rtol=0, atol=TOL)
        assert got.shape == (L, base.config.hidden_size) and got.dtype == np.float64


def test_steering_matches_reference_and_random_directions_keep_the_norm(tok, pair, examples):
    base, tuned = pair
    spans = patching.tokenize_examples(tok, examples)
    diff = patching.mean_difference(base, tuned, tok, examples, positions="answer", progress=False)
    rand = patching.random_directions(diff, 3, seed=0)
    np.testing.assert_allclose(np.linalg.norm(rand, axis=-1), np.tile(np.linalg.norm(diff, axis=1), (3, 1)),
                               rtol=1e-12)
    np.testing.assert_array_equal(rand, patching.random_directions(diff, 3, seed=0))  # seeded
    cos = (rand[0] * diff).sum(-1) / np.linalg.norm(diff, axis=1) ** 2
    assert (np.abs(cos) < 0.9).all()  # not the difference itself
    vecs = np.concatenate([diff[None], rand])
    r = patching.steer_sweep(base, tuned, tok, examples, vecs, positions="answer", batch_size=2, progress=False)
    assert r.delta.shape == (len(examples), 4, L) and r.meta["receiver"] == "base" and r.meta["donor"] == "tuned"
    for j, vec in enumerate(vecs):
        for k, s in enumerate(spans):
            pos = torch.tensor(s["answer_positions"]) - 1
            for layer in range(L):
                def add(_m, _i, out, layer=layer, vec=vec, pos=pos):
                    h = (out[0] if isinstance(out, tuple) else out).clone()
                    h[0, pos] += torch.tensor(vec[layer], dtype=h.dtype)
                    return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
                hook = base.model.layers[layer].register_forward_hook(add)
                with torch.no_grad():
                    logp = torch.log_softmax(base(torch.tensor([s["input_ids"]])).logits[0].double(), -1)
                hook.remove()
                ref = logp[pos, torch.tensor(s["input_ids"])[s["answer_positions"]]].sum().item()
                assert abs(r.lp_patched[k, j, layer] - ref) < TOL, (j, k, layer)
    # a twin has no difference: steering with it changes nothing
    zero = np.zeros((1, L, base.config.hidden_size))
    twin = patching.steer_sweep(base, copy.deepcopy(base), tok, examples[:2], zero, progress=False)
    assert (twin.delta == 0).all()
    with pytest.raises(ValueError, match="vectors must be"):
        patching.steer_sweep(base, tuned, tok, examples[:2], zero[:, :2], progress=False)
    halves = patching.concat([patching.steer_sweep(base, tuned, tok, part, vecs, positions="answer", progress=False)
                              for part in (examples[:2], examples[2:])])
    np.testing.assert_allclose(halves.lp_patched, r.lp_patched, rtol=0, atol=TOL)  # batching: round-off
    assert halves.meta["n_examples"] == len(examples)


def test_lens_reads_through_the_final_norm_and_head(tok, pair):
    base, _ = pair
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(4, base.config.hidden_size, generator=g, dtype=torch.float64)
    got = lens.lens_logits(base, diff.numpy())
    with torch.no_grad():
        ref = base.lm_head(base.model.norm(diff.float())).double().numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    # RMSNorm: the reading does not depend on the difference's scale
    np.testing.assert_allclose(lens.lens_logits(base, 7.0 * diff.numpy()), got, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="d_model"):
        lens.lens_logits(base, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        lens.lens_logits(base, np.full((1, base.config.hidden_size), np.nan))


def test_planted_direction_is_the_top_promoted_token(tok, pair):
    """A difference along token x's unembedding (divided by the norm's gain) promotes x first and
    its negative suppresses x first."""
    base, _ = pair
    x = tok.convert_tokens_to_ids("Ġapples") if "Ġapples" in tok.get_vocab() else 200
    w = base.lm_head.weight[x].detach().double() / base.model.norm.weight.detach().double()
    top = lens.top_tokens(lens.lens_logits(base, torch.stack([w, -w]).numpy()), tok, k=5)
    assert top[0]["promoted"][0][0] == tok.decode([x]) and top[0]["promoted"][0][1] > 3
    assert top[1]["suppressed"][0][0] == tok.decode([x])


def test_token_kl_matches_reference(tok, pair, examples):
    base, tuned = pair
    texts = [e["prompt"] + " " + e["answer"] for e in examples]
    got = lens.token_kl(base, tuned, tok, texts, batch_size=2, progress=False)
    for t, k in zip(texts, got):
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lq = torch.log_softmax(base(ids).logits[0].double(), -1)
            lp = torch.log_softmax(tuned(ids).logits[0].double(), -1)
        ref = (lp.exp() * (lp - lq)).sum(-1).numpy()
        assert k.shape == ref.shape and k.dtype == np.float64
        np.testing.assert_allclose(k, ref, rtol=0, atol=TOL)
        assert (k >= -1e-12).all() and k.max() > 1e-3
    same = lens.token_kl(base, copy.deepcopy(base), tok, texts[:2], progress=False)
    assert all((k == 0).all() for k in same)
    ranked = lens.rank_positions(got, tok, texts, top=5)
    assert [r["kl"] for r in ranked] == sorted((r["kl"] for r in ranked), reverse=True)
    assert ranked[0]["kl"] == max(k.max() for k in got)
    r0 = ranked[0]
    assert r0["token"] == tok.decode([tok(texts[r0["text"]], add_special_tokens=False)["input_ids"][r0["pos"]]])


def test_token_kl_bad_input(tok, pair):
    base, tuned = pair
    with pytest.raises(ValueError, match="at least one text"):
        lens.token_kl(base, tuned, tok, [], progress=False)
    with pytest.raises(ValueError, match="text 1 has no tokens"):
        lens.token_kl(base, tuned, tok, ["a b", ""], progress=False)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        lens.token_kl(base, make_model("qwen3", vocab_size=len(tok), num_hidden_layers=2), tok, ["a"], progress=False)
    with pytest.raises(ValueError, match="do not match"):
        lens.rank_positions([np.zeros(2)], tok, ["a b c d e"])


def test_token_kl_memory_is_one_slice_of_the_vocabulary():
    assert lens.chunk_rows(151_936) * 151_936 <= 2**25 and lens.chunk_rows(10**9) == 1


def _steer_result(frac, gap=2.0, n=16):
    """A steering PatchResult whose vectors recover exactly ``frac [K, L]`` of a ``gap`` for
    every example."""
    from alignkit.patching import PatchResult

    delta = np.tile(frac * gap, (n, 1, 1))
    recv = np.zeros(n)
    return PatchResult(lp_patched=delta, delta=delta, npe=delta / gap, kl=np.zeros_like(delta), lp_receiver=recv,
                       lp_donor=recv + gap, kl_receiver=np.zeros(n), npe_valid=np.ones(n, bool),
                       meta={"layers": list(range(frac.shape[1])), "n_examples": n, "n_npe_masked": 0})


def test_steering_against_random_directions_max_statistic():
    from alignkit.analyses.lens import LensResult

    rng = np.random.default_rng(0)
    R, layers = 200, 6
    null = rng.normal(0, 0.05, (R, layers))
    planted = np.zeros(layers)
    planted[2] = 0.8  # one layer carries most of the gap; the others nothing
    res = LensResult(positions={"answer": "answer"}, diff={}, tokens={},
                     steer={"answer": _steer_result(np.vstack([planted, null]))}, texts=[], n_prompt=[],
                     token_kl=[], ranked=[], label="flips")
    st = res.steering("answer", n_boot=50)
    assert st["threshold"] == pytest.approx(np.percentile(null.max(1), 95))
    assert st["p_max"] == pytest.approx(1 / (R + 1)) and st["above"] == [2] and st["peak"] == 2
    assert st["steer"].point[2] == pytest.approx(0.8) and st["n_random"] == R
    np.testing.assert_allclose(st["control"].hi, np.percentile(null, 97.5, axis=0))
    # steering no better than a random direction: flat at half the random maxima's median
    flat = np.full((1, layers), np.median(null.max(1)) / 2)
    res.steer["answer"] = _steer_result(np.vstack([flat, null]))
    st = res.steering("answer", n_boot=50)
    assert st["p_max"] > 0.4 and st["above"] == []


def test_readout_held_out_against_random_directions():
    """``readout_overlap``: two halves with one difference share all ``k`` promoted tokens and
    random directions of that norm few (p = 1/(R+1)); independent halves are no better than
    random (a large p); padded vocabulary rows are never counted; checked against a loop."""
    from alignkit.analyses.lens import LensResult, readout_overlap

    model = make_model()
    rng = np.random.default_rng(0)
    L, d, R, k = 3, model.config.hidden_size, 100, 5
    fit = rng.normal(0, 1, (L, d))
    rand = patching.random_directions(fit, R, seed=1)
    same = readout_overlap(model, 90, fit, fit.copy(), rand, [0, 2], k)
    assert same["halves"].tolist() == [k, k] and same["random"].shape == (R, 2)
    top = lambda v: set(np.argsort(-lens.lens_logits(model, v[None])[0, :90])[:k].tolist())  # noqa: E731
    assert same["random"][7, 1] == len(top(rand[7, 2]) & top(fit[2]))  # the loop reference
    assert all(max(top(v)) < 90 for v in fit)
    steer = _steer_result(np.zeros((1 + R, 2)))
    steer.meta["layers"] = [0, 2]
    res = LensResult(positions={"answer": "answer"}, diff={}, tokens={}, steer={"answer": steer},
                     texts=[], n_prompt=[], token_kl=[], ranked=[], label="flips",
                     readout={"answer": same})
    c = res.readout_control("answer", 2)
    assert c["halves"] == k and c["random"] < k and c["p"] == pytest.approx(1 / (R + 1))
    other = readout_overlap(model, 90, fit, rng.normal(0, 1, (L, d)), rand, [0, 2], k)
    res.readout["answer"] = other  # an unrelated second half: no better than a random direction
    assert res.readout_control("answer", 2)["p"] > 0.05
