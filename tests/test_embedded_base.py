"""The shipped embedded base: every machine starts from the same weights; the recipe rebuilds a
base of the same accuracy (slow; ALIGNKIT_SLOW=1)."""

import json
import os
import shutil

import pytest

from alignkit import runs, tiny
from alignkit.config import get_config

SLOW = os.environ.get("ALIGNKIT_SLOW") == "1"


def test_the_shipped_base_is_the_default_recipes():
    cfg = get_config("tiny")
    manifest = json.loads((tiny.SHIPPED / "manifest.json").read_text())
    assert manifest["key"] == tiny.base_key(cfg), \
        "the recipe changed without re-shipping alignkit/embedded_base (see docs/embedded.md)"
    assert tiny.shipped_base(cfg) == tiny.SHIPPED
    assert runs.weights_hash(tiny.SHIPPED) == manifest["weights_hash"]


def test_ensure_base_copies_the_shipped_weights(tmp_path):
    cfg = get_config("tiny", overrides={"root": str(tmp_path)})
    out = tiny.ensure_base(cfg)
    assert out == tiny.base_dir(cfg) and out != tiny.SHIPPED
    assert runs.weights_hash(out) == runs.weights_hash(tiny.SHIPPED)
    assert runs.manifest_matches(out)
    assert tiny.ensure_base(cfg) == out  # reused, not copied again


def test_other_recipes_do_not_take_the_shipped_base(smoke_cfg):
    assert tiny.shipped_base(smoke_cfg) is None  # the smoke base builds its own


def test_a_damaged_shipped_base_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "shipped"
    shutil.copytree(tiny.SHIPPED, fake)
    manifest = json.loads((fake / "manifest.json").read_text())
    (fake / "manifest.json").write_text(json.dumps(dict(manifest, weights_hash="0" * 16)))
    monkeypatch.setattr(tiny, "SHIPPED", fake)
    with pytest.raises(RuntimeError, match="does not match its manifest"):
        tiny.shipped_base(get_config("tiny"))


@pytest.mark.skipif(not SLOW, reason="rebuilds the base (~18 min on 2 cores) and evaluates both; "
                    "ALIGNKIT_SLOW=1 runs it")
def test_a_rebuild_reaches_the_shipped_accuracy(tmp_path):
    from alignkit.evaluate import evaluate_checkpoint

    cfg = get_config("tiny", overrides={"root": str(tmp_path)})
    rebuilt = tiny.build_base(cfg, tmp_path / "rebuilt")
    acc = {name: evaluate_checkpoint(path, cfg).accuracy
           for name, path in (("shipped", tiny.SHIPPED), ("rebuilt", rebuilt))}
    loss = {name: json.loads((path / "manifest.json").read_text())["final_train_loss"]
            for name, path in (("shipped", tiny.SHIPPED), ("rebuilt", rebuilt))}
    print(f"rebuild: accuracy {acc}, final pretraining loss {loss}")
    assert abs(acc["rebuilt"] - acc["shipped"]) <= tiny.REBUILD_TOLERANCE, acc
    assert abs(loss["rebuilt"] - loss["shipped"]) <= 0.05, loss
