"""Real-size benchmark: the analysis pipeline on two models of Qwen3-0.6B's exact shape, on this CPU.

Qwen/Qwen3-0.6B cannot be downloaded here, so two models are built from its configuration
(``QWEN3_06B``: 28 layers, hidden 1024, 16 query / 8 key-value heads, head_dim 128, intermediate
3072, vocabulary 151,936, tied embeddings, rope_theta 1e6, RMSNorm eps 1e-6) with random weights,
saved with ``save_pretrained`` (float32 safetensors, 2.4 GB each) and loaded back **by path** with
``alignkit.models.load_model``, exactly as a downloaded checkpoint would be:

* ``base``: transformers' own initialisation (normal, std 0.02) under ``torch.manual_seed(seed)``;
* ``tuned``: base plus Gaussian noise on every weight matrix of decoder layer ``l`` with standard
  deviation ``noise * (l + 1) / L`` times that matrix's own standard deviation (noise growing with
  depth, as fine-tuning drift does in notebook 02's curves); embeddings and norms untouched.

Tokenizer: the project's tokenizer recipe (``alignkit.tiny.train_tokenizer``: byte-level BPE with
single-digit splitting, as Qwen's) trained on generated GSM8K-format problems, then its ids are
scattered over the whole 151,936-entry vocabulary (a seeded random permutation; the unused ids
hold never-produced filler tokens), so embedding rows, LM-head targets and ``len(tokenizer)``
are those of the real vocabulary. It is saved in both model directories.

Probe texts: ``n_texts`` prompts (``format_prompt``) of test-split problems from
``alignkit.data``'s generator with 2-6 steps and operands up to 99: prompts of 35-105 tokens,
46.7 words on average (GSM8K's questions average roughly 46 words); token counts are in the report. Patching examples are the
first ``n_patch`` of them with their gold solutions.

Stages, each in its own subprocess so that its peak resident memory is its own (read with
``os.wait4`` on the child: ``ru_maxrss`` of that process alone, which counts file pages it mapped
and touched, e.g. safetensors weights during loading):

1. ``capture:<model>``: ``load_model`` by path, then ``capture.capture_cached`` of the mean-pooled
   residual stream at all 29 hook points (``embed`` + 28 ``layers.l.resid``), stored as float16
   safetensors and returned memory-mapped (``mmap=True``). The decoder runs without the LM head.
2. ``cka``: both captures memory-mapped (``runs.load_entry``), the 29 x 29
   ``cka.cka_matrix`` (biased and debiased; layers are converted to fp32 one at a time).
3. ``spectral``: ``spectral.layer_metrics`` (RankMe, Rényi ranks) of both models, their
   ``bootstrap_layer_metrics`` (80 % subsampling, ``n_boot``) and ``paired_delta``.
4. ``patching``: both models loaded by path, ``patching.layer_sweep`` (resid, all positions,
   denoise) over all 28 layers on ``n_patch`` examples.

``build`` (tokenizer and both models, cached in ``<workdir>/models`` by the spec's hash) is setup,
reported but not counted in the analysis total.

Usage (from the repository root; the full run holds both cores for ~17 minutes)::

    flock /tmp/cpu.lock env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_scale.py
    .venv/bin/python benchmarks/bench_scale.py --quick   # 2 layers, 32 texts: < 1 minute

The full run writes benchmarks/RESULTS_scale.md (``--no-write`` to skip); ``--quick`` never does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS_scale.md")
ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3

# Qwen/Qwen3-0.6B's config.json, field for field (the ids of special tokens come from our tokenizer).
QWEN3_06B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
    attention_bias=False, initializer_range=0.02, max_window_layers=28, use_sliding_window=False,
)

logger = logging.getLogger("bench_scale")


@dataclasses.dataclass
class Spec:
    """Everything a run depends on; written to ``<workdir>/spec.json`` and read by every stage."""

    model: dict = dataclasses.field(default_factory=lambda: dict(QWEN3_06B))
    n_texts: int = 512  # probe prompts (capture, CKA, spectral)
    n_patch: int = 28  # examples of the resid patching sweep (28-42 fit in 20 min here: RESULTS_scale.md)
    capture_batch: int = 16
    patch_batch: int = 8
    n_boot: int = 200  # spectral bootstrap resamples (notebook 03's full setting)
    noise: float = 0.5  # relative weight noise of the last layer (layer l: noise * (l + 1) / L)
    tokenizer_vocab: int = 4096  # BPE training budget (the generator's world saturates below it)
    tokenizer_corpus: int = 3000  # generated train-split problems the tokenizer is trained on
    min_steps: int = 2
    max_steps: int = 6
    max_number: int = 99
    seed: int = 0
    threads: int = 2
    mode: str = "full"
    # --compare: `python -m alignkit compare --models base=... sft=...` on the two models, no training
    compare_eval: int = 32  # problems evaluated per model (greedy, random weights: never stop early)
    compare_new_tokens: int = 32
    compare_patch: int = 8  # flips (substitutes: random models solve nothing) patched and steered

    def models_key(self) -> str:
        from alignkit import runs as cache

        keep = ("model", "noise", "tokenizer_vocab", "tokenizer_corpus", "min_steps", "max_steps", "max_number", "seed")
        return cache.hash_obj({k: getattr(self, k) for k in keep}, length=12)


def quick_spec(**over) -> Spec:
    """2 decoder layers of the real width and vocabulary, 32 texts, 4 patching examples (< 1 min)."""
    model = dict(QWEN3_06B, num_hidden_layers=2, max_window_layers=2)
    return Spec(**{**dict(model=model, n_texts=32, n_patch=4, n_boot=20, mode="quick"), **over})


# ----------------------------------------------------------------------------- data, tokenizer, models


def problems(spec: Spec, n: int, split: str = "test") -> list[dict]:
    from alignkit.config import GeneratorConfig
    from alignkit.data import generate_problems

    gen = GeneratorConfig(min_steps=spec.min_steps, max_steps=spec.max_steps, max_number=spec.max_number,
                          seed=spec.seed)
    return generate_problems(n, split, gen)


def probe_texts(spec: Spec) -> list[str]:
    from alignkit.data import format_prompt

    return [format_prompt(p["question"]) for p in problems(spec, spec.n_texts)]


def patch_examples(spec: Spec) -> list[dict]:
    from alignkit.data import format_completion, format_prompt

    return [{"prompt": format_prompt(p["question"]), "answer": format_completion(p["answer"])}
            for p in problems(spec, spec.n_patch)]


def scatter_vocab(tokenizer, vocab_size: int, seed: int = 0):
    """The same tokenizer with its ids spread over ``0..vocab_size-1`` (unused ids: filler tokens).

    Works on the serialised ``tokenizers`` JSON: every vocabulary entry and added (special) token
    gets a new id from a seeded random permutation; the merges refer to strings and are unchanged,
    so texts split into exactly the same tokens as before, only their ids differ.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` with a BPE model.
        vocab_size: the size of the id space (e.g. 151936); at least the tokenizer's size.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``len(tokenizer) == vocab_size``.
    """
    import numpy as np
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens, more than vocab_size={vocab_size}")
    new_ids = np.random.default_rng(seed).permutation(vocab_size)
    remap = {old: int(new_ids[i]) for i, old in enumerate(sorted(vocab.values()))}
    used = set(remap.values())
    scattered = {tok: remap[i] for tok, i in vocab.items()}
    fillers = (i for i in range(vocab_size) if i not in used)
    scattered.update({f"<|filler_{i}|>": i for i in fillers})
    state["model"]["vocab"] = scattered
    for added in state.get("added_tokens", []):
        added["id"] = remap[added["id"]]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                   eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, bos_token=None)
    fast.chat_template = tokenizer.chat_template
    fast.padding_side = tokenizer.padding_side
    return fast


def build_tokenizer(spec: Spec):
    """The project's BPE recipe trained on generated problems, ids scattered over the full vocabulary."""
    from alignkit.data import format_completion, format_prompt
    from alignkit.tiny import train_tokenizer

    corpus = [format_prompt(p["question"]) + format_completion(p["answer"])
              for p in problems(spec, spec.tokenizer_corpus, split="train")]
    small = train_tokenizer(corpus, spec.tokenizer_vocab)
    return scatter_vocab(small, spec.model["vocab_size"], spec.seed)


def perturb_(model, noise: float, seed: int) -> None:
    """Adds depth-growing Gaussian noise to every weight matrix of every decoder layer, in place.

    Layer ``l`` of ``L``: ``W += N(0, (noise * (l + 1) / L * std(W))^2)``; 1-D weights (norms) and
    the embeddings are left alone.
    """
    import torch

    from alignkit.models import decoder_layers

    g = torch.Generator().manual_seed(seed + 1)
    layers = decoder_layers(model)
    with torch.no_grad():
        for l, layer in enumerate(layers):
            rel = noise * (l + 1) / len(layers)
            for p in layer.parameters():
                if p.ndim == 2:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (rel * float(p.std())))


def model_dirs(spec: Spec, workdir: Path) -> tuple[Path, Path]:
    root = workdir / "models" / spec.models_key()
    return root / "base", root / "tuned"


def build_models(spec: Spec, workdir: Path) -> dict:
    """Tokenizer, base and tuned model, saved (float32 safetensors) unless already there."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from alignkit import runs as cache

    base_dir, tuned_dir = model_dirs(spec, workdir)
    done = base_dir.parent / "done.json"
    if done.is_file():
        logger.info("models already built in %s", base_dir.parent)
        return dict(json.loads(done.read_text()), cached=True)
    t0 = time.perf_counter()
    tok = build_tokenizer(spec)
    t_tok = time.perf_counter() - t0
    eos = tok.eos_token_id
    config = Qwen3Config(**spec.model, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(config)
    t_init = time.perf_counter() - t0 - t_tok
    n_params = sum(p.numel() for p in model.parameters())
    for d, name in ((base_dir, "base"), (tuned_dir, "tuned")):
        if name == "tuned":
            perturb_(model, spec.noise, spec.seed)
        with cache.atomic_dir(d) as tmp:
            model.save_pretrained(tmp)  # float32 safetensors
            tok.save_pretrained(tmp)
    info = {"n_params": n_params, "tokenizer_s": t_tok, "init_s": t_init,
            "total_s": time.perf_counter() - t0, "vocab_in_use": len(tok.get_vocab()) - sum(
                t.startswith("<|filler_") for t in tok.get_vocab()),
            "disk_bytes": sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))}
    cache.write_json_atomic(done, info)
    return dict(info, cached=False)


# ----------------------------------------------------------------------------- stages (run in children)


class Phases:
    """Wall time and resident memory after each phase of a stage (where the time and memory go)."""

    def __init__(self):
        self.rows: list[dict] = []
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.rows.append({"phase": name, "s": round(now - self._t, 3), "rss_gib": round(rss_gib("VmRSS"), 3)})
        self._t = now


def rss_gib(field: str = "VmHWM") -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process from /proc/self/status, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def _acts_entry(workdir: Path, name: str) -> Path:
    """The capture's cache entry (``runs.cached``: ``key.json`` and ``result/``)."""
    (path,) = (workdir / "acts" / name).glob("acts-*")
    return path


def stage_build(spec: Spec, workdir: Path) -> dict:
    return build_models(spec, workdir)


def stage_capture(spec: Spec, workdir: Path, name: str) -> dict:
    ph = Phases()
    import torch

    from alignkit import runs as cache
    from alignkit.capture import capture_cached
    from alignkit.models import load_model

    ph.mark("imports")
    texts = probe_texts(spec)
    ph.mark("probe texts")
    model_dir = model_dirs(spec, workdir)[name == "tuned"]
    model, tok = load_model(model_dir)  # by path, float32, CPU
    ph.mark("load_model")
    cache_dir = workdir / "acts" / name
    shutil.rmtree(cache_dir, ignore_errors=True)  # a fresh miss every run: this stage measures the capture
    cache.weights_hash(model_dir)  # memoised: capture_cached's own call below reuses it
    ph.mark("weights_hash (sha256 of the checkpoint)")
    acts = capture_cached(model, tok, texts, None, "mean", cache_dir, model_dir=model_dir,
                          batch_size=spec.capture_batch, dtype=torch.float16, mmap=True)
    ph.mark("capture_cached (forward, pool, write fp16, mmap)")
    lengths = [len(t) for t in tok(texts, add_special_tokens=False)["input_ids"]]
    return {"phases": ph.rows, "shape": list(acts.acts.shape), "dtype": str(acts.acts.dtype),
            "n_tokens": sum(lengths), "len_min": min(lengths), "len_mean": sum(lengths) / len(lengths),
            "len_max": max(lengths), "constant_points": acts.meta["constant_points"],
            "entry_bytes": (_acts_entry(workdir, name) / "result" / "arrays.safetensors").stat().st_size,
            "vocab": len(tok)}


def _load_pair(workdir: Path, ph: "Phases"):
    """Both models' cached activations, memory-mapped and checked comparable, and the hook points
    with variance in both (constant ones dropped)."""
    from alignkit.capture import check_comparable, varying_points
    from alignkit.runs import load_entry

    ph.mark("imports")
    a, b = (load_entry(_acts_entry(workdir, n), mmap=True) for n in ("base", "tuned"))
    check_comparable(a, b)
    keep = varying_points([a, b])[0]
    ph.mark("load_entry (verified, mmap)")
    return a, b, keep


def stage_cka(spec: Spec, workdir: Path) -> dict:
    ph = Phases()
    from alignkit import cka

    a, b, keep = _load_pair(workdir, ph)
    mat = cka.cka_matrix(a.acts[keep], b.acts[keep])
    ph.mark("cka_matrix biased")
    mat_d = cka.cka_matrix(a.acts[keep], b.acts[keep], debiased=True)
    ph.mark("cka_matrix debiased")
    diag = mat.diagonal()
    return {"phases": ph.rows, "shape": list(mat.shape), "diag_first": float(diag[0]), "diag_last": float(diag[-1]),
            "diag_min": float(diag.min()), "debiased_diag_last": float(mat_d.diagonal()[-1])}


def stage_spectral(spec: Spec, workdir: Path) -> dict:
    ph = Phases()
    from alignkit import spectral

    a, b, keep = _load_pair(workdir, ph)
    m_a, m_b = spectral.layer_metrics(a.acts[keep]), spectral.layer_metrics(b.acts[keep])
    ph.mark("layer_metrics x 2")
    boots = [spectral.bootstrap_layer_metrics(x.acts[keep], n_boot=spec.n_boot, seed=0, eig_workers=spec.threads)
             for x in (a, b)]
    ph.mark(f"bootstrap_layer_metrics x 2 (n_boot={spec.n_boot}, eig_workers={spec.threads})")
    delta = spectral.paired_delta(boots[1], boots[0])
    ph.mark("paired_delta")
    return {"phases": ph.rows, "rankme_base_last": float(m_a["rankme"][-1]), "rankme_tuned_last": float(m_b["rankme"][-1]),
            "delta_rankme_last": float(delta["rankme"]["point"][-1])}


def stage_patching(spec: Spec, workdir: Path) -> dict:
    ph = Phases()
    import numpy as np

    from alignkit import patching
    from alignkit.models import load_model

    ph.mark("imports")
    base_dir, tuned_dir = model_dirs(spec, workdir)
    base, tok = load_model(base_dir)
    ph.mark("load_model base")
    tuned, _ = load_model(tuned_dir)
    ph.mark("load_model tuned")
    examples = patch_examples(spec)
    spans = patching.tokenize_examples(tok, examples)
    ph.mark("examples")
    res = patching.layer_sweep(base, tuned, tok, examples, component="resid", positions="all", direction="denoise",
                               batch_size=spec.patch_batch)
    ph.mark(f"layer_sweep resid x {base.config.num_hidden_layers} layers")
    lengths = [len(s["input_ids"]) for s in spans]
    return {"phases": ph.rows, "n_examples": len(examples), "n_layers": int(res.delta.shape[1]),
            "len_min": min(lengths), "len_mean": float(np.mean(lengths)), "len_max": max(lengths),
            "n_tokens": sum(lengths), "mean_abs_delta": float(np.abs(res.delta).mean()),
            "lp_receiver_mean": float(res.lp_receiver.mean()), "lp_donor_mean": float(res.lp_donor.mean()),
            "n_npe_masked": res.meta["n_npe_masked"]}


def stage_compare(spec: Spec, workdir: Path) -> dict:
    """Compare mode on the two models, the calls `python -m alignkit compare --models` makes
    (``compare.report_models``): cross-layer CKA, the whole comparison (evaluation, capture,
    layerwise CKA, Δ RankMe, resid patching, weight drift of every tensor) and the difference lens
    with steering and per-token KL, from an empty cache root."""
    ph = Phases()
    import dataclasses

    import numpy as np

    from alignkit.analyses import cka, compare, lens
    from alignkit.analyses.common import from_models
    from alignkit.config import GeneratorConfig, get_config, with_values

    ph.mark("imports")
    base_dir, tuned_dir = model_dirs(spec, workdir)
    root = workdir / "compare-root"
    shutil.rmtree(root, ignore_errors=True)  # a fresh miss every run: this stage measures the work
    cfg = dataclasses.replace(get_config("tiny"), root=str(root), generator=GeneratorConfig(
        spec.min_steps, spec.max_steps, spec.max_number, spec.seed))
    cfg.eval = dataclasses.replace(cfg.eval, n_eval=spec.compare_eval, batch_size=spec.compare_eval,
                                   max_new_tokens=spec.compare_new_tokens)
    cfg = with_values(cfg, {"patching.n_examples": spec.compare_patch, "patching.batch_size": spec.patch_batch,
                            "lens.n_texts": spec.compare_patch})
    models = from_models(cfg, {"base": str(base_dir), "tuned": str(tuned_dir)})
    cross = cka.ensure_cross(cfg, models)
    ph.mark("cka.ensure_cross (capture probes, cross-layer CKA + bootstrap)")
    res = compare.ensure(cfg, models)
    ph.mark("compare.ensure (evaluate, capture, CKA, ranks, patching, weight drift)")
    lz = lens.ensure(cfg, models)
    ph.mark("lens.ensure (mean difference, steering, per-token KL)")
    return {"phases": ph.rows, "n_eval": res.n_eval, "n_patch": int(res.patches["tuned"].delta.shape[0]),
            "n_layers": int(res.patches["tuned"].delta.shape[1]), "n_probes": cross.n_probes,
            "cka_last": float(res.cka["tuned"].point[-1]), "drift_tensors": len(res.weights.drift["tuned"]),
            "kl_mean": float(np.mean(np.concatenate(lz.token_kl)))}


STAGES = {"build": stage_build, "capture:base": lambda s, w: stage_capture(s, w, "base"),
          "capture:tuned": lambda s, w: stage_capture(s, w, "tuned"), "cka": stage_cka,
          "spectral": stage_spectral, "patching": stage_patching, "compare": stage_compare}
ANALYSIS = ["capture:base", "capture:tuned", "cka", "spectral", "patching"]


def child_main(stage: str, workdir: Path) -> None:
    """Entry point of a stage's subprocess: run it, write ``<workdir>/stages/<stage>.json``."""
    import torch

    spec = Spec(**json.loads((workdir / "spec.json").read_text()))
    torch.set_num_threads(spec.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    out = STAGES[stage](spec, workdir)
    out.update(stage=stage, work_s=time.perf_counter() - t0, peak_rss_gib=rss_gib("VmHWM"),
               torch_threads=torch.get_num_threads(), torch=torch.__version__)
    path = workdir / "stages" / f"{stage.replace(':', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


# ----------------------------------------------------------------------------- parent: run and measure


def run_stage(stage: str, workdir: Path) -> dict:
    """Run one stage in a fresh Python process and measure it.

    Peak memory is the child's own ``VmHWM`` (/proc/self/status, read by the child as it finishes):
    the high-water mark of the resident set of the address space it got at ``exec``, counting
    anonymous memory and the file pages it mapped and touched (safetensors weights, memory-mapped
    activations). ``ru_maxrss`` from ``os.wait4`` on the child is kept as a cross-check, but Linux
    carries the *parent's* high-water mark into a child across fork/vfork + exec, so it reads
    ``max(parent's peak at spawn, child's peak)``; this launcher never imports torch, so its own
    peak stays far below any stage's.

    Returns:
        The stage's JSON output (``work_s``: the stage function after interpreter start-up;
        ``peak_rss_gib``: the child's VmHWM) plus ``wall_s`` (the whole process: interpreter,
        imports, work), ``ru_maxrss_gib`` and ``cpu_s`` (user + system CPU seconds of the child).
    """
    log = workdir / "logs" / f"{stage.replace(':', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--stage", stage,
                                 "--workdir", str(workdir)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); log: {log}\n"
                           + "\n".join(log.read_text().splitlines()[-20:]))
    out = json.loads((workdir / "stages" / f"{stage.replace(':', '_')}.json").read_text())
    out.update(wall_s=wall, ru_maxrss_gib=usage.ru_maxrss * 1024 / GIB, cpu_s=usage.ru_utime + usage.ru_stime)
    logger.info("%-14s wall %7.1f s  work %7.1f s  peak RSS %.2f GiB", stage, wall, out["work_s"], out["peak_rss_gib"])
    return out


def _run_stages(spec: Spec, workdir: Path, stages: list[str]) -> dict:
    """``spec.json`` written, the models built (or reused), then each of ``stages`` in its own
    process: ``{"spec", "stages": {name: output}, "machine"}``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))
    load0 = os.getloadavg()[0]
    out = {"build": run_stage("build", workdir)}
    for stage in stages:
        out[stage] = run_stage(stage, workdir)
    return {"spec": dataclasses.asdict(spec), "stages": out,
            "machine": {"platform": platform.machine(), "cpus": os.cpu_count(), "torch": out["build"]["torch"],
                        "python": platform.python_version(), "load_start": load0, "load_end": os.getloadavg()[0],
                        "mem_total_gib": _meminfo_gib("MemTotal")}}


def run(spec: Spec, workdir: Path, stages: list[str] | None = None) -> dict:
    """Build (or reuse) the models, then run every analysis stage in its own process.

    Returns:
        ``{"spec": ..., "stages": {name: output}, "analysis_wall_s": float, "max_peak_rss_gib": float,
        "machine": {...}}``.
    """
    rep = _run_stages(spec, workdir, stages or ANALYSIS)
    analysis = [rep["stages"][s] for s in ANALYSIS if s in rep["stages"]]
    return {**rep, "analysis_wall_s": sum(s["wall_s"] for s in analysis),
            "max_peak_rss_gib": max(s["peak_rss_gib"] for s in analysis)}


def run_compare(spec: Spec, workdir: Path) -> dict:
    """Build (or reuse) the models, then the ``compare`` stage in its own process."""
    return _run_stages(spec, workdir, ["compare"])


def compare_markdown(rep: dict) -> str:
    """The compare-mode results document: the stage's time and peak memory, and its phases."""
    spec, m, c = rep["spec"], rep["machine"], rep["stages"]["compare"]
    L = spec["model"]["num_hidden_layers"]
    ok = c["peak_rss_gib"] <= BUDGET_GIB
    out = [f"# Compare mode at real size: two Qwen3-0.6B-shaped models on the {m['cpus']}-core CPU", "",
           f"Produced by `benchmarks/bench_scale.py --compare` ({spec['mode']} mode) on {m['platform']}, {m['cpus']} "
           f"CPUs, {m['mem_total_gib']:.0f} GiB RAM, torch {m['torch']}, Python {m['python']}, {spec['threads']} "
           f"torch threads; load average {m['load_start']:.1f} at start, {m['load_end']:.1f} at end.", "",
           "What ran: the calls of `python -m alignkit compare --models base=DIR tuned=DIR` "
           "(`cka.ensure_cross`, `compare.ensure`, `lens.ensure` on `common.from_models`) on the two models of "
           f"`bench_scale.py` (Qwen3, {L} layers x {spec['model']['hidden_size']}, vocabulary "
           f"{spec['model']['vocab_size']:,}, float32, random weights; tuned = base + depth-growing noise), from an "
           f"empty cache, in one process: {c['n_eval']} generated GSM8K-format problems evaluated per model "
           f"(greedy, {spec['compare_new_tokens']} new tokens), {c['n_probes']} probes captured, layerwise and "
           f"cross-layer CKA with bootstraps, Δ RankMe, a resid denoise sweep over {c['n_layers']} layers on "
           f"{c['n_patch']} examples (batch {spec['patch_batch']}), weight drift of all {c['drift_tensors']} tensors, "
           f"and the difference lens (steering + shuffled control at every layer, per-token KL).", "",
           "| stage | wall s | stage work s | CPU s | peak RSS GiB |", "|---|---:|---:|---:|---:|"]
    for name, s in rep["stages"].items():
        out.append(f"| {name} | {s['wall_s']:.1f} | {s['work_s']:.1f} | {s['cpu_s']:.0f} | {s['peak_rss_gib']:.2f} |")
    out += ["", f"- Memory target (compare of two 0.6B-sized models <= {BUDGET_GIB:.0f} GiB on the CPU): peak "
            f"{c['peak_rss_gib']:.2f} GiB, {'met' if ok else 'NOT met'}.",
            f"- Sanity: CKA at the last layer {c['cka_last']:.3f}; mean per-token KL(tuned ‖ base) {c['kl_mean']:.3f} nats.",
            "", "| phase | s | RSS GiB after |", "|---|---:|---:|"]
    out += [f"| {p['phase']} | {p['s']:.1f} | {p['rss_gib']:.2f} |" for p in c["phases"]]
    return "\n".join(out) + "\n"


def _meminfo_gib(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


# ----------------------------------------------------------------------------- report

BUDGET_S = 20 * 60  # the whole analysis on the 2-core CPU
BUDGET_GIB = 8.0  # peak resident memory of every stage

_WHAT = {
    "build": "setup: tokenizer, init, perturb, save both (not in the total)",
    "capture:base": "load by path, hash, capture 29 points (mean-pooled) to an fp16 cache, mmap",
    "capture:tuned": "the same for the tuned model",
    "cka": "29 x 29 `cka_matrix`, biased and debiased, from the mmapped fp16 caches",
    "spectral": "`layer_metrics` + `bootstrap_layer_metrics` of both + `paired_delta`",
    "patching": "load both by path + `layer_sweep` (resid) over all layers",
}

METHOD = """\
**Models.** Two models of Qwen3-0.6B's exact configuration (28 layers, hidden 1024, 16 query / 8
key-value heads, head_dim 128, intermediate 3072, vocabulary 151,936, tied embeddings, rope_theta 1e6,
RMSNorm eps 1e-6, QK-norm) with random weights: *base* is transformers' own initialisation (normal,
std 0.02) under `torch.manual_seed(0)`; *tuned* is base plus Gaussian noise on every weight matrix of
decoder layer `l` with standard deviation `0.5 * (l + 1) / 28` times that matrix's own standard
deviation (drift growing with depth; embeddings and norms untouched). Each is saved with
`save_pretrained` as **float32** safetensors (2.4 GB) together with the tokenizer and loaded back **by
path** with `alignkit.models.load_model`, as a downloaded checkpoint would be (float32, CPU).

**Tokenizer.** The project's recipe (`alignkit.tiny.train_tokenizer`: byte-level BPE, digits split
one by one as in Qwen's tokenizers) trained on 3,000 generated train-split problems, then its ids
scattered over the whole 151,936-id space by a seeded permutation (`scatter_vocab`; unused ids hold
filler tokens that never occur): the same token split, but `len(tokenizer) = 151,936` and ids that
reach every part of the embedding and LM-head matrices.

**Probe texts.** 512 prompts (`format_prompt`, `Question: ...\\nAnswer:`) of test-split problems from
`alignkit.data`'s generator with 2-6 steps and operands up to 99: 46.7 words on average, roughly
GSM8K's question length. Patching examples are the first `n_patch` of them with their gold solutions.

**Stages.** Each runs in its own Python process, started by a launcher that never imports torch:

1. `capture`: `load_model` by path, then `capture.capture_cached` of the residual stream at all
   29 hook points (`embed` and `layers.0..27.resid`), mean-pooled over each prompt's tokens (in
   float64 inside the hooks), stored as **float16** safetensors and returned **memory-mapped**
   (`mmap=True`). The decoder runs without the LM head. The activation cache is emptied first, so
   every run measures a miss.
2. `cka`: both captures memory-mapped by path (`capture.load_activations`), the 29 x 29
   `cka.cka_matrix`, biased and debiased (layers converted to fp32 one at a time, HSIC in float64).
3. `spectral`: `spectral.layer_metrics` of both models (RankMe, Renyi ranks 0.5/1/2/inf) and
   `bootstrap_layer_metrics` with notebook 03's full setting (80 % subsampling, `n_boot` = 200) plus
   the paired difference (`paired_delta`).
4. `patching`: both models loaded by path, `patching.layer_sweep(component="resid",
   positions="all", direction="denoise")` over all 28 layers on a subset of examples (below).

**Measurements.** The full run held the shared CPU lock (`flock /tmp/cpu.lock`), so no other
locked job shared the two cores (the load average above shows what else ran). Wall time: `time.perf_counter` around the whole child process (interpreter start,
imports, work); "stage work" excludes interpreter start-up. Peak resident memory: the child's own
`VmHWM` from `/proc/self/status`, read as it finishes: the high-water mark of the resident set of
the address space it got at `exec`, counting anonymous memory *and* the file pages it mapped and
touched (transformers 5 maps the safetensors weights, and the float16 activations are mapped), so
nothing is hidden in the page cache. `ru_maxrss` from `os.wait4` is recorded as a cross-check
(column "wait4"); on Linux it is `max(parent's peak at spawn, child's peak)` because the parent's
high-water mark survives fork + exec, which is why the launcher stays small. The phases table
reads `VmRSS` after each phase.
"""


def _fits(rep: dict) -> dict | None:
    """Patching cost per example and the largest subset that fits the time budget with the rest."""
    st = rep["stages"]
    pat = st.get("patching")
    if not pat:
        return None
    sweep = next(p["s"] for p in pat["phases"] if p["phase"].startswith("layer_sweep"))
    per_example = sweep / pat["n_examples"]
    fixed = rep["analysis_wall_s"] - sweep
    return {"sweep_s": sweep, "per_example_s": per_example, "fixed_s": fixed,
            "max_examples": int((BUDGET_S - fixed) // per_example)}


def report_markdown(rep: dict) -> str:
    """The results document (method, table, facts, phases) for a run's report."""
    spec, st, m = rep["spec"], rep["stages"], rep["machine"]
    cap, pat, build = st.get("capture:base", {}), st.get("patching", {}), st["build"]
    L = spec["model"]["num_hidden_layers"]
    out = [f"# Real-size benchmark: Qwen3-0.6B-shaped models on the {m['cpus']}-core CPU", "",
           f"Produced by `benchmarks/bench_scale.py` ({spec['mode']} mode) on {m['platform']}, {m['cpus']} CPUs, "
           f"{m['mem_total_gib']:.0f} GiB RAM, torch {m['torch']}, Python {m['python']}, {spec['threads']} torch "
           f"threads; load average {m['load_start']:.1f} at start, {m['load_end']:.1f} at end.",
           "", "## Results", "",
           "| stage | what | wall s | stage work s | CPU s | peak RSS GiB | wait4 GiB |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for name, s in st.items():
        out.append(f"| {name} | {_WHAT.get(name, '')} | {s['wall_s']:.1f} | {s['work_s']:.1f} | {s['cpu_s']:.0f} "
                   f"| {s['peak_rss_gib']:.2f} | {s['ru_maxrss_gib']:.2f} |")
    out.append(f"| **analysis total** | capture x 2 + cka + spectral + patching | **{rep['analysis_wall_s']:.1f}** | | "
               f"| **max {rep['max_peak_rss_gib']:.2f}** | |")
    out.append("| GPU (bf16) | the same benchmark on a GPU | not run (no GPU lent to this task) | | | | |")
    out.append("")
    if spec["mode"] == "full":
        ok_t, ok_m = rep["analysis_wall_s"] <= BUDGET_S, rep["max_peak_rss_gib"] <= BUDGET_GIB
        out += [f"- Time target (whole analysis <= {BUDGET_S // 60} min): {rep['analysis_wall_s'] / 60:.1f} min, "
                f"{'met' if ok_t else 'NOT met'}.",
                f"- Memory target (every stage <= {BUDGET_GIB:.0f} GiB): max {rep['max_peak_rss_gib']:.2f} GiB, "
                f"{'met' if ok_m else 'NOT met'}."]
    out.append(f"- Models: Qwen3 {L} layers x {spec['model']['hidden_size']}, vocabulary {spec['model']['vocab_size']:,}, "
               f"{build['n_params'] / 1e6:.0f} M parameters, float32 safetensors of {build['disk_bytes'] / 1e9:.2f} GB "
               f"each; built {'in an earlier run' if build.get('cached') else 'in this run'} "
               f"(tokenizer {build['tokenizer_s']:.0f} s, init {build['init_s']:.0f} s, all {build['total_s']:.0f} s).")
    if cap:
        out.append(f"- Probe set: {spec['n_texts']} prompts of {cap['len_min']}-{cap['len_max']} tokens (mean "
                   f"{cap['len_mean']:.1f}, {cap['n_tokens']:,} in all); activations {cap['shape']} {cap['dtype']}, "
                   f"{cap['entry_bytes'] / 1e6:.1f} MB on disk per model"
                   + (f"; constant hook points skipped: {cap['constant_points']}" if cap["constant_points"] else "") + ".")
        fwd = next(p["s"] for p in cap["phases"] if p["phase"].startswith("capture_cached"))
        out.append(f"- Capture throughput: {cap['n_tokens'] / fwd:.0f} tokens/s per model "
                   f"({cap['n_tokens'] * 2 * _decoder_params(spec) / fwd / 1e9:.0f} GFLOP/s in the decoder's matmuls).")
    if pat:
        f = _fits(rep)
        out.append(f"- Patching: {pat['n_examples']} examples (prompt + gold solution, {pat['len_min']}-{pat['len_max']} "
                   f"tokens, mean {pat['len_mean']:.1f}) x {pat['n_layers']} layers, batch {spec['patch_batch']}: "
                   f"{f['per_example_s']:.1f} s per example; with the other stages ({f['fixed_s']:.0f} s) at most "
                   f"**{f['max_examples']} examples** fit in {BUDGET_S // 60} min. Mean |delta answer log-prob| "
                   f"{pat['mean_abs_delta']:.3f} nats (receiver {pat['lp_receiver_mean']:.2f}, donor "
                   f"{pat['lp_donor_mean']:.2f}); NPE masked for {pat['n_npe_masked']} of {pat['n_examples']}.")
    if "cka" in st:
        c = st["cka"]
        out.append(f"- CKA base vs tuned (biased, diagonal): {c['diag_first']:.3f} at the embeddings, {c['diag_last']:.3f} "
                   f"at the last layer (minimum {c['diag_min']:.3f}); debiased at the last layer {c['debiased_diag_last']:.3f}.")
    if "spectral" in st:
        s = st["spectral"]
        out.append(f"- RankMe at the last layer: base {s['rankme_base_last']:.1f}, tuned {s['rankme_tuned_last']:.1f} "
                   f"(paired delta {s['delta_rankme_last']:+.1f}).")
    out += ["", "### Where the time and memory go", "",
            "Phases inside each stage (RSS = `VmRSS` after the phase):", "",
            "| stage | phase | s | RSS GiB |", "|---|---|---:|---:|"]
    for name, s in st.items():
        for p in s.get("phases", []):
            out.append(f"| {name} | {p['phase']} | {p['s']:.1f} | {p['rss_gib']:.2f} |")
    out += ["", "## Method", "", METHOD]
    return "\n".join(out) + "\n"


NOTES_MARKER = "<!-- notes below are written by hand and kept when bench_scale.py rewrites this file -->"


def write_results(md: str, path: Path = RESULTS) -> None:
    """Write the generated document, keeping the hand-written notes after ``NOTES_MARKER``."""
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else NOTES_MARKER + "\n"
    path.write_text(md + "\n" + notes)


def _decoder_params(spec: dict) -> int:
    """Weights of the decoder layers' matmuls (what a token's forward multiplies through)."""
    m = spec["model"]
    d, h, kv, hd, f = m["hidden_size"], m["num_attention_heads"], m["num_key_value_heads"], m["head_dim"], m["intermediate_size"]
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f
    return per_layer * m["num_hidden_layers"]


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers of the real width, 32 texts, 4 patching examples")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "scale",
                   help="models, activation caches, logs and report.json/md (default: runs/scale)")
    p.add_argument("--layers", type=int, help="override the number of decoder layers")
    p.add_argument("--n-texts", type=int, help="probe prompts (default 512)")
    p.add_argument("--n-patch", type=int, help="examples of the patching sweep (default 28)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per stage (and spectral eig_workers)")
    p.add_argument("--stages", nargs="+", choices=ANALYSIS,
                   help="run only these analysis stages, in order (cka and spectral need the captures)")
    p.add_argument("--compare", action="store_true",
                   help="compare mode (python -m alignkit compare --models) instead: RESULTS_compare.md")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS_scale.md")
    p.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # internal: run one stage
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.stage:
        child_main(args.stage, args.workdir)
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = quick_spec() if args.quick else Spec()
    if args.layers:
        spec.model = dict(spec.model, num_hidden_layers=args.layers, max_window_layers=args.layers)
        spec.mode = "custom"
    for k in ("n_texts", "n_patch", "threads"):
        if getattr(args, k) is not None and getattr(args, k) != getattr(spec, k):
            setattr(spec, k, getattr(args, k))
            spec.mode = spec.mode if k == "threads" else "custom"
    workdir = args.workdir / spec.mode if spec.mode != "full" else args.workdir
    if args.compare:
        rep = run_compare(spec, workdir)
        md = compare_markdown(rep)
        (workdir / "report_compare.md").write_text(md)
        sys.stdout.write(md)
        if spec.mode == "full" and not args.no_write:
            RESULTS.with_name("RESULTS_compare.md").write_text(md)
        return rep
    rep = run(spec, workdir, args.stages)
    md = report_markdown(rep)
    (workdir / "report.json").write_text(json.dumps(rep, indent=2, default=str))
    (workdir / "report.md").write_text(md)
    sys.stdout.write(md)
    if spec.mode == "full" and not args.no_write and not args.stages:
        logger.info("writing %s", RESULTS)
        write_results(md, RESULTS)
    return rep


if __name__ == "__main__":
    main()
