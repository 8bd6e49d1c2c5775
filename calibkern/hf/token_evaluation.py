"""Token-level calibration of a causal LM on plain text (``calibkern evaluate --token-level``).

Rows are JSONL ``{"text": …}`` (every token after the first is scored) or ``{"prompt": …, "completion": …}``
(only the completion's tokens are scored). Each batch runs the decoder once and the fused loss without
gradient (docs/math.md#token-level-calibration), so the ``[tokens, V]`` logits of the data never exist: per
position the top-1 confidence over the vocabulary and its correctness are binned (``token_stats``), every
vocabulary probability too (``full_stats``, Full-ECE), and the cross-entropy sums to the NLL.

Metrics: ``token_ece`` (plug-in, l1), ``token_ece_debiased`` (docs/math.md#debiased-ece), ``token_ece_l2``,
``token_mce``, ``token_accuracy``, ``token_confidence``, ``full_ece`` (``Σ_k |s_k − a_k| / (n · V)``), ``nll``
(mean per scored token), ``n_tokens``, ``n_skipped`` (positions with non-finite logits), and the reliability
diagram's bins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..losses import fused_linear_calibration_loss
from ..metrics import BinStats
from .data import MCQCollator, MCQDataError, jsonl_records, resolve_pad_token_id
from .modeling import check_logit_parity, eval_decoder_passes

__all__ = ["TokenEvaluation", "load_text_rows", "encode_text_row", "evaluate_tokens", "write_token_evaluation"]


@dataclass
class TokenEvaluation:
    """``metrics`` (floats and counts) and the token and Full-ECE ``BinStats`` they come from."""

    metrics: dict
    token_stats: BinStats
    full_stats: BinStats


def load_text_rows(path: str | os.PathLike) -> list[dict]:
    """JSONL rows with ``text`` (a non-empty string) or ``prompt`` and ``completion`` (strings, the completion
    non-empty); an error names the file and line."""
    rows = []
    for where, record in jsonl_records(str(path)):
        if not isinstance(record, dict):
            raise MCQDataError(f"{where}: a row must be a JSON object")
        if "text" in record:
            fields = {"text": record["text"]}
        elif "prompt" in record and "completion" in record:
            fields = {"prompt": record["prompt"], "completion": record["completion"]}
        else:
            raise MCQDataError(f"{where}: a row needs 'text', or 'prompt' and 'completion'")
        if not all(isinstance(value, str) for value in fields.values()) or not fields.get("text",
                                                                                         fields.get("completion")):
            raise MCQDataError(f"{where}: 'text' / 'completion' must be a non-empty string ('prompt' a string)")
        rows.append(fields)
    if not rows:
        raise MCQDataError(f"{path}: no rows")
    return rows


def encode_text_row(tokenizer, row: dict, max_length: int | None = None) -> dict:
    """``input_ids`` and ``labels`` (unshifted, Hugging Face convention, so the first token is never a target):
    the prompt's tokens ``-100`` — where the tokenizer merges the prompt's end with the completion, from the
    first token that differs — and truncated to ``max_length`` tokens."""
    if "text" in row:
        ids = tokenizer(row["text"])["input_ids"]
        labels = list(ids)
    else:
        prompt = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
        n_prompt = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
        labels = [-100] * n_prompt + ids[n_prompt:]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


@torch.no_grad()
def evaluate_tokens(model, tokenizer, rows: Sequence[dict], *, n_bins: int = 10, batch_size: int = 8,
                    max_length: int | None = None, progress: bool = True) -> TokenEvaluation:
    """Token-level metrics of ``model`` on text ``rows`` (:func:`load_text_rows`), chunked through the fused
    loss: one decoder pass per batch, never the full logits."""
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("rows is empty")
    collate = MCQCollator(resolve_pad_token_id(model, tokenizer))
    device = next(model.parameters()).device

    def batches():
        for start in tqdm(range(0, len(rows), batch_size), desc="evaluate tokens", unit="batch",
                          disable=not progress):
            features = [encode_text_row(tokenizer, row, max_length) for row in rows[start:start + batch_size]]
            yield {key: value.to(device) for key, value in collate(features).items()}

    token, full = BinStats.empty(n_bins, device=device), BinStats.empty(n_bins, device=device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    for index, (batch, (hidden, weight, bias, softcap)) in enumerate(eval_decoder_passes(model, batches())):
        if index == 0:  # the fused path equals the model's own logits, or calibkern refuses the model
            check_logit_parity(model, batch)
        out = fused_linear_calibration_loss(hidden, weight, batch["labels"], option_ids=None, bias=bias,
                                            calibration=None, n_bins=n_bins, logit_softcap=softcap,
                                            num_items_in_batch=1, token_stats=True, full_stats=True)
        token, full = token + out.token_stats, full + out.full_stats
        nll_sum += out.sft_loss.double()
    return TokenEvaluation(token_metrics(token, full, nll_sum), token, full)


def token_metrics(token: BinStats, full: BinStats, nll_sum: torch.Tensor) -> dict:
    """The metric set of the module docstring from the accumulated statistics."""
    n_tokens = int(token.total())
    return {"token_ece": float(token.ece("l1")), "token_ece_debiased": float(token.ece("l1", "debiased")),
            "token_ece_l2": float(token.ece("l2")), "token_mce": float(token.mce()),
            "token_accuracy": float(token.accuracy()), "token_confidence": float(token.mean_confidence()),
            "full_ece": float(full.ece("l1")), "nll": float(nll_sum) / max(n_tokens, 1), "n_tokens": n_tokens,
            "n_skipped": int(token.n_skipped)}


def write_token_evaluation(result: TokenEvaluation, out_dir: str | os.PathLike) -> None:
    """``out_dir/token_metrics.json`` (the metrics and the reliability bins) and ``out_dir/token_reliability.png``."""
    from ..pipeline.report import write_reliability_plot

    os.makedirs(out_dir, exist_ok=True)
    rel = result.token_stats.reliability()
    bins = {"accuracy": rel.accuracy.tolist(), "confidence": rel.confidence.tolist(), "counts": rel.counts.tolist()}
    with open(os.path.join(out_dir, "token_metrics.json"), "w", encoding="utf-8") as handle:
        json.dump({**result.metrics, "reliability": bins}, handle, indent=2)
    write_reliability_plot(os.path.join(out_dir, "token_reliability.png"), "tokens", bins,
                           {"ece": result.metrics["token_ece"], "accuracy": result.metrics["token_accuracy"]})
