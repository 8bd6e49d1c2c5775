"""Loading what the command-line stages take: Hugging Face model directories and preference pairs."""

from __future__ import annotations

import json
import os

from ..hf.alignment import PreferencePair
from ..hf.data import LETTERS, MCQDataError, load_mcq, read_text


def load_model(path: str | os.PathLike):
    """``(model, tokenizer)`` from a local Hugging Face causal-LM directory; a missing one is an error naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
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
