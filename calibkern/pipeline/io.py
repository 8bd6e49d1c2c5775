"""Loading what the command-line stages take: Hugging Face model directories, the training record saved beside a
model (how it was prompted), and preference pairs."""

from __future__ import annotations

import json
import os

from ..hf.alignment import PreferencePair
from ..hf.data import LETTERS, MCQDataError, load_mcq, read_text

TRAINING_RECORD = "calibkern_training.json"
OPTION_FORMAT = "options as lines 'A. <choice>'; the answer is ' <letter>' after the prompt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def training_record(stage: str, template: str, option_ids, provenance: dict | None = None) -> dict:
    """What a saved model was trained with: ``{"stage", "template", "option_ids", "option_format", "provenance"}``."""
    return {"stage": stage, "template": template, "option_ids": [int(i) for i in option_ids],
            "option_format": OPTION_FORMAT, "provenance": provenance or {}}


def write_training_record(directory: str, record: dict) -> None:
    with open(os.path.join(directory, TRAINING_RECORD), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


def read_training_record(directory: str | os.PathLike) -> dict | None:
    """The model directory's training record, or ``None`` when it has none; a malformed one is an error naming it."""
    path = os.path.join(os.fspath(directory), TRAINING_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: malformed training record ({error})") from None
    if (not isinstance(record, dict) or not isinstance(record.get("template"), str)
            or not isinstance(record.get("option_ids"), list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in record["option_ids"])):
        raise ValueError(f"{path}: a training record needs a template (string) and option_ids (integers)")
    return record


def load_model(path: str | os.PathLike):
    """``(model, tokenizer)`` from a local Hugging Face causal-LM directory; a missing one, or one without config.json
    or tokenizer files, is an error naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                                "tokenizer into the model directory (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:  # a malformed config.json, missing weights or tokenizer
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: cannot load the model or tokenizer ({first_line})") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _rejected_index(value, n_options: int, where: str) -> int:
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        value = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_options:
        raise MCQDataError(f"{where}: rejected must be an option index or letter among the {n_options} choices, "
                           f"got {value!r}")
    return value


def load_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Preference pairs from JSONL rows ``question``, ``choices``, ``answer`` (the chosen option) and optionally
    ``rejected`` (index or letter); a row without ``rejected`` pairs its answer with every other option."""
    path = os.fspath(path)
    examples = load_mcq(path)
    if not path.endswith((".jsonl", ".json")):
        raise MCQDataError(f"{path}: preference pairs must be JSONL")
    lines = read_text(path).split("\n")
    pairs = []
    for example in examples:
        record = json.loads(lines[int(example.source.rsplit(":", 1)[1]) - 1])
        if "rejected" in record:
            rejected = [_rejected_index(record["rejected"], example.n_options, example.source)]
        else:
            rejected = [j for j in range(example.n_options) if j != example.answer]
        for j in rejected:
            if j == example.answer:
                raise MCQDataError(f"{example.source}: rejected equals the chosen answer {example.answer}")
            pairs.append(PreferencePair(example, chosen=example.answer, rejected=j))
    return pairs
