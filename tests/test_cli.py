"""The headless CLI (``python -m alignkit``) and the cached analyses it shares with the notebooks.

Stages run in-process on the tiny preset in smoke size (the session's smoke run); their artifacts
must load through the notebooks' calls (``alignkit.analyses``) with every expensive function
patched to raise, i.e. without recomputation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import smoke_config

from alignkit import cli, runs
from alignkit.analyses import behaviour, cka, compare, lens, patching, spectral
from alignkit.analyses.common import captures, from_methods, from_run
from alignkit.config import with_values
from alignkit.runs import list_checkpoints
from alignkit.train import train

ROOT = Path(__file__).resolve().parent.parent
PROG = "python -m alignkit: error: "


# ----------------------------------------------------------------------------- help


def _run_help(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "alignkit", *args, "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


def test_top_level_help_subprocess():
    r = _run_help()
    assert r.returncode == 0 and r.stderr == ""
    out = r.stdout
    assert out.startswith("usage: python -m alignkit")
    for cmd in ("train", "evaluate", "capture", "cka", "spectral", "patching", "compare", "figures",
                "all"):
        assert f"\n    {cmd} " in out, cmd
    for opt in ("--preset", "--smoke", "--set KEY=VALUE", "--model PATH", "--data PATH", "--eval-data PATH",
                "--root DIR", "-v, --verbose"):
        assert opt in out, opt
    assert "examples:" in out and "accelerate launch -m alignkit" in out


@pytest.mark.parametrize("cmd", cli.STAGES + ("all",))
def test_subcommand_help_subprocess(cmd):
    r = _run_help(cmd)
    assert r.returncode == 0 and r.stderr == ""
    out = r.stdout
    assert out.startswith(f"usage: python -m alignkit {cmd}")
    assert "examples:\n  python -m alignkit" in out
    assert "--preset NAME" in out and "--set KEY=VALUE" in out and "--root DIR" in out  # global options here too
    if cmd == "train":
        assert "{sft,dpo,grpo}" in out
    elif cmd not in ("figures", "compare"):
        assert "--method {sft,dpo,grpo}" in out


# ----------------------------------------------------------------------------- bad input


def _error(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def test_unknown_preset(capsys, tmp_path):
    rc, err = _error(capsys, ["--preset", "huge", "--root", str(tmp_path / "r"), "cka"])
    assert rc == 2
    assert err == PROG + "unknown preset 'huge'; choose one of ['qwen3-0.6b', 'qwen3-0.6b-base', 'smollm2-135m', 'tiny']\n"
    assert not (tmp_path / "r").exists()  # checked before anything runs


def test_bad_override_key_and_value(capsys, tmp_path):
    rc, err = _error(capsys, ["--root", str(tmp_path), "--set", "sft.max_stepz=3", "train", "sft"])
    assert (rc, err) == (2, PROG + "unknown config key 'sft.max_stepz'\n")
    rc, err = _error(capsys, ["train", "sft", "--set", "sft.max_steps=many"])  # options after the command too
    assert (rc, err) == (2, PROG + "config key 'sft.max_steps' expects int (preset value 400), got 'many'\n")
    rc, err = _error(capsys, ["--set", "sft", "cka"])
    assert (rc, err) == (2, PROG + "--set expects KEY=VALUE, got 'sft'\n")
    rc, err = _error(capsys, ["--set", "sft={}", "cka"])
    assert (rc, err) == (2, PROG + "config key 'sft' is a section; set one of its fields, e.g. sft.max_steps=...\n")
    assert "Traceback" not in err


def test_model_path_that_is_not_a_model(capsys, tmp_path):
    rc, err = _error(capsys, ["--model", str(tmp_path / "nope"), "train", "sft"])
    assert (rc, err) == (2, PROG + f"--model: model directory {tmp_path / 'nope'} does not exist\n")
    d = tmp_path / "m"
    d.mkdir()
    rc, err = _error(capsys, ["--model", str(d), "train", "sft"])
    assert (rc, err) == (2, PROG + f"--model: model directory {d} is missing config.json, weights (*.safetensors or *.bin), a tokenizer (tokenizer.json or tokenizer_config.json)\n")
    (d / "config.json").write_text("{}")
    rc, err = _error(capsys, ["--model", str(d), "train", "sft"])
    assert (rc, err) == (2, PROG + f"--model: model directory {d} is missing weights (*.safetensors or *.bin), a tokenizer (tokenizer.json or tokenizer_config.json)\n")
    (d / "model.safetensors").write_bytes(b"")
    rc, err = _error(capsys, ["--model", str(d), "train", "sft"])
    assert (rc, err) == (2, PROG + f"--model: model directory {d} is missing a tokenizer (tokenizer.json or tokenizer_config.json)\n")
    rc, err = _error(capsys, ["--model", str(d / "config.json"), "train", "sft"])
    assert (rc, err) == (2, PROG + f"--model: {d / 'config.json'} is a file, not a model directory\n")


def test_missing_data_file(capsys, tmp_path):
    rc, err = _error(capsys, ["--data", str(tmp_path / "train.jsonl"), "evaluate"])
    assert (rc, err) == (2, PROG + f"--data {tmp_path / 'train.jsonl'}: no such file\n")
    rc, err = _error(capsys, ["--eval-data", str(tmp_path / "test.jsonl"), "evaluate"])
    assert (rc, err) == (2, PROG + f"--eval-data {tmp_path / 'test.jsonl'}: no such file\n")
    rc, err = _error(capsys, ["--set", f"data_source={tmp_path / 'x.jsonl'}", "evaluate"])
    assert (rc, err) == (2, PROG + f"data_source {tmp_path / 'x.jsonl'}: no such file\n")


def test_only_train_under_a_distributed_launch(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    rc, err = _error(capsys, ["evaluate"])
    assert (rc, err) == (2, PROG + "only `train` runs under a distributed launch (WORLD_SIZE=4); run `evaluate` in "
                                   "one process: python -m alignkit ...\n")


def test_full_size_on_the_cpu_is_warned_before_any_work(caplog):
    """A real preset at full size on the CPU gets a warning with the rehearsal's cost; the
    embedded model, smoke sizes, figures and a GPU do not."""
    import logging

    from alignkit.config import get_config

    caplog.set_level(logging.WARNING, logger="alignkit")
    real = get_config("qwen3-0.6b-base", overrides={"device": "cpu"})
    cli.warn_if_slow(real, "train")
    assert "qwen3-0.6b-base at full size on the CPU" in caplog.text
    assert "so 1000 steps take days" in caplog.text and "benchmarks/RESULTS_real.md" in caplog.text
    caplog.clear()
    for cfg, cmd in ((get_config("tiny"), "train"),
                     (get_config("qwen3-0.6b", smoke=True, overrides={"device": "cpu"}), "all"),
                     (real, "figures"),
                     (get_config("qwen3-0.6b", overrides={"device": "cuda:0"}), "train")):
        cli.warn_if_slow(cfg, cmd)
    assert caplog.text == ""


def test_method_choices_match_the_trainers():
    from alignkit.runs import METHODS

    assert cli.METHODS == METHODS


def test_parse_overrides_types():
    got = cli.parse_overrides(["sft.max_steps=50", "sft.schedule=[0, 0.5, 1]", "sft.learning_rate=1",
                               "eval_source=null", "model=/data/Qwen3-0.6B", "chat=true", "eval.stop=[\"\\n\\n\"]",
                               "tiny.rope_theta=1e6", "preset=tiny"])
    assert got == {"sft.max_steps": 50, "sft.schedule": (0, 0.5, 1), "sft.learning_rate": 1.0, "eval_source": None,
                   "model": "/data/Qwen3-0.6B", "chat": True, "eval.stop": ("\n\n",), "tiny.rope_theta": 1e6,
                   "preset": "tiny"}
    assert isinstance(got["sft.learning_rate"], float) and isinstance(got["sft.schedule"], tuple)
    with pytest.raises(cli.UsageError, match=r"config key 'chat' expects bool \(preset value False\), got 1"):
        cli.parse_overrides(["chat=1"])
    for preset in ("tiny", "qwen3-0.6b"):  # a bool or "auto", whatever the preset's value
        assert cli.parse_overrides(["gradient_checkpointing=auto", "gradient_checkpointing=true"],
                                   preset) == {"gradient_checkpointing": True}
        assert cli.parse_overrides(["gradient_checkpointing=auto"], preset) == {
            "gradient_checkpointing": "auto"}
    for preset in ("tiny", "qwen3-0.6b"):
        for bad in ("yes", "1", '"true"'):
            with pytest.raises(cli.UsageError, match="gradient_checkpointing' expects true, false "
                               "or auto"):
                cli.parse_overrides([f"gradient_checkpointing={bad}"], preset)


# ----------------------------------------------------------------------------- stages (smoke)


def _no_compute(monkeypatch):
    """Make every expensive function raise: what still works was read from the caches."""
    import trl

    from alignkit import capture, controls, evaluate, patching, spectral, tiny, train, weights

    def boom(*a, **k):
        raise AssertionError("recomputed although the result was cached")

    for name in ("SFTTrainer", "DPOTrainer", "GRPOTrainer"):
        monkeypatch.setattr(trl, name, boom)
        monkeypatch.setattr(train, name, boom)
    monkeypatch.setattr(tiny, "Trainer", boom)
    monkeypatch.setattr(evaluate, "generate", boom)
    monkeypatch.setattr(capture, "capture_poolings", boom)
    for mod, names in ((controls, ["bootstrap_layerwise_cka", "noise_floor", "permutation_baseline",
                                   "transition_layer_bootstrap"]),
                       (spectral, ["bootstrap_layer_metrics", "rank_vs_n"]),
                       (weights, ["weight_drift"]),
                       (patching, ["layer_sweep", "cross_layer_sweep", "weight_sweep"])):
        for n in names:
            monkeypatch.setattr(mod, n, boom)


@pytest.fixture(scope="module")
def staged(smoke_root, smoke_run):
    """Every stage through ``cli.main`` on the session's smoke run; returns the argv prefix."""
    argv = ["--smoke", "--root", str(smoke_root), "--seeds", "1"]  # the seed loop: test_seeds_flag
    for stage in (["train", "sft"], ["evaluate"], ["capture"], ["cka"], ["spectral"], ["patching"], ["lens"],
                  ["weights"]):
        assert cli.main(argv + stage) == 0, stage
    return argv


def test_train_stage_reuses_the_run(staged, smoke_cfg, smoke_run, monkeypatch):
    mtimes = {s: (d / "model.safetensors").stat().st_mtime_ns for s, d in list_checkpoints(smoke_run)}
    _no_compute(monkeypatch)
    assert cli.main(staged + ["train", "sft"]) == 0
    assert train(smoke_cfg, "sft") == smoke_run
    assert {s: (d / "model.safetensors").stat().st_mtime_ns for s, d in list_checkpoints(smoke_run)} == mtimes


def test_evaluate_stage_artifacts_load_in_notebook_helpers(staged, smoke_cfg, smoke_run, monkeypatch):
    assert (smoke_run / "flips.json").is_file()
    from alignkit.runs import weights_hash

    distinct = {weights_hash(d) for _, d in list_checkpoints(smoke_run)}  # equal weights: one evaluation
    assert len(list((smoke_cfg.run_root / "evals").glob("eval-*"))) >= len(distinct)
    _no_compute(monkeypatch)
    res = behaviour.ensure(smoke_cfg, from_run(smoke_cfg))  # what notebook 01 calls
    assert res.run_dir == smoke_run and res.steps == [s for s, _ in list_checkpoints(smoke_run)]
    assert all(r.n == smoke_cfg.eval.n_eval for r in res.evals)
    table = json.loads((smoke_run / "flips.json").read_text())
    assert table == {"flips": res.table.flips, "controls": res.table.controls}


def test_capture_stage_fills_the_notebooks_cache(staged, smoke_cfg, smoke_run, monkeypatch):
    from alignkit.data import probe_texts

    texts = probe_texts(smoke_cfg)
    _no_compute(monkeypatch)
    ckpts = from_run(smoke_cfg)
    assert list(ckpts.steps.values()) == [s for s, _ in list_checkpoints(smoke_run)]
    for pooling in ("question", "mean", "last"):  # notebook 02 (all three), 03-05 (question)
        caps = captures(smoke_cfg, ckpts, pooling)
        assert list(caps) == ckpts.labels
        a = caps[ckpts.tuned]
        assert a.acts.shape == (smoke_cfg.tiny.num_hidden_layers + 1, len(texts), smoke_cfg.tiny.hidden_size)
    captures(smoke_cfg, ckpts.pair(ckpts.tuned), "question")  # notebook 04's pair: the same entries


def test_cka_stage_matches_a_direct_computation(staged, smoke_cfg, smoke_run, monkeypatch):
    from alignkit import cka as measure
    from alignkit import controls

    ckpts = from_run(smoke_cfg)
    caps = {ckpts.steps[k]: a for k, a in captures(smoke_cfg, ckpts, "question").items()}
    steps = sorted(caps)
    keep = [i for i, n in enumerate(caps[steps[0]].hook_points)
            if not any(n in a.meta["constant_points"] for a in caps.values())]
    base, final = caps[steps[0]].acts[keep], caps[steps[-1]].acts[keep]
    direct = {"matrix": measure.cka_matrix(base, final), "lw": measure.layerwise_cka(base, final),
              "boot": controls.bootstrap_layerwise_cka(base, caps[steps[1]].acts[keep], n_boot=20, seed=0,
                                                       debiased=True),
              "noise": controls.noise_floor(base, final, n_splits=20, seed=0)}
    _no_compute(monkeypatch)
    res = cka.ensure(smoke_cfg, ckpts)  # notebook 02's call: read, not computed
    assert isinstance(res, cka.CKAResult) and list((smoke_run / "analysis").glob("cka-*"))
    assert res.steps == steps and res.labels[0] == "embed" and len(res.labels) == len(keep)
    np.testing.assert_array_equal(res.matrix, np.asarray(direct["matrix"], dtype=np.float64))
    np.testing.assert_allclose(res.classic[steps[-1]].point, direct["lw"], rtol=0, atol=1e-12)
    for k in ("point", "lo", "hi"):
        np.testing.assert_array_equal(res.debiased[steps[1]][k], direct["boot"][k])
    np.testing.assert_array_equal(res.noise_classic, direct["noise"]["half_width"])
    assert res.path[0] == (0, 0) and res.path[-1] == (len(keep) - 1, len(keep) - 1)
    assert len(res.transition) == 3 and res.departure.shape == (len(keep),)
    assert res.alt_pooling == "last" and res.alt_curve.shape == (len(res.alt_labels),)
    assert cli.main(staged + ["cka"]) == 0  # the stage itself is idempotent


def test_stale_or_damaged_results_are_recomputed(staged, smoke_cfg, smoke_run, caplog):
    ckpts = from_run(smoke_cfg)
    res = cka.ensure(smoke_cfg, ckpts)
    more = with_values(smoke_cfg, {"cka.n_boot": 21})
    other = cka.ensure(more, ckpts)  # other parameters: another key, another file
    assert len(list((smoke_run / "analysis").glob("cka-*"))) == 2
    np.testing.assert_array_equal(other.matrix, res.matrix)
    final = res.steps[-1]
    assert not np.array_equal(other.classic[final].lo, res.classic[final].lo)
    path = next(p for p in (smoke_run / "analysis").glob("cka-*") if p.stat().st_mtime_ns ==
                max(q.stat().st_mtime_ns for q in (smoke_run / "analysis").glob("cka-*")))
    info = json.loads((path / "key.json").read_text())
    info["key"]["params"]["n_boot"] = 999  # a result stored under another key is never read
    (path / "key.json").write_text(json.dumps(info))
    again = cka.ensure(more, ckpts)
    assert "damaged or stale" in caplog.text
    np.testing.assert_array_equal(again.classic[final].lo, other.classic[final].lo)
    with pytest.raises(ValueError, match="unknown config key 'cka.n_bot'"):
        with_values(smoke_cfg, {"cka.n_bot": 21})


def test_spectral_stage_matches_a_direct_computation(staged, smoke_cfg, smoke_run, monkeypatch):
    from alignkit import spectral as measure

    ckpts = from_run(smoke_cfg)
    caps = {ckpts.steps[k]: a for k, a in captures(smoke_cfg, ckpts, "question").items()}
    steps = sorted(caps)
    boot = {s: measure.bootstrap_layer_metrics(caps[s].acts, alphas=(0.5, 1.0, 2.0, float("inf")),
                                               n_boot=20, seed=0) for s in (steps[0], steps[-1])}
    _no_compute(monkeypatch)
    res = spectral.ensure(smoke_cfg, ckpts)  # notebook 03's call
    assert res.steps == steps and res.dropped == [] and res.ns == [16, 32]
    for metric, d in boot[steps[-1]].items():
        for k in ("point", "lo", "hi"):
            np.testing.assert_array_equal(getattr(res, k)[metric][-1], d[k])
        np.testing.assert_array_equal(res.samples[metric][-1], d["samples"])
    np.testing.assert_allclose(res.point["rankme"][0][-1], measure.rankme(caps[steps[0]].acts[-1]),
                               rtol=1e-10)
    delta = measure.paired_delta(boot[steps[-1]], boot[steps[0]])["rankme"]  # as notebook 03 reads it
    for k in ("point", "lo", "hi"):
        np.testing.assert_allclose(res.delta("rankme", steps[-1])[k], delta[k], rtol=0, atol=1e-12)
    assert res.rank_vs_n.shape == (2, 2, len(res.labels))


def test_patching_stage_round_trips_exactly(staged, smoke_cfg, smoke_run, monkeypatch):
    from alignkit import patching as measure
    from alignkit.models import load_model

    ckpts = from_run(smoke_cfg)
    run = behaviour.ensure(smoke_cfg, ckpts)
    sets, labels = behaviour.example_sets(smoke_cfg, run)
    base, tok = load_model(run.evals[0].checkpoint)
    tuned, _ = load_model(run.evals[-1].checkpoint)
    metric = smoke_cfg.patching.metric
    exs = measure.examples_from_table(sets["controls"], tok, metric=metric)
    direct = measure.layer_sweep(base, tuned, tok, exs, component="mlp", direction="noise", batch_size=8,
                                 progress=False, metric=metric)
    _no_compute(monkeypatch)
    res = patching.ensure(smoke_cfg, ckpts)  # notebook 04's call
    assert res.sets == sets and res.labels == labels
    L = smoke_cfg.tiny.num_hidden_layers
    assert set(res.sweeps) == {f"{s}/{c}/{d}" for s in ("flips", "controls") for c in ("resid", "attn", "mlp")
                               for d in ("denoise", "noise")}
    got = res.sweep("controls", "mlp", "noise")
    assert isinstance(got, measure.PatchResult) and got.delta.shape == (len(exs), L)
    for f in ("lp_patched", "delta", "npe", "kl", "lp_receiver", "lp_donor", "npe_valid"):
        np.testing.assert_array_equal(getattr(got, f), getattr(direct, f))
    assert got.meta == direct.meta
    assert list(res.by_pos) == ["all", "prompt", "answer"]
    assert res.cross["flips"].delta.shape == (4, L, L) and res.cka_matrix.shape == (L, L)
    assert set(res.ablation) == {f"{s}/{k}" for s in ("flips", "controls") for k in ("revert", "graft", "mean_diff")} | {
        f"flips/{k}@{q}" for k in ("mean_diff", "noise") for q in ("prompt", "answer")}
    assert res.metric == metric
    np.testing.assert_array_equal(res.checks[f"{metric}/flips"].lp_patched, res.sweep().lp_patched)
    assert {k.split("/")[0] for k in res.checks} <= {"answer", "computed", "copy"} and "answer/flips" in res.checks
    n_gen = smoke_cfg.patching.n_generate
    assert set(res.generation) == {"flips", "controls"} and res.generation["flips"].correct.shape[1] == L
    assert len(res.generation["flips"].correct) == min(n_gen, len(res.sets["flips"]))


def test_lens_stage_round_trips_exactly(staged, smoke_cfg, smoke_run, monkeypatch):
    from alignkit import lens as measure
    from alignkit import patching as sweeps
    from alignkit.models import load_model

    ckpts = from_run(smoke_cfg)
    run = behaviour.ensure(smoke_cfg, ckpts)
    sets, labels = behaviour.example_sets(smoke_cfg, run)
    base, tok = load_model(run.evals[0].checkpoint)
    tuned, _ = load_model(run.evals[-1].checkpoint)
    exs = sweeps.examples_from_table(sets["flips"], tok, metric=smoke_cfg.patching.metric)
    kw = dict(positions="answer", batch_size=8, progress=False, metric=smoke_cfg.patching.metric)
    held, fit = exs[0::2], exs[1::2]  # the first half steered with the second half's difference
    v = sweeps.mean_difference(base, tuned, tok, fit, **kw)
    vecs = np.concatenate([v[None], sweeps.random_directions(v, smoke_cfg.lens.n_random, seed=0)])
    direct = sweeps.steer_sweep(base, tuned, tok, held, vecs, **kw)
    diff = sweeps.mean_difference(base, tuned, tok, exs, positions=list(range(5)), batch_size=8, progress=False,
                                  metric=smoke_cfg.patching.metric)
    _no_compute(monkeypatch)
    monkeypatch.setattr(measure, "token_kl", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    res = lens.ensure(smoke_cfg, ckpts)  # notebook 04's call, read from the CLI's cache
    assert res.label == labels["flips"] and list(res.positions) == ["first", "answer"]
    np.testing.assert_array_equal(res.steer["answer"].lp_patched[: len(held)], direct.lp_patched)
    assert res.steer["answer"].delta.shape[:2] == (len(exs), 1 + smoke_cfg.lens.n_random)
    np.testing.assert_array_equal(res.diff["first"], diff)
    L = smoke_cfg.tiny.num_hidden_layers
    assert res.diff["answer"].shape == (L, smoke_cfg.tiny.hidden_size)
    assert len(res.tokens["first"]["base"]) == L and len(res.tokens["answer"]["tuned"][0]["promoted"]) == 10
    assert len(res.token_kl) == len(res.texts) == len(res.n_prompt) == min(8, len(exs))
    assert all(len(k) == len(tok(t, add_special_tokens=False)["input_ids"]) for k, t in zip(res.token_kl, res.texts))
    assert res.ranked[0]["kl"] == max(k.max() for k in res.token_kl)
    text = lens.summarize([res, res], smoke_cfg)
    assert "Steering at the first tokens" in text and "Per-token KL" in text and "in all 2 seeds" in text
    assert "held out, the two halves' differences share per seed" in text
    assert res.readout["answer"]["random"].shape == (smoke_cfg.lens.n_random, L)


def test_lens_at_some_layers_equals_the_full_lens_there(staged, smoke_cfg, smoke_run):
    """``lens.steer_layers`` (one config field, ``--set lens.steer_layers=[0,2]``) steers at those
    decoder layers only: the same numbers as the full lens there, reported and drawn at their own
    layers."""
    import matplotlib.pyplot as plt

    from alignkit import plots

    ckpts = from_run(smoke_cfg)
    full = lens.ensure(smoke_cfg, ckpts)
    assert cli.main(staged + ["lens", "--set", "lens.steer_layers=[0, 2]"]) == 0
    sub = lens.ensure(with_values(smoke_cfg, {"lens.steer_layers": [0, 2]}), ckpts)  # the CLI's
    for name in ("first", "answer"):
        np.testing.assert_array_equal(sub.steer[name].delta, full.steer[name].delta[..., [0, 2]])
        assert list(sub.steer[name].meta["layers"]) == [0, 2]
        st = sub.steering(name, 50)
        assert list(st["layers"]) == [0, 2] and st["peak"] == [0, 2][st["at"]]
        np.testing.assert_array_equal(sub.diff[name], full.diff[name])
    assert "Steering at the positions predicting the scored tokens" in lens.summarize([sub])
    # results are keyed by the layers steered, however named: every layer by list = steer_every 1
    assert lens.steer_layers(smoke_cfg.lens, 4) == [0, 1, 2, 3]
    assert lens.steer_layers(with_values(smoke_cfg, {"lens.steer_every": 2}).lens, 4) == [1, 3]
    with runs.read_only() as read:
        named = lens.ensure(with_values(smoke_cfg, {"lens.steer_layers": [0, 1, 2, 3]}), ckpts)
    assert read[-1].name.startswith("lens-")  # found, not computed (read-only)
    np.testing.assert_array_equal(named.steer["answer"].delta, full.steer["answer"].delta)
    fig = plots.plot_steering([sub.steering("answer", 50)])
    assert list(fig.axes[0].lines[0].get_xdata()) == [0, 2]
    plt.close(fig)


def test_a_knob_is_one_field_settable_everywhere(capsys):
    """Every analysis knob is a config field: ``--set`` takes it, typed like its default."""
    assert cli.parse_overrides(["lens.steer_layers=[0, 4]", "cka.n_boot=500", "patching.min_gap=1"]) == {
        "lens.steer_layers": [0, 4], "cka.n_boot": 500, "patching.min_gap": 1.0}
    rc, err = _error(capsys, ["--set", "cka.n_boot=many", "cka"])
    assert (rc, err) == (2, PROG + "config key 'cka.n_boot' expects int (preset value 200), got 'many'\n")


def test_figures_runs_a_notebook_on_the_cached_results(staged, smoke_root, smoke_run):
    analysis = {p: p.stat().st_mtime_ns for p in (smoke_run / "analysis").iterdir()}
    acts = {p: p.stat().st_mtime_ns for p in (smoke_root / "activations").iterdir()}
    assert cli.main(staged + ["figures", "--notebooks", "03"]) == 0
    out = smoke_root / "reports" / "tiny-smoke" / "03_spectral.ipynb"
    nb = json.loads(out.read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and f"'root': '{smoke_root.resolve()}'" in "".join(injected[0]["source"])
    pngs = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) >= 4  # ranks, Rényi deltas, rank vs n, scatter, static explorer
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # the notebook read the CLI's captures and spectral result instead of computing new ones
    assert {p: p.stat().st_mtime_ns for p in (smoke_run / "analysis").iterdir()} == analysis
    assert {p: p.stat().st_mtime_ns for p in (smoke_root / "activations").iterdir()} == acts


# ----------------------------------------------------------------------------- local model and data


def test_local_model_and_jsonl_fully_offline(tmp_path, smoke_base, monkeypatch):
    from alignkit.data import eval_set, generate_problems

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for path, rows in ((train_file, generate_problems(32, "train")), (test_file, generate_problems(16, "test"))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "runs"
    monkeypatch.chdir(smoke_base.parent)  # a relative --model path is resolved
    argv = ["--smoke", "--root", str(root), "--model", smoke_base.name, "--data", str(train_file), "--eval-data", str(test_file),
            "--set", "sft.max_steps=2", "--set", "sft.n_train=32", "--set", "sft.batch_size=8",
            "--set", "eval.n_eval=16", "--set", "eval.max_new_tokens=16"]
    assert cli.main(argv + ["evaluate"]) == 0
    assert cli.main(argv + ["cka"]) == 0
    cfg = smoke_config(root, model=str(smoke_base.resolve()), data_source=str(train_file.resolve()),
                       eval_source=str(test_file.resolve()),
                       **{"sft.max_steps": 2, "sft.n_train": 32, "sft.batch_size": 8, "eval.n_eval": 16,
                          "eval.max_new_tokens": 16})
    run_dir = train(cfg, "sft")
    assert run_dir.parent == root / "sft" and not (root / "base").exists()  # no embedded base was built
    ckpts = list_checkpoints(run_dir)
    manifest = json.loads((ckpts[0][1] / "manifest.json").read_text())
    assert manifest["base"] == str(smoke_base.resolve()) and [s for s, _ in ckpts] == [0, 1, 2]
    assert eval_set(cfg)["question"] == [json.loads(l)["question"] for l in test_file.read_text().splitlines()]
    res = cka.ensure(cfg, from_run(cfg))
    assert res.steps == [0, 1, 2] and res.matrix.shape == (len(res.labels),) * 2


# ----------------------------------------------------------------------------- DPO and GRPO


def test_dpo_and_grpo_stages(staged, smoke_cfg, smoke_run, monkeypatch):
    from alignkit.runs import run_dir

    for method in ("dpo", "grpo"):
        assert cli.main(staged + ["train", method]) == 0
    assert cli.main(staged + ["evaluate", "--method", "dpo"]) == 0
    assert cli.main(staged + ["cka", "--method", "dpo"]) == 0
    assert cli.main(staged + ["spectral", "--method", "grpo"]) == 0
    sft_final = json.loads((list_checkpoints(smoke_run)[-1][1] / "manifest.json").read_text())["weights_hash"]
    for method in ("dpo", "grpo"):
        rdir = run_dir(smoke_cfg, method)
        assert rdir.parent.name == method and train(smoke_cfg, method) == rdir
        step0 = json.loads((list_checkpoints(rdir)[0][1] / "manifest.json").read_text())
        assert step0["weights_hash"] == sft_final  # both start from the final SFT checkpoint
    _no_compute(monkeypatch)
    res = cka.ensure(smoke_cfg, from_run(smoke_cfg, "dpo"))
    assert res.steps == [s for s, _ in list_checkpoints(run_dir(smoke_cfg, "dpo"))]
    assert (run_dir(smoke_cfg, "dpo") / "analysis").is_dir()
    assert spectral.ensure(smoke_cfg, from_run(smoke_cfg, "grpo")).steps[0] == 0
    assert len(behaviour.ensure(smoke_cfg, from_run(smoke_cfg, "dpo")).evals) == len(res.steps)


def test_compare_stage_then_every_stage_is_cached(staged, smoke_cfg, monkeypatch):
    assert cli.main(staged + ["compare"]) == 0
    first = compare.ensure(smoke_cfg, from_methods(smoke_cfg))
    _no_compute(monkeypatch)
    res = compare.ensure(smoke_cfg, from_methods(smoke_cfg))  # notebook 05's call: read, not computed
    assert isinstance(res, compare.CompareResult) and res.methods == ["sft", "dpo", "grpo"]
    assert res.init == {"sft": "base", "dpo": "sft", "grpo": "sft"}
    for m in ("dpo", "grpo"):  # the size control of the sparsity claim, per tensor
        shares = res.weights.own["sft"][f"unchanged_bf16_at_{m}"]
        assert shares.notna().all() and shares.between(0, 1).all()
    for m in res.methods:
        np.testing.assert_array_equal(res.cka[m].point, first.cka[m].point)
        np.testing.assert_array_equal(res.patches[m].delta, first.patches[m].delta)
        assert res.weights.own[m].equals(first.weights.own[m])
        assert res.weights.own[m].attrs == first.weights.own[m].attrs
    assert res.weights.structure_controls == first.weights.structure_controls
    assert cli.main(staged + ["all", "--skip", "figures"]) == 0  # every stage cached: nothing recomputed


def test_seeds_flag_runs_every_stage_once_per_training_seed(capsys, monkeypatch, tmp_path):
    import alignkit.analyses.common as common_mod
    import alignkit.train as train_mod

    args = cli.build_parser().parse_args(["--smoke", "--seeds", "3", "train", "sft"])
    cfg, overrides = cli.config_from_args(args)
    assert cfg.n_seeds == 3 and overrides["n_seeds"] == 3  # figures pass it to the notebooks
    trained = []
    monkeypatch.setattr(train_mod, "train", lambda c, m: trained.append((m, c.sft.seed)) or tmp_path)
    cli.stage_train(cfg, "sft")
    assert trained == [("sft", 0), ("sft", 1), ("sft", 2)]
    seen = []
    monkeypatch.setattr(common_mod, "checkpoints", lambda c, m: m)
    monkeypatch.setattr(cka, "ensure", lambda c, ckpts: seen.append((c.sft.seed, ckpts)) or c.sft.seed)
    monkeypatch.setattr(cka, "summarize", lambda res, cfg=None: f"{len(res)} results")
    assert cli.stage_analysis("cka", cfg, "sft") == [0, 1, 2]
    assert seen == [(0, "sft"), (1, "sft"), (2, "sft")]
    capsys.readouterr()  # the seeds' progress bar
    rc, err = _error(capsys, ["--seeds", "0", "train", "sft"])
    assert (rc, err) == (2, PROG + "--seeds must be at least 1, got 0\n")
