"""Models spread by a device map (``--set device=map``: transformers' ``device_map="auto"`` over the
GPUs, accelerate's dispatch). No GPU here, so the map puts decoder layers on "disk": accelerate then
runs them through the same hooks that move weights and inputs between devices, with the weights
absent (meta) until each module runs. Every analysis must give what the plainly loaded models give:
our partial reruns call decoder layers, norms and the head directly, not through the model's
forward."""

import numpy as np
import pytest
import torch
from tiny_models import make_model, perturbed_copy

from alignkit import lens, patching
from alignkit.capture import capture
from alignkit.config import get_config
from alignkit.data import format_prompt, generate_problems
from alignkit.evaluate import answer_logprob
from alignkit.models import input_device, load_model, placement
from alignkit.tiny import train_tokenizer

MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
       "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = train_tokenizer([p["question"] + " " + p["answer"] for p in generate_problems(200, "train")], 300)
    base = make_model("qwen3", vocab_size=len(tok))
    tuned = perturbed_copy(base)
    root = tmp_path_factory.mktemp("map")
    for name, m in (("base", base), ("tuned", tuned)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def load_both(root, mapped: bool):
    kw = dict(device_map=MAP, offload_folder=root / "offload") if mapped else {}
    base, tok = load_model(root / "base", **kw)
    tuned, _ = load_model(root / "tuned", **kw)
    return base, tuned, tok


def test_mapped_models_give_the_plain_models_numbers(saved):
    plain, mapped = load_both(saved, False), load_both(saved, True)
    layer = mapped[0].model.layers[1]
    assert hasattr(layer, "_hf_hook") and layer.self_attn.q_proj.weight.device.type == "meta"
    assert input_device(mapped[0]).type == "cpu"
    probs = generate_problems(6, "test")
    examples = [{"prompt": format_prompt(p["question"]), "answer": p["answer"]} for p in probs]
    texts = [e["prompt"] + e["answer"] for e in examples]

    def run(base, tuned, tok):
        out = {"acts": capture(base, tok, texts, pooling="question").acts.numpy(),
               "lp": answer_logprob(base, tok, [e["prompt"] for e in examples], [e["answer"] for e in examples]),
               "kl": np.concatenate(lens.token_kl(base, tuned, tok, texts, progress=False))}
        for c in ("resid", "attn", "mlp"):
            r = patching.layer_sweep(base, tuned, tok, examples, component=c, progress=False)
            out[c] = r.delta
        w = patching.weight_sweep(base, tuned, tok, examples, progress=False, kinds=patching.WEIGHT_KINDS)
        out |= {k: r.delta for k, r in w.items()}
        out["steer"] = patching.steer_sweep(base, tuned, tok, examples, vecs, positions="answer", progress=False).delta
        return out

    diff = patching.mean_difference(*plain, examples, positions="answer", progress=False)
    vecs = np.concatenate([diff[None], patching.random_directions(diff, 2)])
    want, got = run(*plain), run(*mapped)
    assert set(got) == set(want) and {"revert", "graft", "steer"} <= set(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)
    assert np.abs(want["resid"]).max() > 1e-3  # the patches matter


def test_placement_follows_the_config():
    cfg = get_config("tiny", smoke=True)
    assert placement(cfg) == {"device": torch.device("cpu"), "device_map": None}
    cfg.device = "map"
    assert placement(cfg) == {"device": torch.device("cpu"), "device_map": "auto"}
