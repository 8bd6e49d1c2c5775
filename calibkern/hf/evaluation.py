"""Multiple-choice evaluation: option logits at the last prompt position, metrics and per-row predictions.

For each question the prompt (ending at the answer cue) is run through the decoder; the hidden state at the
last prompt token gives the option logits ``z = h · W[option_ids]ᵀ`` (docs/math.md#confidence) — the same numbers
as
``model(prompt).logits[-1, option_ids]``, without computing the other ``V − K`` logits. Prompts are batched
with right padding (the last real position is read per row), under ``torch.no_grad`` and ``model.eval()``
(the training mode is restored afterwards), with a tqdm progress bar.

Metrics (docs/math.md#ece), from the calibkern public API, on ``p = softmax(z / T)``: ``ece``, ``ece_l2``,
``mce``, ``ece_debiased``, ``smece`` (smooth ECE, docs/math.md#smooth-ece) and its bandwidth ``smece_sigma``,
``cw_ece`` (classwise),
``accuracy``, ``mean_confidence``, ``nll``, ``brier``, ``n`` and ``ece_ci`` (a seeded 95 % interval around the
debiased ECE, docs/math.md#intervals). Predictions: one dict
per row with ``probs`` (over the options), ``pred``, ``label`` and ``confidence``. All rows must have the
same number of options.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import calibkern

from .data import (DEFAULT_TEMPLATE, MCQCollator, MCQExample, as_examples, detect_option_ids, encode_prompt,
                   resolve_pad_token_id)
from .modeling import check_logit_parity, eval_decoder_passes, option_logits_at

__all__ = [
    "EvaluationResult",
    "collect_option_logits",
    "calibration_metrics",
    "predictions_from_logits",
    "evaluate",
    "write_evaluation",
]


@dataclass
class EvaluationResult:
    """``metrics`` (floats, ``ece_ci`` a ``[low, high]`` list), per-row ``predictions``, and the raw
    ``option_logits [N, K]`` (float32, before temperature) with ``labels [N]`` for fitting baselines."""

    metrics: dict
    predictions: list[dict]
    option_logits: torch.Tensor
    labels: torch.Tensor


def _common_n_options(examples: Sequence[MCQExample]) -> int:
    n_options = examples[0].n_options
    for example in examples:
        if example.n_options != n_options:
            raise ValueError(
                f"{example.source}: {example.n_options} choices, but {examples[0].source} has {n_options}; "
                "evaluation needs the same number of options in every row"
            )
    return n_options


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def collect_option_logits(
    model,
    tokenizer,
    examples: Sequence[MCQExample],
    option_ids: Sequence[int],
    *,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(option_logits float32 [N, K], labels int64 [N])`` read at the last prompt position of each row."""
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("examples is empty")
    examples = as_examples(examples)
    n_options = _common_n_options(examples)
    if len(option_ids) < n_options:
        raise ValueError(f"option_ids has {len(option_ids)} ids but the rows have {n_options} options; pass one id "
                         "per option letter")
    option_ids = list(option_ids)[:n_options]  # the letters A, B, … of the rows' options
    collate = MCQCollator(resolve_pad_token_id(model, tokenizer))
    device = _model_device(model)

    def batches():
        for start in tqdm(range(0, len(examples), batch_size), desc="evaluate", unit="batch", disable=not progress):
            features = []
            for example in examples[start : start + batch_size]:
                ids = encode_prompt(tokenizer, example, template)
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
            yield {key: value.to(device) for key, value in collate(features).items()}

    chunks = []
    for index, (batch, (hidden, weight, bias, softcap)) in enumerate(eval_decoder_passes(model, batches())):
        if index == 0:  # the fused path equals the model's own logits, or calibkern refuses the model
            check_logit_parity(model, batch)
        last = batch["attention_mask"].sum(dim=1) - 1
        rows = hidden[torch.arange(hidden.shape[0], device=device), last]
        chunks.append(option_logits_at(rows, weight, bias, option_ids, softcap).cpu())
    labels = torch.tensor([example.answer for example in examples], dtype=torch.long)
    return torch.cat(chunks), labels


def calibration_metrics(
    option_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_bins: int = 10,
    temperature: float = 1.0,
    ci_samples: int = 1000,
    seed: int = 0,
) -> dict:
    """The metric set of the module docstring for ``softmax(option_logits / temperature)``, from two reads of the
    logits: the binned metrics, their interval, NLL and Brier from one (a classwise ``CalibrationMeter``), the
    smooth ECE from the rows' top-1 confidences (the other), with its bandwidth as ``smece_sigma``."""
    logits = option_logits.float()
    meter = calibkern.CalibrationMeter(n_bins, classwise=True, temperature=temperature)
    meter.update(logits, labels)
    summary = meter.compute()
    interval = meter.stats.confidence_interval(n_boot=ci_samples, seed=seed)
    smece, sigma = calibkern.smooth_ece(logits, labels, temperature=temperature, return_sigma=True)
    return {
        "ece": float(summary["ece"]),
        "ece_debiased": float(summary["ece_debiased"]),
        "smece": float(smece),
        "smece_sigma": sigma,
        "ece_l2": float(summary["ece_l2"]),
        "mce": float(summary["mce"]),
        "cw_ece": float(summary["cw_ece"]),
        "accuracy": float(summary["accuracy"]),
        "mean_confidence": float(summary["mean_confidence"]),
        "nll": float(summary["nll"]),
        "brier": float(summary["brier"]),
        "n": int(labels.numel()),
        "ece_ci": [interval.low, interval.high],
    }


def predictions_from_logits(option_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> list[dict]:
    """One dict per row: ``probs`` over the options, ``pred`` (argmax, lowest index on ties), ``label``,
    ``confidence`` (max prob)."""
    probs = torch.softmax(option_logits.float() / temperature, dim=-1)
    confidence, pred = probs.max(dim=-1)
    return [
        {"probs": row, "pred": p, "label": y, "confidence": c}
        for row, p, y, c in zip(probs.tolist(), pred.tolist(), labels.tolist(), confidence.tolist())
    ]


def evaluate(
    model,
    tokenizer,
    examples: Sequence[MCQExample],
    option_ids: Sequence[int] | None = None,
    *,
    template: str = DEFAULT_TEMPLATE,
    n_bins: int = 10,
    temperature: float = 1.0,
    batch_size: int = 32,
    progress: bool = True,
    seed: int = 0,
) -> EvaluationResult:
    """Evaluate ``model`` on multiple-choice ``examples`` — loaded rows or plain dicts with ``question``,
    ``choices`` and ``answer`` — (option ids detected from the tokenizer if omitted)."""
    examples = as_examples(examples)
    if option_ids is None:
        option_ids = detect_option_ids(tokenizer, _common_n_options(examples), template)
    logits, labels = collect_option_logits(
        model, tokenizer, examples, option_ids, template=template, batch_size=batch_size, progress=progress
    )
    metrics = calibration_metrics(logits, labels, n_bins=n_bins, temperature=temperature, seed=seed)
    return EvaluationResult(metrics, predictions_from_logits(logits, labels, temperature), logits, labels)


def write_evaluation(result: EvaluationResult, out_dir: str | os.PathLike) -> None:
    """``out_dir/metrics.json`` and ``out_dir/predictions.jsonl`` (one line per data row)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(result.metrics, handle, indent=2)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as handle:
        for row in result.predictions:
            handle.write(json.dumps(row) + "\n")
