import pytest

from alignkit.config import get_config


def test_presets_and_overrides(tmp_path):
    cfg = get_config("tiny", overrides={"sft.max_steps": 7, "root": str(tmp_path)})
    assert cfg.sft.max_steps == 7 and cfg.run_root == tmp_path and cfg.model == "tiny"
    real = get_config("qwen3-0.6b")
    assert real.model == "Qwen/Qwen3-0.6B" and real.data_source == "openai/gsm8k" and real.dtype == "bfloat16"
    assert get_config("tiny", smoke=True).tiny.num_hidden_layers < get_config("tiny").tiny.num_hidden_layers


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        get_config("gpt5")


@pytest.mark.parametrize("key", ["sft.max_step", "nope", "sft.max_steps.x"])
def test_bad_override_key(key):
    with pytest.raises(ValueError, match="unknown config key"):
        get_config("tiny", overrides={key: 1})
