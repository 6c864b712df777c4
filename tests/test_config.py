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


def test_seed_configs_move_every_training_seed_and_nothing_else():
    import dataclasses

    from alignkit.config import seed_configs, with_seed
    from alignkit.runs import run_key

    cfg = get_config("tiny")
    assert cfg.n_seeds == 3 and get_config("tiny", smoke=True).n_seeds == 2
    assert get_config("qwen3-0.6b-base").n_seeds == 1  # GPU hours: the real presets opt in
    cfgs = seed_configs(cfg)
    assert cfgs[0] == cfg and len(cfgs) == 3
    assert [(c.sft.seed, c.dpo.seed, c.grpo.seed) for c in cfgs] == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    for c in cfgs[1:]:  # the same base, data and knobs: only the seeds differ
        assert dataclasses.replace(c, sft=cfg.sft, dpo=cfg.dpo, grpo=cfg.grpo) == cfg
        assert dataclasses.replace(c.sft, seed=0) == cfg.sft
    assert len({run_key(c, m) for c in cfgs for m in ("sft", "dpo", "grpo")}) == 9  # runs apart
    assert with_seed(get_config("tiny", overrides={"sft.seed": 5}), 1).sft.seed == 6
    assert len(seed_configs(cfg, 1)) == 1
    with pytest.raises(ValueError, match="n_seeds must be >= 1"):
        seed_configs(cfg, 0)
