import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignkit import runs
from alignkit.data import format_prompt
from alignkit.evaluate import (
    answer_logprob,
    answer_spans,
    evaluate_checkpoint,
    flip_table,
    generate,
    summary,
    wilson_interval,
)
from alignkit.models import load_model
from alignkit.runs import list_checkpoints

SOL = "Tom has 5+3=<<5+3=8>>8 apples.\nHe gives 2, so 8-2=<<8-2=6>>6.\n#### 16"


def test_answer_spans_locate_final_answer(smoke_base):
    _, tok = load_model(smoke_base)
    prompt = format_prompt("How many?")
    (span,) = answer_spans(tok, [prompt], [SOL])
    toks = tok.convert_ids_to_tokens(span["input_ids"])
    assert [toks[i] for i in span["answer_positions"]] == ["1", "6"]
    assert span["answer_positions"][-1] == len(toks) - 1


def test_answer_logprob_matches_direct_computation(smoke_base):
    model, tok = load_model(smoke_base)
    prompts = [format_prompt("How many apples?"), format_prompt("A much longer question about many apples and pears?")]
    sols = [SOL, SOL.replace("#### 16", "#### 1234")]
    got = answer_logprob(model, tok, prompts, sols, batch_size=2)
    for p, s, g in zip(prompts, sols, got):
        prefix, final = s.rsplit("#### ", 1)
        ids_prefix = tok(p + " " + prefix + "#### ", add_special_tokens=False)["input_ids"]
        ids = tok(p + " " + prefix + "#### " + final, add_special_tokens=False)["input_ids"]
        assert ids[: len(ids_prefix)] == ids_prefix
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        ref = sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(len(ids_prefix), len(ids)))
        assert g == pytest.approx(ref, abs=1e-6)
    # batching (right padding) does not change the value
    one = [answer_logprob(model, tok, [p], [s])[0] for p, s in zip(prompts, sols)]
    np.testing.assert_allclose(got, one, atol=1e-6)


def test_answer_merged_with_the_space_before_it_is_located():
    # a BPE without digit splitting merges " 12" into one token that starts at the space: that
    # token overlaps the answer, so it is the answer's (as Qwen's " -" of "#### -10")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["#### 12"] * 50, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    [span] = answer_spans(fast, ["Question: q\nAnswer:"], ["x\n#### 12"])
    assert fast.convert_ids_to_tokens([span["input_ids"][i] for i in span["answer_positions"]]) \
        == ["Ġ12"]


def test_empty_inputs_raise(smoke_base):
    model, tok = load_model(smoke_base)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, tok, [])
    with pytest.raises(ValueError, match="at least one example"):
        answer_logprob(model, tok, [], [])


def test_generate_is_padding_safe(smoke_base):
    model, tok = load_model(smoke_base)
    prompts = [format_prompt("Tom has 3 apples. How many?"),
               format_prompt("A train goes 12 miles in the first hour. It keeps that speed for 3 hours. What is it?")]
    batched = generate(model, tok, prompts, max_new_tokens=12, batch_size=2)
    single = [generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    z2 = 1.959964**2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # closed form at k = 0
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)


def test_evaluate_run_cached_and_flips(smoke_cfg, smoke_run):
    results = [evaluate_checkpoint(d, smoke_cfg) for _, d in list_checkpoints(smoke_run)]
    assert [r.step for r in results] == [s for s, _ in list_checkpoints(smoke_run)]
    for r in results:
        assert r.n == smoke_cfg.eval.n_eval and 0 <= r.accuracy <= 1
        assert all(math.isfinite(x) and x <= 0 for x in r.answer_logprob)
    # second call reads the cache (same object content, no recomputation)
    ckpt = list_checkpoints(smoke_run)[-1][1]
    cached = smoke_cfg.run_root / "evals" / f"eval-{results[-1].key}" / "key.json"
    assert runs.load_entry(cached.parent).weights_hash == runs.weights_hash(ckpt)
    mtime = cached.stat().st_mtime_ns
    assert evaluate_checkpoint(ckpt, smoke_cfg) == results[-1]
    assert cached.stat().st_mtime_ns == mtime
    # a damaged cache is recomputed, not read
    cached.write_text("{not json")
    assert evaluate_checkpoint(ckpt, smoke_cfg).accuracy == results[-1].accuracy
    rows = summary(results)
    assert rows[0]["acc_lo"] <= rows[0]["accuracy"] <= rows[0]["acc_hi"]


def test_flip_table_logic(smoke_cfg):
    from types import SimpleNamespace

    from alignkit.data import eval_set

    ds = eval_set(smoke_cfg)
    n = len(ds)
    first = SimpleNamespace(correct=[i % 2 == 0 for i in range(n)], outputs=["a"] * n,
                            answer_logprob=[-1.0] * n)
    last = SimpleNamespace(correct=[i % 3 == 0 for i in range(n)], outputs=["b"] * n,
                           answer_logprob=[-0.5] * n)
    t = flip_table([first, last], smoke_cfg, ds)
    assert [r["index"] for r in t.flips] == [i for i in range(n) if i % 2 and i % 3 == 0]
    assert [r["index"] for r in t.controls] == [i for i in range(n) if i % 6 == 0]
    with pytest.raises(ValueError, match="do not match"):
        flip_table([SimpleNamespace(correct=[True]), last], smoke_cfg, ds)


def test_same_weights_are_evaluated_once(smoke_cfg, smoke_run, tmp_path, monkeypatch):
    """A copy of a checkpoint in another run (a seed's step 0 is the base, DPO's is SFT's final)
    reads the shared store under its own name; damaged everywhere, it is recomputed."""
    import shutil

    import alignkit.evaluate as evaluate_mod

    ckpt = list_checkpoints(smoke_run)[-1][1]
    first = evaluate_checkpoint(ckpt, smoke_cfg)
    twin = tmp_path / "other-run" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, twin)
    real_generate = evaluate_mod.generate
    monkeypatch.setattr(evaluate_mod, "generate", lambda *a, **k: pytest.fail("generated again"))
    again = evaluate_checkpoint(twin, smoke_cfg)
    assert again.checkpoint == str(twin) and again.correct == first.correct
    assert again.answer_logprob == first.answer_logprob and not list(twin.glob("eval-*"))
    for f in (smoke_cfg.run_root / "evals").glob("eval-*/key.json"):
        f.write_text("{not json")
    monkeypatch.setattr(evaluate_mod, "generate", real_generate)
    assert evaluate_checkpoint(twin, smoke_cfg).correct == first.correct


def test_evaluations_are_keyed_by_tokenizer_and_generation_config(smoke_cfg, smoke_run,
                                                                    tmp_path, monkeypatch):
    """The same weights with another generation config (another end token) or tokenizer are
    evaluated again, not read from the cache; a changed answer extractor rescores the cached
    outputs without generating."""
    import json
    import shutil

    import alignkit.evaluate as evaluate_mod
    from alignkit import data

    ckpt = list_checkpoints(smoke_run)[-1][1]
    first = evaluate_checkpoint(ckpt, smoke_cfg)
    calls = []
    real_generate = evaluate_mod.generate
    monkeypatch.setattr(evaluate_mod, "generate",
                        lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    for name, edit in [("generation_config.json", lambda c: dict(c, eos_token_id=[0, 2])),
                       ("tokenizer_config.json", lambda c: dict(c, model_max_length=77))]:
        other = tmp_path / name / ckpt.name
        shutil.copytree(ckpt, other)
        (other / name).write_text(json.dumps(edit(json.loads((other / name).read_text()))))
        assert runs.weights_hash(other) == runs.weights_hash(ckpt)
        n = len(calls)
        again = evaluate_checkpoint(other, smoke_cfg)
        assert len(calls) == n + 1 and again.key != first.key, name
    monkeypatch.setattr(evaluate_mod, "generate", lambda *a, **k: pytest.fail("generated again"))
    ds = data.eval_set(smoke_cfg)  # its gold answers extracted before the extractor changes
    monkeypatch.setattr(data, "extract_answer", lambda text: "planted")
    rescored = evaluate_checkpoint(ckpt, smoke_cfg, ds)
    assert rescored.outputs == first.outputs and set(rescored.predictions) == {"planted"}
    assert rescored.accuracy == 0.0 and not any(rescored.correct)


def test_a_fitted_batch_shrinks_when_the_gpu_runs_out(smoke_cfg, smoke_run, monkeypatch, tmp_path):
    """``eval.batch_size=0``: an out-of-memory error retries at a smaller batch (accelerate's
    ``find_executable_batch_size``; recorded); a batch the user set is never changed."""
    import dataclasses

    from alignkit import evaluate

    real, calls = evaluate.generate, []

    def pretend_gpu(model, tok, prompts, max_new, batch, *args, **kwargs):
        calls.append(batch)
        if batch > 12:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (pretend)")
        return real(model, tok, prompts, max_new, batch, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", pretend_gpu)
    ckpt = list_checkpoints(smoke_run)[-1][1]
    cfg = dataclasses.replace(smoke_cfg, root=str(tmp_path),
                              eval=dataclasses.replace(smoke_cfg.eval, batch_size=0))
    res = evaluate_checkpoint(ckpt, cfg)
    assert calls[0] == 48 and res.batch_size == calls[-1] <= 12 and res.n == 48
    assert all(b < a for a, b in zip(calls, calls[1:]))
    calls.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        evaluate_checkpoint(ckpt, dataclasses.replace(cfg, root=str(tmp_path / "fixed"),
                            eval=dataclasses.replace(cfg.eval, batch_size=48)))
    assert calls == [48]


def test_the_eval_cache_is_keyed_by_the_dtype(smoke_cfg):
    """Greedy outputs in bfloat16 differ from float32 ones: one must never be read for the
    other."""
    import dataclasses

    from alignkit.data import eval_set
    from alignkit.evaluate import eval_key

    ds = eval_set(smoke_cfg)
    assert eval_key(smoke_cfg, ds) != eval_key(dataclasses.replace(smoke_cfg, dtype="bfloat16"), ds)
