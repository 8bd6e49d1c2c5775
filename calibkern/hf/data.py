"""Multiple-choice data: loading, the prompt template, option token ids, tokenised training features.

File formats (docs/demo.md):

* **JSONL** (``.jsonl``, ``.json``): one JSON object per line with ``question`` (string), ``choices`` (list of
  strings) and ``answer``. Blank lines are skipped.
* **CSV** (``.csv``, with a header row): ``question``, ``answer`` and the options either as a ``choices``
  column holding a JSON list, or as separate columns named by their letters ``A``, ``B``, ``C``, … (consecutive
  from ``A``; an empty cell ends the options of that row, so rows may have different numbers of options).
* **A local ``datasets`` directory** (written by ``Dataset.save_to_disk``), with the same fields; a
  ``DatasetDict`` needs ``split=``.

``answer`` is a 0-based option index (an integer, or a string of digits — CSV cells are strings) or an option
letter (``"A"``, ``"b"``, …). Every malformed row is a :class:`MCQDataError` naming the file and line (for a
``datasets`` directory: the row number, 1-based).

Prompt (docs/math.md#confidence, docs/demo.md): ``template.format(question=..., options=...)`` where ``{options}``
renders as lines
``"A. <choice>"`` joined by newlines; the prompt ends at the answer cue and the answer continuation is
``" <letter>"``. The option token ids are found by tokenising a prompt with and without that continuation,
so a tokenizer that folds the leading space into the letter (``"ĠA"``, ``"▁A"``) and one that does not are
both handled; a letter that comes out as several tokens is an error.
"""

from __future__ import annotations

import csv
import io
import json
import os
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_TEMPLATE",
    "MCQDataError",
    "MCQExample",
    "load_mcq",
    "option_letters",
    "format_prompt",
    "answer_continuation",
    "detect_option_ids",
    "encode_prompt",
    "encode_example",
    "build_sft_dataset",
    "MCQCollator",
    "resolve_pad_token_id",
]

DEFAULT_TEMPLATE = (
    "### Question: {question}\n\nOptions:\n{options}\n\nAnswer with only a single letter.\n### Answer:"
)
LETTERS = string.ascii_uppercase


class MCQDataError(ValueError):
    """A malformed multiple-choice row; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class MCQExample:
    """One multiple-choice question; ``answer`` is the 0-based index of the correct choice."""

    question: str
    choices: tuple[str, ...]
    answer: int
    source: str = ""

    @property
    def n_options(self) -> int:
        return len(self.choices)


def option_letters(n_options: int) -> list[str]:
    """``["A", "B", …]`` for ``n_options`` options (2 ≤ n ≤ 26)."""
    if not 2 <= n_options <= len(LETTERS):
        raise ValueError(f"n_options must be in [2, {len(LETTERS)}], got {n_options}")
    return list(LETTERS[:n_options])


# --------------------------------------------------------------------------------------------------- loading


def _parse_answer(value: Any, n_options: int, where: str) -> int:
    """An option index from an index (int or digit string) or a letter; raises naming ``where``."""
    if isinstance(value, bool) or value is None:
        raise MCQDataError(f"{where}: answer must be an option index or letter, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():  # str.isdigit alone accepts "²", which int() refuses
            value = int(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            index = LETTERS.index(text.upper())
            if index >= n_options:
                raise MCQDataError(
                    f"{where}: answer {value!r} is not among the {n_options} choices "
                    f"({', '.join(LETTERS[:n_options])})"
                )
            return index
        else:
            raise MCQDataError(f"{where}: answer must be an option index or letter, got {value!r}")
    if not isinstance(value, int):
        raise MCQDataError(f"{where}: answer must be an option index or letter, got {value!r}")
    if not 0 <= value < n_options:
        raise MCQDataError(f"{where}: answer index {value} is not among the {n_options} choices (0-based)")
    return value


def _make_example(record: dict, where: str) -> MCQExample:
    """Validate one row (a mapping with question, choices, answer) into an :class:`MCQExample`."""
    if not isinstance(record, dict):
        raise MCQDataError(f"{where}: expected an object with question, choices, answer; got {type(record).__name__}")
    missing = [key for key in ("question", "choices", "answer") if key not in record]
    if missing:
        raise MCQDataError(f"{where}: missing field(s) {', '.join(missing)}")
    question, choices = record["question"], record["choices"]
    if not isinstance(question, str) or not question.strip():
        raise MCQDataError(f"{where}: question must be a non-empty string")
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise MCQDataError(f"{where}: choices must be a list of strings")
    if not 2 <= len(choices) <= len(LETTERS):
        raise MCQDataError(f"{where}: need between 2 and {len(LETTERS)} choices, got {len(choices)}")
    answer = _parse_answer(record["answer"], len(choices), where)
    return MCQExample(question=question, choices=tuple(choices), answer=answer, source=where)


def read_text(path: str) -> str:
    """The UTF-8 text of ``path`` without a leading byte-order mark (as Excel writes); bytes that are not
    UTF-8 raise :class:`MCQDataError` naming the file and line."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise MCQDataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); save the file as "
                           "UTF-8") from None


def as_examples(rows) -> list[MCQExample]:
    """Loaded :class:`MCQExample` rows as they are; plain dicts (``question``, ``choices``, ``answer``)
    validated into examples, each named by its position."""
    return [row if isinstance(row, MCQExample) else _make_example(row, f"row {i + 1}") for i, row in enumerate(rows)]


def jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    """``(file:line, record)`` for each non-blank line of a JSONL file (lines split at ``\\n`` only, so the line
    numbers are the file's); a line that is not JSON raises :class:`MCQDataError` naming the file and line."""
    for line_number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MCQDataError(f"{where}: malformed JSON ({error.msg})") from None
        except RecursionError:  # the parser recurses once per level: a line nested thousands deep
            raise MCQDataError(f"{where}: JSON nested too deeply (a row is an object of strings and lists)") from None
        yield where, record


def _load_jsonl(path: str) -> list[MCQExample]:
    return [_make_example(record, where) for where, record in jsonl_records(path)]


def _csv_choices(row: dict, header: list[str], where: str) -> list:
    """The options of a CSV row: a JSON list in ``choices`` or the letter columns ``A``, ``B``, …."""
    if "choices" in header:
        try:
            return json.loads(row["choices"] or "")
        except json.JSONDecodeError:
            raise MCQDataError(f"{where}: the choices column must hold a JSON list of strings") from None
    choices = []
    for letter in LETTERS:
        if letter not in header or not row[letter]:
            break
        choices.append(row[letter])
    return choices


def _load_csv(path: str) -> list[MCQExample]:
    examples = []
    text = read_text(path)
    # csv refuses cells over 128 KiB by default; a long passage is a legitimate cell, and no cell exceeds the file
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if "question" not in header or "answer" not in header or not ("choices" in header or "A" in header):
        raise MCQDataError(
            f"{path}:1: the CSV header needs question, answer and either choices (a JSON list) "
            f"or option columns A, B, …; got {header}"
        )
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row or any(value is None for value in row.values()):
            cells = sum(value is not None for key, value in row.items() if key is not None)
            cells += len(row.get(None, []))
            raise MCQDataError(f"{where}: row has {cells} cells but the header has {len(header)}")
        record = {"question": row["question"], "answer": row["answer"]}
        record["choices"] = _csv_choices(row, header, where)
        examples.append(_make_example(record, where))
    return examples


def _load_datasets_dir(path: str, split: str | None) -> list[MCQExample]:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise MCQDataError(f"{path}: a DatasetDict with splits {list(loaded)} needs split=")
            split = next(iter(loaded))
        if split not in loaded:
            raise MCQDataError(f"{path}: no split {split!r} (has {list(loaded)})")
        loaded = loaded[split]
    return [_make_example(dict(record), f"{path}:row {i + 1}") for i, record in enumerate(loaded)]


def load_mcq(path: str | os.PathLike, *, split: str | None = None) -> list[MCQExample]:
    """Load multiple-choice rows from a JSONL/CSV file or a local ``datasets`` directory (module docstring)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        examples = _load_datasets_dir(path, split)
    elif path.endswith(".csv"):
        examples = _load_csv(path)
    elif path.endswith((".jsonl", ".json")):
        examples = _load_jsonl(path)
    else:
        raise MCQDataError(f"{path}: unknown data format (expected .jsonl, .json, .csv or a datasets directory)")
    if not examples:
        raise MCQDataError(f"{path}: no rows")
    return examples


# --------------------------------------------------------------------------------------------------- prompts


TEMPLATE_FIELDS = ("question", "options")


def check_template(template) -> str:
    """A format string whose replacement fields are exactly ``{question}`` and ``{options}`` (each at least
    once, no conversion or format spec); ``{{`` and ``}}`` stand for literal braces."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a string, got {type(template).__name__}")
    try:
        fields = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        raise ValueError(f"template {template!r} is not a valid format string ({error})") from None
    for name, conversion, spec in fields:
        if name not in TEMPLATE_FIELDS or conversion or spec:
            raise ValueError(f"template {template!r}: unknown field {{{name}}}; the fields are {{question}} and "
                             "{options} (write {{ and }} for literal braces)")
    missing = [f"{{{name}}}" for name in TEMPLATE_FIELDS if name not in {f[0] for f in fields}]
    if missing:
        raise ValueError(f"template {template!r} must contain {' and '.join(missing)}")
    return template


def format_prompt(example: MCQExample, template: str = DEFAULT_TEMPLATE) -> str:
    """``template`` with ``{question}`` and ``{options}`` (lines ``"A. <choice>"``) filled in."""
    check_template(template)
    letters = option_letters(example.n_options)
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, example.choices))
    return template.format(question=example.question, options=options)


def answer_continuation(index: int) -> str:
    """The text that answers with option ``index``: a space and its letter (``" B"``)."""
    return " " + LETTERS[index]


def _token_ids(tokenizer, text: str) -> list[int]:
    """The tokens of ``text`` with the special tokens the tokenizer puts before it (BOS) but none that its
    post-processor appends (EOS): a prompt goes on with its answer, so nothing may close it."""
    full = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start + len(plain)]
    return full


def detect_option_ids(tokenizer, n_options: int, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """Token id of each option letter as the tokenizer produces it after the answer cue (docs/math.md#confidence).

    For each letter, ``prompt + " <letter>"`` must tokenise to the prompt's tokens plus exactly one more token;
    that token (with or without the leading space folded in, whatever the tokenizer does) is the option id.
    """
    letters = option_letters(n_options)
    probe = MCQExample(question="q", choices=tuple(letters), answer=0)
    prompt = format_prompt(probe, template)
    prompt_ids = _token_ids(tokenizer, prompt)
    option_ids = []
    for index, letter in enumerate(letters):
        full_ids = _token_ids(tokenizer, prompt + answer_continuation(index))
        continuation = full_ids[len(prompt_ids):]
        if full_ids[: len(prompt_ids)] != prompt_ids or len(continuation) != 1:
            pieces = tokenizer.convert_ids_to_tokens(full_ids[len(prompt_ids) - 1:])
            raise ValueError(
                f"option letter {letter!r} does not tokenise to a single token after the answer cue "
                f"(the cue's last token and the continuation {answer_continuation(index)!r} become {pieces}); "
                "option_ids needs one token per letter — use a template or tokenizer where each letter is one token"
            )
        option_ids.append(continuation[0])
    if len(set(option_ids)) != len(option_ids):
        raise ValueError(f"option letters share token ids {option_ids}")
    return option_ids


# --------------------------------------------------------------------------------------------------- features


def encode_prompt(tokenizer, example: MCQExample, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """Token ids of the prompt (special tokens as the tokenizer adds them), ending at the answer cue."""
    return _token_ids(tokenizer, format_prompt(example, template))


def encode_example(
    tokenizer,
    example: MCQExample,
    option_ids: Sequence[int],
    *,
    template: str = DEFAULT_TEMPLATE,
    supervise: str = "completion",
    answer: int | None = None,
) -> dict[str, list]:
    """Causal-LM features for ``prompt + " <letter>"`` (no EOS after the letter).

    ``labels`` follow the Hugging Face convention (unshifted, ``-100`` = unsupervised): ``supervise=
    "completion"`` supervises only the answer token (CFT's ``L_SFT1``), ``"full"`` every token (RCFT's
    ``L_SFT2``). ``answer_mask`` is ``True`` at the answer token's position in ``labels``. ``answer``
    overrides the example's answer (e.g. a sampled answer).
    """
    if supervise not in ("completion", "full"):
        raise ValueError(f"supervise must be 'completion' or 'full', got {supervise!r}")
    if len(option_ids) != example.n_options:
        raise ValueError(f"{example.source}: {example.n_options} choices but {len(option_ids)} option_ids; the "
                         "calibration terms score every answer over all option_ids, so every training row needs "
                         "that many options (evaluation refuses mixed option counts too)")
    target = example.answer if answer is None else answer
    prompt_ids = encode_prompt(tokenizer, example, template)
    input_ids = prompt_ids + [int(option_ids[target])]
    if supervise == "completion":
        labels = [-100] * len(prompt_ids) + [input_ids[-1]]
    else:
        labels = list(input_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "answer_mask": [False] * len(prompt_ids) + [True],
    }


def build_sft_dataset(
    tokenizer,
    examples: Sequence[MCQExample],
    option_ids: Sequence[int],
    *,
    template: str = DEFAULT_TEMPLATE,
    supervise: str = "completion",
):
    """A ``datasets.Dataset`` of :func:`encode_example` features, one row per example."""
    import datasets

    rows = [
        encode_example(tokenizer, example, option_ids, template=template, supervise=supervise)
        for example in examples
    ]
    return datasets.Dataset.from_list(rows)


def resolve_pad_token_id(model=None, tokenizer=None) -> int:
    """The tokenizer's pad id, else the model config's, else 0 (padded positions are masked anyway)."""
    for source in (tokenizer, getattr(model, "config", None)):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return 0


class MCQCollator:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0), ``labels`` (-100) and ``answer_mask`` (False)."""

    PAD_VALUES = {"attention_mask": 0, "labels": -100, "answer_mask": False}

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for key in features[0]:
            pad = self.pad_token_id if key == "input_ids" else self.PAD_VALUES.get(key)
            if pad is None:
                continue
            dtype = torch.bool if key == "answer_mask" else torch.long
            rows = [list(feature[key]) + [pad] * (length - len(feature[key])) for feature in features]
            batch[key] = torch.tensor(rows, dtype=dtype)
        return batch
