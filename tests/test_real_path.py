"""The real path, rehearsed without weights or internet (benchmarks/rehearsal.py): a tokenizer that
splits like Qwen's, GSM8K's answer quirks, Qwen's vocabulary size, fp32 master weights, the two
real presets' prompt formats, the memory estimate and the named errors before long work."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import rehearsal  # noqa: E402
from tiny_models import ARCHS, make_model, make_unsupported  # noqa: E402

from alignkit import data, evaluate, models, train  # noqa: E402
from alignkit.analyses import behaviour, common  # noqa: E402
from alignkit.config import get_config  # noqa: E402
from alignkit.runs import list_checkpoints  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_qwen(tmp_path_factory, qwen_tok):
    """A 2-layer, 64-wide Qwen3 with Qwen3's exact tokenizer, saved (fast to train)."""
    path = tmp_path_factory.mktemp("small_qwen")
    model = make_model("qwen3", vocab_size=len(qwen_tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, initializer_range=0.02,
                       pad_token_id=qwen_tok.pad_token_id, eos_token_id=qwen_tok.eos_token_id)
    model.save_pretrained(path)
    qwen_tok.save_pretrained(path)
    return path


def test_answers_are_located_whatever_the_split(qwen_tok):
    """``" -"`` holds the space before a negative answer: it belongs to the answer (no error)."""
    prompt = data.format_prompt("Q?")
    answers = ["It is 3-13=<<3-13=-10>>-10.\n#### -10", "So 2125.\n#### 2,125", "Half.\n#### 7.5"]
    spans = evaluate.answer_spans(qwen_tok, [prompt] * 3, answers)
    pieces = [qwen_tok.convert_ids_to_tokens([s["input_ids"][i] for i in s["answer_positions"]])
              for s in spans]
    assert pieces == [["Ġ-", "1", "0"], ["2", ",", "1", "2", "5"], ["7", ".", "5"]]
    for s in spans:  # what predicts the answer ends at "####" (its space alone, or in " -")
        assert qwen_tok.decode(s["input_ids"][: s["answer_positions"][0]]).endswith(
            ("####", "#### "))


def test_answer_logprob_equals_full_logits_reference(qwen_tok):
    """The head runs on the answer rows only; the sum equals the full-vocab reference."""
    model = make_model("qwen3", vocab_size=len(qwen_tok), pad_token_id=qwen_tok.pad_token_id)
    rows = rehearsal.quirky_rows(12, "test")
    prompts = [data.format_prompt(r["question"]) for r in rows]
    got = evaluate.answer_logprob(model, qwen_tok, prompts, [r["answer"] for r in rows],
                                  batch_size=5)
    spans = evaluate.answer_spans(qwen_tok, prompts, [r["answer"] for r in rows])
    for g, s in zip(got, spans):
        ids = torch.tensor([s["input_ids"]])
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
        ref = sum(logp[p - 1, s["input_ids"][p]].item() for p in s["answer_positions"])
        assert g == pytest.approx(ref, abs=1e-5)  # fp32 model: batching moves the 7th digit


SCORING = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {bench!r})
    import rehearsal
    from alignkit import data, evaluate
    rows = rehearsal.quirky_rows(32, "test")
    from alignkit.pretrained import qwen_tokenizer
    tok = qwen_tokenizer(chat=False)
    model = rehearsal.real_shaped_model(tok, layers=1).eval()
    long = " ".join(["It adds up, step by step, to the same number."] * 30)
    prompts = [data.format_prompt(r["question"] + " " + long) for r in rows]
    widths = [len(tok(p + r["answer"])["input_ids"]) for p, r in zip(prompts, rows)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lp = evaluate.answer_logprob(model, tok, prompts, [r["answer"] for r in rows], batch_size=32)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(min(widths), after - before, bool(torch.isfinite(torch.tensor(lp)).all()))
""")


def test_scoring_memory_does_not_scale_with_batch_times_vocab():
    """32 problems of ~400 tokens with Qwen's 151,936-token vocabulary: full logits alone would be
    7.8 GB (15.6 GB as float64); scoring adds about 1 GiB to the loaded model (the decoder's
    activations and attention of one batch, and the [answer rows, vocab] slice)."""
    out = subprocess.run([sys.executable, "-c", SCORING.format(bench=str(REPO / "benchmarks"))],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert out.returncode == 0, out.stderr[-2000:]
    width, grown_gib, finite = out.stdout.split()
    assert int(width) >= 350 and finite == "True"
    assert float(grown_gib) < 2.0, f"scoring grew the peak RSS by {grown_gib} GiB"


def test_generation_ends_at_stop_strings_while_decoding(small_qwen):
    """A stop string ends a sequence's decoding (not only its text): fewer decoder steps."""
    model, tok = models.load_model(small_qwen)
    prompts = [data.format_prompt("Tom has 5 apples.")]
    calls = []
    handle = model.model.register_forward_hook(lambda *a: calls.append(1))
    kw = dict(max_new_tokens=24, temperature=1.0, seed=3)  # seeded sampling: varied text
    free = evaluate.generate(model, tok, prompts, stop=(), **kw)
    n_free, calls[:] = len(calls), []
    # a string the greedy continuation first reaches after a few characters
    stop = next(free[0][i : i + 3] for i in range(2, len(free[0]) - 3)
                if free[0].find(free[0][i : i + 3]) == i and free[0][i : i + 3].strip())
    cut = evaluate.generate(model, tok, prompts, stop=(stop,), **kw)
    handle.remove()
    assert cut[0] == free[0].split(stop)[0]
    assert len(calls) < n_free


def test_end_tokens_are_the_models_own(qwen_tok):
    model = rehearsal.real_shaped_model(qwen_tok, layers=1)
    ids = [qwen_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert evaluate.end_tokens(model, qwen_tok) == ids


def _always(model, token_id: int):
    """``model`` with a head that predicts ``token_id`` at every position."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model


@pytest.mark.parametrize("preset", ["qwen3-0.6b-base", "tiny"])
def test_decoding_stops_on_every_end_token(preset, qwen_tok):
    """A base-style generation config names ``<|endoftext|>`` only (Qwen3-0.6B-Base: 151643); a
    model that then writes ``<|im_end|>`` still stops there, on both presets' tokenizers."""
    from alignkit import tiny
    tok = qwen_tok if preset != "tiny" else AutoTokenizer.from_pretrained(tiny.SHIPPED)
    endoftext, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    model = make_model("qwen3", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model.generation_config.eos_token_id = endoftext  # the base's config: one end token
    assert set(evaluate.end_tokens(model, tok)) >= {endoftext, im_end}
    model = _always(model, im_end)
    [out] = evaluate.generate(model, tok, ["Question: 2+2?\nAnswer:"], max_new_tokens=8,
                              stop=())
    assert out == ""  # stopped at the first token (skip_special_tokens drops it), not 8 later
    assert model.generation_config.eos_token_id == endoftext  # the model's own config untouched


def test_one_prompt_format_for_both_presets(qwen_tok):
    base, chat = get_config("qwen3-0.6b-base"), get_config("qwen3-0.6b")
    assert (base.model, base.chat, chat.model, chat.chat) == (
        "Qwen/Qwen3-0.6B-Base", False, "Qwen/Qwen3-0.6B", True)
    assert base.eval.n_eval is None and chat.eval.n_eval is None  # the whole test split
    q = "Tom has 5 apples. How many?"
    assert data.prompts_for(base, qwen_tok, [q]) == [f"Question: {q}\nAnswer:"]
    assert data.prompts_for(chat, qwen_tok, [q]) == [
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"]
    with pytest.raises(ValueError, match="chat=True needs a tokenizer with a chat template"):
        data.prompts_for(chat, None, [q])
    assert data.format_completion("x\n#### 3 ", chat=True) == "x\n#### 3"
    assert data.format_completion("x\n#### 3 ") == " x\n#### 3"


def test_few_shot_prompts(qwen_tok, tmp_path):
    rows = rehearsal.quirky_rows(6, "train")
    path = rehearsal.write_jsonl(rows, tmp_path / "train.jsonl")
    cfg = get_config("qwen3-0.6b-base", overrides={"data_source": str(path), "eval.n_shot": 2})
    [p] = data.prompts_for(cfg, qwen_tok, ["Q?"], few_shot=True)
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows[:2])
    assert p == shots + "Question: Q?\nAnswer:"
    assert data.prompts_for(cfg, qwen_tok, ["Q?"]) == ["Question: Q?\nAnswer:"]  # probes: 0-shot
    cfg.chat = True
    [c] = data.prompts_for(cfg, qwen_tok, ["Q?"], few_shot=True)
    assert c.count("<|im_start|>assistant\n") == 3 and c.endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("chat", [False, True])
def test_flips_are_patched_with_the_prompts_they_were_evaluated_with(qwen_tok, tmp_path, chat):
    """Flips found under few-shot evaluation are patched after the same worked examples (they
    were patched zero-shot), for patching, the lens and compare alike (``patch_examples``)."""
    rows = rehearsal.quirky_rows(6, "train")
    path = rehearsal.write_jsonl(rows, tmp_path / "train.jsonl")
    flips = [{"index": 0, "question": "Tom has 3 apples and buys 4. How many?",
              "answer": "3+4=<<3+4=7>>7\n#### 7"}]
    for n_shot in (0, 2):
        cfg = get_config("qwen3-0.6b-base", overrides={"data_source": str(path), "chat": chat,
                                                         "eval.n_shot": n_shot})
        [ex] = behaviour.patch_examples(cfg, qwen_tok, flips)
        assert ex["prompt"] == data.prompts_for(cfg, qwen_tok, [flips[0]["question"]],
                                                few_shot=True)[0]
        assert ex["prompt"].count(rows[0]["question"].strip()) == (n_shot > 0)


def _sft_cfg(root, model, **over):
    rows = rehearsal.quirky_rows(16, "train")
    path = rehearsal.write_jsonl(rows, Path(root) / "train.jsonl")
    return get_config("qwen3-0.6b-base", smoke=True, overrides={
        "model": str(model), "data_source": str(path), "eval_source": str(path), "root": str(root),
        "device": "cpu", "dtype": "float32", "gradient_checkpointing": False,
        "sft.schedule": (0.0, 1.0), **over})


def _changed_share(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return sum(int((wa[k] != wb[k]).sum()) for k in wa) / sum(v.numel() for v in wa.values())


def test_bf16_training_keeps_fp32_master_weights(tmp_path, small_qwen):
    """bf16 autocast at lr 1e-6: the fp32 checkpoint changes in >= 99 % of its entries (pure bf16
    weights round such updates away: 1.2 % moved in the old path)."""
    cfg = _sft_cfg(tmp_path, small_qwen, precision="bf16", **{
        "sft.max_steps": 2, "sft.learning_rate": 1e-6, "sft.batch_size": 4,
        "sft.micro_batch_size": 2})
    assert train.training_precision(cfg, torch.device("cpu")) == "bf16"
    ckpts = list_checkpoints(train.train_sft(cfg))
    assert all(t.dtype == torch.float32 for t in load_file(
        str(ckpts[-1][1] / "model.safetensors")).values())
    assert _changed_share(ckpts[0][1], ckpts[-1][1]) >= 0.99


def test_micro_batches_accumulate_to_the_full_batch(tmp_path, small_qwen):
    """Micro-batches of 1 with accumulation give the checkpoint of whole batches of 4."""
    over = {"sft.max_steps": 3, "sft.learning_rate": 1e-3, "sft.batch_size": 4}
    whole = list_checkpoints(train.train_sft(_sft_cfg(tmp_path / "a", small_qwen, **over)))
    micro = list_checkpoints(train.train_sft(_sft_cfg(tmp_path / "b", small_qwen, **over,
                                                      **{"sft.micro_batch_size": 1})))
    wa = load_file(str(whole[-1][1] / "model.safetensors"))
    wb = load_file(str(micro[-1][1] / "model.safetensors"))
    assert _changed_share(whole[0][1], whole[-1][1]) > 0.5
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=2e-5)


def test_batch_plans_and_generation_batches():
    assert train.batch_plan("sft", 16, 4, 1) == (4, 4)
    assert train.batch_plan("sft", 16, 0, 2) == (8, 1)
    assert train.batch_plan("sft", 16, 2, 2) == (2, 4)
    with pytest.raises(ValueError, match=r"sft.batch_size \(15\) must be divisible by the number "
                                         r"of processes \(2\)"):
        train.batch_plan("sft", 15, 0, 2)
    with pytest.raises(ValueError, match=r"dpo.micro_batch_size \(3\) must divide"):
        train.batch_plan("dpo", 16, 3, 1)
    assert train.generation_batch(64, 8, 1, 8) == 8
    assert train.generation_batch(64, 4, 1, 8) == 8  # whole groups of 8
    assert train.generation_batch(64, 4, 2, 8) == 8  # a multiple of the global micro-batch
    with pytest.raises(ValueError, match="no generation batch"):
        train.generation_batch(64, 4, 3, 8)


QWEN3_06B = AutoConfig.for_model("qwen3", **rehearsal.QWEN3_06B)


@pytest.mark.parametrize("preset", ["qwen3-0.6b-base", "qwen3-0.6b"])
@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_every_training_stage_fits_24_gib_by_estimate(preset, method):
    """Micro-batches are fitted to the GPU: every stage of both presets within 24 GiB, and the SFT
    study within a T4's 15 GiB (fp16); gradient checkpointing is what makes that possible."""
    cfg = get_config(preset)
    micro = train.fit_micro_batch(cfg, method, QWEN3_06B, 1, "bf16", 24.0)
    est = train.memory_estimate(cfg, method, QWEN3_06B, 1, "bf16", micro)
    assert 9 < est["total"] <= 24, (micro, est)
    assert micro >= (2 if method != "dpo" else 1)
    if method == "sft":
        t4 = train.fit_micro_batch(cfg, "sft", QWEN3_06B, 1, "fp16", 15.0)
        assert train.memory_estimate(cfg, "sft", QWEN3_06B, 1, "fp16", t4)["total"] <= 15.0
    off = train.memory_estimate(dataclasses.replace(cfg, gradient_checkpointing=False), method,
                                QWEN3_06B, 1, "bf16", micro)
    assert off["activations"] > 5 * est["activations"]
    assert train.fit_micro_batch(cfg, method, QWEN3_06B, 1, "bf16", 4.0) == 1  # nothing fits


def test_checkpointing_is_off_only_where_the_gpu_holds_the_step_without_it(tmp_path,
                                                                          monkeypatch):
    """``gradient_checkpointing="auto"`` (the real presets): off on an 80 GB GPU for SFT (the whole
    batch of 16 fits without recomputation within 70 %), on for a 24 GB GPU and the CPU;
    ``plan_memory`` then fits the micro-batch with the choice it made."""
    cfg = get_config("qwen3-0.6b-base")
    assert cfg.gradient_checkpointing == "auto"
    whole_off = train.memory_estimate(dataclasses.replace(cfg, gradient_checkpointing=False),
                                      "sft", QWEN3_06B, 1, "bf16", 16)["total"]
    assert 0.7 * 24 < whole_off <= 0.7 * 80  # both sides of the rule are exercised
    assert f"SFT's {whole_off:.1f} GiB on an 80 GB GPU" in (REPO / "docs" / "real-path.md").read_text()
    resolve = train.resolve_checkpointing
    assert resolve(cfg, "sft", QWEN3_06B, 1, "bf16", 80.0) is False
    assert resolve(cfg, "sft", QWEN3_06B, 1, "bf16", 24.0) is True
    assert resolve(cfg, "sft", QWEN3_06B, 1, "bf16", None) is True
    for fixed in (True, False):
        assert resolve(dataclasses.replace(cfg, gradient_checkpointing=fixed), "sft", QWEN3_06B,
                       1, "bf16", 80.0) is fixed
    with pytest.raises(ValueError, match="gradient_checkpointing must be true, false or 'auto'"):
        resolve(dataclasses.replace(cfg, gradient_checkpointing="yes"), "sft", QWEN3_06B, 1,
                "bf16", 80.0)
    QWEN3_06B.save_pretrained(tmp_path)
    # an 80 GB GPU: all of it free, then 24 GB free (another process on it): planned by what is free
    for gib, want in ((80, (16, False)), (24, (train.fit_micro_batch(
            cfg, "sft", QWEN3_06B, 1, "bf16", 24.0), True))):
        monkeypatch.setattr(train.torch.cuda, "mem_get_info", lambda d, g=gib: (g * 2**30, 80 * 2**30))
        assert train.plan_memory(cfg, "sft", tmp_path, torch.device("cuda"), 1, "bf16") == want
    assert train.plan_memory(cfg, "sft", tmp_path, torch.device("cpu"), 1, "fp32") == (16, True)


def test_training_precision_is_chosen_from_the_device():
    cfg = get_config("qwen3-0.6b-base")
    assert train.training_precision(cfg, torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision='fp16'.*needs a CUDA GPU"):
        train.training_precision(dataclasses.replace(cfg, precision="fp16"), torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        train.training_precision(dataclasses.replace(cfg, precision="half"), torch.device("cpu"))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_memory_estimates_read_every_supported_family(arch):
    """GPT-2 names its MLP width ``n_inner`` (None: 4 d) and has no key-value heads, GPT-NeoX no
    key-value heads: ``models.dims`` reads every supported family, so the GPU estimates do."""
    c = make_model(arch).config
    dims = models.dims(c)
    assert dims["kv"] <= dims["heads"] and dims["ffn"] > 0 and dims["head_dim"] > 0
    cfg = get_config("qwen3-0.6b-base")
    assert train.memory_estimate(cfg, "sft", c, 1, "bf16", 2)["total"] > 0
    if arch == "gpt2":
        assert dims["ffn"] == (c.n_inner or 4 * c.n_embd) and dims["kv"] == c.n_head


def test_a_gpu_without_native_bf16_gets_fp16_training_and_float32_analysis(monkeypatch):
    """Colab's T4 (compute capability 7.5) can hold bf16 tensors, so torch's
    ``is_bf16_supported()`` says yes there; the choice must read the capability."""
    cfg = get_config("qwen3-0.6b-base")
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    for capability, autocast, analysis in (((7, 5), "fp16", "float32"),
                                           ((8, 0), "bf16", "bfloat16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert train.training_precision(cfg, gpu) == autocast
        assert models.compute_dtype(cfg.dtype, gpu) == analysis
        assert models.compute_dtype("float16", gpu) == "float16"
        on_gpu = dataclasses.replace(cfg, device="cuda:0")  # keys use the dtype actually run
        assert models.analysis_dtype(on_gpu) == common.run_on(on_gpu)["model_dtype"] == analysis
    assert models.compute_dtype("bfloat16", "cpu") == "bfloat16"


def test_eval_batch_is_fitted_to_the_gpu(monkeypatch):
    """``eval.batch_size=0`` (the real presets): at most 64 prompts on the CPU and 256 on a GPU
    (divided by the sequences per prompt), evened out over the batches, smaller on out-of-memory
    only; a batch the user set is used as is."""
    cfg = get_config("qwen3-0.6b-base")
    assert cfg.eval.batch_size == 0
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for where, n, per_prompt, want in ((cpu, 1319, 1, 63), (cpu, 64, 1, 64), (gpu, 1319, 1, 220),
                                       (gpu, 4800, 4, 64), (gpu, 10, 1, 10)):
        monkeypatch.setattr(evaluate.models, "input_device", lambda m, d=where: d)
        seen = []
        out, batch = evaluate.batched(cfg, None, n, lambda b: seen.append(b) or "done", per_prompt)
        assert (out, batch, seen) == ("done", want, [want])  # 21 batches of 63; 6 of 220; ...
    for fixed in (8, 300):
        fixed_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=fixed))
        assert evaluate.batched(fixed_cfg, None, 1319, lambda b: b) == (fixed, fixed)
    with pytest.raises(ValueError, match="eval.batch_size must be >= 0"):
        evaluate.batched(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=-1)),
                         None, 10, lambda b: b)


def test_named_errors_before_long_work(tmp_path, small_qwen, qwen_tok):
    with pytest.raises(ValueError, match="unknown preset 'qwen3-0.6B'"):
        get_config("qwen3-0.6B")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is missing config.json, weights"):
        models.preflight(empty, chat=False)
    bloom = tmp_path / "bloom"
    make_unsupported(len(qwen_tok)).save_pretrained(bloom)
    qwen_tok.save_pretrained(bloom)
    with pytest.raises(NotImplementedError, match="does not support BloomForCausalLM "
                                                  r"\(model_type 'bloom'\)"):
        models.preflight(bloom, chat=False)
    nopad = tmp_path / "nopad"
    make_model("qwen3", vocab_size=len(qwen_tok)).save_pretrained(nopad)
    tok = AutoTokenizer.from_pretrained(small_qwen)
    tok.pad_token = None
    tok.save_pretrained(nopad)
    with pytest.raises(ValueError, match="has no pad token"):
        models.preflight(nopad, chat=False)
    notemplate = tmp_path / "notemplate"
    make_model("qwen3", vocab_size=len(qwen_tok)).save_pretrained(notemplate)
    tok = AutoTokenizer.from_pretrained(small_qwen)
    tok.chat_template = None
    tok.save_pretrained(notemplate)
    (notemplate / "chat_template.jinja").unlink(missing_ok=True)
    models.preflight(notemplate, chat=False)
    with pytest.raises(ValueError, match="chat=True but the tokenizer of .* has no chat template"):
        models.preflight(notemplate, chat=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "answer": "The answer is 3."}) + "\n")
    with pytest.raises(ValueError, match="line 1 has no '#### ' final-answer marker"):
        data.load_gsm8k(str(bad))


SLOW = os.environ.get("ALIGNKIT_SLOW") == "1"


@pytest.mark.parametrize("preset,compare", [
    ("qwen3-0.6b-base", False),
    pytest.param("qwen3-0.6b", False, marks=pytest.mark.skipif(
        not SLOW, reason="~6 CPU minutes with Qwen3's exact tokenizer; the chat path runs in CI "
                         "on the real SmolLM2 (test_pretrained); ALIGNKIT_SLOW=1 runs it")),
    pytest.param("qwen3-0.6b", True, marks=pytest.mark.skipif(
        not SLOW, reason="~9 CPU minutes; ALIGNKIT_SLOW=1 runs it (passed 2026-12-01)"))])
def test_both_presets_run_all_end_to_end(tmp_path, preset, compare):
    """``python -m alignkit --preset P --smoke ... all`` through every stage but the notebooks, on
    a 2-layer model of Qwen3-0.6B's width and vocabulary with Qwen3's exact tokenizer, loaded by
    path, and GSM8K-format data with negative, comma and decimal answers. CI runs the base preset
    (~6 min here with Qwen3's exact tokenizer; where that time goes is not yet profiled); the chat
    path runs in CI through test_pretrained's SmolLM2 preset. CI skips compare (DPO,
    GRPO and their analyses cost ~6 CPU minutes at the real vocabulary; the tiny preset's
    notebook 05 runs that code in CI); ``ALIGNKIT_SLOW=1`` adds the chat preset's full ``all``
    (both presets' full runs passed here in ~9 min each)."""
    from alignkit import cli

    paths = rehearsal.build(tmp_path / "inputs", layers=2, n_train=32, n_test=16,
                            chat=preset == "qwen3-0.6b")
    test_rows = [json.loads(x) for x in paths["test"].read_text().splitlines()]
    assert any("#### -" in r["answer"] for r in test_rows[:8])
    argv = ["--preset", preset, "--smoke", "--model", str(paths["model"]), "--data",
            str(paths["train"]), "--eval-data", str(paths["test"]), "--root", str(tmp_path / "r"),
            "--set", "device=cpu", "--set", "dtype=float32"]
    for method in ("sft", "dpo", "grpo"):
        argv += ["--set", f"{method}.schedule=[0, 1]"]
    assert cli.main(argv + ["all", "--skip", "figures"] + ([] if compare else ["compare"])) == 0
    cfg, _ = cli.config_from_args(cli.build_parser().parse_args(argv + ["all"]))
    ckpts = common.from_run(cfg, "sft")
    res = behaviour.ensure(cfg, ckpts)
    assert [e.n for e in res.evals] == [8, 8] and [e.batch_size for e in res.evals] == [8, 8]
    assert all(np.isfinite(e.answer_logprob).all() for e in res.evals)
    probes = common.probes(cfg, ckpts)
    assert probes[0].endswith("<think>\n\n</think>\n\n" if cfg.chat else "\nAnswer:")
    ckpts = list_checkpoints(res.run_dir)  # fp32 checkpoints that moved
    assert _changed_share(ckpts[0][1], ckpts[-1][1]) > 0.9
    if compare:  # GRPO's random policy earns no reward, hence no gradient: DPO must move
        ckpts = list_checkpoints(train.train(cfg, "dpo"))
        assert _changed_share(ckpts[0][1], ckpts[-1][1]) > 0.9
        assert [s for s, _ in list_checkpoints(train.train(cfg, "grpo"))] == [0, 2]
        assert set(compare.ensure(cfg, common.from_methods(cfg)).methods) == {"sft", "dpo", "grpo"}


def test_only_the_default_run_writes_images(tmp_path):
    from alignkit.plots import figure_dir

    published = REPO / "images"  # written by make publish only, never by a run
    assert figure_dir(get_config("tiny", overrides={"root": str(tmp_path)})) == tmp_path / "images"
    others = [get_config("tiny", smoke=True, overrides={"root": str(tmp_path)}),
              get_config("tiny", overrides={"root": str(tmp_path), "sft.max_steps": 50}),
              get_config("qwen3-0.6b-base", overrides={"root": str(tmp_path)}),
              get_config("qwen3-0.6b", overrides={"root": str(tmp_path)})]
    dirs = [figure_dir(c) for c in others]
    assert len(set(dirs)) == 4
    for d in dirs:
        assert d.is_relative_to(tmp_path / "reports") and d.name == "images"
    assert all(not d.is_relative_to(published) for d in dirs)
