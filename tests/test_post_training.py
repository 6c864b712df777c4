"""DPO and GRPO: rewards, run keys, smoke runs from the session SFT run, idempotence, evaluation, bad input."""

import json
import shutil

import pytest
import torch
from conftest import smoke_config
from transformers import AutoModelForCausalLM

from alignkit import train as train_mod
from alignkit.analyses import behaviour
from alignkit.analyses.common import from_run
from alignkit.config import get_config
from alignkit.data import eval_set, extract_answer, load_gsm8k
from alignkit.models import load_model
from alignkit.runs import list_checkpoints, run_dir, run_key, schedule_steps
from alignkit.tiny import base_dir
from alignkit.train import correctness_reward, format_reward, train, train_dpo, train_grpo

RIGHT = " Tom has 3+4=<<3+4=7>>7 apples.\n#### 7"
WRONG = " Tom has 3+4=<<3+4=8>>8 apples.\n#### 8"
UNFORMATTED = " Tom has 3+4=7 apples, so the answer is 7."
RAMBLING = RIGHT + "\nQuestion: Ann has 2 pens and buys 2 more. How many?\nAnswer: 2+2=<<2+2=4>>4\n#### 4"


# ----------------------------------------------------------------------------- rewards

def test_correctness_reward_values():
    completions = [RIGHT, WRONG, UNFORMATTED, "", "no number here", RAMBLING]
    gold = ["7"] * len(completions)
    # TRL passes prompts, completion ids and every dataset column as keyword arguments
    got = correctness_reward(completions, final_answer=gold, prompts=["p"] * 6, completion_ids=[[1]] * 6, extra=[0] * 6)
    assert got == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # unformatted but right counts, as in evaluation
    # without the evaluation's cut, the rambling completion's invented next answer would be scored
    assert correctness_reward([RAMBLING], final_answer=["7"], stop=()) == [0.0]
    # gold answers normalise like extract_answer: 1000 == "#### 1,000"; conversational completions
    assert correctness_reward([" 10*100=<<10*100=1000>>1,000\n#### 1,000"], final_answer=[1000]) == [1.0]
    assert correctness_reward([[{"role": "assistant", "content": "#### 7"}]], final_answer=["7"]) == [1.0]
    with pytest.raises(ValueError, match="got 2 completions but 1 gold answers"):
        correctness_reward([RIGHT, WRONG], final_answer=["7"])
    with pytest.raises(ValueError, match="gold answer 'seven' is not a number"):
        correctness_reward([RIGHT], final_answer=["seven"])


def test_format_reward_values():
    completions = [RIGHT, WRONG, UNFORMATTED, "", "#### seven", RIGHT + "\n\n", RAMBLING, "#### 7 apples"]
    assert format_reward(completions, prompts=["p"] * 8, final_answer=["7"] * 8) == [
        1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- keys and bad input

def test_run_keys(tmp_path):
    cfg = smoke_config(tmp_path)
    dirs = {m: run_dir(cfg, m) for m in ("sft", "dpo", "grpo")}
    assert dirs["sft"].parent == tmp_path / "sft"
    assert dirs["dpo"].parent == tmp_path / "dpo" and dirs["dpo"].name.startswith("tiny-smoke-")
    assert dirs["grpo"].parent == tmp_path / "grpo"
    # dotted overrides reach the new sections; each knob moves only its own run
    beta0 = smoke_config(tmp_path, **{"grpo.beta": 0.0})
    assert beta0.grpo.beta == 0.0 and run_dir(beta0, "grpo") != dirs["grpo"] and run_dir(beta0, "dpo") == dirs["dpo"]
    # an SFT change moves runs that start from SFT, not runs that start from the base
    sft2 = smoke_config(tmp_path, **{"sft.max_steps": 21})
    assert run_dir(sft2, "dpo") != dirs["dpo"] and run_dir(sft2, "grpo") != dirs["grpo"]
    base_a = smoke_config(tmp_path, **{"dpo.init": "base"})
    base_b = smoke_config(tmp_path, **{"dpo.init": "base", "sft.max_steps": 21})
    assert run_dir(base_a, "dpo") == run_dir(base_b, "dpo") != dirs["dpo"]
    # the GRPO reward cuts at the evaluation's stop strings, so they key the run
    assert run_dir(smoke_config(tmp_path, **{"eval.stop": ("\n\n",)}), "grpo") != dirs["grpo"]


@pytest.mark.parametrize("overrides, fn, message", [
    ({}, lambda c: train(c, "ppo"), r"unknown method 'ppo'; choose one of \('sft', 'dpo', 'grpo'\)"),
    ({}, lambda c: run_dir(c, "rlhf"), "unknown method 'rlhf'"),
    ({}, lambda c: from_run(c, "ppo"), "unknown method 'ppo'"),
    ({"dpo.n_pairs": 0}, train_dpo, r"dpo.n_pairs must be >= 1 \(DPO needs preference pairs\), got 0"),
    ({"grpo.n_prompts": 0}, train_grpo, r"grpo.n_prompts must be >= 1 \(GRPO needs prompts\), got 0"),
    ({"grpo.batch_size": 6, "grpo.num_generations": 4}, train_grpo,
     r"grpo.batch_size \(6\) must be divisible by grpo.num_generations \(4\)"),
    ({"grpo.num_generations": 1, "grpo.batch_size": 4}, train_grpo, "grpo.num_generations must be >= 2"),
    ({"dpo.init": "scratch"}, train_dpo, r"dpo.init must be one of \('sft', 'base'\), got 'scratch'"),
    ({"grpo.max_steps": 0}, train_grpo, "max_steps must be >= 1, got 0"),
    ({"dpo.beta": 0.0}, train_dpo, "dpo.beta must be > 0, got 0.0"),
    ({"dpo.rejected": "random"}, train_dpo, "dpo.rejected must be 'corrupt' or 'sampled', got 'random'"),
    ({"dpo.rejected": "sampled", "dpo.n_samples": 0}, train_dpo, "needs n_samples >= 1 and sample_temperature > 0"),
])
def test_bad_input_fails_before_any_work(tmp_path, overrides, fn, message):
    cfg = smoke_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        fn(cfg)
    assert not any(tmp_path.iterdir())  # nothing built: no base, no SFT, no run directory


def test_pairs_and_prompts_come_from_their_own_stream(smoke_cfg):
    """DPO pairs and GRPO prompts: a train-split stream of their own (3), never an evaluation question.

    The generator's space of short problems is small, so a share of them also occurs among the SFT
    rows by chance (9 % for the full preset's 1,600 pairs vs 8,000 SFT rows); the stream only makes
    them independent draws.
    """
    post = train_mod._post_training_rows(smoke_cfg, 64)["question"]
    sft = load_gsm8k("synthetic", "train", n=smoke_cfg.sft.n_train, generator=smoke_cfg.generator)["question"]
    assert len(set(post)) == 64 and post != sft[:64]
    assert sum(q in set(sft) for q in post) < 32
    assert not set(post) & set(eval_set(smoke_cfg)["question"])


# ----------------------------------------------------------------------------- smoke runs

def _root_with_sft(root, smoke_cfg, smoke_base, smoke_run, **overrides):
    """A fresh run root holding copies of the session base and SFT run, so only DPO/GRPO train here."""
    cfg = smoke_config(root, **overrides)
    shutil.copytree(smoke_base, base_dir(cfg))
    shutil.copytree(smoke_run, run_dir(cfg, "sft"))
    return cfg


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _spy_ref(monkeypatch, trainer_cls, seen):
    """Record, when training starts, whether the trainer's reference equals the init's weights."""
    real = trainer_cls.train

    def spy(self, *a, **kw):
        ref = self.ref_model
        seen.append(None if ref is None else {k: v.detach().clone() for k, v in ref.state_dict().items()})
        return real(self, *a, **kw)

    monkeypatch.setattr(trainer_cls, "train", spy)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, smoke_cfg, smoke_base, smoke_run):
    from trl import DPOTrainer

    cfg = _root_with_sft(tmp_path_factory.mktemp("dpo"), smoke_cfg, smoke_base, smoke_run)
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        _spy_ref(mp, DPOTrainer, seen)
        run = train_dpo(cfg)
    return cfg, run, seen


def _share_of_ones(completions, **kwargs):
    return [c.count("1") / max(1, len(c)) for c in completions]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, smoke_cfg, smoke_base, smoke_run):
    from trl import GRPOTrainer

    cfg = _root_with_sft(tmp_path_factory.mktemp("grpo"), smoke_cfg, smoke_base, smoke_run)
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        # The smoke SFT model (20 steps) answers nothing right, so exact match and format rewards are
        # all 0, every group's advantage is 0 and GRPO cannot move the weights (checked below through
        # the logged reward). To check that the trainer moves them, a reward with variance within
        # each group stands in for exact match: the share of "1" characters.
        mp.setattr(train_mod, "correctness_reward", _share_of_ones)
        _spy_ref(mp, GRPOTrainer, seen)
        run = train_grpo(cfg)
    return cfg, run, seen


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_smoke_run_checkpoints_and_manifests(method, request):
    cfg, run, seen = request.getfixturevalue(f"{method}_run")
    assert run == run_dir(cfg, method) and run.parent.name == method
    knobs = getattr(cfg, method)
    ckpts = list_checkpoints(run)
    assert [s for s, _ in ckpts] == schedule_steps(knobs.max_steps, knobs.schedule)
    init = list_checkpoints(run_dir(cfg, "sft"))[-1][1]
    init_w = _weights(init)
    assert _same(_weights(ckpts[0][1]), init_w)  # step 0 is the init: the final SFT checkpoint
    assert not _same(_weights(ckpts[-1][1]), init_w)  # training moved the weights
    # the reference the trainer used is the init (DPO: a deep copy; GRPO, beta > 0: reloaded from the init dir)
    assert len(seen) == 1 and seen[0] is not None and _same(seen[0], init_w)
    for step, d in ckpts:
        m = json.loads((d / "manifest.json").read_text())
        assert m["kind"] == method and m["init"] == str(init) and m["step"] == step
        assert m["sft_key"] == run_key(cfg, "sft") and m["run_key"] == run_key(cfg, method)
        assert {"config_hash", "data_hash", "init_weights_hash", "weights_hash", "wall_time_s", method} <= set(m)
        if step > 0:
            assert m["train_loss"] is not None and set(m["metrics"])
        load_model(d)
    assert not (run / "trainer").exists()
    log = json.loads((run / "train_log.json").read_text())
    assert len(log["loss"]) >= 1


def _completion_logprobs(model, tok, pairs) -> torch.Tensor:
    """Slow reference: summed log-prob of each pair's chosen and rejected completion (+ EOS) given its prompt.

    Returns:
        ``[n_pairs, 2]`` float64 (chosen, rejected).
    """
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for i, r in enumerate(pairs):
        n_prompt = len(tok(r["prompt"])["input_ids"])
        for j, key in enumerate(("chosen", "rejected")):
            ids = tok(r["prompt"] + r[key])["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            out[i, j] = sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))
    return out


def test_dpo_learns_the_preference(dpo_run):
    """DPO's implicit reward margin beta * (log pi/ref(chosen) - log pi/ref(rejected)) on its own pairs turns positive."""
    cfg, run, _ = dpo_run
    ckpts = list_checkpoints(run)
    init, tok = load_model(ckpts[0][1])
    final, _ = load_model(ckpts[-1][1])
    pairs = train_mod.dpo_dataset(cfg, tok)
    assert len(pairs) == cfg.dpo.n_pairs
    ratio = _completion_logprobs(final, tok, pairs) - _completion_logprobs(init, tok, pairs)
    margin = cfg.dpo.beta * (ratio[:, 0] - ratio[:, 1])
    # the smoke model is barely trained (it writes "1111..."), so 16 steps move it only a little: the
    # margin is positive on average and for most pairs (measured 0.048 and 55 %); the full run shows more
    assert margin.mean() > 0.02 and (margin > 0).double().mean() > 0.5
    log = json.loads((run / "train_log.json").read_text())
    assert log["rewards/margins"][0][1] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference


def test_grpo_rewards_logged(grpo_run):
    cfg, run, _ = grpo_run
    m = json.loads((list_checkpoints(run)[-1][1] / "manifest.json").read_text())["metrics"]
    assert m["rewards/format_reward/mean"] == 0.0  # the smoke model never writes a "#### N" line
    assert 0.0 < m["rewards/correctness_reward/mean"] < 1.0  # the stand-in reward
    assert m["completions/mean_length"] <= cfg.grpo.max_completion_length


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_finished_run_returns_at_once(method, request, monkeypatch):
    import trl

    cfg, run, _ = request.getfixturevalue(f"{method}_run")
    last = list_checkpoints(run)[-1][1] / "model.safetensors"
    mtime = last.stat().st_mtime_ns

    def boom(*a, **kw):
        raise AssertionError("a finished run must not build a trainer")

    monkeypatch.setattr(trl, "DPOTrainer", boom)
    monkeypatch.setattr(trl, "GRPOTrainer", boom)
    monkeypatch.setattr(train_mod, "load_model", boom)
    assert train(cfg, method) == run
    assert last.stat().st_mtime_ns == mtime


def test_behaviour_evaluates_every_checkpoint(dpo_run):
    cfg, run, _ = dpo_run
    res = behaviour.ensure(cfg, from_run(cfg, "dpo"))
    results = res.evals
    assert res.run_dir == run
    assert [r.step for r in results] == [s for s, _ in list_checkpoints(run)]
    assert all(r.n == cfg.eval.n_eval for r in results)
    # step 0 is the SFT final checkpoint: same weights, same greedy outputs as SFT's own evaluation
    sft_last = behaviour.ensure(cfg, from_run(cfg, "sft")).evals[-1]
    assert results[0].outputs == sft_last.outputs and results[0].correct == sft_last.correct
    assert (run / "flips.json").is_file()
    for r in results:
        assert r.accuracy == pytest.approx(sum(r.correct) / r.n)
        assert r.predictions == [extract_answer(o) for o in r.outputs]


def test_sampled_generation_is_reproducible_and_prompt_major(smoke_run):
    from alignkit.data import format_prompt
    from alignkit.evaluate import generate

    model, tok = load_model(list_checkpoints(smoke_run)[-1][1])
    prompts = [format_prompt(q) for q in load_gsm8k("synthetic", "test", n=3)["question"]]
    a = generate(model, tok, prompts, max_new_tokens=12, num_samples=4, temperature=1.0, seed=3)
    b = generate(model, tok, prompts, max_new_tokens=12, num_samples=4, temperature=1.0, seed=3)
    assert len(a) == 12 and a == b
    assert len(set(a)) > 3  # samples, not four copies of the greedy answer
    with pytest.raises(ValueError, match="greedy decoding gives one completion per prompt"):
        generate(model, tok, prompts, num_samples=2)


def test_sampled_rejections_are_the_models_own_wrong_answers(smoke_cfg, smoke_run, monkeypatch):
    cfg = get_config("tiny", smoke=True, overrides={"root": str(smoke_cfg.run_root), "dpo.rejected": "sampled",
                                                     "dpo.n_pairs": 6, "dpo.n_samples": 3})
    model, tok = load_model(list_checkpoints(smoke_run)[-1][1])
    rows = train_mod._post_training_rows(cfg, 6)
    # a stand-in sampler: sample 0 right, 1 wrong, 2 without a number for even rows; all right for odd ones
    golds = [r["final_answer"] for r in rows]

    def fake_generate(model, tokenizer, prompts, *args, num_samples=1, **kwargs):
        assert num_samples == 3 and kwargs["temperature"] == cfg.dpo.sample_temperature
        out = []
        for i, g in enumerate(golds):
            wrong = str(int(float(g)) + 1)
            out += [f" x\n#### {g}", f" y\n#### {wrong}", " no number"] if i % 2 == 0 else [f" #### {g}"] * 3
        return out

    monkeypatch.setattr(train_mod, "generate", fake_generate)
    ds = train_mod.dpo_dataset(cfg, tok, rows, model=model)
    for i, row in enumerate(ds):
        if i % 2 == 0:
            assert row["rejected_source"] == "sampled" and row["rejected"] == f" y\n#### {int(float(golds[i])) + 1}"
        else:  # every sample right: the corrupted gold solution stays
            assert row["rejected_source"] == "corrupt" and extract_answer(row["rejected"]) != golds[i]
    with pytest.raises(ValueError, match="needs the init model"):
        train_mod.dpo_dataset(cfg, tok, rows)


def test_grpo_rollouts_end_at_the_stop_string(smoke_base):
    """TRL generates GRPO's rollouts with a GenerationConfig and no tokenizer: after
    ``cut_rollouts`` a stop string ends them (before, generate refused the stop string), the rest
    of the row is padding, and TRL's rule (loss masked after the first end id) masks it."""
    from transformers import GenerationConfig

    from alignkit.models import load_model
    from alignkit.train import cut_rollouts

    model, tok = load_model(smoke_base)
    enc = tok(["Question: Tom has 3 apples.\nAnswer:"], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    free = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, n:]
    stop = tok.decode(free[3:5])
    assert stop.strip(), "the greedy continuation should hold text to stop at"
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                   stop_strings=[stop])
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**enc, generation_config=GenerationConfig(**options))
    kwargs = cut_rollouts(model, tok, [stop])
    assert kwargs == {"stop_strings": [stop]}
    ends = model.generation_config.eos_token_id
    assert set(ends) >= {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}
    out = model.generate(**enc, generation_config=GenerationConfig(**dict(options, **kwargs),
                                                                  eos_token_id=ends))[0, n:]
    kept = len(out) if not any(t in ends for t in out.tolist()) else next(
        i for i, t in enumerate(out.tolist()) if t in ends)
    assert kept <= 5 and stop in tok.decode(out[:kept])  # cut at (the first) stop string
    assert out[:kept].tolist() == free[:kept].tolist()  # the same tokens up to there
    assert all(t == tok.pad_token_id for t in out[kept:].tolist())
