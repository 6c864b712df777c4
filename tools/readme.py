"""The README and docs/ quote the notebooks' summaries, never type them.

``python tools/readme.py fill``: every ``<!-- summary: PATH -->`` … ``<!-- /summary -->`` block of
README.md and docs/*.md gets the file at PATH, every ``<!-- verdicts: PATH ... -->`` block the
table of those observation summaries' verdicts (``make readme``; ``tests/test_readme.py`` fails
while they differ). ``python tools/readme.py differences``: where ``make reproduce``'s summaries
(``runs/images/``) differ from the published ones (``images/``), printed and written beside them.
``python tools/readme.py check [PRESET ...]``: every summary of the published runs
(``config.PUBLISHED``: the toy's in ``images/``, the real model's in ``images/smollm2-135m/``; or
those named) recomputed read-only from the cached results
(``alignkit.analyses.summaries.regenerate``) equals the one the notebooks wrote (``make test``
after the smoke notebooks, ``make reproduce`` after the full ones; ``ALIGNKIT_SMOKE=1``: the toy's
smoke run). ``python tools/readme.py publish``: that check on every published run, then their
figures and summaries into ``images/`` with ``images/provenance.json`` (each summary's and each
cache entry's SHA-256), then ``fill`` (``make publish``); ``tests/test_readme.py`` holds the
published summaries against the record and, where the recorded results are cached, against what
they give.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUMMARY_BLOCK = re.compile(r"(<!-- summary: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /summary -->)",
                           re.S)
VERDICT = re.compile(r"^\d+\. \*(?P<claim>[^*]+)\*.*Verdict over [^:]+: "
                     r"\*\*(?P<verdict>[a-z0-9 ()]+)\*\*", re.M)
# the seed study's observations (images/00_observations.md): "Observations (...): 1. **agrees**"
OBSERVATION = re.compile(r"(?P<claim>\d)\. \*\*(?P<verdict>[a-z0-9 ()]+)\*\*")


# several runs' observation verdicts side by side: "<!-- verdicts: PATH ... -->" … the end tag
VERDICTS_BLOCK = re.compile(
    r"(<!-- verdicts: (?P<paths>[^>]+?) -->\n)(?P<body>.*?)(<!-- /verdicts -->)", re.S)
RUN_LINE = re.compile(r"^Run: (?P<run>.+?), (?P<seeds>\S+ training seeds?)\.", re.M)


def _quoted(root: Path, rel: str) -> str:
    path = root / rel
    if not path.is_file():
        raise FileNotFoundError(f"{rel} is quoted but does not exist: run make reproduce, then "
                                "make publish (which writes images/*.md)")
    return path.read_text()


def verdict_table(texts: list[str]) -> str:
    """The observations' verdicts of each run's ``00_observations`` summary (``texts``) as one
    Markdown table, a column per run: what the summaries computed, side by side."""
    from alignkit.analyses.observations import OBSERVATIONS

    heads, columns = [], []
    for text in texts:
        run, verdicts = RUN_LINE.search(text), dict(OBSERVATION.findall(_observations(text)))
        if run is None or set(verdicts) != {str(k) for k in OBSERVATIONS}:
            raise ValueError("an observations summary without its run line or four verdicts")
        heads.append(f"{run['run']}, {run['seeds']}")
        columns.append(verdicts)
    lines = ["| observation | " + " | ".join(heads) + " |", "| --- " * (len(heads) + 1) + "|"]
    lines += [f"| {k}. {title} | " + " | ".join(f"**{c[str(k)]}**" for c in columns) + " |"
              for k, title in OBSERVATIONS.items()]
    return "\n".join(lines) + "\n"


def fill_readme(text: str, root: str | Path) -> str:
    """``text`` with every summary block holding the file at ``root/PATH`` and every verdicts
    block the table of its files' verdicts (``verdict_table``); FileNotFoundError naming a
    missing file."""
    root = Path(root)
    text = SUMMARY_BLOCK.sub(lambda m: m.group(1) + _quoted(root, m["path"]) + m.group(4), text)
    return VERDICTS_BLOCK.sub(lambda m: m.group(1) + verdict_table(
        [_quoted(root, p) for p in m["paths"].split()]) + m.group(4), text)


def differences(fresh: str | Path, published: str | Path) -> str:
    """Where a reproduction's summaries (``fresh``) differ from the published ones the README
    quotes (``published``): first every verdict on a published claim that changed, then, per
    summary, each sentence that differs. A finding about reproducibility, not a failure: numbers
    move between machines (docs/determinism.md)."""
    fresh, published = Path(fresh), Path(published)
    names = sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*.md")
                   if p.name != "differences.md")
    if not names:
        raise FileNotFoundError(f"no summaries in {fresh}: run make reproduce first")
    changed, details = [], []
    for name in names:
        new = (fresh / name).read_text()
        old = (published / name).read_text() if (published / name).is_file() else ""
        changed += _changed(VERDICT, old, new)
        changed += _changed(OBSERVATION, _observations(old), _observations(new), "observation ")
        diff = [line for line in difflib.unified_diff(old.splitlines(), new.splitlines(),
                                                      n=0, lineterm="")
                if line[:3] not in ("---", "+++")]
        if diff:
            details += [f"### {name}", "", "```diff", *diff, "```", ""]
    head = [f"# Reproduction against the published summaries ({len(names)} files)", "",
            libraries_line(published), "",
            "Verdicts (published claims, the seed study's observations) that changed:",
            ""] + (changed or ["- none"])
    same = [n for n in names if f"### {n}" not in details]
    return "\n".join(head + ["", f"Identical: {', '.join(same) or 'none'}.", "", *details])


LIBRARIES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "numpy")


def library_versions() -> dict[str, str]:
    """The installed versions of the libraries the numbers depend on (``LIBRARIES``)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def libraries_line(published: str | Path) -> str:
    """Which library versions differ between the published run (its ``provenance.json``) and
    this machine: training and generation numerics move with them (docs/determinism.md)."""
    record = Path(published) / "provenance.json"
    then = json.loads(record.read_text()).get("libraries") if record.is_file() else None
    if not then:
        return "Libraries: the published run did not record its versions."
    now = library_versions()
    moved = [f"{n} {then.get(n, '?')} → {v}" for n, v in now.items() if then.get(n) != v]
    return ("Libraries: the same versions as the published run." if not moved else
            "Libraries that differ from the published run's (numbers move with them): "
            + ", ".join(moved) + ".")


def _observations(text: str) -> str:
    """The observations' verdict line of a summary ("" if none)."""
    return next((line for line in text.splitlines() if line.startswith("Observations (")), "")


def _changed(pattern: re.Pattern, old: str, new: str, prefix: str = "") -> list[str]:
    """``"- *claim*: **old** → **new**"`` for each verdict ``pattern`` finds in both that moved."""
    verdicts = {m["claim"]: m["verdict"] for m in pattern.finditer(old)}
    return [f"- *{prefix}{m['claim']}*: **{verdicts[m['claim']]}** → **{m['verdict']}**"
            for m in pattern.finditer(new)
            if m["claim"] in verdicts and verdicts[m["claim"]] != m["verdict"]]


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def unlike(texts: dict[str, str], directory: str | Path) -> list[str]:
    """The summaries among ``texts`` ({name: text}) that ``directory/<name>.md`` does not hold
    exactly (missing ones included)."""
    directory = Path(directory)
    return [n for n, t in texts.items()
            if not (directory / f"{n}.md").is_file() or (directory / f"{n}.md").read_text() != t]


def provenance(images: str | Path, names: list[str], entries: list[Path], root: str | Path,
               version: int) -> dict:
    """The record ``publish`` writes: the library versions, each published summary's SHA-256 and
    each cache entry it was computed from (directory under the run root: SHA-256 of its
    ``key.json``, which holds its key and its files' checksums)."""
    return {"analysis_version": version, "libraries": library_versions(),
            "summaries": {n: sha256(Path(images) / f"{n}.md") for n in sorted(names)},
            "results": {Path(e).relative_to(root).as_posix(): sha256(Path(e) / "key.json")
                        for e in entries}}


def recorded_results_here(record: dict, root: str | Path) -> str | None:
    """None when every cache entry the record names is under ``root`` with the recorded
    ``key.json``; else why not (missing, or this machine's own results)."""
    for rel, digest in record["results"].items():
        path = Path(root) / rel / "key.json"
        if not path.is_file():
            return f"{rel} is not cached here"
        if sha256(path) != digest:
            return f"{rel} holds other results here (another machine's or a newer run)"
    return None


def regenerate_published(presets, smoke: bool = False) -> tuple[dict[str, str], list[Path]]:
    """``({name: text}, cache entries read)``: the summaries of each published run of
    ``presets`` (``config.PUBLISHED``) recomputed read-only from the cache, named by their path
    under the images folder without ``.md`` (``"smollm2-135m/02_cka"``)."""
    from alignkit.analyses import summaries
    from alignkit.config import PUBLISHED, get_config

    texts, entries = {}, []
    for preset in presets:
        folder = PUBLISHED[preset]
        got, read = summaries.regenerate(get_config(preset, smoke=smoke),
                                         summaries.published(preset))
        texts |= {f"{folder}/{n}" if folder else n: t for n, t in got.items()}
        entries += [e for e in read if e not in entries]
    return texts, entries


def main(command: str, presets: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    from alignkit.config import PUBLISHED, default_root, get_config

    fresh = default_root() / "images"
    if command in ("check", "publish"):
        smoke = command == "check" and os.environ.get("ALIGNKIT_SMOKE") == "1"
        from alignkit.plots import figure_dir
        from alignkit.runs import NotCached

        presets = list(PUBLISHED) if command == "publish" or not presets else presets
        if smoke:  # CI's smoke notebooks run the toy only
            presets = ["tiny"]
        unknown = set(presets) - set(PUBLISHED)
        if unknown:
            sys.exit(f"not a published run: {sorted(unknown)}; choose from {list(PUBLISHED)}")
        written = figure_dir(get_config("tiny", smoke=smoke))
        try:
            texts, entries = regenerate_published(presets, smoke)
        except NotCached as e:
            sys.exit(f"{e}: run the notebooks first (make reproduce; make test for the smoke run)")
        bad = unlike(texts, written)
        if bad:
            sys.exit(f"summaries in {written} are not what the cached results give (recomputed "
                     f"read-only): {', '.join(bad)}; rerun their notebooks")
        print(f"{len(texts)} summaries in {written} equal what {len(entries)} cached results give")
        if command == "check":
            return
    if command == "differences":
        text = differences(fresh, REPO / "images")
        (fresh / "differences.md").write_text(text + "\n")
        print(text)
        return
    if command == "publish":
        from alignkit.analyses.common import ANALYSIS_VERSION

        for f in sorted(fresh.rglob("*")):
            if f.suffix in (".png", ".md") and f.name != "differences.md":
                (REPO / "images" / f.relative_to(fresh)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, REPO / "images" / f.relative_to(fresh))
        record = provenance(REPO / "images", list(texts), entries, default_root(),
                            ANALYSIS_VERSION)
        (REPO / "images" / "provenance.json").write_text(json.dumps(record, indent=1) + "\n")
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        page.write_text(fill_readme(page.read_text(), REPO))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("fill", "differences", "check", "publish"):
        sys.exit("usage: python tools/readme.py fill|differences|check [PRESET ...]|publish")
    main(sys.argv[1], sys.argv[2:])
