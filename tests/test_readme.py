"""The README's results section quotes the notebooks' computed summaries and types no number."""

import re
from pathlib import Path

import pytest

from alignkit.report import SUMMARY_BLOCK, fill_readme

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def results_section(text: str) -> str:
    start = text.index("## Results of the embedded run")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_every_quoted_summary_is_the_computed_one():
    """Each ``<!-- summary: images/NN_*.md -->`` block holds exactly the file the default run's
    notebook wrote (``make readme`` copies them): a caption and its result cannot disagree."""
    assert fill_readme(README, REPO) == README, "README differs from images/*.md: run make readme"
    quoted = {m["path"] for m in SUMMARY_BLOCK.finditer(results_section(README))}
    for nb in sorted((REPO / "notebooks").glob("0[1-5]_*.py")):
        assert f"images/{nb.stem}.md" in quoted, f"the results section does not quote {nb.stem}"


def test_no_number_is_typed_by_hand_in_the_results_section():
    text = SUMMARY_BLOCK.sub("", results_section(README))
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # images
    text = re.sub(r"`[^`]*`", "", text)  # code: file and function names
    text = re.sub(r"\bnotebooks? 0\d(–0\d)?\b|\b0\d_[a-z_]+", "", text)
    # not results: interval levels, the bootstrap's subsample share, years, issues, dtype names
    text = re.sub(r"\b(95|80) %|\b(19|20)\d\d\b|#\d+|\b(bfloat|float|bf|fp)\d+\b", "", text)
    typed = [line for line in text.splitlines() if re.search(r"\d", line)]
    assert not typed, "numbers typed by hand in the results section:\n" + "\n".join(typed)


def test_fill_readme(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.md").write_text("- seven in 2 of 3 seeds\n")
    text = "x\n<!-- summary: images/a.md -->\nold\n<!-- /summary -->\ny\n"
    assert fill_readme(text, tmp_path) == ("x\n<!-- summary: images/a.md -->\n- seven in 2 of 3 seeds\n"
                                           "<!-- /summary -->\ny\n")
    with pytest.raises(FileNotFoundError, match="quotes images/b.md"):
        fill_readme(text.replace("a.md", "b.md"), tmp_path)
