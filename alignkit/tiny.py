"""The embedded base: a locally trained tokenizer and a small Qwen3 pretrained from scratch on a
corpus without GSM8K's solution format (docs/embedded.md)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from itertools import islice
from pathlib import Path

import datasets
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from alignkit import runs
from alignkit.config import Config, GeneratorConfig, TinyModelConfig
from alignkit.data import format_prompt, generate_problems, iter_problems
from alignkit.models import PYPI
from alignkit.pretrained import CHAT_TEMPLATE, ensure_converted

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
SPECIAL = [EOS, "<|im_start|>", "<|im_end|>"]  # Qwen's ChatML tokens
THINKING = ["<think>", "</think>"]  # Qwen3's thinking tokens (added, not special, as in Qwen3)


def pretraining_corpus(tcfg: TinyModelConfig, gcfg: GeneratorConfig) -> list[str]:
    """Documents of the pretraining corpus, shuffled: train-split problems of generator stream 1, so
    no evaluation question is ever seen and SFT data (stream 0) is not reused verbatim."""
    rng = random.Random(tcfg.seed)
    it = iter_problems("train", gcfg, stream=1)
    docs = [p.narrative for p in islice(it, tcfg.n_narratives)]
    docs += [f"{format_prompt(p.question)} {p.final}" for p in islice(it, tcfg.n_direct)]
    for p in islice(it, tcfg.n_worked):
        work = " ".join(f"{a}{op}{b}={r}." for a, op, b, r in p.steps)
        docs.append(f"{p.question} Working: {work} The result is {p.final}.")
    # standalone equations: the same arithmetic facts the problems use, drawn from their steps
    total = len(docs) + tcfg.n_equations
    eq_it = iter_problems("train", gcfg, stream=3)
    while len(docs) < total:
        docs.extend(f"{a}{op}{b}={r}" for a, op, b, r in next(eq_it).steps)
    docs = docs[:total]
    rng.shuffle(docs)
    return docs


def train_tokenizer(texts: list[str], vocab_size: int) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer``: byte-level BPE on ``texts`` with Qwen2/Qwen3's pre-tokenisation, ChatML
    and thinking tokens and chat template (docs/embedded.md); ``vocab_size`` counts the specials."""
    template = Qwen2Tokenizer()
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = template._tokenizer.normalizer
    bpe.pre_tokenizer = template._tokenizer.pre_tokenizer
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL + THINKING, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, eos_token=EOS, pad_token=EOS)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tok.add_tokens(THINKING)  # already in the vocabulary: matched whole, never split
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def build_model(tcfg: TinyModelConfig, vocab_size: int, eos_id: int) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 with Qwen3-0.6B's layout (GQA, QK-norm, tied embeddings)."""
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=tcfg.hidden_size, head_dim=tcfg.head_dim,
        intermediate_size=tcfg.intermediate_size, num_hidden_layers=tcfg.num_hidden_layers,
        num_attention_heads=tcfg.num_attention_heads, num_key_value_heads=tcfg.num_key_value_heads,
        max_position_embeddings=tcfg.max_position_embeddings, rope_theta=tcfg.rope_theta,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(tcfg.seed)
    return Qwen3ForCausalLM(config)


def _blocks(tokenizer, docs: list[str], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate documents separated by EOS and cut the stream into equal blocks (GPT-style)."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


RECIPE_VERSION = 2  # bump when this module's corpus or tokenizer recipe changes: no stale bases


def base_key(cfg: Config) -> str:
    """Cache key of the embedded base: its model, corpus and generator knobs, and the recipe."""
    return runs.hash_obj({"tiny": cfg.tiny, "generator": cfg.generator, "version": RECIPE_VERSION})


def base_dir(cfg: Config) -> Path:
    """Where ``ensure_base`` keeps the base for this config."""
    return cfg.run_root / "base" / f"tiny-{base_key(cfg)}"


def _base_bytes(tcfg: TinyModelConfig) -> int:
    """Disk the base build needs: the weights, twice over (temporary + final), plus 10 MB."""
    d, L, f, v = tcfg.hidden_size, tcfg.num_hidden_layers, tcfg.intermediate_size, tcfg.vocab_size
    n_params = v * d + L * (4 * d * tcfg.num_attention_heads * tcfg.head_dim + 3 * d * f)
    return 2 * 4 * n_params + 10 * 2**20


SHIPPED = Path(__file__).parent / "embedded_base"  # the base built once and shipped (README)
# a rebuild from the recipe on another machine differs by round-off; its base accuracy on the 300
# evaluation problems stays within this of the shipped base's (tests/test_embedded_base.py)
REBUILD_TOLERANCE = 0.06


def shipped_base(cfg: Config) -> Path | None:
    """The shipped base's directory when it was built from this config's recipe and its weights
    match its manifest, else None (a changed recipe or config builds its own)."""
    manifest = SHIPPED / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text()).get("key") != base_key(cfg):
        return None
    if not runs.manifest_matches(SHIPPED):
        raise RuntimeError(f"the shipped base {SHIPPED} does not match its manifest's weights "
                           "hash: restore it with `git checkout alignkit/embedded_base`")
    return SHIPPED


def ensure_base(cfg: Config, rebuild: bool = False) -> Path:
    """The base's directory: the shipped embedded base (copied under the run root) or, for another
    recipe or with ``rebuild``, the embedded base built once; a ``pypi:`` model converted once;
    any other ``cfg.model`` as given. The embedded build fails early on an unwritable or full disk
    or, not yet built, under a multi-process launch."""
    if cfg.model.startswith(PYPI):
        return ensure_converted(cfg.model, cfg.run_root, cfg.base_layers)
    if cfg.model != "tiny":
        return Path(cfg.model)
    out, tcfg = base_dir(cfg), cfg.tiny
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under accelerate launch: never build, never lock
        if runs.manifest_matches(out):
            return out
        raise RuntimeError(f"the tiny base {out} must be built before a multi-process launch: run "
                           "`python -m alignkit train sft` (or alignkit.tiny.ensure_base) once in "
                           "one process")
    runs.ensure_writable(out.parent, need_bytes=_base_bytes(tcfg))
    with runs.build_lock(out):
        if runs.manifest_matches(out) and not rebuild:
            logger.info("reusing base %s", out)
            return out
        if out.exists() and not rebuild:
            logger.warning("base %s is incomplete or damaged (weights differ from its manifest): "
                           "rebuilding", out)
        shipped = None if rebuild else shipped_base(cfg)
        if shipped is not None:
            with runs.atomic_dir(out) as tmp:
                shutil.copytree(shipped, tmp, dirs_exist_ok=True)
            logger.info("base %s: the shipped one (%s)", out, shipped)
            return out
        build_base(cfg, out)
        return out


def build_base(cfg: Config, out: Path) -> Path:
    """Build the embedded base from its recipe into ``out`` (atomically; about 18 minutes on two
    CPU cores): the tokenizer, then pretraining (docs/embedded.md)."""
    tcfg = cfg.tiny
    t0 = time.time()
    docs = pretraining_corpus(tcfg, cfg.generator)
    # the tokenizer also sees solution-format text, so SFT targets tokenize sensibly
    sol = [r["answer"] for r in generate_problems(2000, "train", cfg.generator, stream=2)]
    tokenizer = train_tokenizer(docs + sol, tcfg.vocab_size)
    model = build_model(tcfg, len(tokenizer), tokenizer.eos_token_id)
    ds = datasets.Dataset.from_dict(_blocks(tokenizer, docs, tcfg.block_size))
    logger.info("pretraining corpus: %d docs, %d blocks of %d tokens",
                len(docs), len(ds), tcfg.block_size)
    with runs.atomic_dir(out) as tmp:
        args = TrainingArguments(
            output_dir=str(tmp / "trainer"), max_steps=tcfg.pretrain_steps, seed=tcfg.seed,
            per_device_train_batch_size=tcfg.pretrain_batch_size, weight_decay=0.01,
            learning_rate=tcfg.pretrain_lr, warmup_steps=max(1, tcfg.pretrain_steps // 20),
            lr_scheduler_type="cosine", logging_steps=max(1, tcfg.pretrain_steps // 20),
            save_strategy="no", report_to="none", bf16=False, dataloader_pin_memory=False,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=False)
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          data_collator=default_data_collator)
        result = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        runs.write_json_atomic(tmp / "manifest.json", {
            "kind": "tiny-base", "key": base_key(cfg), "config": dataclasses.asdict(tcfg),
            "generator": dataclasses.asdict(cfg.generator), "n_docs": len(docs),
            "n_tokens": len(ds) * tcfg.block_size, "pretrain_loss_curve": losses,
            "final_train_loss": result.training_loss, "wall_time_s": time.time() - t0,
            "weights_hash": runs.weights_hash(tmp)})
    logger.info("built base %s in %.0f s", out, time.time() - t0)
    return out
