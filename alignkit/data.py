"""GSM8K rows from the hub, a local jsonl file or the offline generator; prompts; answer extraction.

The generator writes solutions exactly like GSM8K: one reasoning step per line, each with a
calculator annotation ``<<a*b=c>>``, and a last line ``#### N``. ``extract_answer`` is the one
answer extractor of the project: evaluation, training rewards and patching all call it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
from pathlib import Path
from typing import Callable

import datasets

logger = logging.getLogger(__name__)

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"####\s*(" + _NUMBER + r")")
_ANY = re.compile(_NUMBER)
ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>=]+)>>")


def normalize_number(text: str) -> str | None:
    """Normalise a number as GSM8K does: drop ``,`` and ``$`` and a trailing period.

    ``"1,000"`` -> ``"1000"``, ``"7.0"`` -> ``"7"``, ``"7.50"`` -> ``"7.5"``, ``"-3"`` -> ``"-3"``.
    Returns None when ``text`` holds no number.
    """
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a solution or a model's output, normalised, or None.

    The number after the last ``####`` when there is one (GSM8K's rule), otherwise the last
    number in the text.
    """
    if text is None:
        return None
    finals = _FINAL.findall(text)
    if finals:
        return normalize_number(finals[-1])
    numbers = _ANY.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------------- prompts

def format_prompt(question: str, tokenizer=None, chat: bool = False) -> str:
    """The one prompt format: ``Question: ...\\nAnswer:`` for a base model, else the chat template.

    Completions start with a space (``" Tom has ..."``) so BPE never merges across the boundary.
    """
    if not chat:
        return f"Question: {question.strip()}\nAnswer:"
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat=True needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question.strip()}], tokenize=False, add_generation_prompt=True
    )


def format_completion(answer: str) -> str:
    """The training target for a prompt from ``format_prompt``: the full solution, space first."""
    return " " + answer.strip()


def split_solution(answer: str) -> tuple[str, str]:
    """Split a gold solution into (text up to and including ``"#### "``, final answer text)."""
    idx = answer.rfind("####")
    if idx < 0:
        raise ValueError(f"solution has no '#### ' marker: {answer[-60:]!r}")
    rest = answer[idx + 4 :]
    stripped = rest.lstrip()
    prefix = answer[: idx + 4] + rest[: len(rest) - len(stripped)]
    return prefix, stripped.strip()


# ----------------------------------------------------------------------------- loading

def _rows_to_dataset(rows: list[dict], origin: str) -> datasets.Dataset:
    if not rows:
        raise ValueError(f"no rows in {origin}")
    out = {"question": [], "answer": [], "final_answer": []}
    for i, row in enumerate(rows):
        ans = row["answer"]
        if "####" not in ans:
            raise ValueError(f"{origin}: row {i} has no '#### ' final-answer marker")
        final = extract_answer(ans)
        if final is None:
            raise ValueError(f"{origin}: row {i} has no number after '####'")
        out["question"].append(row["question"])
        out["answer"].append(ans)
        out["final_answer"].append(final)
    return datasets.Dataset.from_dict(out)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a GSM8K-format jsonl file; a malformed line raises ValueError naming its number."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GSM8K file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(
                row.get("answer"), str
            ):
                raise ValueError(f"{path}: line {lineno} needs string fields 'question' and 'answer'")
            if "####" not in row["answer"]:
                raise ValueError(f"{path}: line {lineno} has no '#### ' final-answer marker")
            rows.append(row)
    return rows


def load_gsm8k(source: str, split: str = "test", n: int | None = None, generator: "GeneratorConfig | None" = None) -> datasets.Dataset:
    """GSM8K rows with columns ``question``, ``answer`` and ``final_answer``.

    Args:
        source: ``"openai/gsm8k"`` (hub, config "main"), a path to a local GSM8K-format ``.jsonl``
            file, or ``"synthetic"`` (the offline generator).
        split: ``"train"`` or ``"test"``; ignored for a local file.
        n: keep the first ``n`` rows (all when None). For ``"synthetic"``, how many to generate.
        generator: generator knobs for ``"synthetic"``.

    Returns:
        A ``datasets.Dataset``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source == "synthetic":
        gen = generator or GeneratorConfig()
        rows = generate_problems(n if n is not None else 1000, split=split, cfg=gen)
        ds = _rows_to_dataset(rows, "synthetic generator")
    elif source == "openai/gsm8k":
        ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
        ds = _rows_to_dataset(list(ds), "openai/gsm8k")
    else:
        ds = _rows_to_dataset(read_jsonl(source), str(source))
    if n is not None and n > len(ds):
        raise ValueError(f"asked for {n} rows but {source} has only {len(ds)}")
    return ds.select(range(n)) if n is not None else ds


def dataset_hash(ds: datasets.Dataset | list[str]) -> str:
    """Content hash of a dataset's questions and answers (or of a list of texts)."""
    h = hashlib.sha256()
    items = ds if isinstance(ds, list) else (q + "\x00" + a for q, a in zip(ds["question"], ds["answer"]))
    for item in items:
        h.update(item.encode())
        h.update(b"\x01")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- generator

@dataclasses.dataclass
class GeneratorConfig:
    """Knobs of the GSM8K-format problem generator."""

    min_steps: int = 1
    max_steps: int = 4
    max_number: int = 20  # operands are drawn from 2..max_number
    seed: int = 0


NAMES = ["Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Lily", "Max", "Emma", "Noah", "Ella",
         "Jack", "Ruby", "Omar", "Nina", "Ivan", "Sara", "Luis", "Anna"]

# Each theme: a starting sentence and, per operation, a question clause and a solution line.
# {n}: name, {a}: current quantity, {b}: operand, {r}: result, {u}: unit.
THEMES: dict[str, dict] = {
    "shopping": {
        "units": ["apples", "pencils", "stickers", "cookies", "marbles", "cards"],
        "start": "{n} has {a} {u}.",
        "+": ("{n} buys {b} more {u}.", "{n} buys {b} more, so {n} has {a}+{b}=<<{a}+{b}={r}>>{r} {u}."),
        "-": ("{n} gives {b} {u} to a friend.", "{n} gives away {b}, so {n} has {a}-{b}=<<{a}-{b}={r}>>{r} {u}."),
        "*": ("Then {n} buys enough to have {b} times as many {u}.",
              "{b} times as many is {a}*{b}=<<{a}*{b}={r}>>{r} {u}."),
        "/": ("{n} shares the {u} equally among {b} bags and keeps one bag.",
              "One bag holds {a}/{b}=<<{a}/{b}={r}>>{r} {u}."),
        "q": "How many {u} does {n} have now?",
    },
    "money": {
        "units": ["dollars"],
        "start": "{n} has {a} dollars.",
        "+": ("{n} earns {b} dollars.", "After earning {b}, {n} has {a}+{b}=<<{a}+{b}={r}>>{r} dollars."),
        "-": ("{n} spends {b} dollars on lunch.", "After lunch {n} has {a}-{b}=<<{a}-{b}={r}>>{r} dollars."),
        "*": ("{n} then saves until the money is {b} times as much.",
              "{b} times as much is {a}*{b}=<<{a}*{b}={r}>>{r} dollars."),
        "/": ("{n} splits the money equally with {b} people including {n}.",
              "Each share is {a}/{b}=<<{a}/{b}={r}>>{r} dollars."),
        "q": "How many dollars does {n} have at the end?",
    },
    "rates": {
        "units": ["miles"],
        "start": "A train goes {a} miles in the first hour.",
        "+": ("In the next hour it goes {b} miles farther than that.",
              "The next hour it goes {a}+{b}=<<{a}+{b}={r}>>{r} miles."),
        "-": ("Then it slows down and goes {b} miles less per hour.",
              "Slower, it goes {a}-{b}=<<{a}-{b}={r}>>{r} miles per hour."),
        "*": ("It keeps that speed for {b} hours.", "In {b} hours it goes {a}*{b}=<<{a}*{b}={r}>>{r} miles."),
        "/": ("The trip is split into {b} equal parts.", "Each part is {a}/{b}=<<{a}/{b}={r}>>{r} miles."),
        "q": "What is the last number of miles?",
    },
    "ages": {
        "units": ["years"],
        "start": "{n} is {a} years old.",
        "+": ("{n}'s aunt is {b} years older than that.", "The aunt is {a}+{b}=<<{a}+{b}={r}>>{r} years old."),
        "-": ("A cousin is {b} years younger than that.", "The cousin is {a}-{b}=<<{a}-{b}={r}>>{r} years old."),
        "*": ("A grandparent is {b} times that age.", "The grandparent is {a}*{b}=<<{a}*{b}={r}>>{r} years old."),
        "/": ("A baby is that age divided by {b}.", "The baby is {a}/{b}=<<{a}/{b}={r}>>{r} years old."),
        "q": "How old is the last person?",
    },
    "sharing": {
        "units": ["candies", "grapes", "nuts"],
        "start": "A jar has {a} {u}.",
        "+": ("{n} adds {b} {u} to the jar.", "The jar has {a}+{b}=<<{a}+{b}={r}>>{r} {u}."),
        "-": ("{n} eats {b} {u}.", "After eating, there are {a}-{b}=<<{a}-{b}={r}>>{r} {u}."),
        "*": ("{n} fills {b} jars like it.", "{b} jars hold {a}*{b}=<<{a}*{b}={r}>>{r} {u}."),
        "/": ("The {u} are shared equally by {b} kids.", "Each kid gets {a}/{b}=<<{a}/{b}={r}>>{r} {u}."),
        "q": "How many {u} is that at the end?",
    },
    "work": {
        "units": ["pages"],
        "start": "{n} reads {a} pages on Monday.",
        "+": ("On Tuesday {n} reads {b} pages more than on Monday.",
              "On Tuesday {n} reads {a}+{b}=<<{a}+{b}={r}>>{r} pages."),
        "-": ("The next day {n} reads {b} pages fewer.", "The next day {n} reads {a}-{b}=<<{a}-{b}={r}>>{r} pages."),
        "*": ("{n} reads that many pages every day for {b} days.",
              "In {b} days {n} reads {a}*{b}=<<{a}*{b}={r}>>{r} pages."),
        "/": ("The pages are split into {b} equal chapters.", "Each chapter has {a}/{b}=<<{a}/{b}={r}>>{r} pages."),
        "q": "How many pages is the last amount?",
    },
    "time": {
        "units": ["minutes"],
        "start": "{n} practices piano for {a} minutes.",
        "+": ("Then {n} practices {b} more minutes.", "That makes {a}+{b}=<<{a}+{b}={r}>>{r} minutes."),
        "-": ("{n} stops {b} minutes early.", "Stopping early leaves {a}-{b}=<<{a}-{b}={r}>>{r} minutes."),
        "*": ("{n} does the same every day for {b} days.", "Over {b} days that is {a}*{b}=<<{a}*{b}={r}>>{r} minutes."),
        "/": ("The time is split into {b} equal songs.", "Each song takes {a}/{b}=<<{a}/{b}={r}>>{r} minutes."),
        "q": "How many minutes is the last amount?",
    },
}


@dataclasses.dataclass
class Problem:
    """One generated problem and the world facts it is built from."""

    question: str
    answer: str
    final: int
    theme: str
    steps: list[tuple[int, str, int, int]]  # (a, op, b, result)
    narrative: str  # the same events told as sentences, outcome included (for pretraining)


def _pick_step(rng: random.Random, a: int, max_number: int) -> tuple[str, int, int]:
    """One operation on the running quantity ``a``; intermediate results stay in 1..10 * max_number."""
    cap = 10 * max_number
    ops = ["+", "-", "*", "/"]
    rng.shuffle(ops)
    for op in ops:
        if op == "+" and a + 2 <= cap:
            b = rng.randint(2, min(max_number, cap - a))
            return op, b, a + b
        if op == "-" and a > 2:
            b = rng.randint(1, min(a - 1, max_number))
            return op, b, a - b
        if op == "*" and a * 2 <= cap:
            b = rng.randint(2, max(2, min(5, cap // a)))
            return op, b, a * b
        if op == "/":
            divisors = [d for d in range(2, min(max_number, 10) + 1) if a % d == 0 and a // d >= 2]
            if divisors:
                b = rng.choice(divisors)
                return op, b, a // b
    return "-", 1, a - 1  # a == 2 and nothing else fits


def make_problem(rng: random.Random, cfg: GeneratorConfig) -> Problem:
    """Draw one problem with ``min_steps..max_steps`` operations and integer intermediate results."""
    theme_name = rng.choice(sorted(THEMES))
    theme = THEMES[theme_name]
    name = rng.choice(NAMES)
    unit = rng.choice(theme["units"])
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    a0 = rng.randint(2, cfg.max_number)
    steps, a = [], a0
    while len(steps) < n_steps:
        op, b, r = _pick_step(rng, a, cfg.max_number)
        steps.append((a, op, b, r))
        a = r
    fill = dict(n=name, u=unit)
    q_parts = [theme["start"].format(a=a0, **fill)]
    sol_lines, story = [], [theme["start"].format(a=a0, **fill)]
    for a, op, b, r in steps:
        clause, line = theme[op]
        q_parts.append(clause.format(a=a, b=b, r=r, **fill))
        sol_lines.append(line.format(a=a, b=b, r=r, **fill))
        story.append(clause.format(a=a, b=b, r=r, **fill) + f" That gives {r} {unit}.")
    q_parts.append(theme["q"].format(**fill))
    final = steps[-1][3]
    answer = "\n".join(sol_lines + [f"#### {final}"])
    return Problem(
        question=" ".join(q_parts), answer=answer, final=final, theme=theme_name, steps=steps,
        narrative=" ".join(story),
    )


def _split_of(question: str) -> str:
    """Deterministic split assignment by a hash of the question: train and test never overlap."""
    return "test" if hashlib.sha256(question.encode()).digest()[0] < 52 else "train"  # ~20 % test


def iter_problems(split: str, cfg: GeneratorConfig, stream: int = 0):
    """Endless stream of distinct problems belonging to ``split`` ("train", "test").

    Problems are assigned to splits by a hash of their question text, so the splits are disjoint
    by construction whatever the seed. ``stream`` picks an independent random stream (used to draw
    the pretraining corpus apart from the SFT data while keeping both in the train split).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{cfg.seed}-{split}-{stream}")
    seen: set[str] = set()
    misses = 0
    while True:
        p = make_problem(rng, cfg)
        if _split_of(p.question) != split or p.question in seen:
            misses += 1
            if misses > 100_000:
                raise ValueError(f"generator exhausted: no new {split} problems for {cfg}")
            continue
        misses = 0
        seen.add(p.question)
        yield p


def generate_problems(n: int, split: str = "train", cfg: GeneratorConfig | None = None, stream: int = 0) -> list[dict]:
    """``n`` GSM8K-format rows ``{"question", "answer"}`` from the generator."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cfg = cfg or GeneratorConfig()
    it = iter_problems(split, cfg, stream)
    return [{"question": p.question, "answer": p.answer} for p in (next(it) for _ in range(n))]


def check_solution(answer: str, evaluate: Callable[[str], float] | None = None) -> list[str]:
    """Re-check every ``<<expr=value>>`` annotation and the final line of a solution.

    Returns a list of problems found (empty when the solution is consistent).
    """
    errors = []
    for expr, value in ANNOTATION.findall(answer):
        if not re.fullmatch(r"[\d+\-*/. ]+", expr):
            errors.append(f"unsafe expression {expr!r}")
            continue
        got = evaluate(expr) if evaluate else eval(expr)  # noqa: S307 - digits and operators only
        if abs(float(got) - float(value)) > 1e-9:
            errors.append(f"{expr} = {got}, annotated {value}")
    lines = answer.strip().split("\n")
    if not lines[-1].startswith("#### "):
        errors.append("last line is not '#### N'")
    annotated = ANNOTATION.findall(answer)
    if annotated and normalize_number(annotated[-1][1]) != extract_answer(answer):
        errors.append("final answer differs from the last computed value")
    return errors
