"""Hugging Face integration (SPEC §6): the calibration-aware trainer, multiple-choice data, evaluation,
DPO alignment and the baselines. Needs the ``hf`` extra (transformers, trl, peft, datasets)."""

from .config import CalibrationConfig
from .data import (
    DEFAULT_TEMPLATE,
    MCQCollator,
    MCQDataError,
    MCQExample,
    build_sft_dataset,
    detect_option_ids,
    encode_example,
    format_prompt,
    load_mcq,
)
from .evaluation import EvaluationResult, calibration_metrics, evaluate, write_evaluation
from .trainer import CalibrationTrainer, compute_loss_func

__all__ = [
    "DEFAULT_TEMPLATE",
    "CalibrationConfig",
    "CalibrationTrainer",
    "EvaluationResult",
    "MCQCollator",
    "MCQDataError",
    "MCQExample",
    "build_sft_dataset",
    "calibration_metrics",
    "compute_loss_func",
    "detect_option_ids",
    "encode_example",
    "evaluate",
    "format_prompt",
    "load_mcq",
    "write_evaluation",
]
