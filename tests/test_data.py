import json
import random
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
        ("#### .5", "0.5"),  # a leading decimal point is not dropped
        ("#### -.25", "-0.25"),
        ("She walks 3-4 miles", "4"),  # a hyphen between numbers is not a minus sign
        ("so x-2 is left, or (1+2)-3", "3"),
        ("it fell to -7 degrees", "-7"),
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


# ----------------------------------------------------------------------------- preference pairs

from alignkit.data import corrupt_solution, preference_pairs  # noqa: E402


def _pairs_rows(n=400):
    return generate_problems(n, "train", GeneratorConfig(1, 3, 10, 0), stream=3)


def test_preference_pairs_chosen_right_rejected_wrong():
    rows = _pairs_rows()
    pairs = preference_pairs(rows, seed=0)
    assert len(pairs) == len(rows)
    kinds = {"slip": 0, "final": 0}
    for row, p in zip(rows, pairs):
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["prompt"] == format_prompt(row["question"])  # same prompt for both
        assert p["chosen"] == format_completion(row["answer"])
        gold = extract_answer(row["answer"])
        assert extract_answer(p["chosen"]) == gold
        assert extract_answer(p["rejected"]) != gold  # guaranteed
        rej = p["rejected"].strip()
        # same format: as many lines, one annotation per step line, last line "#### N", starts with a space
        assert p["rejected"].startswith(" ") and len(rej.split("\n")) == len(row["answer"].split("\n"))
        assert len(ANNOTATION.findall(rej)) == len(ANNOTATION.findall(row["answer"]))
        assert re.fullmatch(r"#### -?\d+", rej.split("\n")[-1])
        # exactly one thing is wrong: one slipped step (later steps recomputed from it) or the final line
        errors = check_solution(rej)
        assert len(errors) == 1, (row["answer"], rej, errors)
        if errors[0] == "final answer differs from the last computed value":
            kinds["final"] += 1
            assert rej.split("\n")[:-1] == row["answer"].split("\n")[:-1]  # every step untouched
        else:
            kinds["slip"] += 1
            annots = ANNOTATION.findall(rej)
            for (e1, v1), (e2, _) in zip(annots, annots[1:]):  # the slip is carried into the next step
                assert re.match(rf"{v1}\D", e2)
    # both kinds occur, about a quarter wrong final lines (wrong_final_share 0.25)
    assert 0.15 < kinds["final"] / len(rows) < 0.35 and kinds["slip"] > 0


def test_preference_pairs_slip_propagates_by_hand():
    # a two-step solution slipped in step 1 must carry the wrong value into step 2 and the final line
    answer = "Tom buys 4 more, so Tom has 5+4=<<5+4=9>>9 apples.\n2 times as many is 9*2=<<9*2=18>>18 apples.\n#### 18"
    seen = set()
    for s in range(60):
        wrong = corrupt_solution(answer, random.Random(s), p_final=0.0)
        lines = wrong.split("\n")
        v1 = int(ANNOTATION.findall(lines[0])[0][1])
        if v1 != 9:  # slip in step 1: step 2 recomputed from it, visible text and final line follow
            assert lines[1] == f"2 times as many is {v1}*2=<<{v1}*2={2 * v1}>>{2 * v1} apples."
            assert lines[2] == f"#### {2 * v1}"
            assert lines[0] == f"Tom buys 4 more, so Tom has 5+4=<<5+4={v1}>>{v1} apples."
        else:  # slip in step 2 only
            v2 = int(ANNOTATION.findall(lines[1])[0][1])
            assert v2 != 18 and lines[2] == f"#### {v2}"
        seen.add(v1 != 9)
    assert seen == {True, False}  # both steps get slipped across seeds


def test_preference_pairs_real_gsm8k_rows():
    for seed in range(10):
        for row, p in zip(GSM8K_ROWS, preference_pairs(GSM8K_ROWS, seed=seed)):
            assert extract_answer(p["rejected"]) != extract_answer(row["answer"])
            rej = p["rejected"].strip()
            assert re.fullmatch(r"#### [\d,]+", rej.split("\n")[-1]) and len(check_solution(rej)) == 1
            if "2,400" in row["answer"]:  # thousands separators kept where the gold solution had them
                assert re.search(r">>\d,\d{3} dollars", rej) and re.fullmatch(r"#### \d,\d{3}", rej.split("\n")[-1])


def test_preference_pairs_deterministic_per_seed():
    rows = _pairs_rows(100)
    a, b = preference_pairs(rows, seed=0), preference_pairs(rows, seed=0)
    assert a == b
    c = preference_pairs(rows, seed=1)
    assert sum(x["rejected"] != y["rejected"] for x, y in zip(a, c)) > 50
    # a pair depends on its row and the seed only, not on the other rows
    assert preference_pairs(rows[10:20], seed=0) == a[10:20]


def test_preference_pairs_bad_input():
    with pytest.raises(ValueError, match="preference_pairs needs at least one row, got none"):
        preference_pairs([], seed=0)
    with pytest.raises(ValueError, match="row 1 has no '#### ' final-answer marker"):
        preference_pairs([GSM8K_ROWS[0], {"question": "q", "answer": "it is 4"}], seed=0)
