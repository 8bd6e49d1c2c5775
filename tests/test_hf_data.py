"""Multiple-choice data: loading JSONL/CSV/datasets directories, errors naming file and line, prompts, option ids."""

import json

import pytest

pytest.importorskip("transformers")

from calibkern.hf.data import (  # noqa: E402
    DEFAULT_TEMPLATE,
    MCQDataError,
    MCQExample,
    detect_option_ids,
    encode_example,
    format_prompt,
    load_mcq,
)
from hf_tiny import make_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_jsonl_answers_as_index_or_letter(tmp_path):
    path = _write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question": "one?", "choices": ["a", "b", "c"], "answer": 2},
            "",
            {"question": "two?", "choices": ["a", "b"], "answer": "b"},
            {"question": "three?", "choices": ["a", "b"], "answer": "1"},
        ],
    )
    examples = load_mcq(path)
    assert [e.answer for e in examples] == [2, 1, 1]
    assert examples[1].choices == ("a", "b") and examples[1].source == f"{path}:3"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "not among the 2 choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "not among the 2 choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": "maybe"}, "index or letter"),
        ({"question": "q", "choices": "a,b", "answer": 0}, "choices must be a list"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "between 2 and 26"),
        ({"question": "q", "answer": 0}, "missing field"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 0', "malformed JSON"),
        ([1, 2], "expected an object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, row, message):
    good = {"question": "q", "choices": ["a", "b"], "answer": 0}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(MCQDataError, match=rf"^{path}:3: .*{message}"):
        load_mcq(path)


def test_csv_with_letter_columns_and_with_a_json_choices_column(tmp_path):
    letters = tmp_path / "letters.csv"
    letters.write_text('question,A,B,C,answer\n"x, y?",p,q,r,B\nz?,p,q,,0\n')
    examples = load_mcq(letters)
    assert examples[0] == MCQExample("x, y?", ("p", "q", "r"), 1, f"{letters}:2")
    assert examples[1].choices == ("p", "q")
    as_json = tmp_path / "json.csv"
    as_json.write_text('question,choices,answer\nw?,"[""p"", ""q""]",1\n')
    assert load_mcq(as_json)[0].choices == ("p", "q")


@pytest.mark.parametrize(
    "text, message",
    [
        ("question,A,B,answer\nq?,p,q,A\n\"multi\nline?\",p,q,C\n", "4: answer 'C' is not among the 2 choices"),
        ('question,choices,answer\nq?,"[""p"", ",0\n', "2: the choices column"),
        ("question,A,B,answer\nq?,p,q,A,extra\n", "2: row has 5 cells but the header has 4"),
        ("prompt,answer\nq?,A\n", "1: the CSV header"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(MCQDataError, match=rf"^{path}:{message}"):
        load_mcq(path)


def test_datasets_directory(tmp_path):
    import datasets

    rows = [
        {"question": "q?", "choices": ["a", "b"], "answer": 1},
        {"question": "r?", "choices": ["a", "b"], "answer": 5},
    ]
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "good"))
    assert load_mcq(tmp_path / "good")[0].answer == 1
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(MCQDataError, match=r"bad:row 2: answer index 5"):
        load_mcq(tmp_path / "bad", split="train")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_mcq(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(MCQDataError, match="unknown data format"):
        load_mcq(tmp_path / "x.txt")


def test_default_template_renders_the_paper_format():
    example = MCQExample("Capital of France?", ("Paris", "Rome"), 0)
    assert format_prompt(example) == (
        "### Question: Capital of France?\n\nOptions:\nA. Paris\nB. Rome\n\n"
        "Answer with only a single letter.\n### Answer:"
    )
    assert format_prompt(example, "{question} | {options} =>") == "Capital of France? | A. Paris\nB. Rome =>"
    with pytest.raises(ValueError, match="question"):
        format_prompt(example, "no fields")


def test_option_ids_are_detected_after_the_cue():
    tokenizer = make_tokenizer()
    option_ids = detect_option_ids(tokenizer, 4)
    assert tokenizer.convert_ids_to_tokens(option_ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]  # the leading space folded in


def test_letter_that_is_several_tokens_is_an_error():
    tokenizer = make_tokenizer(letters_as_tokens=False)  # " A" is "Ġ" + "A" here
    with pytest.raises(ValueError, match="option letter 'A' does not tokenise to a single token"):
        detect_option_ids(tokenizer, 4)


def test_encoded_features_supervise_the_answer():
    tokenizer = make_tokenizer()
    option_ids = detect_option_ids(tokenizer, 4)
    example = MCQExample("which goes with cat?", ("red", "blue", "sun", "fish"), 2)
    completion = encode_example(tokenizer, example, option_ids)
    prompt_ids = tokenizer(format_prompt(example, DEFAULT_TEMPLATE))["input_ids"]
    assert completion["input_ids"] == prompt_ids + [option_ids[2]]
    assert completion["input_ids"] == tokenizer(format_prompt(example) + " C")["input_ids"]
    assert completion["labels"] == [-100] * len(prompt_ids) + [option_ids[2]]
    assert completion["answer_mask"] == [False] * len(prompt_ids) + [True]
    full = encode_example(tokenizer, example, option_ids, supervise="full", answer=0)
    assert full["labels"] == full["input_ids"] and full["input_ids"][-1] == option_ids[0]
