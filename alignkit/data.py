"""GSM8K rows (hub, local jsonl, offline generator; docs/embedded.md), the one prompt format, the
one answer extractor, evaluation and probe sets, stop rules and DPO preference pairs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable, Sequence

import datasets

from alignkit.config import Config, GeneratorConfig

_UNSIGNED = r"\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"  # "1,250", "$7.50", ".5"
# a minus sign, not a hyphen: "3-4 miles" is 3 and 4, "x-2" 2, "(1+2)-3" 3; "#### -10" is -10
_NUMBER = r"(?:(?<![\w.)])-)?" + _UNSIGNED
_FINAL = re.compile(r"####\s*(-?" + _UNSIGNED + r")")
_ANY = re.compile(_NUMBER)
ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>=]+)>>")
# generator streams: 0 SFT data, 1 pretraining corpus, 2 tokenizer text, 3 DPO pairs, GRPO prompts
POST_TRAINING_STREAM = 3


def normalize_number(text: str) -> str | None:
    """GSM8K's form of a number (``"$1,000."`` -> ``"1000"``, ``"7.50"`` -> ``"7.5"``, ``".5"`` ->
    ``"0.5"``), or None."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if re.fullmatch(r"-?\.\d+", s):  # ".5" -> "0.5"
        s = s.replace(".", "0.", 1)
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def extract_answer(text: str) -> str | None:
    """The final answer of a solution or a model's output, normalised: the number after the last
    ``####`` (GSM8K's rule), else the last number; None when there is no number."""
    text = text or ""
    numbers = _FINAL.findall(text) or _ANY.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def has_final_line(text: str) -> bool:
    """Whether a solution's last non-empty line is GSM8K's ``#### N`` (what the reward checks)."""
    return _FINAL.fullmatch((text or "").strip().split("\n")[-1].strip()) is not None


def cut_at_stop(text: str, stop: Sequence[str] = ("\nQuestion:",)) -> str:
    """``text`` up to the first stop string: how evaluation and GRPO's reward cut completions."""
    for s in stop:
        text = text.split(s)[0]
    return text


def format_prompt(question: str, tokenizer=None, chat: bool = False,
                  shots: Sequence[tuple[str, str]] = ()) -> str:
    """The one prompt format: ``Question: ...\\nAnswer:`` (after ``shots``, worked examples
    ``(question, solution)`` written the same way), or the tokenizer's chat template with thinking
    disabled (Qwen3's ``enable_thinking=False``: an empty ``<think>`` block; templates without the
    switch ignore it), the shots as earlier user/assistant turns."""
    if not chat:
        solved = "".join(f"Question: {q.strip()}\nAnswer:{format_completion(a)}\n\n"
                         for q, a in shots)
        return f"{solved}Question: {question.strip()}\nAnswer:"
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
        raise ValueError(f"chat=True needs a tokenizer with a chat template; {name} has none "
                         "(use a plain-prompt preset such as qwen3-0.6b-base, or --set chat=false)")
    messages = [m for q, a in shots for m in ({"role": "user", "content": q.strip()},
                                              {"role": "assistant", "content": a.strip()})]
    messages.append({"role": "user", "content": question.strip()})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)


def format_completion(answer: str, chat: bool = False) -> str:
    """The training target: the solution after a space for plain prompts (so BPE never merges it
    with the prompt), as it is after a chat template's assistant header."""
    return ("" if chat else " ") + answer.strip()


def eval_shots(cfg: Config) -> list[tuple[str, str]]:
    """Evaluation's worked examples ``(question, solution)``: the first ``cfg.eval.n_shot``
    training rows (none for 0). Flips were found with them, so patching prompts hold them too."""
    if cfg.eval.n_shot <= 0:
        return []
    rows = load_gsm8k(cfg.data_source, "train", cfg.eval.n_shot, cfg.generator)
    return list(zip(rows["question"], rows["answer"]))


def prompts_for(cfg: Config, tokenizer, questions: Sequence[str],
                few_shot: bool = False) -> list[str]:
    """``format_prompt`` of each question in ``cfg``'s format, every caller's; ``few_shot``: after
    ``eval_shots`` (evaluation's option)."""
    shots = eval_shots(cfg) if few_shot else []
    return [format_prompt(q, tokenizer, chat=cfg.chat, shots=shots) for q in questions]


def split_solution(answer: str) -> tuple[str, str]:
    """Split a gold solution into (text up to and including ``"#### "``, final answer text)."""
    idx = answer.rfind("####")
    if idx < 0:
        raise ValueError(f"solution has no '#### ' marker: {answer[-60:]!r}")
    final = answer[idx + 4 :].lstrip()  # the prefix keeps the whitespace after "####"
    return answer[: len(answer) - len(final)], final.strip()


def _rows_to_dataset(rows: list[dict], origin: str) -> datasets.Dataset:
    if not rows:
        raise ValueError(f"no rows in {origin}")
    finals = []
    for i, row in enumerate(rows):
        if "####" not in row["answer"]:
            raise ValueError(f"{origin}: row {i} has no '#### ' final-answer marker")
        finals.append(extract_answer(row["answer"]))
        if finals[-1] is None:
            raise ValueError(f"{origin}: row {i} has no number after '####'")
    columns = {key: [row[key] for row in rows] for key in ("question", "answer")}
    return datasets.Dataset.from_dict(dict(columns, final_answer=finals))


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
            if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                    and isinstance(row.get("answer"), str)):
                raise ValueError(
                    f"{path}: line {lineno} needs string fields 'question' and 'answer'")
            if "####" not in row["answer"]:
                raise ValueError(f"{path}: line {lineno} has no '#### ' final-answer marker")
            rows.append(row)
    return rows


def load_gsm8k(source: str, split: str = "test", n: int | None = None,
               generator: GeneratorConfig | None = None, stream: int = 0) -> datasets.Dataset:
    """The first ``n`` rows (all when None) of ``split`` (ignored for a local file) of ``source``:
    ``"openai/gsm8k"`` (hub), a GSM8K-format ``.jsonl`` file, or ``"synthetic"`` (``generator`` on
    ``stream``). Columns ``question``, ``answer`` and ``final_answer``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source == "synthetic":
        rows = generate_problems(n if n is not None else 1000, split, generator, stream)
        ds = _rows_to_dataset(rows, "synthetic generator")
    elif source == "openai/gsm8k":
        ds = _rows_to_dataset(list(datasets.load_dataset(source, "main", split=split)), source)
    else:
        ds = _rows_to_dataset(read_jsonl(source), str(source))
    if n is not None and n > len(ds):
        raise ValueError(f"asked for {n} rows but {source} has only {len(ds)}")
    return ds.select(range(n)) if n is not None else ds


def eval_set(cfg: Config) -> datasets.Dataset:
    """The held-out problems of a config (never seen in pretraining or SFT)."""
    return load_gsm8k(cfg.eval_source or cfg.data_source, split="test", n=cfg.eval.n_eval,
                      generator=cfg.generator)


def probe_texts(cfg: Config, tokenizer=None, n: int | None = None) -> list[str]:
    """The probe set: zero-shot ``prompts_for`` of the held-out problems (chat: ``tokenizer``)."""
    questions = eval_set(cfg)["question"]
    return prompts_for(cfg, tokenizer, questions[: n or len(questions)])


def dataset_hash(ds: datasets.Dataset | list[str]) -> str:
    """Content hash of a dataset's questions and answers (or of a list of texts)."""
    h = hashlib.sha256()
    items = ds if isinstance(ds, list) else (
        q + "\x00" + a for q, a in zip(ds["question"], ds["answer"]))
    for item in items:
        h.update(item.encode() + b"\x01")
    return h.hexdigest()[:16]


NAMES = ["Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Lily", "Max", "Emma", "Noah", "Ella",
         "Jack", "Ruby", "Omar", "Nina", "Ivan", "Sara", "Luis", "Anna"]

# Per theme: units, a start, a question and, per operation, a question clause and a solution line;
# {n} name, {u} unit, {a} first quantity, {b} operand, {calc} the step, e.g. "6*3=<<6*3=18>>18".
THEMES: dict[str, dict] = {
    "shopping": {"units": ["apples", "pencils", "stickers", "cookies", "marbles", "cards"],
        "start": "{n} has {a} {u}.",
        "q": "How many {u} does {n} have now?",
        "+": ("{n} buys {b} more {u}.", "{n} buys {b} more, so {n} has {calc} {u}."),
        "-": ("{n} gives {b} {u} to a friend.", "{n} gives away {b}, so {n} has {calc} {u}."),
        "*": ("Then {n} buys enough to have {b} times as many {u}.",
              "{b} times as many is {calc} {u}."),
        "/": ("{n} shares the {u} equally among {b} bags and keeps one bag.",
              "One bag holds {calc} {u}.")},
    "money": {"units": ["dollars"], "start": "{n} has {a} dollars.",
        "q": "How many dollars does {n} have at the end?",
        "+": ("{n} earns {b} dollars.", "After earning {b}, {n} has {calc} dollars."),
        "-": ("{n} spends {b} dollars on lunch.", "After lunch {n} has {calc} dollars."),
        "*": ("{n} then saves until the money is {b} times as much.",
              "{b} times as much is {calc} dollars."),
        "/": ("{n} splits the money equally with {b} people including {n}.",
              "Each share is {calc} dollars.")},
    "rates": {"units": ["miles"], "start": "A train goes {a} miles in the first hour.",
        "q": "What is the last number of miles?",
        "+": ("In the next hour it goes {b} miles farther than that.",
              "The next hour it goes {calc} miles."),
        "-": ("Then it slows down and goes {b} miles less per hour.",
              "Slower, it goes {calc} miles per hour."),
        "*": ("It keeps that speed for {b} hours.", "In {b} hours it goes {calc} miles."),
        "/": ("The trip is split into {b} equal parts.", "Each part is {calc} miles.")},
    "ages": {"units": ["years"], "start": "{n} is {a} years old.",
        "q": "How old is the last person?",
        "+": ("{n}'s aunt is {b} years older than that.", "The aunt is {calc} years old."),
        "-": ("A cousin is {b} years younger than that.", "The cousin is {calc} years old."),
        "*": ("A grandparent is {b} times that age.", "The grandparent is {calc} years old."),
        "/": ("A baby is that age divided by {b}.", "The baby is {calc} years old.")},
    "sharing": {"units": ["candies", "grapes", "nuts"], "start": "A jar has {a} {u}.",
        "q": "How many {u} is that at the end?",
        "+": ("{n} adds {b} {u} to the jar.", "The jar has {calc} {u}."),
        "-": ("{n} eats {b} {u}.", "After eating, there are {calc} {u}."),
        "*": ("{n} fills {b} jars like it.", "{b} jars hold {calc} {u}."),
        "/": ("The {u} are shared equally by {b} kids.", "Each kid gets {calc} {u}.")},
    "work": {"units": ["pages"], "start": "{n} reads {a} pages on Monday.",
        "q": "How many pages is the last amount?",
        "+": ("On Tuesday {n} reads {b} pages more than on Monday.",
              "On Tuesday {n} reads {calc} pages."),
        "-": ("The next day {n} reads {b} pages fewer.", "The next day {n} reads {calc} pages."),
        "*": ("{n} reads that many pages every day for {b} days.",
              "In {b} days {n} reads {calc} pages."),
        "/": ("The pages are split into {b} equal chapters.", "Each chapter has {calc} pages.")},
    "time": {"units": ["minutes"], "start": "{n} practices piano for {a} minutes.",
        "q": "How many minutes is the last amount?",
        "+": ("Then {n} practices {b} more minutes.", "That makes {calc} minutes."),
        "-": ("{n} stops {b} minutes early.", "Stopping early leaves {calc} minutes."),
        "*": ("{n} does the same every day for {b} days.", "Over {b} days that is {calc} minutes."),
        "/": ("The time is split into {b} equal songs.", "Each song takes {calc} minutes.")},
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
    """``(op, b, result)`` of one step on the running quantity ``a``, result in 1..10*max_number."""
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
    """One problem of ``min_steps..max_steps`` operations, every intermediate result an integer."""
    theme_name = rng.choice(sorted(THEMES))
    theme = THEMES[theme_name]
    fill = {"n": rng.choice(NAMES), "u": rng.choice(theme["units"])}
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    a0 = rng.randint(2, cfg.max_number)
    steps, a = [], a0
    while len(steps) < n_steps:
        op, b, r = _pick_step(rng, a, cfg.max_number)
        steps.append((a, op, b, r))
        a = r
    start = theme["start"].format(a=a0, **fill)
    q_parts, sol_lines, story = [start], [], [start]
    for a, op, b, r in steps:
        clause, line = theme[op]
        calc = f"{a}{op}{b}=<<{a}{op}{b}={r}>>{r}"
        q_parts.append(clause.format(b=b, **fill))
        sol_lines.append(line.format(b=b, calc=calc, **fill))
        story.append(q_parts[-1] + f" That gives {r} {fill['u']}.")
    q_parts.append(theme["q"].format(**fill))
    final = steps[-1][3]
    answer = "\n".join(sol_lines + [f"#### {final}"])
    return Problem(question=" ".join(q_parts), answer=answer, final=final, theme=theme_name,
                   steps=steps, narrative=" ".join(story))


def _split_of(question: str) -> str:
    """Deterministic split assignment by a hash of the question: train and test never overlap."""
    return "test" if hashlib.sha256(question.encode()).digest()[0] < 52 else "train"  # ~20 % test


def iter_problems(split: str, cfg: GeneratorConfig, stream: int = 0):
    """Distinct problems of ``split`` ("train", "test") from random ``stream``, endlessly."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{cfg.seed}-{split}-{stream}")
    seen, misses = set(), 0
    while misses <= 100_000:
        p = make_problem(rng, cfg)
        misses += 1
        if _split_of(p.question) == split and p.question not in seen:
            seen.add(p.question)
            misses = 0
            yield p
    raise ValueError(f"generator exhausted: no new {split} problems for {cfg}")


def generate_problems(n: int, split: str = "train", cfg: GeneratorConfig | None = None,
                      stream: int = 0) -> list[dict]:
    """``n`` GSM8K-format rows ``{"question", "answer"}`` from the generator."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    it = iter_problems(split, cfg or GeneratorConfig(), stream)
    return [{"question": p.question, "answer": p.answer} for p in (next(it) for _ in range(n))]


def check_solution(answer: str, evaluate: Callable[[str], float] | None = None) -> list[str]:
    """The inconsistencies of a solution's ``<<expr=value>>`` annotations and final line, if any."""
    errors = []
    annotated = ANNOTATION.findall(answer)
    for expr, value in annotated:
        if not re.fullmatch(r"[\d+\-*/. ]+", expr):
            errors.append(f"unsafe expression {expr!r}")
            continue
        got = evaluate(expr) if evaluate else eval(expr)  # noqa: S307 - digits and operators only
        if abs(float(got) - float(value)) > 1e-9:
            errors.append(f"{expr} = {got}, annotated {value}")
    if not answer.strip().split("\n")[-1].startswith("#### "):
        errors.append("last line is not '#### N'")
    if annotated and normalize_number(annotated[-1][1]) != extract_answer(answer):
        errors.append("final answer differs from the last computed value")
    return errors


_EXPR_SAFE = re.compile(r"[\d+\-*/. ()]+")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _eval_expr(expr: str) -> float | None:
    """Value of a calculator annotation's expression (digits, operators, parentheses), or None."""
    if not _EXPR_SAFE.fullmatch(expr):
        return None
    try:
        return float(eval(expr))  # noqa: S307 - digits, operators and parentheses only
    except (SyntaxError, ZeroDivisionError, TypeError):
        return None


def _format_like(value: float, like: str) -> str:
    """``value`` as GSM8K writes numbers: integers plain (with commas if ``like`` has them)."""
    if abs(value - round(value)) < 1e-9:
        v = int(round(value))
        return f"{v:,}" if "," in like else str(v)
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _slip_values(value: float, rng: random.Random) -> list[float]:
    """Plausible wrong values for one step's result, in random order: off by 1, 2, 3 or 10."""
    deltas = [1, -1, 2, -2, 3, -3, 10, -10]
    rng.shuffle(deltas)
    return [value + d for d in deltas if value + d >= 0 or value < 0]


def _propagate_slip(answer: str, k: int, new_value: float) -> str | None:
    """``answer`` with annotation ``k`` set to ``new_value`` and the slip carried on, or None."""
    changed: dict[str, float] = {}
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) on the original text
    for i, m in enumerate(list(ANNOTATION.finditer(answer))[k:], start=k):
        expr, val = m.group(1), m.group(2)
        if i == k:
            new_expr, new_val = expr, new_value
        else:
            hits = [t for t in _PLAIN_NUMBER.finditer(expr)
                    if normalize_number(t.group()) in changed]
            if not hits:
                continue
            t = hits[0]  # the carried value; a later equal operand ("4*4") is a different quantity
            carried = _format_like(changed[normalize_number(t.group())], "")
            new_expr = expr[: t.start()] + carried + expr[t.end() :]
            new_val = _eval_expr(new_expr)
            if new_val is None:
                return None
            old = _eval_expr(expr)
            integral = old is not None and abs(old - round(old)) < 1e-9
            if (integral and abs(new_val - round(new_val)) > 1e-9) or (new_val < 0 <= (old or 0)):
                return None
        key = normalize_number(val)
        if key is None:
            return None
        changed[key] = new_val
        start, end, prefix = m.start(), m.end(), ""
        before = re.search(re.escape(expr) + r"(\s*=\s*)$", answer[: m.start()])
        if before and new_expr != expr:  # the visible "a+b = " in front of the annotation
            start, prefix = before.start(), new_expr + before.group(1)
        text = f"{prefix}<<{new_expr}={_format_like(new_val, '')}>>"
        written = _ANY.match(answer, m.end())  # the result written after the annotation
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
    key = normalize_number(final.group(1)) if final else None
    if key in changed:
        lines[-1] = "#### " + _format_like(changed[key], final.group(1))
    return "\n".join(lines)


def computed_spans(answer: str, before: str = "") -> list[tuple[int, int]]:
    """Character spans in ``answer`` of the results it computes: each ``<<expr=value>>``'s value
    (what the model must work out from the expression just before it), except a value already
    written as a number in ``before`` (the prompt) or earlier in the solution (it could be
    copied). Empty when nothing is computed there (docs/measures.md#activation-patching)."""
    out = []
    for m in ANNOTATION.finditer(answer):
        key = normalize_number(m.group(2))
        earlier = {normalize_number(t) for t in _ANY.findall(before + " " + answer[: m.start()])}
        if key is not None and key not in earlier:
            lead = len(m.group(2)) - len(m.group(2).lstrip())
            out.append((m.start(2) + lead, m.start(2) + len(m.group(2).rstrip())))
    return out


def copy_corrupted(answer: str) -> str | None:
    """The copy control's solution: the last computed result (the last ``<<expr=value>>``) off by
    the first of 1, -1, 2, -2, 3, -3, 10, -10 that keeps it a number of the same kind, carried into
    the number written after it and the ``#### N`` line; its ``#### N`` is then a copy, not a
    solution. None without an annotation whose value can be changed."""
    anns = list(ANNOTATION.finditer(answer))
    value = _eval_expr(anns[-1].group(1)) if anns else None
    if value is None:
        return None
    gold = extract_answer(answer)
    for d in (1, -1, 2, -2, 3, -3, 10, -10):
        if value + d < 0 <= value:
            continue
        out = _propagate_slip(answer, len(anns) - 1, value + d)
        if out is not None and extract_answer(out) != gold:
            return out
    return None


def _wrong_final_line(answer: str, rng: random.Random) -> str:
    """The solution with every step right but a nearby wrong number on its ``#### N`` line."""
    lines = answer.rstrip().split("\n")
    gold = extract_answer(answer)
    for new in _slip_values(float(gold), rng):
        if normalize_number(_format_like(new, "")) != gold:
            lines[-1] = "#### " + _format_like(new, lines[-1])
            return "\n".join(lines)
    raise AssertionError("unreachable: a nonzero slip always changes the value")


def corrupt_solution(answer: str, rng: random.Random, p_final: float = 0.25) -> str:
    """A plausible wrong solution in the same format whose extracted answer differs from the gold:
    with probability ``1 - p_final`` (given annotations) a slip of 1, 2, 3 or 10 in one step,
    carried through the later steps; otherwise, or when no slip fits, a wrong ``#### N`` line."""
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


def preference_pairs(rows, seed: int = 0, tokenizer=None, chat: bool = False,
                     p_final: float = 0.25) -> list[dict]:
    """DPO pairs ``[{"prompt", "chosen", "rejected"}]``: each row's gold solution against its
    ``corrupt_solution``, seeded by ``seed`` and the question alone."""
    rows = list(rows)
    if not rows:
        raise ValueError("preference_pairs needs at least one row, got none")
    pairs = []
    for i, row in enumerate(rows):
        if "####" not in row["answer"]:
            raise ValueError(f"row {i} has no '#### ' final-answer marker")
        rng = random.Random(f"{seed}-{row['question']}")
        pairs.append({"prompt": format_prompt(row["question"], tokenizer, chat=chat),
                      "chosen": format_completion(row["answer"], chat),
                      "rejected": format_completion(corrupt_solution(row["answer"], rng, p_final),
                                                    chat)})
    return pairs
