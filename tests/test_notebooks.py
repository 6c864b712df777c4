"""Every notebook is a jupytext pair: the .ipynb (no outputs) holds exactly the cells of its .py."""

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
def test_first_code_cell_is_parameters(py):
    nb = jupytext.read(py, fmt="py:percent")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert 'os.environ.get("ALIGNKIT_SMOKE")' in code[0].source
    rest = "\n".join(c.source for c in code[1:])
    assert "ALIGNKIT_SMOKE" not in rest  # read in the parameters cell and nowhere else
