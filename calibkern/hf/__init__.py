"""Hugging Face integration (docs/hf.md): the calibration-aware trainer, multiple-choice data, evaluation,
DPO alignment and the baselines. Needs the ``hf`` extra (transformers, trl, peft, datasets)."""

from .alignment import PreferencePair, preference_dataset, train_dpo
from .baselines import fit_temperature, temperature_scaling, train_label_smoothing
from .config import CalibrationConfig
from .data import (
    DEFAULT_TEMPLATE,
    MCQCollator,
    MCQDataError,
    MCQExample,
    build_sft_dataset,
    detect_option_ids,
    encode_example,
    check_template,
    format_prompt,
    load_mcq,
    resolve_pad_token_id,
)
from .evaluation import EvaluationResult, calibration_metrics, evaluate, write_evaluation
from .loss_policy import LossPolicy
from .patching import FusedCausalLMOutput, apply_fused_loss, fused_loss_of
from .telemetry import TokenTelemetryCallback
from .token_evaluation import TokenEvaluation, evaluate_tokens, load_text_rows, write_token_evaluation
from .trainer import CalibrationTrainer, compute_loss_func, silence_console

__all__ = [
    "DEFAULT_TEMPLATE",
    "PreferencePair",
    "CalibrationConfig",
    "CalibrationTrainer",
    "EvaluationResult",
    "TokenEvaluation",
    "TokenTelemetryCallback",
    "FusedCausalLMOutput",
    "LossPolicy",
    "MCQCollator",
    "MCQDataError",
    "MCQExample",
    "apply_fused_loss",
    "build_sft_dataset",
    "calibration_metrics",
    "compute_loss_func",
    "detect_option_ids",
    "encode_example",
    "evaluate",
    "evaluate_tokens",
    "fit_temperature",
    "check_template",
    "format_prompt",
    "fused_loss_of",
    "load_mcq",
    "load_text_rows",
    "preference_dataset",
    "resolve_pad_token_id",
    "silence_console",
    "temperature_scaling",
    "train_dpo",
    "train_label_smoothing",
    "write_evaluation",
    "write_token_evaluation",
]
