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


def has_final_line(text: str) -> bool:
    """Whether a solution's last non-empty line is GSM8K's ``#### N`` (the format the reward checks)."""
    lines = [line for line in (text or "").strip().split("\n") if line.strip()]
    return bool(lines) and _FINAL.fullmatch(lines[-1].strip()) is not None


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


def load_gsm8k(source: str, split: str = "test", n: int | None = None, generator: "GeneratorConfig | None" = None,
               stream: int = 0) -> datasets.Dataset:
    """GSM8K rows with columns ``question``, ``answer`` and ``final_answer``.

    Args:
        source: ``"openai/gsm8k"`` (hub, config "main"), a path to a local GSM8K-format ``.jsonl``
            file, or ``"synthetic"`` (the offline generator).
        split: ``"train"`` or ``"test"``; ignored for a local file.
        n: keep the first ``n`` rows (all when None). For ``"synthetic"``, how many to generate.
        generator: generator knobs for ``"synthetic"``.
        stream: for ``"synthetic"``, which independent stream of the split to draw (0: SFT data,
            1: the pretraining corpus, 2: the tokenizer's solution text, 3: DPO pairs and GRPO
            prompts); ignored otherwise.

    Returns:
        A ``datasets.Dataset``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source == "synthetic":
        gen = generator or GeneratorConfig()
        rows = generate_problems(n if n is not None else 1000, split=split, cfg=gen, stream=stream)
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


# ----------------------------------------------------------------------------- preference pairs

_EXPR_SAFE = re.compile(r"[\d+\-*/. ()]+")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SLIPS = (1, -1, 2, -2, 3, -3, 10, -10)


def _eval_expr(expr: str) -> float | None:
    """Value of a calculator annotation's expression (digits, operators, parentheses), or None."""
    if not _EXPR_SAFE.fullmatch(expr):
        return None
    try:
        return float(eval(expr))  # noqa: S307 - digits, operators and parentheses only
    except (SyntaxError, ZeroDivisionError, TypeError):
        return None


def _format_like(value: float, like: str) -> str:
    """Write ``value`` as GSM8K writes numbers: integers plain (with commas if ``like`` had them)."""
    if abs(value - round(value)) < 1e-9:
        v = int(round(value))
        return f"{v:,}" if "," in like else str(v)
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _slip_values(value: float, rng: random.Random) -> list[float]:
    """Plausible wrong values for one step's result, in random order: off by 1, 2, 3 or 10."""
    deltas = list(_SLIPS)
    rng.shuffle(deltas)
    return [value + d for d in deltas if value + d >= 0 or value < 0]


def _propagate_slip(answer: str, k: int, new_value: float) -> str | None:
    """Rewrite annotation ``k`` to ``new_value`` and recompute every later step that uses a changed value.

    In each later expression the first number equal to a changed value is replaced (the carried
    quantity; GSM8K has no variable names, so this is a heuristic) and re-evaluated; its visible
    ``expr =`` text, annotation and written result rewritten, and the ``#### N`` line follows the
    last computed value. Returns None when the slip makes a later integer step non-integer or
    negative (implausible for GSM8K) or an expression cannot be evaluated.
    """
    anns = list(ANNOTATION.finditer(answer))
    changed: dict[str, float] = {}
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) on the original text
    for i, m in enumerate(anns):
        if i < k:
            continue
        expr, val = m.group(1), m.group(2)
        old = _eval_expr(expr)
        if i == k:
            new_expr, new_val = expr, new_value
        else:
            hits = [t for t in _PLAIN_NUMBER.finditer(expr) if normalize_number(t.group()) in changed]
            if not hits:
                continue
            t = hits[0]  # the carried value; a later equal operand ("4*4") is a different quantity
            new_expr = expr[: t.start()] + _format_like(changed[normalize_number(t.group())], "") + expr[t.end() :]
            new_val = _eval_expr(new_expr)
            if new_val is None:
                return None
            integral = old is not None and abs(old - round(old)) < 1e-9
            if (integral and abs(new_val - round(new_val)) > 1e-9) or (new_val < 0 <= (old or 0)):
                return None
        key = normalize_number(val)
        if key is None:
            return None
        changed[key] = new_val
        start = m.start()
        before = re.search(re.escape(expr) + r"(\s*=\s*)$", answer[: m.start()])
        if before and new_expr != expr:  # the visible "a+b = " in front of the annotation
            start = before.start()
            prefix = new_expr + before.group(1)
        else:
            prefix = answer[start : m.start()]
        text = f"{prefix}<<{new_expr}={_format_like(new_val, '')}>>"
        end = m.end()
        written = re.compile(_NUMBER).match(answer, m.end())  # the result written after the annotation
        if written and normalize_number(written.group()) == key:
            dollar = "$" if written.group().startswith("$") else ""
            text += dollar + _format_like(new_val, written.group())
            end = written.end()
        edits.append((start, end, text))
    out = answer
    for start, end, text in reversed(edits):
        out = out[:start] + text + out[end:]
    lines = out.rstrip().split("\n")
    final = _FINAL.fullmatch(lines[-1].strip())
    if final and normalize_number(final.group(1)) in changed:
        lines[-1] = "#### " + _format_like(changed[normalize_number(final.group(1))], final.group(1))
    return "\n".join(lines)


def _wrong_final_line(answer: str, rng: random.Random) -> str:
    """The solution with its ``#### N`` line changed to a nearby wrong number (every step left right)."""
    lines = answer.rstrip().split("\n")
    gold = extract_answer(answer)
    value = float(gold)
    for new in _slip_values(value, rng):
        if normalize_number(_format_like(new, "")) != gold:
            lines[-1] = "#### " + _format_like(new, lines[-1])
            return "\n".join(lines)
    raise AssertionError("unreachable: a nonzero slip always changes the value")


def corrupt_solution(answer: str, rng: random.Random, p_final: float = 0.25) -> str:
    """A plausible wrong solution in the same format whose extracted answer differs from the gold one.

    With probability ``1 - p_final`` (when the solution has calculator annotations): an arithmetic
    slip in one step (its result off by 1, 2, 3 or 10) carried consistently through every later
    step that uses it, down to the ``#### N`` line. Otherwise, or when no slip changes the final
    answer plausibly: every step right but a wrong ``#### N`` line.

    Args:
        answer: a GSM8K-format solution (one step per line, ``<<expr=value>>``, last line ``#### N``).
        rng: the random source (seeded by the caller for determinism).
        p_final: share of wrong-final-line corruptions.

    Returns:
        The corrupted solution; ``extract_answer`` of it never equals that of ``answer``.
    """
    gold = extract_answer(answer)
    if gold is None or not answer.rstrip().split("\n")[-1].startswith("####"):
        raise ValueError(f"solution has no '#### N' last line: {answer[-60:]!r}")
    anns = ANNOTATION.findall(answer)
    if anns and rng.random() >= p_final:
        order = list(range(len(anns)))
        rng.shuffle(order)
        for k in order:
            value = _eval_expr(anns[k][0])
            if value is None:
                continue
            for new_value in _slip_values(value, rng):
                out = _propagate_slip(answer, k, new_value)
                if out is not None and extract_answer(out) != gold:
                    return out
    return _wrong_final_line(answer, rng)


def preference_pairs(rows, seed: int = 0, tokenizer=None, chat: bool = False, p_final: float = 0.25) -> list[dict]:
    """DPO preference pairs from GSM8K-format rows: the gold solution against a plausible wrong one.

    Args:
        rows: rows with ``question`` and ``answer`` (a ``datasets.Dataset`` or a list of dicts).
        seed: the corruption of each row is drawn from ``random.Random(f"{seed}-{question}")``, so a
            pair depends only on its row and the seed.
        tokenizer, chat: as in ``format_prompt``.
        p_final: share of wrong-final-line corruptions (the rest are propagated arithmetic slips).

    Returns:
        ``[{"prompt", "chosen", "rejected"}]`` formatted for TRL: the prompt by ``format_prompt``,
        both solutions by ``format_completion``; ``extract_answer(rejected)`` differs from the gold
        answer in every pair.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("preference_pairs needs at least one row, got none")
    pairs = []
    for i, row in enumerate(rows):
        if "####" not in row["answer"]:
            raise ValueError(f"row {i} has no '#### ' final-answer marker")
        rng = random.Random(f"{seed}-{row['question']}")
        pairs.append({
            "prompt": format_prompt(row["question"], tokenizer, chat=chat),
            "chosen": format_completion(row["answer"]),
            "rejected": format_completion(corrupt_solution(row["answer"], rng, p_final)),
        })
    return pairs
