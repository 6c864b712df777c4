"""Every notebook is a jupytext pair: the .ipynb (no outputs) holds exactly the cells of its .py."""

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
PAIRS = sorted(NB_DIR.glob("*.py"))


def cells(nb):
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def test_notebooks_exist():
    assert [p.stem for p in PAIRS][:1] == ["01_sft_train"]


@pytest.mark.parametrize("py", PAIRS, ids=lambda p: p.stem)
def test_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} missing: run `make sync`"
    nb_py = jupytext.read(py, fmt="py:percent")
    nb_ipynb = jupytext.read(ipynb)
    assert cells(nb_ipynb) == cells(nb_py), f"{ipynb.name} and {py.name} differ: run `make sync`"
    assert all(not c.get("outputs") for c in nb_ipynb.cells if c.cell_type == "code"), "commit notebooks without outputs"


@pytest.mark.parametrize("py", PAIRS, ids=lambda p: p.stem)
def test_colab_setup_then_parameters(py):
    nb = jupytext.read(py, fmt="py:percent")
    code = [c for c in nb.cells if c.cell_type == "code"]
    # first: the Colab set-up cell, the same in every notebook (installs what Colab lacks)
    assert 'if "google.colab" in sys.modules:' in code[0].source
    assert code[0].source == jupytext.read(PAIRS[0], fmt="py:percent").cells[1].source
    # then the parameters cell, the only place that reads ALIGNKIT_SMOKE
    assert "parameters" in code[1].metadata.get("tags", [])
    assert 'os.environ.get("ALIGNKIT_SMOKE")' in code[1].source
    code = code[1:]
    rest = "\n".join(c.source for c in code[1:])
    assert "ALIGNKIT_SMOKE" not in rest  # read in the parameters cell and nowhere else


def test_colab_setup_does_nothing_outside_colab(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    nb = jupytext.read(PAIRS[0], fmt="py:percent")
    setup = [c for c in nb.cells if c.cell_type == "code"][0].source
    path_before = list(sys.path)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    exec(compile(setup, "colab-setup", "exec"), {})
    assert calls == [] and sys.path == path_before and Path.cwd() == tmp_path


def test_colab_setup_in_colab_clones_installs_and_enters(monkeypatch, tmp_path):
    """In Colab (simulated): clone ALIGNKIT_REPO, pip-install its requirements and the package, enter notebooks/."""
    nb = jupytext.read(PAIRS[0], fmt="py:percent")
    setup = [c for c in nb.cells if c.cell_type == "code"][0].source
    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", object())
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setattr(os.path, "isdir", lambda p: False)
    monkeypatch.setattr(os, "chdir", lambda p: calls.append(["chdir", p]))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("ALIGNKIT_REPO", raising=False)
    with pytest.raises(RuntimeError, match="set os.environ\\['ALIGNKIT_REPO'\\]"):
        exec(compile(setup, "colab-setup", "exec"), {})
    monkeypatch.setenv("ALIGNKIT_REPO", "https://example.org/align-drift.git")
    exec(compile(setup, "colab-setup", "exec"), {})
    assert calls[0] == ["git", "clone", "-q", "https://example.org/align-drift.git", "/content/align-drift"]
    assert calls[1][-4:] == ["-r", "/content/align-drift/requirements.txt", "-e", "/content/align-drift"]
    assert calls[2] == ["chdir", "/content/align-drift/notebooks"] and sys.path[0] == "/content/align-drift"
