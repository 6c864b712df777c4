"""The README is a front page: at most 300 lines, every page of docs/ linked from it, every link
alive. Its results section and docs/results.md quote the notebooks' computed summaries and type no
number."""

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from readme import SUMMARY_BLOCK, differences, fill_readme  # noqa: E402

README = (REPO / "README.md").read_text()
DOCS = sorted((REPO / "docs").glob("*.md"))
NOTEBOOKS = [nb.stem for nb in sorted((REPO / "notebooks").glob("0[1-5]_*.py"))]


def results_section(text: str) -> str:
    start = text.index("## Results of the embedded run")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def quoted(text: str) -> set[str]:
    return {m["path"] for m in SUMMARY_BLOCK.finditer(text)}


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 300
    linked = set(re.findall(r"\]\((docs/[^)#]+)", README))
    assert {f"docs/{p.name}" for p in DOCS} == linked, "every docs/ page is linked from the README"
    for page, text in [(REPO / "README.md", README), *((p, p.read_text()) for p in DOCS)]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which is missing"


@pytest.mark.parametrize("page", [REPO / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_quoted_summary_is_the_computed_one(page):
    """Each ``<!-- summary: images/NN_*.md -->`` block holds exactly the file the default run's
    notebook wrote (``make readme`` copies them): a caption and its result cannot disagree."""
    text = page.read_text()
    assert fill_readme(text, REPO) == text, f"{page.name} differs from images/*.md: run make readme"


def test_the_summaries_of_every_notebook_are_quoted():
    front, full = quoted(results_section(README)), quoted((REPO / "docs" / "results.md").read_text())
    for nb in NOTEBOOKS:
        assert f"images/{nb}.md" in front, f"the README's results do not quote {nb}"
        assert f"images/{nb}_seeds.md" in full, f"docs/results.md does not quote {nb}'s seeds"
    assert {"images/04_lens.md"} <= front and {"images/04_lens_seeds.md",
                                               "images/02_cka_pooling.md"} <= full


@pytest.mark.parametrize("text", [results_section(README), (REPO / "docs" / "results.md").read_text()],
                         ids=["README", "docs/results.md"])
def test_no_number_is_typed_by_hand_in_the_results(text):
    assert not typed_numbers(text), "numbers typed by hand in the results:\n" + "\n".join(typed_numbers(text))


NUMBER_WORDS = re.compile(r"\b(two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|"
                          r"fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|"
                          r"seventy|eighty|ninety|hundred|thousand|million|twice|thrice|dozen|quarter)\b", re.I)


def typed_numbers(text: str) -> list[str]:
    """Lines outside the quoted summaries that state a number: digits (percentages included),
    number words, or a number in backticks; file names, notebook numbers, interval levels, years
    and issue numbers are not results."""
    text = SUMMARY_BLOCK.sub("", text)
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # images
    text = re.sub(r"`[-+−]?\d[\d.,]*\s*%?`", " NUMBER ", text)  # a number in backticks is a number
    text = re.sub(r"`[^`]*`", "", text)  # code: file and function names
    text = NUMBER_WORDS.sub(" NUMBER ", text)
    text = re.sub(r"\bnotebooks? 0\d(–0\d)?\b|\b0\d_[a-z_]+", "", text)
    # not results: interval levels, the bootstrap's subsample share, years, issues, dtype names
    text = re.sub(r"\b(95|80) %|\b(19|20)\d\d\b|#\d+|\b(bfloat|float|bf|fp)\d+\b", "", text)
    return [line for line in text.splitlines() if re.search(r"\d|NUMBER", line)]


def test_the_typed_number_check_catches_words_backticks_and_percentages():
    assert typed_numbers("the gap fell by 12 % in `04_patching`") == ["the gap fell by 12 % in "]
    assert typed_numbers("steering carries `0.61` of it") and typed_numbers("in all three seeds")
    assert typed_numbers("Seven of twelve layers") and typed_numbers("a fraction of `+0.5 %`")
    assert not typed_numbers("see `04_patching`, notebook 04, 95 % intervals, issue #27, bf16, 2026")
    assert not typed_numbers("<!-- summary: images/a.md -->\n- 7 of 12\n<!-- /summary -->\n")


def test_fill_readme(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.md").write_text("- seven in 2 of 3 seeds\n")
    text = "x\n<!-- summary: images/a.md -->\nold\n<!-- /summary -->\ny\n"
    assert fill_readme(text, tmp_path) == ("x\n<!-- summary: images/a.md -->\n- seven in 2 of 3 seeds\n"
                                           "<!-- /summary -->\ny\n")
    with pytest.raises(FileNotFoundError, match="images/b.md is quoted but does not exist"):
        fill_readme(text.replace("a.md", "b.md"), tmp_path)


def test_differences_name_changed_verdicts_and_sentences(tmp_path):
    """``make reproduce`` reports where a reproduction differs from the published summaries."""
    fresh, published = tmp_path / "fresh", tmp_path / "published"
    for d, verdict, value in ((fresh, "agrees", 1), (published, "disagrees", 2)):
        d.mkdir()
        (d / "05.md").write_text(f"- x {value}\n\n1. *Claim one* (src) — q: items. Verdict over 3 "
                                 f"training seeds: **{verdict}**.\n")
        (d / "01.md").write_text("- same\n")
    text = differences(fresh, published)
    assert "- *Claim one*: **disagrees** → **agrees**" in text and "Identical: 01.md." in text
    assert "-- x 2\n+- x 1" in text and "### 01.md" not in text
    (fresh / "00.md").write_text("| table |\n\nObservations (4 items): 1. **agrees**; 2. "
                                 "**inconclusive (3 seeds)**.\n")
    (published / "00.md").write_text("| table |\n\nObservations (4 items): 1. **agrees**; 2. "
                                     "**disagrees**.\n")
    (fresh / "06.md").write_text("1. *Claim two* (src) — q. Verdict over 2 training seeds (its one "
                                 "item decides; 1 item at 5 % each): **inconclusive (2 seeds)**.\n")
    (published / "06.md").write_text("1. *Claim two* (src) — q. Verdict over 2 training seeds (its "
                                     "one item decides; 1 item at 5 % each): **agrees**.\n")
    text = differences(fresh, published)
    assert "- *observation 2*: **disagrees** → **inconclusive (3 seeds)**" in text
    assert "observation 1" not in text
    assert "- *Claim two*: **agrees** → **inconclusive (2 seeds)**" in text
    with pytest.raises(FileNotFoundError, match="run make reproduce first"):
        differences(tmp_path / "empty", published)
