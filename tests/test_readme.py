"""The README is a front page: at most 300 lines, every page of docs/ linked from it, every link
alive. Its results section and docs/results.md quote the notebooks' computed summaries and type no
number."""

import json
import re
import sys
from pathlib import Path

import pytest

from alignkit.analyses.common import ANALYSIS_VERSION
from alignkit.analyses.summaries import published
from alignkit.config import PUBLISHED, default_root
from alignkit.runs import NotCached

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from readme import (  # noqa: E402
    SUMMARY_BLOCK,
    VERDICTS_BLOCK,
    differences,
    fill_readme,
    library_versions,
    provenance,
    recorded_results_here,
    regenerate_published,
    sha256,
    unlike,
    verdict_table,
)

README = (REPO / "README.md").read_text()
DOCS = sorted((REPO / "docs").glob("*.md"))
NOTEBOOKS = [nb.stem for nb in sorted((REPO / "notebooks").glob("0[1-5]_*.py"))]


def results_section(text: str) -> str:
    start = text.index("## Results")
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


PROVENANCE = json.loads((REPO / "images" / "provenance.json").read_text())


def test_the_published_summaries_are_the_recorded_ones():
    """``make publish`` records every summary's checksum (images/provenance.json) after checking
    it against the cached results: a summary edited by hand, copied without ``make publish`` or
    left from an older computation (``ANALYSIS_VERSION``) fails here."""
    names = {f"{folder}/{n}" if folder else n for preset, folder in PUBLISHED.items()
             for n in published(preset)}
    assert set(PROVENANCE["summaries"]) == names == {
        p.relative_to(REPO / "images").with_suffix("").as_posix()
        for p in (REPO / "images").rglob("*.md")}
    for name, digest in PROVENANCE["summaries"].items():
        assert sha256(REPO / "images" / f"{name}.md") == digest, (
            f"images/{name}.md is not the summary make publish recorded")
    assert PROVENANCE["analysis_version"] == ANALYSIS_VERSION, (
        "the published summaries were computed by an older ANALYSIS_VERSION: make reproduce, "
        "then make publish")
    assert PROVENANCE["results"], "the record names no cached result"


def test_the_published_summaries_are_what_their_cached_results_give():
    """Where the results the summaries were published from are cached (the publishing machine),
    every summary is recomputed from them read-only with today's code and must equal the
    published file; elsewhere (a clean clone, another machine's ``make reproduce``) skipped, and
    ``tools/readme.py check`` checks that machine's own summaries against its own results."""
    why = recorded_results_here(PROVENANCE, default_root())
    if why:
        pytest.skip(f"the published results are not here: {why}")
    try:
        texts, read = regenerate_published(list(PUBLISHED))
    except NotCached as e:
        pytest.fail(f"today's code asks for results the published summaries did not come from "
                    f"({e}): make reproduce, then make publish")
    assert not unlike(texts, REPO / "images"), "summaries differ from what their results give"
    assert {str(e.relative_to(default_root()).as_posix()) for e in read} == set(PROVENANCE["results"])


def test_provenance_records_and_detects_other_results(tmp_path):
    """The record: each summary's and each cache entry's checksum; entries missing or holding
    other results are named, and ``unlike`` names summaries that differ or are missing."""
    images, root = tmp_path / "images", tmp_path / "runs"
    images.mkdir()
    (images / "a.md").write_text("- x\n")
    entry = root / "sft" / "analysis" / "cka-1"
    entry.mkdir(parents=True)
    (entry / "key.json").write_text('{"key": 1}')
    record = provenance(images, ["a"], [entry], root, ANALYSIS_VERSION)
    assert record["summaries"] == {"a": sha256(images / "a.md")}
    assert record["libraries"] == library_versions() and "transformers" in record["libraries"]
    assert list(record["results"]) == ["sft/analysis/cka-1"]
    assert recorded_results_here(record, root) is None
    (entry / "key.json").write_text('{"key": 2}')  # another machine's result under that key
    assert "holds other results" in recorded_results_here(record, root)
    assert "is not cached here" in recorded_results_here(record, tmp_path / "elsewhere")
    assert unlike({"a": "- x\n"}, images) == [] and unlike({"a": "- y\n", "b": ""}, images) == ["a", "b"]


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
    text = VERDICTS_BLOCK.sub("", SUMMARY_BLOCK.sub("", text))
    text = re.sub(r"SmolLM2-135M(-Instruct)?", "", text)  # a model's name
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
    assert "the published run did not record its versions" in text
    record = {"libraries": dict(library_versions(), transformers="5.24.0")}
    (published / "provenance.json").write_text(json.dumps(record))
    line = differences(fresh, published).splitlines()[2]
    assert line.startswith("Libraries that differ") and "transformers 5.24.0 → " in line
    assert "torch" not in line
    record["libraries"]["transformers"] = library_versions()["transformers"]
    (published / "provenance.json").write_text(json.dumps(record))
    assert "the same versions as the published run" in differences(fresh, published)


def test_the_verdict_table_puts_each_runs_computed_verdicts_side_by_side(tmp_path):
    """The README's table of the observations' verdicts: one column per run, each cell the verdict
    its ``00_observations`` summary computed; a summary without its four verdicts is refused."""
    def summary(run, seeds, verdicts):
        return (f"Run: {run}, {seeds} training seeds. Each item ...\n\n| table |\n\nObservations "
                "(each agrees only when all its items agree; 10 items at 5 % each, uncorrected): "
                + "; ".join(f"{k}. **{v}**" for k, v in enumerate(verdicts, 1)) + ".\n")
    real = summary("SmolLM2-135M-Instruct (the wheel)", 2, ["agrees", "disagrees",
                                                           "inconclusive (2 seeds)", "agrees"])
    toy = summary("embedded", 3, ["disagrees", "agrees", "agrees", "disagrees"])
    table = verdict_table([real, toy])
    lines = table.splitlines()
    assert lines[0] == ("| observation | SmolLM2-135M-Instruct (the wheel), 2 training seeds | "
                        "embedded, 3 training seeds |")
    assert lines[3].startswith("| 2. Partial layer remapping") and \
        lines[3].endswith("| **disagrees** | **agrees** |")
    assert lines[4].endswith("| **inconclusive (2 seeds)** | **agrees** |") and len(lines) == 6
    with pytest.raises(ValueError, match="four verdicts"):
        verdict_table([real.replace("4. **agrees**", "")])
    (tmp_path / "a.md").write_text(real)
    (tmp_path / "b.md").write_text(toy)
    page = "x\n<!-- verdicts: a.md b.md -->\nold\n<!-- /verdicts -->\ny"
    assert fill_readme(page, tmp_path) == f"x\n<!-- verdicts: a.md b.md -->\n{table}<!-- /verdicts -->\ny"
