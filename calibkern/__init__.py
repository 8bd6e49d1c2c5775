"""calibkern: fused calibration-aware fine-tuning kernels for aligned LLMs (CFT / RCFT).

The public API; every name is re-exported from the module that defines it.
"""

from .backends import (
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    backend_report,
    get_backend,
    is_deterministic,
    set_backend,
    set_deterministic,
)
from .em import EMState, em_regularizer
from .metrics import (
    BinStats,
    CalibrationMeter,
    ConfidenceInterval,
    Reliability,
    adaptive_ece,
    binned_stats,
    brier,
    classwise_ece,
    ece,
    ece_confidence_interval,
    nll,
)
from .losses import CalibrationLossOutput, FusedLinearCalibrationLoss, fused_linear_calibration_loss
from .ops.calibration_loss import calibration_loss
from .ops.row_metrics import Top1Rows, top1_rows
from .smooth import SmoothReliability, smooth_ece, smooth_reliability

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "BinStats",
    "CalibrationLossOutput",
    "CalibrationMeter",
    "ConfidenceInterval",
    "EMState",
    "FusedLinearCalibrationLoss",
    "Reliability",
    "SmoothReliability",
    "Top1Rows",
    "adaptive_ece",
    "available_backends",
    "backend_report",
    "binned_stats",
    "brier",
    "calibration_loss",
    "classwise_ece",
    "ece",
    "ece_confidence_interval",
    "em_regularizer",
    "fused_linear_calibration_loss",
    "get_backend",
    "is_deterministic",
    "nll",
    "set_backend",
    "set_deterministic",
    "smooth_ece",
    "smooth_reliability",
    "top1_rows",
]
