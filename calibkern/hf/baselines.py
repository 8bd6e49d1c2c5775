"""The baselines CFT/RCFT are compared with (docs/demo.md): temperature scaling and label-smoothing SFT.

* **Temperature scaling**: one scalar ``T`` for the option logits, ``p = softmax(z / T)``, fitted by minimising
  the mean NLL on a held-out split with L-BFGS over ``log T`` (so ``T > 0``), starting from ``T = 1``.
  Accuracy is unchanged by construction (``argmax`` is invariant to ``T > 0``).
* **Label smoothing**: completion-only SFT with ``transformers.Trainer``'s ``label_smoothing_factor = ε``, i.e.
  the target distribution ``(1 − ε)·e_y + ε/V`` over the *whole vocabulary*, as an SFT user would run it. (Over
  ``V`` tokens this bounds the logit gap at ``log((1 − ε)·V/ε)``, which is why it barely moves option-level
  confidence on large vocabularies.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..calibrators import TemperatureScaling
from .data import DEFAULT_TEMPLATE, MCQExample
from .evaluation import EvaluationResult, calibration_metrics, collect_option_logits, predictions_from_logits

__all__ = ["fit_temperature", "temperature_scaling", "train_label_smoothing"]


def fit_temperature(option_logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """``T`` minimising ``mean_i −log softmax(z_i / T)[y_i]``, by L-BFGS over ``log T`` from ``T = 1``
    (:class:`calibkern.calibrators.TemperatureScaling`)."""
    if option_logits.dim() != 2 or option_logits.shape[0] != labels.shape[0] or option_logits.shape[0] == 0:
        raise ValueError(f"option_logits must be [N, K] with N = len(labels) ≥ 1, got {tuple(option_logits.shape)}")
    if not torch.isfinite(option_logits).all():
        raise ValueError("option_logits contains NaN or infinite values")
    return TemperatureScaling(max_iter=max_iter).fit(option_logits, labels).temperature


def temperature_scaling(
    model,
    tokenizer,
    calibration_examples: Sequence[MCQExample],
    test_examples: Sequence[MCQExample],
    option_ids: Sequence[int],
    *,
    template: str = DEFAULT_TEMPLATE,
    n_bins: int = 10,
    batch_size: int = 32,
    progress: bool = True,
    seed: int = 0,
) -> tuple[float, EvaluationResult]:
    """Fit ``T`` on ``calibration_examples`` (held out), then evaluate ``test_examples`` at ``T``.
    Returns ``(T, result)``; ``result.metrics["temperature"] = T``."""
    fit_logits, fit_labels = collect_option_logits(
        model, tokenizer, calibration_examples, option_ids, template=template, batch_size=batch_size, progress=progress
    )
    temperature = fit_temperature(fit_logits, fit_labels)
    logits, labels = collect_option_logits(
        model, tokenizer, test_examples, option_ids, template=template, batch_size=batch_size, progress=progress
    )
    metrics = calibration_metrics(logits, labels, n_bins=n_bins, temperature=temperature, seed=seed)
    metrics["temperature"] = temperature
    return temperature, EvaluationResult(metrics, predictions_from_logits(logits, labels, temperature), logits, labels)


def train_label_smoothing(model, train_dataset, args, *, epsilon: float = 0.1, data_collator=None, tokenizer=None,
                          quiet: bool = False):
    """Completion-only SFT of ``model`` with label smoothing ``epsilon`` over the vocabulary; returns the
    trained ``transformers.Trainer``. ``train_dataset``: :func:`calibkern.hf.data.build_sft_dataset` features
    (``answer_mask`` is dropped as an unused column); ``args``: ``TrainingArguments`` (its
    ``label_smoothing_factor`` is set to ``epsilon``); ``quiet=True``: nothing on the console."""
    from transformers import Trainer

    from .data import MCQCollator, resolve_pad_token_id

    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}")
    args.label_smoothing_factor = float(epsilon)
    if "answer_mask" in getattr(train_dataset, "column_names", ()):
        train_dataset = train_dataset.remove_columns("answer_mask")
    collator = data_collator or MCQCollator(resolve_pad_token_id(model, tokenizer))
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)
    if quiet:
        from .trainer import silence_console

        silence_console(trainer)
    trainer.train()
    return trainer
