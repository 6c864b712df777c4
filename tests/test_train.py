"""Smoke-size base build, SFT with scheduled checkpoints, resume after an interruption."""

import json

import pytest
import torch
from conftest import smoke_config
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from alignkit import runs
from alignkit import train as train_mod
from alignkit.models import load_model
from alignkit.runs import list_checkpoints, manifest_matches, schedule_steps
from alignkit.tiny import ensure_base, pretraining_corpus
from alignkit.train import train_sft


def test_pretraining_corpus_has_no_worked_solutions(smoke_cfg):
    docs = pretraining_corpus(smoke_cfg.tiny, smoke_cfg.generator)
    assert docs and not any("<<" in d or "####" in d for d in docs)


def test_base_loads_like_a_hub_model(smoke_cfg, smoke_base):
    model = AutoModelForCausalLM.from_pretrained(smoke_base)
    tok = AutoTokenizer.from_pretrained(smoke_base)
    assert isinstance(model, Qwen3ForCausalLM)
    c = model.config
    assert c.tie_word_embeddings and c.num_key_value_heads < c.num_attention_heads  # GQA, tied
    assert c.num_hidden_layers == smoke_cfg.tiny.num_hidden_layers
    assert hasattr(model.model.layers[0].self_attn, "q_norm")  # QK-norm
    assert tok.convert_ids_to_tokens(tok(" 123")["input_ids"])[-3:] == ["1", "2", "3"]  # digit split
    manifest = json.loads((smoke_base / "manifest.json").read_text())
    assert manifest["n_tokens"] > 0 and manifest["final_train_loss"] < 7


def test_ensure_base_is_cached(smoke_cfg, smoke_base):
    mtime = (smoke_base / "model.safetensors").stat().st_mtime_ns
    assert ensure_base(smoke_cfg) == smoke_base
    assert (smoke_base / "model.safetensors").stat().st_mtime_ns == mtime


def test_schedule_steps():
    assert schedule_steps(100, (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)) == [0, 5, 10, 25, 50, 100]
    assert schedule_steps(10, (0.0, 0.05, 0.1, 1.0)) == [0, 1, 10]
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        schedule_steps(0, (0.0,))


def test_sft_checkpoints_and_manifests(smoke_cfg, smoke_run):
    ckpts = list_checkpoints(smoke_run)
    steps = [s for s, _ in ckpts]
    assert steps == schedule_steps(smoke_cfg.sft.max_steps, smoke_cfg.sft.schedule)
    base_w = AutoModelForCausalLM.from_pretrained(ckpts[0][1]).state_dict()
    ref_w = AutoModelForCausalLM.from_pretrained(ensure_base(smoke_cfg)).state_dict()
    assert all(torch.equal(base_w[k], ref_w[k]) for k in ref_w)  # step 0 is the base
    last = AutoModelForCausalLM.from_pretrained(ckpts[-1][1]).state_dict()
    assert any(not torch.equal(last[k], base_w[k]) for k in base_w)
    for step, d in ckpts:
        m = json.loads((d / "manifest.json").read_text())
        assert m["step"] == step and m["fraction"] == pytest.approx(step / smoke_cfg.sft.max_steps)
        assert {"config_hash", "data_hash", "train_loss", "wall_time_s", "weights_hash"} <= set(m)
        if step > 0:
            assert m["train_loss"] > 0
        load_model(d)
    assert not (smoke_run / "trainer").exists()  # resume state removed once finished
    # a finished run returns at once and changes nothing
    mtime = (ckpts[-1][1] / "model.safetensors").stat().st_mtime_ns
    assert train_sft(smoke_cfg) == smoke_run
    assert (ckpts[-1][1] / "model.safetensors").stat().st_mtime_ns == mtime


def test_completion_only_loss(smoke_cfg, smoke_base):
    from trl import SFTConfig, SFTTrainer

    from alignkit.train import sft_dataset

    model, tok = load_model(smoke_base)
    ds = sft_dataset(smoke_cfg, tok).select(range(2))
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True,
                                                     bf16=False, max_length=256), train_dataset=ds,
                         processing_class=tok)
    row = trainer.train_dataset[0]
    labels = row["labels"] if "labels" in row else [
        t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])]
    n_prompt = len(tok(ds[0]["prompt"])["input_ids"])
    assert all(x == -100 for x in labels[:n_prompt])  # no loss on the prompt
    assert labels[n_prompt:] == row["input_ids"][n_prompt:]  # loss on every solution token
    assert row["input_ids"][-1] == tok.eos_token_id  # TRL appends EOS


def test_incomplete_checkpoint_is_not_complete(tmp_path, smoke_run):
    import shutil

    src = list_checkpoints(smoke_run)[-1][1]
    dst = tmp_path / "step-000001"
    shutil.copytree(src, dst)
    assert manifest_matches(dst)
    with open(dst / "model.safetensors", "r+b") as f:  # truncate the weights
        f.truncate(100)
    assert not manifest_matches(dst)
    (dst / "manifest.json").unlink()
    assert not manifest_matches(dst)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption(tmp_path, smoke_base, smoke_cfg, smoke_run, monkeypatch):
    # same base (copy the cache) so only SFT runs here
    import shutil

    cfg = smoke_config(tmp_path)
    from alignkit.tiny import base_dir

    shutil.copytree(smoke_base, base_dir(cfg))
    steps = schedule_steps(cfg.sft.max_steps, cfg.sft.schedule)
    stop_after = steps[-2] + 1  # crash after the second-to-last checkpoint was written
    original = train_mod._ScheduleCallback.on_step_end

    def crashing(self, args, state, control, **kw):
        if state.global_step == stop_after:
            raise _Interrupt
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(train_mod._ScheduleCallback, "on_step_end", crashing)
    with pytest.raises(_Interrupt):
        train_sft(cfg)
    run = runs.run_dir(cfg, "sft")
    done = [s for s, _ in list_checkpoints(run)]
    assert done == steps[:-1]
    kept = {s: (d / "model.safetensors").stat().st_mtime_ns for s, d in list_checkpoints(run)}

    monkeypatch.setattr(train_mod._ScheduleCallback, "on_step_end", original)
    started = []
    from trl import SFTTrainer

    real_train = SFTTrainer.train

    def spy(self, resume_from_checkpoint=None, **kw):
        started.append(resume_from_checkpoint)
        return real_train(self, resume_from_checkpoint=resume_from_checkpoint, **kw)

    monkeypatch.setattr(SFTTrainer, "train", spy)
    train_sft(cfg)
    assert started and started[0] is not None and started[0].endswith(f"checkpoint-{steps[-2]}")
    final = list_checkpoints(run)
    assert [s for s, _ in final] == steps
    # finished checkpoints were not rewritten
    assert all((d / "model.safetensors").stat().st_mtime_ns == kept[s] for s, d in final if s in kept)
    # resumed weights equal an uninterrupted run's (the session run has the same config)
    a = AutoModelForCausalLM.from_pretrained(final[-1][1]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(list_checkpoints(smoke_run)[-1][1]).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="model path does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a model directory"):
        load_model(tmp_path / "empty")


def test_real_path_with_local_files(tmp_path, smoke_base):
    """The qwen3-0.6b preset's code path (local model dir + GSM8K jsonl), shrunk to smoke size on CPU."""
    from alignkit.data import generate_problems
    from alignkit.evaluate import evaluate_checkpoint

    for split, n in (("train", 40), ("test", 8)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for row in generate_problems(n, split):
                f.write(json.dumps(row) + "\n")
    from alignkit.config import get_config

    cfg = get_config("qwen3-0.6b", smoke=True, overrides={
        "model": str(smoke_base), "data_source": str(tmp_path / "train.jsonl"),
        "eval_source": str(tmp_path / "test.jsonl"), "dtype": "float32", "root": str(tmp_path / "runs"),
        "sft.n_train": 40})
    assert ensure_base(cfg) == smoke_base
    run = train_sft(cfg)
    results = [evaluate_checkpoint(d, cfg) for _, d in list_checkpoints(run)]
    assert [r.step for r in results] == schedule_steps(cfg.sft.max_steps, cfg.sft.schedule)
    assert all(r.n == 8 for r in results)


def test_read_only_finds_a_complete_run_and_trains_nothing(smoke_cfg, smoke_run, smoke_root):
    """Under ``runs.read_only`` (summaries recomputed from the cache) a complete run is returned
    as is, and one that would have to be trained raises ``NotCached`` naming it."""
    with runs.read_only():
        assert train_mod.train(smoke_cfg, "sft") == smoke_run
        other = smoke_config(smoke_root, **{"sft.seed": 7})
        with pytest.raises(runs.NotCached, match="the SFT run .* is not in the cache"):
            train_mod.train(other, "sft")
    assert not list_checkpoints(runs.run_dir(other, "sft"))


def _sharding_worker(rank, port, out_dir, mode, delay=1.0, timeout_s=3.0):
    """One of two CPU processes (gloo) under a process-group timeout of ``timeout_s`` (set the way
    training sets it, through ``PartialState(timeout=...)``): 4 items at ``delay`` s each."""
    import os
    import time
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist
    from accelerate import PartialState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=timeout_s))

    def slow(share):
        time.sleep(delay * len(share))
        return [10 * x for x in share]

    out = Path(out_dir) / f"{mode}-{rank}.json"
    try:
        if mode == "sharded":  # each rank its 2 items (2 s), then one gather
            out.write_text(json.dumps(train_mod.sharded(list(range(4)), slow)))
        else:  # rank 0 alone does all 4 items (4 s) while rank 1 waits in a collective
            result = slow(list(range(4))) if rank == 0 else None
            parts = [None, None]
            dist.all_gather_object(parts, result)
            out.write_text(json.dumps(parts[0]))
    except Exception as e:  # noqa: BLE001 - the timeout, recorded for the test
        out.write_text(json.dumps(f"error: {type(e).__name__}: {e}"))
        os._exit(0)  # the process group is broken: leave without its teardown


def test_dpo_sampling_is_sharded_within_the_process_group_timeout(tmp_path):
    """Two processes on the CPU (gloo) with a 3 s collective timeout and 4 s of once-only work:
    all on rank 0 while rank 1 waits (the old DPO sampling) times out; sharded, each rank does
    its 2 s and both get the whole result in order."""
    import socket

    import torch.multiprocessing as mp

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    mp.start_processes(_sharding_worker, args=(port(), str(tmp_path), "sharded"), nprocs=2,
                       start_method="spawn")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"sharded-{rank}.json").read_text()) == [0, 10, 20, 30]
    mp.start_processes(_sharding_worker, args=(port(), str(tmp_path), "rank0"), nprocs=2,
                       start_method="spawn")
    assert "Timed out waiting 3000ms" in json.loads((tmp_path / "rank0-1.json").read_text())
    # one process (no process group): the whole list, computed once
    assert train_mod.sharded([1, 2], lambda share: [x + 1 for x in share]) == [2, 3]


def test_fp16_training_stops_when_the_loss_scaler_skips_most_steps():
    """The fp16 check (a CUDA-only path, so with a mocked optimizer): most steps skipped by the
    loss scaler, or weights that never moved, stop training with an error naming the count."""
    from types import SimpleNamespace

    import torch

    from alignkit.train import LossScaleCheck

    model = torch.nn.Linear(3, 2)
    skipped, stepped = SimpleNamespace(step_was_skipped=True), SimpleNamespace(step_was_skipped=False)
    check = LossScaleCheck(after=20)
    check.on_train_begin(None, None, None, model=model)
    for _ in range(19):
        check.on_step_end(None, None, None, optimizer=skipped)  # early steps: not judged yet
    with pytest.raises(RuntimeError, match="skipped 20 of the first 20 optimizer steps"):
        check.on_step_end(None, None, None, optimizer=skipped)
    ok = LossScaleCheck(after=4)
    ok.on_train_begin(None, None, None, model=model)
    for opt in (skipped, skipped, stepped, stepped, stepped):  # the scale calibrating: 2 of 5
        ok.on_step_end(None, None, None, optimizer=opt)
    with pytest.raises(RuntimeError, match="weights did not move in 5 steps"):
        ok.on_train_end(None, None, None, model=model)
    with torch.no_grad():
        model.weight.add_(0.01)
    ok.on_train_end(None, None, None, model=model)  # moved: no error


def test_checkpointing_under_the_installed_transformers_name(monkeypatch):
    """transformers 5.23 renamed TrainingArguments' ``gradient_checkpointing`` to
    ``activation_checkpointing`` (5.17, on GPU images and Colab, has only the old name)."""
    import dataclasses

    from alignkit import train

    @dataclasses.dataclass
    class Old:  # transformers < 5.23
        gradient_checkpointing: bool = False

    @dataclasses.dataclass
    class New:  # 5.23 and later
        activation_checkpointing: bool = False
        gradient_checkpointing: bool = False  # a deprecated alias there

    monkeypatch.setattr(train, "TrainingArguments", Old)
    assert train.checkpointing_argument(True) == {"gradient_checkpointing": True}
    monkeypatch.setattr(train, "TrainingArguments", New)
    assert train.checkpointing_argument(False) == {"activation_checkpointing": False}
