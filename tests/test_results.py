"""Results: every class saves and loads back exactly through the one generic save/load
(``runs.save_result``: arrays to safetensors, the rest to JSON, no pickle); the one content-keyed
cache never reads a stale or damaged entry."""

import json
import logging

import numpy as np
import pytest
import torch
from tiny_models import make_model

from alignkit import runs, spectral, weights
from alignkit.analyses.behaviour import BehaviourResult
from alignkit.analyses.cka import CKAResult
from alignkit.analyses.compare import CompareResult, compare_claims
from alignkit.analyses.patching import PatchingResult
from alignkit.analyses.spectral import SpectralResult
from alignkit.analyses.weights import WeightsResult, structure
from alignkit.evaluate import CheckpointEval, FlipTable
from alignkit.patching import GenerationResult, PatchResult
from alignkit.stats import Band

RNG = np.random.default_rng(0)
L = 5


def band(*shape):
    p = RNG.normal(size=shape)
    return Band(p, p - 0.1, p + 0.1)


def patch_result(n=4, grid=(L,)):
    a = RNG.normal(size=(n, *grid))
    meta = {"sweep": "layer", "layers": list(range(grid[0])), "positions": [1, -1], "min_gap": 0.1}
    return PatchResult(lp_patched=a, delta=a - 1, npe=np.where(a > 0, a, np.nan), kl=abs(a),
                       lp_receiver=RNG.normal(size=n), lp_donor=RNG.normal(size=n),
                       kl_receiver=RNG.random(n), npe_valid=RNG.random(n) > 0.3, meta=meta)


def cka_result():
    return CKAResult(
        steps=[0, 5, 10], labels=["embed", "0", "1", "2", "3"], dropped=[], pooling="mean",
        classic={5: band(L), 10: band(L)}, debiased={5: band(L), 10: band(L)},
        noise_classic=RNG.random(L), noise_debiased=RNG.random(L), matrix=RNG.random((L, L)),
        chance=RNG.random((L, L)), path=[(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)],
        best=np.arange(L), remap=0.4, transition=(2, 1, 3), departure=np.array([-1, 5, 5, 10, 10]),
        alt_pooling="last", alt_labels=["0", "1", "2", "3"], alt_curve=RNG.random(4))


def spectral_result():
    acts = {s: torch.from_numpy(RNG.normal(size=(L, 40, 8))) for s in (0, 10)}
    boot = {s: spectral.bootstrap_layer_metrics(a, alphas=(1.0, 2.0), n_boot=10) for s, a in acts.items()}
    return SpectralResult.from_bootstraps(
        boot, labels=["embed", "0", "1", "2", "3"], dropped=[], pooling="mean", alphas=(1.0, 2.0),
        width=8, ns=[16, 32], rank_vs_n=RNG.random((2, 2, L)), cka_drift=RNG.random(L)), boot


def assert_same(a, b):
    """Dataclass instances equal field by field (arrays exactly, Bands and dicts recursively)."""
    if isinstance(a, dict):
        assert list(a) == list(b)  # the order too: figures and tables follow it
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (Band, PatchResult)) or hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b)
        for f in a.__dataclass_fields__:
            assert_same(getattr(a, f), getattr(b, f))
    elif isinstance(a, list) and a and hasattr(a[0], "__dataclass_fields__"):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, (np.ndarray, np.floating)):
        np.testing.assert_array_equal(a, b)  # NaN equals NaN here
    elif hasattr(a, "equals"):  # DataFrame
        assert a.equals(b) and a.attrs == b.attrs
    else:
        assert a == b, (a, b)


def round_trip(obj, path):
    runs.save_result(obj, path)
    assert not list(path.glob("*.pkl")) and (path / "result.json").is_file()
    return runs.load_result(path)


def test_cka_result_round_trip(tmp_path):
    res = cka_result()
    back = round_trip(res, tmp_path / "r")
    assert_same(res, back)
    assert list(back.classic) == [5, 10]  # integer keys stay integers
    assert back.by_step().shape == (3, L) and np.all(back.by_step()[0] == 1)


def test_spectral_result_round_trip_and_paired_delta(tmp_path):
    res, boot = spectral_result()
    back = round_trip(res, tmp_path / "r")
    assert_same(res, back)
    assert back.alphas == (1.0, 2.0)  # tuples stay tuples
    direct = spectral.paired_delta(boot[10], boot[0])["renyi_2"]
    got = back.delta("renyi_2", 10)
    for k in ("point", "lo", "hi"):
        np.testing.assert_allclose(got[k], direct[k], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back.band("rankme", 10).point, boot[10]["rankme"]["point"])


def test_patching_result_round_trip(tmp_path):
    res = PatchingResult(
        sets={"flips": [{"index": 3, "question": "q", "answer": "a\n#### 1"}], "controls": []},
        labels={"flips": "flips", "controls": "controls (substitute)"}, base_step=0, final_step=10,
        sweeps={"flips/resid/denoise": patch_result()}, by_pos={"all": patch_result()},
        cross={"flips": patch_result(2, (L, L))}, ablation={"flips/revert": patch_result()},
        cka_matrix=RNG.random((L, L)), metric="computed",
        checks={"computed/flips": patch_result(), "answer/flips": patch_result()},
        generation={"flips": GenerationResult(
            correct=RNG.random((1, L)) > 0.5, receiver=np.array([False]), donor=np.array([True]),
            predictions=[[None, "3"] + ["1"] * (L - 2)], outputs=[["x"] * L], meta={"layers": list(range(L))})})
    res.by_pos["all"] = res.sweeps["flips/resid/denoise"]  # one object held twice: stored once
    res.checks["computed/flips"] = res.sweeps["flips/resid/denoise"]
    back = round_trip(res, tmp_path / "r")
    assert_same(res, back)
    assert res.sweep("flips", "resid", "denoise") is res.sweeps["flips/resid/denoise"]


def test_compare_result_round_trip(tmp_path):
    base, tuned = make_model("qwen3", seed=0), make_model("qwen3", seed=1)
    drift = weights.weight_drift(base, tuned, progress=False)
    methods = ["sft", "grpo"]
    own = {m: drift for m in methods}
    values, controls = structure(own, 20, 0, 1e-5)
    w = WeightsResult("base", methods, {"sft": "base", "grpo": "sft"}, own, own, values, controls,
                      {"grpo": 0.25})
    res = CompareResult(
        methods=methods, init={"sft": "base", "grpo": "sft"},
        accuracy={"base": {"step": 0, "accuracy": 0.1}, "sft": {"step": 4, "accuracy": 0.5},
                  "grpo": {"step": 2, "accuracy": 0.4}},
        n_eval=10, pooling="mean", labels=["embed", "0", "1", "2"], dropped=[],
        cka={m: band(4) for m in methods}, cka_floor=RNG.random(4),
        rank_vs_base={m: band(4) for m in methods}, rank_vs_init={m: band(4) for m in methods},
        patch_set="flips", patches={m: patch_result(3, (3,)) for m in methods},
        patch_curves={m: band(3) for m in methods}, weights=w,
        correct={k: [True, False, True] for k in ("base", *methods)},
        last_states={k: RNG.random((6, 4)) for k in ("base", *methods)}, claims=[])
    res.claims = compare_claims([res.last_states], [own], [w.matched_unchanged], res.init, n_boot=10)
    back = round_trip(res, tmp_path / "r")
    assert back.claims[0].sentence() == res.claims[0].sentence()
    assert_same(res, back)
    assert back.weights.drift["sft"]["shape"].iloc[0] == drift["shape"].iloc[0]  # a tuple again
    assert set(back.weights.drift_by_layer()) == {"sft vs base", "grpo vs base", "grpo own update"}
    assert back.gap("sft") == pytest.approx(np.mean(res.patches["sft"].lp_donor - res.patches["sft"].lp_receiver))


def test_behaviour_result_round_trip_and_training_log(tmp_path):
    ev = CheckpointEval(checkpoint=str(tmp_path), step=0, weights_hash="h", key="k", accuracy=0.5, n=2,
                        correct=[True, False], predictions=["1", None], outputs=["1", "x"],
                        answer_logprob=[-1.0, -2.0], mean_answer_logprob=-1.5)
    assert round_trip(ev, tmp_path / "e") == ev
    table = FlipTable(flips=[{"index": 1}], controls=[])
    res = BehaviourResult(["0"], [ev], table, tmp_path)
    assert round_trip(res, tmp_path / "b") == res  # Path fields come back as paths
    assert res.loss() == [] and res.steps == [0] and res.summary()[0]["accuracy"] == 0.5
    (tmp_path / "train_log.json").write_text(json.dumps({"loss": [[1, 2.5], [2, 2.0]]}))
    assert res.loss() == [(1, 2.5), (2, 2.0)]
    assert BehaviourResult(["base"], [ev], table).loss() == []  # given models: no run, no log


def test_save_result_refuses_what_it_cannot_store_and_classes_it_does_not_own(tmp_path):
    with pytest.raises(TypeError, match="cannot save a set at r.x"):
        runs.save_result({"x": {1, 2}}, tmp_path / "a")
    runs.save_result(Band(np.zeros(2), np.zeros(2), np.ones(2)), tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "result.json").read_text())
    meta["__type__"] = "os:system"
    (tmp_path / "b" / "result.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="refusing to build os:system"):
        runs.load_result(tmp_path / "b")


def test_tensors_come_back_exactly_and_memory_mapped(tmp_path):
    import torch as t

    acts = t.randn(3, 5, 4).to(t.bfloat16)
    runs.save_result({"acts": acts, "half": t.ones(2, dtype=t.float16)}, tmp_path / "a")
    back = runs.load_result(tmp_path / "a")
    mapped = runs.load_result(tmp_path / "a", mmap=True)
    assert back["acts"].dtype == t.bfloat16 and t.equal(back["acts"], acts)
    assert t.equal(mapped["acts"], acts) and t.equal(mapped["half"], t.ones(2, dtype=t.float16))


class Counted:
    """A computation whose calls are counted."""

    calls = 0

    @classmethod
    def compute(cls):
        cls.calls += 1
        return {"v": np.array(3.5)}


def test_cache_reuses_and_never_reads_stale_or_damaged(tmp_path, caplog):
    path, key = tmp_path / "stage-x", {"a": 1}
    assert float(runs.cached(path, key, Counted.compute)["v"]) == 3.5
    assert float(runs.cached(path, key, Counted.compute)["v"]) == 3.5 and Counted.calls == 1
    with caplog.at_level(logging.WARNING):
        runs.cached(path, {"a": 2}, Counted.compute)  # another key under that path
        assert Counted.calls == 2 and "stale" in caplog.text
        (path / "result" / "arrays.safetensors").write_bytes(b"damaged")
        runs.cached(path, {"a": 2}, Counted.compute)
        assert Counted.calls == 3 and "damaged" in caplog.text
        data = (path / "result" / "arrays.safetensors").read_bytes()  # a flipped byte, same size
        (path / "result" / "arrays.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        runs.cached(path, {"a": 2}, Counted.compute)
        assert Counted.calls == 4 and "does not match its checksum" in caplog.text
    assert json.loads((path / "key.json").read_text())["key"] == {"a": 2}
    assert not list(tmp_path.glob(".*tmp"))  # no temporary directory left behind


def test_read_only_reads_records_and_never_computes(tmp_path):
    """``runs.read_only``: a cached entry is read and recorded; a missing or stale one raises
    ``NotCached`` naming it, and nothing is written."""
    path, key = tmp_path / "stage-r", {"a": 1}
    runs.cached(path, key, Counted.compute)
    calls = Counted.calls
    with runs.read_only() as read:
        assert float(runs.cached(path, key, Counted.compute)["v"]) == 3.5
        with pytest.raises(runs.NotCached, match="stage-r .*stale"):
            runs.cached(path, {"a": 2}, Counted.compute)
        with pytest.raises(runs.NotCached, match="stage-missing"):
            runs.cached(tmp_path / "stage-missing", key, Counted.compute)
        with pytest.raises(runs.NotCached, match="the SFT run x"):
            runs.check_computable("the SFT run x")
    assert read == [path] and Counted.calls == calls
    assert not (tmp_path / "stage-missing").exists()
    assert json.loads((path / "key.json").read_text())["key"] == key
    runs.check_computable("anything")  # outside read_only: nothing raised
