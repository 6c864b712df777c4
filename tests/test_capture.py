"""The one capture path: pooling, padding invariance, errors, the on-disk cache, comparability.

Tiny random models (``initializer_range=0.2``, so activations are O(1) and 1e-5 is a real
tolerance) and a tokenizer trained in the fixture; no network.
"""

import json
import logging
import shutil

import pytest
import torch
from tiny_models import CORPUS, make_model, make_tokenizer
from tokenizers import pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
)

import alignkit.capture as act
from alignkit import runs as cache
from alignkit.capture import (
    Activations,
    capture,
    capture_cached,
    check_comparable,
    template_span,
    texts_hash,
    varying_points,
)
from alignkit.hooks import overwrite, record
from alignkit.models import check_same_tokenizer

# lengths from 1 to ~20 tokens, so batches mix very different lengths
TEXTS = ["Tom has 5 apples and buys 3 more . How many apples does Tom have now ?", "8", "Mia reads 12 pages .",
         "A train goes 60 miles in 2 hours . Answer : 30", "How many ?", "Tom buys 3 apples each day for a week .",
         "Answer : 8", "Mia has 12 apples and Tom has 5 .", "A week", "How many pages does Mia read each day ?",
         "Tom goes 2 miles ."]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="session")
def tok_left():
    return make_tokenizer(padding_side="left")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, qwen3, tok):
    d = tmp_path_factory.mktemp("ckpt") / "qwen3"
    qwen3.save_pretrained(d)
    tok.save_pretrained(d)
    return d


POINTS = ["embed", "layers.0.resid", "layers.1.attn", "layers.1.mlp", "layers.2.resid"]


def reference(model, tok, text, name):
    """Independent reference: the text alone, through the whole causal LM, full output recorded."""
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with record(model, [name]) as s:
        model(ids)
    return s[name][0].double()  # [seq, d]


# ---------------------------------------------------------------- pooling and padding invariance


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_and_batching_do_not_change_the_result(any_model, tok, tok_left, pooling):
    kw = dict(hook_points=POINTS, pooling=pooling)
    base = capture(any_model, tok, TEXTS, batch_size=1, **kw)
    for t in (tok, tok_left):
        for bs in (3, 8, 32):
            other = capture(any_model, t, TEXTS, batch_size=bs, **kw)
            assert other.acts.shape == base.acts.shape
            torch.testing.assert_close(other.acts, base.acts, **TOL)
    # against the texts run one at a time through the full model
    for p, name in enumerate(POINTS):
        for i, text in enumerate(TEXTS):
            h = reference(any_model, tok, text, name)
            ref = h[-1] if pooling == "last" else h.mean(0)
            torch.testing.assert_close(base.acts[p, i].double(), ref, **TOL)
    # not vacuous: rows are O(1) and differ from each other by far more than the tolerance
    resid = base.acts[POINTS.index("layers.2.resid")].double()
    dist = torch.cdist(resid, resid).fill_diagonal_(1e9)
    assert resid.abs().mean() > 0.3 and dist.min() > 1e-2


PROMPTS = [f"Question : {t}\nAnswer :" for t in TEXTS]


def test_question_pooling_leaves_the_shared_template_out(any_model, tok, tok_left):
    """``"question"``: the mean over the tokens between the prefix and suffix every probe shares,
    against the texts run one at a time; any batch size and padding side alike."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    pre, suf = template_span(ids)
    assert pre >= 2 and suf >= 2  # "Question :" and "\nAnswer :" at least
    base = capture(any_model, tok, PROMPTS, POINTS, pooling="question", batch_size=1)
    assert base.meta["template_tokens"] == [pre, suf] and "row_pos" not in base.meta
    for t in (tok, tok_left):
        torch.testing.assert_close(capture(any_model, t, PROMPTS, POINTS, pooling="question", batch_size=4).acts,
                                   base.acts, **TOL)
    for p, name in enumerate(POINTS):
        for i, text in enumerate(PROMPTS):
            h = reference(any_model, tok, text, name)
            torch.testing.assert_close(base.acts[p, i].double(), h[pre : len(h) - suf].mean(0), **TOL)
    mean = capture(any_model, tok, PROMPTS, POINTS, pooling="mean")
    assert (base.acts - mean.acts).abs().max() > 1e-2  # the template rows did count under "mean"


def test_template_span():
    assert template_span([[1, 2, 5, 9], [1, 2, 6, 7, 9]]) == (2, 1)
    assert template_span([[1, 5, 2], [3, 5, 4]]) == (0, 0)  # nothing shared at either end
    with pytest.raises(ValueError, match="at least 2 texts"):
        template_span([[1, 2, 3]])
    with pytest.raises(ValueError, match="text 0 has no token besides the shared template"):
        template_span([[1, 9], [1, 4, 9]])


def test_shapes_and_meta(qwen3, tok):
    a = capture(qwen3, tok, TEXTS, POINTS, pooling="last")
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert isinstance(a, Activations) and a.acts.shape == (5, len(TEXTS), 32) and a.acts.dtype == torch.float32
    assert a.hook_points == POINTS and a.pooling == "last"
    m = a.meta
    assert m["n_texts"] == m["n_rows"] == len(TEXTS) and m["n_tokens"] == sum(lengths)
    assert m["row_pos"] == [n - 1 for n in lengths]
    assert m["probe_hash"] == texts_hash(TEXTS) and m["model_class"] == "Qwen3ForCausalLM"
    assert m["n_layers"] == 3 and m["d_model"] == 32 and m["vocab_size"] == len(tok)
    assert json.loads(json.dumps(m)) == m  # plain JSON: the cache stores it as is
    default = capture(qwen3, tok, TEXTS[:3])
    assert default.hook_points == ["embed", "layers.0.resid", "layers.1.resid", "layers.2.resid"]
    assert default.pooling == "last"
    mlps = capture(qwen3, tok, TEXTS[:3], lambda n: n.endswith(".mlp"))
    assert mlps.hook_points == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]


def test_constant_points_recorded(qwen3, tok):
    same_end = ["Tom has 5 apples .", "A train goes 60 miles .", "Mia reads 12 pages each day ."]
    last = capture(qwen3, tok, same_end, pooling="last")
    assert last.meta["constant_points"] == ["embed"]  # every prompt ends with "."
    assert torch.equal(last.acts[0], last.acts[0, :1].expand_as(last.acts[0]))
    assert capture(qwen3, tok, same_end, pooling="mean").meta["constant_points"] == []
    assert capture(qwen3, tok, TEXTS, pooling="last").meta["constant_points"] == []


def test_varying_points_drop_what_any_capture_holds_constant(qwen3, tok):
    same_end = ["Tom has 5 apples .", "A train goes 60 miles .", "Mia reads 12 pages each day ."]
    last, mean = (capture(qwen3, tok, same_end, pooling=p) for p in ("last", "mean"))
    n = len(last.hook_points)
    assert varying_points([mean]) == (list(range(n)), ["embed", "0", "1", "2"], [])
    assert varying_points([mean, last]) == (list(range(1, n)), ["0", "1", "2"], ["embed"])
    with pytest.raises(ValueError, match="at least one capture"):
        varying_points([])


def test_storage_dtype_and_float64_pooling(qwen3, tok):
    f64 = capture(qwen3, tok, TEXTS, POINTS, pooling="mean", dtype=torch.float64)
    f32 = capture(qwen3, tok, TEXTS, POINTS, pooling="mean")
    bf16 = capture(qwen3, tok, TEXTS, POINTS, pooling="mean", dtype=torch.bfloat16)
    assert (f64.acts.dtype, f32.acts.dtype, bf16.acts.dtype) == (torch.float64, torch.float32, torch.bfloat16)
    torch.testing.assert_close(f32.acts, f64.acts.float(), rtol=0, atol=0)  # float64 mean, then rounded
    torch.testing.assert_close(bf16.acts, f64.acts.bfloat16(), rtol=0, atol=0)


def test_eval_mode_and_mode_restored(tok):
    model = make_model("qwen3", attention_dropout=0.5).train()
    a = capture(model, tok, TEXTS, pooling="mean")
    b = capture(model, tok, TEXTS, pooling="mean")
    assert model.training  # restored
    torch.testing.assert_close(a.acts, b.acts, rtol=0, atol=0)  # no dropout: eval mode inside
    model.eval()
    torch.testing.assert_close(capture(model, tok, TEXTS, pooling="mean").acts, a.acts, rtol=0, atol=0)


def test_capture_errors(qwen3, tok):
    with pytest.raises(ValueError, match="at least one text, got an empty list"):
        capture(qwen3, tok, [])
    with pytest.raises(ValueError, match=r"text 1 tokenizes to zero tokens: ''"):
        capture(qwen3, tok, ["Tom", "", "Mia"])
    with pytest.raises(ValueError, match=r"text 0 tokenizes to zero tokens: '   '"):
        capture(qwen3, tok, ["   "])
    with pytest.raises(TypeError, match="single str"):
        capture(qwen3, tok, "Tom has 5 apples .")
    with pytest.raises(ValueError, match="pooling must be one of"):
        capture(qwen3, tok, TEXTS, pooling="max")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        capture(qwen3, tok, TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        capture(qwen3, tok, TEXTS, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"the model is on cpu but device='meta'"):
        capture(qwen3, tok, TEXTS, device="meta")
    with pytest.raises(ValueError, match=r"layers\.3\.resid: model has 3 layers"):
        capture(qwen3, tok, TEXTS, ["layers.3.resid"])
    with overwrite(qwen3, {"layers.1.mlp": lambda x: x * float("nan")}):
        with pytest.raises(ValueError, match=r"^NaN in layers\.1\.resid activations \(text 0: 'Tom has"):
            capture(qwen3, tok, TEXTS)
    with overwrite(qwen3, {"layers.2.resid": lambda x: x * 1e6}):
        with pytest.raises(ValueError, match=r"layers\.2\.resid activations overflow torch\.float16 \(max \|x\| = "):
            capture(qwen3, tok, TEXTS, dtype=torch.float16)
    # only text 4 goes bad; its row is the one named, with any batch size
    def poison(x):
        return x if x.shape[1] != 3 else torch.full_like(x, float("inf"))  # "How many ?" is 3 tokens
    with overwrite(qwen3, {"layers.2.resid": poison}):
        with pytest.raises(ValueError, match=r"^Inf in layers\.2\.resid activations \(text 4: 'How many \?'\)"):
            capture(qwen3, tok, TEXTS, batch_size=1)


# ---------------------------------------------------------------- cache


class Spy:
    """Counts capture passes and model loads through the module's own names."""

    def __init__(self, monkeypatch):
        self.captures, self.loads, self.poolings = 0, 0, []
        real_capture, real_load = act.capture_poolings, AutoModelForCausalLM.from_pretrained

        def capture_spy(*a, **k):
            self.captures += 1
            self.poolings.append(list(a[3]))
            return real_capture(*a, **k)

        def load_spy(*a, **k):
            self.loads += 1
            return real_load(*a, **k)

        monkeypatch.setattr(act, "capture_poolings", capture_spy)
        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load_spy)


def test_cache_hit_and_misses(model_dir, qwen3, tok, tmp_path, monkeypatch):
    ref = capture(qwen3, tok, TEXTS, POINTS, pooling="mean")
    spy = Spy(monkeypatch)
    cdir = tmp_path / "cache"
    a = capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir)
    assert (spy.captures, spy.loads) == (1, 1)
    torch.testing.assert_close(a.acts, ref.acts, rtol=0, atol=0)
    b = capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir, batch_size=2)  # batch size is not in the key
    assert (spy.captures, spy.loads) == (1, 1)
    assert torch.equal(a.acts, b.acts) and a.hook_points == b.hook_points and a.meta == b.meta
    # an already loaded model plus its directory hits the same entry without running the model
    forwards = []
    h = qwen3.model.embed_tokens.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        c = capture_cached(qwen3, tok, TEXTS, POINTS, "mean", cdir, model_dir=model_dir)
    finally:
        h.remove()
    assert forwards == [] and (spy.captures, spy.loads) == (1, 1) and torch.equal(c.acts, a.acts)
    # the tokenizer can come from the directory
    assert torch.equal(capture_cached(model_dir, None, TEXTS, POINTS, "mean", cdir).acts, a.acts)
    assert spy.captures == 1
    # anything in the key changes -> a miss
    misses = [dict(texts=TEXTS[:-1]), dict(pooling="last"), dict(hook_points=POINTS[:2]),
              dict(dtype=torch.float64), dict(add_special_tokens=True)]
    for i, change in enumerate(misses, start=2):
        kw = {"texts": TEXTS, "hook_points": POINTS, "pooling": "mean", **change}
        capture_cached(model_dir, tok, kw.pop("texts"), kw.pop("hook_points"), kw.pop("pooling"), cdir, **kw)
        assert spy.captures == i, change
    assert len(list(cdir.glob("acts-*"))) == len(misses) + 1
    assert not list(cdir.glob(".*.tmp"))


def test_poolings_together_in_one_pass(model_dir, qwen3, tok, tmp_path, monkeypatch):
    """Several poolings from one forward per batch equal each pooling captured alone, bit for bit
    (meta too); ``together`` caches them all from one pass and later calls hit."""
    alone = {p: capture(qwen3, tok, TEXTS, POINTS, pooling=p, batch_size=3) for p in act.POOLINGS}
    forwards = []
    h = qwen3.model.embed_tokens.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        both = act.capture_poolings(qwen3, tok, TEXTS, act.POOLINGS, POINTS, batch_size=3)
    finally:
        h.remove()
    assert len(forwards) == 4  # 11 texts in batches of 3: one forward each, not one per pooling
    for p, a in alone.items():
        assert torch.equal(both[p].acts, a.acts) and both[p].meta == a.meta, p
        assert both[p].pooling == p and both[p].hook_points == a.hook_points
    spy, cdir = Spy(monkeypatch), tmp_path / "cache"
    got = capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir, batch_size=3,
                         together=act.POOLINGS)
    assert (spy.captures, spy.loads) == (1, 1) and len(list(cdir.glob("acts-*"))) == 3
    assert torch.equal(got.acts, alone["mean"].acts)
    for p in act.POOLINGS:  # each pooling's own entry, as capture_cached alone keys it
        assert torch.equal(capture_cached(model_dir, tok, TEXTS, POINTS, p, cdir).acts,
                           alone[p].acts)
    assert spy.captures == 1
    # only what is missing is computed: one entry removed, one pass of that pooling alone
    gone = next(cdir.glob("acts-*"))
    pooling = json.loads((gone / "key.json").read_text())["key"]["pooling"]
    shutil.rmtree(gone)
    capture_cached(model_dir, tok, TEXTS, POINTS, "last", cdir, together=act.POOLINGS)
    assert spy.poolings == [["mean", "last", "question"], [pooling]]
    assert len(list(cdir.glob("acts-*"))) == 3
    with pytest.raises(ValueError, match="pooling must be one of"):
        capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir, together=["max"])


def test_cache_keyed_by_weights_content(tok, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    d, cdir = tmp_path / "m", tmp_path / "cache"
    make_model("qwen3", seed=0).save_pretrained(d)
    a = capture_cached(d, tok, TEXTS, None, "last", cdir)
    make_model("qwen3", seed=1).save_pretrained(d)  # same path, new weights
    b = capture_cached(d, tok, TEXTS, None, "last", cdir)
    assert spy.captures == 2 and not torch.allclose(a.acts[1:], b.acts[1:])
    make_model("qwen3", seed=0).save_pretrained(d)  # the first weights again: a hit
    assert torch.equal(capture_cached(d, tok, TEXTS, None, "last", cdir).acts, a.acts) and spy.captures == 2
    # a bfloat16 copy of the loaded model does not read the float32 entry
    bf16 = make_model("qwen3", seed=0).to(torch.bfloat16)
    capture_cached(bf16, tok, TEXTS, None, "last", cdir, model_dir=d)
    assert spy.captures == 3


def _damage_truncate(path, _rec):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _damage_flip(path, _rec):  # same size, one byte changed in the tensor data
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage_record_missing(_path, rec):
    rec.unlink()


def _damage_record_stale(_path, rec):
    info = json.loads(rec.read_text())
    info["key"]["pooling"] = "last"
    rec.write_text(json.dumps(info))


def _damage_result_json(path, _rec):  # the non-array part of the result, same size
    meta = path.with_name("result.json")
    meta.write_text(meta.read_text().replace('"mean"', '"last"'))


def _damage_record_garbage(_path, rec):
    rec.write_text("{not json")


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip, _damage_record_missing, _damage_record_stale,
                                    _damage_record_garbage, _damage_result_json])
def test_damaged_cache_is_rebuilt(model_dir, tok, tmp_path, monkeypatch, caplog, damage):
    spy = Spy(monkeypatch)
    cdir = tmp_path / "cache"
    a = capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir)
    (entry,) = cdir.glob("acts-*")
    damage(entry / "result" / "arrays.safetensors", entry / "key.json")
    with caplog.at_level(logging.WARNING, logger="alignkit.runs"):
        b = capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir)
    assert spy.captures == 2 and "damaged or stale" in caplog.text and "recomputing" in caplog.text
    assert torch.equal(a.acts, b.acts) and a.meta == b.meta
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignkit.runs"):
        capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir)
    assert spy.captures == 2 and not caplog.text  # the rebuilt entry is a clean hit


def test_cache_argument_errors(model_dir, qwen3, tok, tmp_path):
    with pytest.raises(ValueError, match="without model_dir"):
        capture_cached(qwen3, tok, TEXTS, None, "last", tmp_path)
    with pytest.raises(ValueError, match="not a model directory"):
        capture_cached(tmp_path, tok, TEXTS, None, "last", tmp_path)
    with pytest.raises(TypeError, match="list of names"):
        capture_cached(model_dir, tok, TEXTS, lambda n: True, "last", tmp_path)
    with pytest.raises(ValueError, match="at least one text"):
        capture_cached(model_dir, tok, [], None, "last", tmp_path)
    assert not list(tmp_path.glob("acts-*"))


def test_captures_of_a_set_of_checkpoints(tok, tmp_path, monkeypatch):
    from alignkit.analyses.common import Checkpoints, captures
    from alignkit.config import get_config

    paths = {}
    for step in (0, 10):
        paths[str(step)] = tmp_path / "run" / f"step-{step}"
        make_model("qwen3", seed=step).save_pretrained(paths[str(step)])
        tok.save_pretrained(paths[str(step)])
    ckpts = Checkpoints(paths, {"0": 0, "10": 10}, {}, tmp_path / "store")
    cfg = get_config("tiny", overrides={"root": str(tmp_path / "root")})
    out = captures(cfg, ckpts, "mean", TEXTS)
    assert list(out) == ["0", "10"] and all(a.acts.shape == (4, len(TEXTS), 32) for a in out.values())
    assert len(list((tmp_path / "root" / "activations").glob("acts-*"))) == 2  # by content, under the root
    spy = Spy(monkeypatch)
    again = captures(cfg, ckpts, "mean", TEXTS)  # all hits
    assert spy.captures == 0 and all(torch.equal(again[k].acts, out[k].acts) for k in out)
    deeper = tmp_path / "deeper"
    make_model("qwen3", num_hidden_layers=4).save_pretrained(deeper)
    tok.save_pretrained(deeper)
    with pytest.raises(ValueError, match="cannot compare: a has 3 layers, b has 4"):
        captures(cfg, Checkpoints({"0": paths["0"], "x": deeper}, {"0": 0, "x": 1}, {}, tmp_path), "mean", TEXTS)


# ---------------------------------------------------------------- comparability


def test_check_comparable(qwen3, tok):
    a = capture(qwen3, tok, TEXTS, pooling="mean")
    check_comparable(a, capture(make_model("qwen3", seed=1), tok, TEXTS, pooling="mean"))  # a fine-tuned twin
    deeper = capture(make_model("qwen3", num_hidden_layers=4), tok, TEXTS, pooling="mean")
    with pytest.raises(ValueError, match=r"^cannot compare: a has 3 layers, b has 4$"):
        check_comparable(a, deeper)
    with pytest.raises(ValueError, match="cannot compare: hook points differ"):
        check_comparable(a, capture(qwen3, tok, TEXTS, ["embed", "layers.0.mlp", "layers.1.resid", "layers.2.resid"],
                                    pooling="mean"))
    with pytest.raises(ValueError, match="cannot compare: a uses 'mean' pooling, b 'last'"):
        check_comparable(a, capture(qwen3, tok, TEXTS, pooling="last"))
    with pytest.raises(ValueError, match=r"cannot compare: different probe sets \(a: 11 texts.*b: 10 texts"):
        check_comparable(a, capture(qwen3, tok, TEXTS[:-1], pooling="mean"))
    wide = capture(make_model("llama", hidden_size=48, head_dim=12), tok, TEXTS, pooling="mean")
    with pytest.raises(ValueError, match="cannot compare: a has width 32, b has 48"):
        check_comparable(a, wide)
    check_comparable(a, wide, same_width=False)
    other_tok = make_tokenizer(corpus=CORPUS[::-1] + ["Answer apples pages"])
    retok = capture(qwen3, other_tok, TEXTS, pooling="mean")
    with pytest.raises(ValueError, match="tokenized differently"):
        check_comparable(a, retok)
    check_comparable(a, retok, same_tokenization=False)


def test_check_same_tokenizer(tok, tmp_path):
    assert check_same_tokenizer(tok, tok) == []
    tok.save_pretrained(tmp_path / "tok")
    assert check_same_tokenizer(tok, AutoTokenizer.from_pretrained(tmp_path / "tok")) == []
    with pytest.raises(ValueError, match=r"tokenizers differ: vocabularies of \d+ and \d+ tokens, \d+ entries differ"):
        check_same_tokenizer(tok, make_tokenizer(corpus=["Completely different words here", "zebra quartz"]))
    # a base / instruct pair differing only in the end and pad tokens (Qwen3-0.6B-Base ends with
    # <|endoftext|>, Qwen3-0.6B with <|im_end|>): positions pair up, so reported, not refused
    instruct = make_tokenizer(pad="<eos>")
    instruct.eos_token = "<unk>"
    assert check_same_tokenizer(tok, instruct) == ["eos_token: '<eos>' vs '<unk>'", "pad_token: '<pad>' vs '<eos>'"]
    # the same vocabulary and merges cut differently before BPE: refused
    other = make_tokenizer()
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(ValueError, match="tokenizers differ in their pre-tokenizer"):
        check_same_tokenizer(tok, other)


def test_a_base_instruct_pair_is_compatible(tmp_path, caplog):
    """``check_compatible`` (compare --models) accepts two checkpoints whose tokenizers differ
    only in their end token, and logs the difference."""
    import logging

    from alignkit.models import check_compatible

    dirs = {}
    for name, eos in (("base", "<eos>"), ("instruct", "<unk>")):
        t = make_tokenizer()
        t.eos_token = eos
        make_model().save_pretrained(tmp_path / name)
        t.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    with caplog.at_level(logging.WARNING):
        check_compatible(dirs)
    assert "name special tokens differently (eos_token: '<eos>' vs '<unk>')" in caplog.text


# ---------------------------------------------------------------- memory-mapped cache entries


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mmap_cache_entries(model_dir, qwen3, tok, tmp_path, monkeypatch, dtype):
    ref = capture(qwen3, tok, TEXTS, POINTS, pooling="mean", dtype=dtype)
    spy = Spy(monkeypatch)
    cdir = tmp_path / "cache"
    # a miss with mmap=True returns the file's tensor, equal to the in-memory capture
    built = capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir, dtype=dtype, mmap=True)
    assert built.acts.dtype == dtype and torch.equal(built.acts, ref.acts)
    (entry,) = cdir.glob("acts-*")
    # a hit with mmap=True: same values and meta, no model run
    hit = capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir, dtype=dtype, mmap=True)
    assert spy.captures == 1 and torch.equal(hit.acts, ref.acts) and hit.meta == built.meta
    # the entry by path (runs.load_entry), memory-mapped or read
    for mm in (True, False):
        got = cache.load_entry(entry, mmap=mm)
        assert torch.equal(got.acts, ref.acts) and got.hook_points == POINTS and got.meta == built.meta
    # copy-on-write: writing to the mapped tensor never changes the file
    hit.acts[0, 0, 0] = 1234.0
    assert torch.equal(cache.load_entry(entry).acts, ref.acts)


def test_mmap_reads_pages_from_the_file(tmp_path):
    from safetensors.torch import save_file

    x = torch.arange(24, dtype=torch.float16).reshape(2, 3, 4)
    path = tmp_path / "t.safetensors"
    save_file({"acts": x, "other": torch.ones(5)}, str(path))
    t = cache.mmap_tensor(path, "acts")
    assert torch.equal(t, x) and t.dtype == torch.float16
    # the tensor is a view of the file: an in-place change of the file's bytes shows through
    data = bytearray(path.read_bytes())
    n_header = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n_header])
    start = 8 + n_header + header["acts"]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(torch.tensor([-7.0], dtype=torch.float16).numpy().tobytes())
    assert float(t[0, 0, 0]) == -7.0
    with pytest.raises(ValueError, match=r"holds no tensor 'nope' \(tensors: \['acts', 'other'\]\)"):
        cache.mmap_tensor(path, "nope")


def test_load_entry_errors(model_dir, tok, tmp_path):
    with pytest.raises(ValueError, match="is not a cache entry"):
        cache.load_entry(tmp_path / "acts-missing")
    cdir = tmp_path / "cache"
    capture_cached(model_dir, tok, TEXTS, POINTS, "mean", cdir, dtype=torch.float16)
    (entry,) = cdir.glob("acts-*")
    _damage_flip(entry / "result" / "arrays.safetensors", None)
    with pytest.raises(ValueError, match="arrays.safetensors does not match its checksum"):
        cache.load_entry(entry)
