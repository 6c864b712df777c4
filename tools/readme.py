"""The README and docs/ quote the notebooks' summaries, never type them.

``python tools/readme.py fill``: every ``<!-- summary: PATH -->`` … ``<!-- /summary -->`` block of
README.md and docs/*.md gets the file at PATH (``make readme``; ``tests/test_readme.py`` fails while
they differ). ``python tools/readme.py differences``: where ``make reproduce``'s summaries
(``runs/images/``) differ from the published ones (``images/``), printed and written beside them.
``python tools/readme.py publish``: a reproduction's figures and summaries into ``images/``, then
``fill`` (``make publish``).
"""

from __future__ import annotations

import difflib
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


def fill_readme(text: str, root: str | Path) -> str:
    """``text`` with every summary block holding the file at ``root/PATH``; FileNotFoundError
    naming a missing one."""
    root = Path(root)

    def body(m: re.Match) -> str:
        path = root / m["path"]
        if not path.is_file():
            raise FileNotFoundError(f"{m['path']} is quoted but does not exist: run make "
                                    "reproduce, then make publish (which writes images/*.md)")
        return m.group(1) + path.read_text() + m.group(4)

    return SUMMARY_BLOCK.sub(body, text)


def differences(fresh: str | Path, published: str | Path) -> str:
    """Where a reproduction's summaries (``fresh``) differ from the published ones the README
    quotes (``published``): first every verdict on a published claim that changed, then, per
    summary, each sentence that differs. A finding about reproducibility, not a failure: numbers
    move between machines (docs/determinism.md)."""
    fresh, published = Path(fresh), Path(published)
    names = sorted(p.name for p in fresh.glob("*.md") if p.name != "differences.md")
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
            "Verdicts (published claims, the seed study's observations) that changed:",
            ""] + (changed or ["- none"])
    same = [n for n in names if f"### {n}" not in details]
    return "\n".join(head + ["", f"Identical: {', '.join(same) or 'none'}.", "", *details])


def _observations(text: str) -> str:
    """The observations' verdict line of a summary ("" if none)."""
    return next((line for line in text.splitlines() if line.startswith("Observations (")), "")


def _changed(pattern: re.Pattern, old: str, new: str, prefix: str = "") -> list[str]:
    """``"- *claim*: **old** → **new**"`` for each verdict ``pattern`` finds in both that moved."""
    verdicts = {m["claim"]: m["verdict"] for m in pattern.finditer(old)}
    return [f"- *{prefix}{m['claim']}*: **{verdicts[m['claim']]}** → **{m['verdict']}**"
            for m in pattern.finditer(new)
            if m["claim"] in verdicts and verdicts[m["claim"]] != m["verdict"]]


def main(command: str) -> None:
    sys.path.insert(0, str(REPO))
    from alignkit.config import default_root

    fresh = default_root() / "images"
    if command == "differences":
        text = differences(fresh, REPO / "images")
        (fresh / "differences.md").write_text(text + "\n")
        print(text)
        return
    if command == "publish":
        for f in sorted(fresh.iterdir()):
            if f.suffix in (".png", ".md") and f.name != "differences.md":
                shutil.copy(f, REPO / "images")
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        page.write_text(fill_readme(page.read_text(), REPO))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("fill", "differences", "publish"):
        sys.exit("usage: python tools/readme.py fill|differences|publish")
    main(sys.argv[1])
