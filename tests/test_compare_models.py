"""``compare --models``: notebook 05's comparison of any checkpoints, without training. It must give
the SFT run's own analysis when handed that run's base and final checkpoint, run on every
supported decoder family, and refuse mismatched models before any work."""

import copy

import numpy as np
import pytest
import torch
from tiny_models import ARCHS, make_model, make_unsupported

from alignkit import cli, runs
from alignkit.analyses import behaviour, cka, compare, lens, patching, spectral
from alignkit.analyses.common import from_models, from_run
from alignkit.config import with_values
from alignkit.data import generate_problems
from alignkit.tiny import train_tokenizer


def test_own_checkpoints_reproduce_the_runs_analysis(smoke_cfg, smoke_run):
    ckpts = from_run(smoke_cfg)
    run = behaviour.ensure(smoke_cfg, ckpts)
    base, final = run.evals[0].checkpoint, run.evals[-1].checkpoint
    res = compare.ensure(smoke_cfg, from_models(smoke_cfg, {"base": base, "sft": final}))
    assert res.methods == ["sft"] and res.init == {"sft": "base"}
    assert res.accuracy["sft"]["accuracy"] == run.summary()[-1]["accuracy"]
    assert res.correct["base"] == list(run.evals[0].correct)
    # CKA: the point of the final checkpoint's layerwise curve (the same probes and pooling)
    own = cka.ensure(smoke_cfg, ckpts)
    idx = [own.labels.index(lab) for lab in res.labels]
    np.testing.assert_allclose(res.cka["sft"].point, own.classic[run.steps[-1]].point[idx], rtol=0, atol=1e-6)
    # effective rank: the paired Δ RankMe of the final checkpoint against the base
    spec = spectral.ensure(smoke_cfg, ckpts)
    d = spec.delta("rankme", run.steps[-1])
    np.testing.assert_allclose(res.rank_vs_base["sft"].point, d["point"][idx], rtol=0, atol=1e-6)
    # patching: the resid denoise sweep on the same flips
    pat = patching.ensure(smoke_cfg, ckpts)
    np.testing.assert_allclose(res.patches["sft"].delta, pat.sweep("flips", "resid", "denoise").delta, rtol=0,
                               atol=1e-6)
    again = compare.ensure(smoke_cfg, from_models(smoke_cfg, {"base": base, "sft": final}))  # cached
    np.testing.assert_array_equal(again.cka["sft"].point, res.cka["sft"].point)


@pytest.fixture(scope="module")
def family_tok():
    return train_tokenizer([p["question"] + "\n" + p["answer"] for p in generate_problems(300, "train")], 300)


def save_pair(arch, tok, where, seed=1):
    """A random model of ``arch`` and a perturbed copy (decoder layers only), saved with ``tok``."""
    base = make_model(arch, vocab_size=len(tok))
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if ".layers." in n or ".h." in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = {}
    for name, m in (("base", base), ("tuned", tuned)):
        m.generation_config.eos_token_id = tok.eos_token_id
        m.generation_config.pad_token_id = tok.pad_token_id
        m.save_pretrained(where / f"{arch}-{name}")
        tok.save_pretrained(where / f"{arch}-{name}")
        out[name] = where / f"{arch}-{name}"
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_whole_comparison_on_every_family(arch, family_tok, tmp_path, smoke_cfg):
    import dataclasses

    cfg = dataclasses.replace(smoke_cfg, root=str(tmp_path / "runs"))
    cfg.eval = dataclasses.replace(cfg.eval, n_eval=16, max_new_tokens=8)
    pair = save_pair(arch, family_tok, tmp_path)
    cfg = with_values(cfg, {"compare.n_boot": 5, "compare.n_splits": 2, "compare.n_boot_patch": 5})
    res = compare.ensure(cfg, from_models(cfg, {"base": str(pair["base"]), "sft": str(pair["tuned"])}))
    L = 3
    assert res.cka["sft"].point.shape == (len(res.labels),) and np.isfinite(res.cka["sft"].point).all()
    assert (res.cka["sft"].point < 1 - 1e-6).any()  # the perturbed layers moved
    assert res.patches["sft"].delta.shape[1] == L and np.isfinite(res.patches["sft"].delta).all()
    moved = res.weights.drift["sft"][res.weights.drift["sft"]["layer"].between(0, L - 1)]
    assert (moved["rel_change"] > 0).all() and len(moved) > 0
    assert np.isfinite(res.rank_vs_base["sft"].point).all()


def test_mismatched_models_are_refused_before_any_work(family_tok, tmp_path, smoke_cfg, monkeypatch):
    import dataclasses

    from alignkit import evaluate

    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work began")))
    cfg = dataclasses.replace(smoke_cfg, root=str(tmp_path / "runs"))
    pair = save_pair("qwen3", family_tok, tmp_path)
    other_tok = train_tokenizer([p["question"] for p in generate_problems(100, "train")], 300)
    odd = tmp_path / "other-tok"
    make_model("qwen3", vocab_size=len(other_tok)).save_pretrained(odd)
    other_tok.save_pretrained(odd)
    with pytest.raises(ValueError, match="sft and the reference base: tokenizers differ"):
        from_models(cfg, {"base": str(pair["base"]), "sft": str(odd)})
    deeper = tmp_path / "deeper"
    make_model("qwen3", vocab_size=len(family_tok), num_hidden_layers=4).save_pretrained(deeper)
    family_tok.save_pretrained(deeper)
    with pytest.raises(ValueError, match="config.num_hidden_layers: 3 vs 4"):
        from_models(cfg, {"base": str(pair["base"]), "sft": str(deeper)})
    bloom = tmp_path / "bloom"
    make_unsupported(len(family_tok)).save_pretrained(bloom)
    family_tok.save_pretrained(bloom)
    with pytest.raises(NotImplementedError, match=r"BloomForCausalLM \(model_type 'bloom'\)"):
        from_models(cfg, {"base": str(pair["base"]), "sft": str(bloom)})
    with pytest.raises(ValueError, match="could not fetch no-such/model@main"):
        from_models(cfg, {"base": str(pair["base"]), "sft": "no-such/model"})
    with pytest.raises(ValueError, match="at least one other model"):
        from_models(cfg, {"base": str(pair["base"])})
    assert cli.main(["--smoke", "--root", str(tmp_path), "compare", "--models", "base"]) == 2


def test_cross_layer_cka_runs_across_depths_and_families(family_tok, tmp_path, smoke_cfg, caplog):
    """Cross-layer CKA needs one tokenizer, not one shape: a deeper model and another family are
    compared with the reference layer by layer; a copy of the reference matches itself on the
    diagonal; the CLI runs what the shapes allow and names what it skips."""
    import dataclasses
    import logging

    from alignkit import plots

    cfg = dataclasses.replace(smoke_cfg, root=str(tmp_path / "runs"))
    cfg.eval = dataclasses.replace(cfg.eval, n_eval=16, max_new_tokens=8)
    pair = save_pair("qwen3", family_tok, tmp_path)
    deeper = tmp_path / "deeper"
    make_model("qwen3", vocab_size=len(family_tok), num_hidden_layers=4).save_pretrained(deeper)
    family_tok.save_pretrained(deeper)
    llama = tmp_path / "llama"
    make_model("llama", vocab_size=len(family_tok)).save_pretrained(llama)
    family_tok.save_pretrained(llama)
    models = {"base": str(pair["base"]), "same": str(pair["base"]), "deeper": str(deeper), "llama": str(llama)}
    cfg = with_values(cfg, {"cka.n_boot": 10, "cka.n_perm": 2})
    res = cka.ensure_cross(cfg, from_models(cfg, models, same_shape=False))
    assert res.models == ["same", "deeper", "llama"]
    assert res.shape["same"] == [] and res.shape["deeper"] == ["num_hidden_layers", "layer_types"]
    assert res.shape["llama"][0] == "architectures"
    assert res.cka["deeper"].shape == (4, 5) and res.cka["llama"].shape == (4, 4)
    np.testing.assert_allclose(np.diag(res.cka["same"]), 1, atol=1e-6)
    assert (res.best["same"] == np.arange(4)).all()
    for m in res.models:
        assert np.isfinite(res.cka[m]).all() and (res.lo[m] <= res.cka[m] + 1e-12).all()
        assert res.ties[m][res.best[m], np.arange(res.cka[m].shape[1])].all()
        assert res.chance[m].shape == res.cka[m].shape
    text = cka.summarize_cross(res)
    assert ("**deeper** (5 hook points against the reference's 4; differs from the reference in num_hidden_layers, "
            "layer_types)") in text
    fig = plots.plot_cross_cka(res, "deeper")
    assert fig.axes[0].get_xlabel() == "deeper layer (differs in num_hidden_layers, layer_types)"
    again = cka.ensure_cross(cfg, from_models(cfg, models, same_shape=False))  # from the cache
    np.testing.assert_array_equal(again.cka["deeper"], res.cka["deeper"])
    argv = ["--smoke", "--root", str(tmp_path / "runs"), "--set", "eval.n_eval=16", "--set", "eval.max_new_tokens=8",
            "compare", "--models", f"base={pair['base']}", f"deeper={deeper}"]
    with caplog.at_level(logging.INFO, logger="alignkit.cli"):
        assert cli.main(argv) == 0
    assert "Cross-layer CKA" in caplog.text and "Accuracy (95 % Wilson)" in caplog.text
    assert "need the reference's shape: deeper differs in num_hidden_layers" in caplog.text
    assert not list((tmp_path / "runs" / "models").glob("compare-*"))  # nothing same-layer was run
    # a pair labelled otherwise than sft / dpo / grpo: compared, no published claim tested
    cfg = with_values(cfg, {"compare.n_boot": 5, "compare.n_splits": 2, "compare.n_boot_patch": 5})
    res = compare.ensure(cfg, from_models(cfg, {"base": str(pair["base"]), "tuned": str(pair["tuned"])}))
    assert res.methods == ["tuned"] and res.claims == []
    assert "None tested: each claim is about a named stage" in compare.summarize([res])


def test_notebook_05_draws_any_checkpoints(smoke_cfg, smoke_run):
    """Notebook 05 with MODELS set: the same atlas for the given checkpoints, nothing trained."""
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    run = behaviour.ensure(smoke_cfg, from_run(smoke_cfg))
    models = {"base": run.evals[0].checkpoint, "sft": run.evals[-1].checkpoint}
    path = Path(__file__).resolve().parent.parent / "notebooks" / "05_post_training_compare.ipynb"
    nb = nbformat.read(path, as_version=4)
    cli.inject_parameters(nb, "tiny", {"root": str(smoke_cfg.run_root)})
    nb.cells.insert(3, nbformat.v4.new_code_cell(f"MODELS = {models!r}"))
    assert "parameters" in nb.cells[1].metadata.get("tags", []) or "parameters" in nb.cells[2].metadata.get("tags", [])
    def trained():
        return sorted(str(p) for m in ("sft", "dpo", "grpo") for p in (smoke_cfg.run_root / m).glob("tiny*"))

    runs_before = trained()
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute(
        env={**__import__("os").environ, "ALIGNKIT_SMOKE": "1", "ALIGNKIT_STATIC": "1"})
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) >= 6
    shown = "".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells for o in c.get("outputs", []))
    assert "Cross-layer CKA on" in shown and "**sft**" in shown  # §8: cross-layer CKA and the lens
    assert "Per-token KL" in shown
    assert trained() == runs_before  # nothing trained


def test_cli_compare_models_with_what_changed(smoke_cfg, smoke_run, caplog):
    """``python -m alignkit compare --models``: the comparison and each model's difference lens,
    the run's own lens on the same checkpoints: one cache entry, keyed by the two models' weights
    whatever their labels (``common.cached(pair=True)``), computed once."""
    import logging

    run = behaviour.ensure(smoke_cfg, from_run(smoke_cfg))
    argv = ["--smoke", "--root", str(smoke_cfg.run_root), "compare", "--models",
            f"base={run.evals[0].checkpoint}", f"sft={run.evals[-1].checkpoint}"]
    with caplog.at_level(logging.INFO, logger="alignkit.cli"):
        assert cli.main(argv) == 0
    assert "What changed, sft against the reference" in caplog.text and "Per-token KL" in caplog.text
    given = from_models(smoke_cfg, {"base": run.evals[0].checkpoint, "sft": run.evals[-1].checkpoint})
    with runs.read_only() as read_theirs:  # neither computed again
        theirs = lens.ensure(smoke_cfg, given.pair("sft"))
    with runs.read_only() as read_own:
        own = lens.ensure(smoke_cfg, from_run(smoke_cfg))
    assert read_theirs[-1] == read_own[-1] and read_own[-1].parent.name == "pairs"
    np.testing.assert_allclose(theirs.diff["answer"], own.diff["answer"], rtol=0, atol=1e-6)
    for a, b in zip(theirs.token_kl, own.token_kl):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert cli.main(argv[:-1] + ["sft=no/such-model-here"]) == 1  # a named error, one line


def test_a_hub_id_fetches_only_what_from_pretrained_reads(tmp_path, monkeypatch):
    """``resolve_model`` of a hub id downloads configs, safetensors and tokenizer files only
    (``HUB_FILES``: not the GGUF, ONNX, ``original/*.pth`` or ``.bin`` copies), at the revision
    asked for; a snapshot without safetensors weights is a named error."""
    import fnmatch

    import huggingface_hub

    from alignkit.models import HUB_FILES, resolve_model

    calls = []

    def fake(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        snap = tmp_path / repo_id.replace("/", "--")
        snap.mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "model.gguf", "pytorch_model.bin", "original/consolidated.00.pth", "onnx/model.onnx"):
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns) and "/" not in name and not (
                    repo_id.endswith("bin-only") and name.endswith(".safetensors")):
                (snap / name).write_text("{}")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    path = resolve_model("Qwen/Qwen3-0.6B", revision="abc")
    assert calls == [("Qwen/Qwen3-0.6B", "abc", HUB_FILES)]
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]
    for skipped in ("model.gguf", "pytorch_model.bin", "original/consolidated.00.pth", "onnx/model.onnx"):
        assert not any(fnmatch.fnmatch(skipped, p) for p in HUB_FILES if p != "*.json"), skipped
    with pytest.raises(ValueError, match="without safetensors weights must be downloaded by hand"):
        resolve_model("someone/bin-only")
