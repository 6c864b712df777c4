"""The real-size benchmark's machinery (benchmarks/bench_scale.py) on a tiny config.

Runs the quick mode's functions end to end (every stage in its own subprocess) on a 2-layer
Qwen3 of width 64 with the real vocabulary size, then checks the per-stage report and that the
float16 memory-mapped capture equals a float32 capture of the same model within fp16 rounding.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_scale  # noqa: E402

TINY = dict(bench_scale.QWEN3_06B, num_hidden_layers=2, max_window_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2)


def _mapped_files(ptr: int) -> list[str]:
    """Paths of the file mappings of this process that contain address ``ptr`` (/proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi and len(parts) == 6:
            out.append(parts[5].strip())
    return out


def test_scatter_vocab_keeps_the_split_and_spans_the_vocabulary():
    from alignkit.tiny import train_tokenizer

    texts = bench_scale.probe_texts(bench_scale.Spec(n_texts=20))
    small = train_tokenizer(texts, 1000)
    big = bench_scale.scatter_vocab(small, 151936, seed=0)
    assert len(big) == 151936 and sorted(big.get_vocab().values()) == list(range(151936))
    ids_small = small(texts, add_special_tokens=False)["input_ids"]
    ids_big = big(texts, add_special_tokens=False)["input_ids"]
    for a, b in zip(ids_small, ids_big):  # same tokens, new ids
        assert small.convert_ids_to_tokens(a) == big.convert_ids_to_tokens(b)
    assert max(max(b) for b in ids_big) > 10 * len(small)  # ids really spread over the range
    assert big.decode(ids_big[0]) == texts[0]
    assert big.convert_ids_to_tokens(big.eos_token_id) == small.eos_token
    with pytest.raises(ValueError, match="more than vocab_size=10"):
        bench_scale.scatter_vocab(small, 10)


def test_quick_pipeline_on_a_tiny_config(tmp_path):
    from alignkit.capture import capture
    from alignkit.models import load_model
    from alignkit.runs import load_entry

    spec = bench_scale.quick_spec(model=TINY, n_texts=12, n_patch=2, n_boot=4, threads=1, tokenizer_corpus=300)
    rep = bench_scale.run(spec, tmp_path)
    stages = rep["stages"]
    assert list(stages) == ["build"] + bench_scale.ANALYSIS
    for name, s in stages.items():
        # every stage ran in its own process and reports wall time and its own peak memory
        assert 0 < s["work_s"] <= s["wall_s"], name
        assert 0.1 < s["peak_rss_gib"] < 8, name  # a Python + torch process is > 100 MB
        # wait4's ru_maxrss also counts the (here: pytest's) parent's peak at spawn: never below VmHWM
        assert s["ru_maxrss_gib"] >= s["peak_rss_gib"] * 0.99, name
        assert all(p["s"] >= 0 and p["rss_gib"] > 0 for p in s.get("phases", [])), name
    assert rep["analysis_wall_s"] == pytest.approx(sum(stages[n]["wall_s"] for n in bench_scale.ANALYSIS))
    assert rep["max_peak_rss_gib"] == max(stages[n]["peak_rss_gib"] for n in bench_scale.ANALYSIS)
    assert stages["cka"]["shape"] == [3, 3] and stages["cka"]["diag_first"] == pytest.approx(1.0)
    assert stages["patching"]["n_examples"] == 2 and stages["patching"]["n_layers"] == 2
    assert stages["capture:base"]["vocab"] == 151936
    md = bench_scale.report_markdown(rep)
    assert "| capture:base |" in md and "not run (no GPU lent to this task)" in md

    # the stored capture: float16 on disk, memory-mapped from the cache file, equal to float32
    base_dir = bench_scale.model_dirs(spec, tmp_path)[0]
    entry = bench_scale._acts_entry(tmp_path, "base")
    acts16 = load_entry(entry, mmap=True)
    assert acts16.acts.dtype == torch.float16 and list(acts16.acts.shape) == [3, 12, 64]
    assert str((entry / "result" / "arrays.safetensors").resolve()) in _mapped_files(acts16.acts.data_ptr())
    model, tok = load_model(base_dir)
    texts = bench_scale.probe_texts(spec)
    acts32 = capture(model, tok, texts, pooling="mean", dtype=torch.float32)
    x16, x32 = acts16.acts.double(), acts32.acts.double()
    err = (x16 - x32).abs()
    assert float(err.max()) > 0  # really rounded to fp16
    # round-to-nearest float16: error <= half an ulp, 2^-11 relative (normal range)
    assert bool((err <= x32.abs() * 2.0**-11 + 2.0**-25).all()), float((err / x32.abs()).max())
    assert np.isfinite(acts16.acts.float().numpy()).all()


def test_bootstrap_eig_workers_same_result_and_threads_restored(monkeypatch):
    # the spectral stage runs bootstrap_layer_metrics(eig_workers=2): same numbers as the default path
    from alignkit import spectral

    g = torch.Generator().manual_seed(0)
    acts = torch.randn(3, 64, 32, generator=g) @ torch.randn(32, 32, generator=g)  # n > d: covariance path
    wide = torch.randn(2, 40, 96, generator=g)  # m < d: Gram path
    threads = torch.get_num_threads()
    monkeypatch.setattr(spectral, "_BOOT_BUDGET", 8 * 51 * 51 * 4)  # several chunks of resamples per layer
    for x in (acts, wide):
        ref = spectral.bootstrap_layer_metrics(x, n_boot=30, seed=1)
        par = spectral.bootstrap_layer_metrics(x, n_boot=30, seed=1, eig_workers=3)
        assert torch.get_num_threads() == threads
        for key in ref:
            np.testing.assert_allclose(par[key]["samples"], ref[key]["samples"], rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(par[key]["lo"], ref[key]["lo"], rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(par[key]["point"], ref[key]["point"], rtol=1e-10, atol=1e-10)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"eig_workers must be a positive int, got {bad!r}"):
            spectral.bootstrap_layer_metrics(acts, n_boot=4, eig_workers=bad)


def test_compare_mode_on_a_tiny_config(tmp_path):
    """``--compare``: the CLI's compare calls on the two built models in their own process, with its
    time, peak memory and phases in the report."""
    spec = bench_scale.quick_spec(model=TINY, n_texts=12, threads=1, tokenizer_corpus=300, compare_eval=8,
                                  compare_new_tokens=4, compare_patch=2, patch_batch=2)
    rep = bench_scale.run_compare(spec, tmp_path)
    c = rep["stages"]["compare"]
    assert 0 < c["work_s"] <= c["wall_s"] and 0.1 < c["peak_rss_gib"] < 8
    assert c["n_eval"] == 8 and c["n_patch"] == 2 and c["n_layers"] == 2 and c["n_probes"] == 8
    assert [p["phase"].split(" ")[0] for p in c["phases"]] == [
        "imports", "cka.ensure_cross", "compare.ensure", "lens.ensure"]
    assert np.isfinite(c["kl_mean"]) and c["drift_tensors"] > 2
    md = bench_scale.compare_markdown(rep)
    assert "| compare |" in md and "peak" in md and "lens.ensure" in md
