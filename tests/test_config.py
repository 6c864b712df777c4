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


def test_runs_are_keyed_by_the_precision_they_resolve_to(monkeypatch):
    """``precision="auto"`` keys a run by what it trains in on this machine: fp32 on the CPU,
    bf16 on a GPU with native bf16 (a GPU's bf16 run is never read as a CPU's fp32 one)."""
    import dataclasses

    import torch

    from alignkit import models, runs

    cfg = get_config("tiny")
    assert cfg.precision == "auto"
    key = {p: runs.run_key(dataclasses.replace(cfg, precision=p), "sft")
           for p in ("fp32", "bf16", "fp16")}
    assert runs.run_key(cfg, "sft") == key["fp32"]  # the CPU
    monkeypatch.setattr(runs, "device_for", lambda c: torch.device("cuda", 0))
    monkeypatch.setattr(models, "native_bf16", lambda d: True)
    assert runs.run_key(cfg, "sft") == key["bf16"] != key["fp32"]
    monkeypatch.setattr(models, "native_bf16", lambda d: False)  # a T4
    assert runs.run_key(cfg, "dpo") == runs.run_key(dataclasses.replace(cfg, precision="fp16"),
                                                    "dpo")


def test_an_older_library_is_refused_by_name():
    """transformers or TRL older than the floors the suite passed on: an ImportError naming the
    installed and the needed version (not a TypeError deep in training); the floors are
    requirements.txt's."""
    import re
    from pathlib import Path

    from alignkit.config import FLOORS, check_versions

    check_versions()  # what is installed here passes
    check_versions(dict(FLOORS))
    with pytest.raises(ImportError, match=r"transformers 4\.57\.1 is installed, alignkit needs "
                                          rf"transformers>={re.escape(FLOORS['transformers'])}"
                                          r".*pip install -U"):
        check_versions({"transformers": "4.57.1", "trl": FLOORS["trl"]})
    with pytest.raises(ImportError, match=r"trl 0\.29\.0 is installed, alignkit needs trl>=1\.0"):
        check_versions({"trl": "0.29.0"})
    reqs = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text()
    for name, floor in FLOORS.items():
        [low] = re.findall(rf"^{name}>=([\d.]+)", reqs, flags=re.M)
        assert low == floor, name
