"""Shared fixtures: tiny configs and a smoke-size base + SFT run built once per session (no network)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def smoke_config(root, **overrides):
    from alignkit.config import get_config

    return get_config("tiny", smoke=True, overrides={"root": str(root), **overrides})


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def smoke_cfg(smoke_root):
    return smoke_config(smoke_root)


@pytest.fixture(scope="session")
def smoke_base(smoke_cfg):
    from alignkit.tiny import ensure_base

    return ensure_base(smoke_cfg)


@pytest.fixture(scope="session")
def smoke_run(smoke_cfg, smoke_base):
    from alignkit.train import train_sft

    return train_sft(smoke_cfg)


# tiny random models for the hook, capture and patching tests (a module may override ``tok``)
@pytest.fixture(scope="session")
def tok():
    from tiny_models import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def qwen3():
    from tiny_models import make_model

    return make_model("qwen3")


@pytest.fixture(scope="session", params=["qwen3", "qwen2", "llama"])
def any_model(request):
    from tiny_models import make_model

    return make_model(request.param)


@pytest.fixture(scope="session")
def qwen_tok(tmp_path_factory):
    """Qwen3-0.6B-Base's exact tokenizer (alignkit.pretrained.qwen_tokenizer), saved and
    reloaded."""
    from transformers import AutoTokenizer

    from alignkit.pretrained import qwen_tokenizer

    tok = qwen_tokenizer(chat=False)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
