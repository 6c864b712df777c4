"""Injected faults and determinism: SIGKILL mid-training, damaged artifacts, concurrent builds,
unwritable or full output directories, and two runs with one seed giving identical numbers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import smoke_config
from safetensors.torch import load_file

from alignkit import cka, spectral
from alignkit import runs as cache
from alignkit.analyses import behaviour
from alignkit.analyses.common import captures, from_run
from alignkit.data import probe_texts
from alignkit.runs import checkpoint_dir, list_checkpoints, run_dir
from alignkit.tiny import base_dir, ensure_base


def sft_dir(cfg):
    return run_dir(cfg, "sft")

# long enough to kill in the middle: checkpoints at steps 0, 3, 6, 15, 30, 60
OVERRIDES = {"sft.max_steps": 60}
KILL_AFTER = 15
TRAIN = ("import sys; from alignkit.config import get_config; from alignkit.train import train_sft; "
         "train_sft(get_config('tiny', smoke=True, overrides={'root': sys.argv[1], 'sft.max_steps': 60}))")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def killed_and_clean(tmp_path_factory):
    """Two independent pipelines with one seed: one SIGKILLed mid-training and rerun, one not."""
    roots = {k: tmp_path_factory.mktemp(k) for k in ("killed", "clean")}
    cfgs = {k: smoke_config(r, **OVERRIDES) for k, r in roots.items()}
    for c in cfgs.values():  # both bases built here, by one process: identical
        ensure_base(c)
    proc = python(TRAIN, str(roots["killed"]))
    marker = checkpoint_dir(sft_dir(cfgs["killed"]), KILL_AFTER) / "manifest.json"
    deadline = time.time() + 600
    while not marker.is_file():
        assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stdout.read()}"
        assert time.time() < deadline, "no checkpoint to kill after within 10 minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = sft_dir(cfgs["killed"])
    state = {"returncode": proc.returncode, "steps_at_kill": [s for s, _ in list_checkpoints(run)],
             "trainer_states": sorted(p.name for p in (run / "trainer").glob("checkpoint-*")),
             "mtimes": {s: (d / "manifest.json").stat().st_mtime_ns for s, d in list_checkpoints(run)}}
    # resume the killed run and build the clean one in the same environment (one thread each: BLAS
    # may split a reduction differently with another thread count, so only like runs are compared)
    for k in ("killed", "clean"):
        proc = python(TRAIN, str(roots[k]))
        out = proc.communicate()[0]
        assert proc.returncode == 0, f"{k} training failed:\n{out[-3000:]}"
    results = {k: behaviour.ensure(c, from_run(c)) for k, c in cfgs.items()}  # evaluation only
    return cfgs, results, state


def test_sigkill_mid_training_resumes_to_identical_results(killed_and_clean):
    cfgs, results, state = killed_and_clean
    assert state["returncode"] == -signal.SIGKILL
    assert KILL_AFTER in state["steps_at_kill"] and 60 not in state["steps_at_kill"]
    assert f"checkpoint-{KILL_AFTER}" in state["trainer_states"]  # resumable state was on disk
    run = sft_dir(cfgs["killed"])
    for step, mtime in state["mtimes"].items():  # resumed, not restarted: finished checkpoints untouched
        assert (checkpoint_dir(run, step) / "manifest.json").stat().st_mtime_ns == mtime, step
    ckpts = {k: dict(list_checkpoints(sft_dir(c))) for k, c in cfgs.items()}
    assert sorted(ckpts["killed"]) == sorted(ckpts["clean"]) == [0, 3, 6, 15, 30, 60]
    for step in ckpts["clean"]:  # bit-identical weights at every checkpoint (CPU)
        assert cache.weights_hash(ckpts["killed"][step]) == cache.weights_hash(ckpts["clean"][step]), step
    assert not (sft_dir(cfgs["killed"]) / "trainer").exists()  # resume state removed once finished


def test_two_runs_with_one_seed_give_identical_numbers(killed_and_clean):
    cfgs, results, _ = killed_and_clean
    (res_a, table_a), (res_b, table_b) = ((results[k].evals, results[k].table) for k in ("killed", "clean"))
    assert [r.accuracy for r in res_a] == [r.accuracy for r in res_b]
    for ra, rb in zip(res_a, res_b):
        np.testing.assert_allclose(ra.answer_logprob, rb.answer_logprob, rtol=0, atol=1e-6)
    assert [r["index"] for r in table_a.flips] == [r["index"] for r in table_b.flips]
    texts = probe_texts(cfgs["clean"])
    acts = {k: {int(s): a for s, a in captures(c, from_run(c), "mean", texts).items()}
            for k, c in cfgs.items()}
    steps = sorted(acts["clean"])
    for k in acts:
        assert sorted(acts[k]) == steps
    first, last = steps[0], steps[-1]
    curve = {k: cka.layerwise_cka(a[first].acts, a[last].acts) for k, a in acts.items()}
    assert np.all(curve["clean"] < 1)  # the comparison is not trivial
    np.testing.assert_allclose(curve["killed"], curve["clean"], rtol=0, atol=1e-6)
    rank = {k: np.array([spectral.rankme(x) for x in a[last].acts]) for k, a in acts.items()}
    np.testing.assert_allclose(rank["killed"], rank["clean"], rtol=0, atol=1e-6)


def retrain(cfg):
    """Rerun the clean run's training as it was built: in a one-thread process."""
    proc = python(TRAIN, str(cfg.run_root))
    out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]


def test_damaged_final_checkpoint_is_detected_and_rebuilt(killed_and_clean):
    cfg = killed_and_clean[0]["clean"]
    run = sft_dir(cfg)
    final = checkpoint_dir(run, 60)
    good = cache.weights_hash(final)
    weights = next(final.glob("*.safetensors"))
    with open(weights, "r+b") as f:  # truncate the weights
        f.truncate(weights.stat().st_size // 2)
    assert 60 not in dict(list_checkpoints(run))  # never read as valid
    retrain(cfg)
    assert cache.manifest_matches(final) and cache.weights_hash(final) == good


def test_damaged_intermediate_checkpoint_is_detected_and_rebuilt(killed_and_clean):
    cfg = killed_and_clean[0]["clean"]
    run = sft_dir(cfg)
    ckpt = checkpoint_dir(run, 6)
    good = cache.weights_hash(ckpt)
    (ckpt / "manifest.json").write_text("{")  # a damaged manifest
    assert 6 not in dict(list_checkpoints(run))
    retrain(cfg)
    assert [s for s, _ in list_checkpoints(run)] == [0, 3, 6, 15, 30, 60]
    assert cache.weights_hash(ckpt) == good


def test_damaged_base_is_detected_and_rebuilt(smoke_cfg, smoke_base, tmp_path):
    cfg = smoke_config(tmp_path)
    target = base_dir(cfg)
    shutil.copytree(smoke_base, target)
    good = cache.weights_hash(target)
    weights = next(target.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # same size, corrupted tail
    assert not cache.manifest_matches(target)
    assert ensure_base(cfg) == target
    assert cache.manifest_matches(target) and cache.weights_hash(target) == good


def test_two_processes_building_the_same_run_at_once(tmp_path):
    code = ("import sys; from alignkit.config import get_config; from alignkit.train import train_sft; "
            "print(train_sft(get_config('tiny', smoke=True, overrides={'root': sys.argv[1]})))")
    procs = [python(code, str(tmp_path)) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    run = sft_dir(smoke_config(tmp_path))
    assert all(str(run) in o for o in outs)
    assert [s for s, _ in list_checkpoints(run)] == [0, 1, 2, 5, 10, 20]  # every checkpoint complete
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old")]
    assert not leftovers


def test_unwritable_output_directory_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = smoke_config(blocker / "runs")
    t0 = time.time()
    with pytest.raises(OSError, match=r"cannot write to .*a-file/runs.*ALIGNKIT_HOME"):
        ensure_base(cfg)
    assert time.time() - t0 < 5


def test_full_disk_fails_before_any_work(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    with pytest.raises(OSError, match=r"only 0.00 GiB free at .* needed: free some space or point ALIGNKIT_HOME"):
        ensure_base(smoke_config(tmp_path))
    assert not base_dir(smoke_config(tmp_path)).exists()


def test_training_under_accelerate_launch_with_two_processes(smoke_base, smoke_run, tmp_path):
    """Two CPU processes (gloo) stand in for two GPUs: the run trains once, exports once, and its
    checkpoints equal the single-process run's (same global batch: each process takes half);
    DPO's sampled rejected solutions are sharded (each process its share), GRPO's generation batch
    fits two processes."""
    cfg = smoke_config(tmp_path)
    shutil.copytree(smoke_base, base_dir(cfg))  # the base is built beforehand, in one process
    launcher = Path(sys.executable).with_name("accelerate")

    def launch(*args):
        proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "-m",
                               "alignkit", "--smoke", "--seeds", "1", "--root", str(tmp_path), *args], env=ENV,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    assert launch("train", "sft").count("SFT run finished") == 2  # two processes really trained
    assert [s for s, _ in list_checkpoints(sft_dir(cfg))] == [0, 1, 2, 5, 10, 20]
    assert not [p for p in sft_dir(cfg).rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert sft_dir(cfg).name == smoke_run.name  # the same run key: world size is not a knob
    for (step, a), (_, b) in zip(list_checkpoints(sft_dir(cfg)), list_checkpoints(smoke_run)):
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        for k in wa:
            np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), rtol=0, atol=2e-4,
                                       err_msg=f"step {step}, {k}")
    out = launch("--set", "dpo.rejected=sampled", "--set", "dpo.max_steps=2", "--set",
                 "dpo.schedule=[0,1]", "train", "dpo")
    assert out.count("DPO run finished") == 2
    [dpo] = list((tmp_path / "dpo").iterdir())
    # sharded: each process sampled its own contiguous share of the prompts (one cache entry each)
    shares = [json.loads((e / "key.json").read_text())["key"]["prompts"] for e in sorted(dpo.glob("sampled-*"))]
    assert len(shares) == 2 and all(shares) and list_checkpoints(dpo)
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    assert not set(shares[0]) & set(shares[1])
    out = launch("--set", "grpo.max_steps=2", "--set", "grpo.schedule=[0,1]", "train", "grpo")
    assert out.count("GRPO run finished") == 2
