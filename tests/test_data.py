import json
import re

import pytest

from alignkit.data import (
    ANNOTATION,
    GeneratorConfig,
    check_solution,
    extract_answer,
    format_completion,
    format_prompt,
    generate_problems,
    iter_problems,
    load_gsm8k,
    split_solution,
)

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shop sold 1,200 pens at $2 each. How much money did it make?",
     "answer": "It made 1200*2 = <<1200*2=2400>>2,400 dollars.\n#### 2,400"},
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 5+3=8\n#### 1,000", "1000"),
        ("#### 7.0", "7"),
        ("#### 7.50", "7.5"),
        ("#### -3", "-3"),
        ("#### $12.", "12"),
        ("He pays $1,250.", "1250"),
        ("first 4 then 9 and finally -2", "-2"),
        ("#### 5\n#### 6", "6"),  # the last marker wins
        ("the answer is 3.\n#### 42", "42"),  # marker beats the last number
        ("no number at all", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_load_local_jsonl(tmp_path):
    ds = load_gsm8k(str(write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)))
    assert ds.column_names == ["question", "answer", "final_answer"]
    assert ds["final_answer"] == ["72", "2400"]


def test_load_missing_path(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_gsm8k(str(tmp_path / "nope.jsonl"))


def test_load_malformed_line_names_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", GSM8K_ROWS, extra_lines=['{"question": "x", '])
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):
        load_gsm8k(str(path))


def test_load_missing_marker(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", GSM8K_ROWS + [{"question": "q", "answer": "it is 4"}])
    with pytest.raises(ValueError, match=r"line 3 has no '#### '"):
        load_gsm8k(str(path))


def test_load_missing_fields_and_empty(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"q": "x", "answer": "#### 1"}])
    with pytest.raises(ValueError, match="line 1 needs string fields"):
        load_gsm8k(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_gsm8k(str(tmp_path / "empty.jsonl"))


def test_generator_round_trip():
    cfg = GeneratorConfig(min_steps=1, max_steps=4, max_number=30, seed=3)
    rows = generate_problems(400, "train", cfg)
    ds = load_gsm8k("synthetic", "train", n=400, generator=cfg)
    assert ds["question"] == [r["question"] for r in rows]
    n_steps = set()
    ops = set()
    for r in rows:
        assert check_solution(r["answer"]) == []
        lines = r["answer"].split("\n")
        annots = ANNOTATION.findall(r["answer"])
        # one step per line, each with exactly one annotation, then "#### N"
        assert len(lines) == len(annots) + 1
        assert all(len(ANNOTATION.findall(line)) == 1 for line in lines[:-1])
        assert re.fullmatch(r"#### -?\d+", lines[-1])
        # the annotated value is written right after the annotation, and results are integers
        for line, (expr, value) in zip(lines, annots):
            assert f">>{value}" in line and float(value) == int(value)
            ops.update(c for c in expr if c in "+-*/")
        # each step starts from the previous result
        for (e1, v1), (e2, _) in zip(annots, annots[1:]):
            assert re.match(rf"{v1}\D", e2)
        assert extract_answer(r["answer"]) == annots[-1][1]
        n_steps.add(len(annots))
    assert n_steps == {1, 2, 3, 4}
    assert ops == set("+-*/")


def test_check_solution_catches_errors():
    assert check_solution("a 2+2=<<2+2=5>>5\n#### 5") == ["2+2 = 4, annotated 5"]
    assert "last line is not '#### N'" in check_solution("a 2+2=<<2+2=4>>4")


def test_generator_splits_disjoint_and_seeded():
    cfg = GeneratorConfig(seed=1)
    train = {r["question"] for r in generate_problems(3000, "train", cfg)}
    test = {r["question"] for r in generate_problems(800, "test", cfg)}
    assert len(train) == 3000 and len(test) == 800  # no duplicates within a split
    assert not train & test
    assert generate_problems(5, "test", cfg) == generate_problems(5, "test", cfg)
    assert generate_problems(5, "test", cfg) != generate_problems(5, "test", GeneratorConfig(seed=2))
    # different streams of the train split are different draws
    a = next(iter_problems("train", cfg, stream=0)).question
    b = next(iter_problems("train", cfg, stream=1)).question
    assert a != b


def test_generator_knobs():
    cfg = GeneratorConfig(min_steps=2, max_steps=2, max_number=9, seed=0)
    for r in generate_problems(200, "test", cfg):
        annots = ANNOTATION.findall(r["answer"])
        assert len(annots) == 2
        first = re.findall(r"\d+", annots[0][0])
        assert 2 <= int(first[0]) <= 9


def test_prompt_and_completion_format():
    assert format_prompt("How many?") == "Question: How many?\nAnswer:"
    assert format_completion("x\n#### 3") == " x\n#### 3"
    prefix, final = split_solution("a\n#### 1,000")
    assert prefix == "a\n#### " and final == "1,000"
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("q", tokenizer=None, chat=True)
    with pytest.raises(ValueError, match="split must be"):
        load_gsm8k("synthetic", split="validation")
