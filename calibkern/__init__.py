"""calibkern: fused calibration-aware fine-tuning kernels for aligned LLMs (CFT / RCFT).

The public API; every name is re-exported from the module that defines it, imported when first used
(calibkern._lazy), so ``import calibkern`` itself loads no torch.
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

EXPORTS = {
    "BackendStatus": ".backends", "BackendUnavailableError": ".backends", "available_backends": ".backends",
    "backend_report": ".backends", "get_backend": ".backends", "is_deterministic": ".backends",
    "set_backend": ".backends", "set_deterministic": ".backends",
    "TemperatureScaling": ".calibrators",
    "EMState": ".em", "em_regularizer": ".em",
    "BinStats": ".metrics", "CalibrationMeter": ".metrics", "ConfidenceInterval": ".metrics",
    "Reliability": ".metrics", "adaptive_ece": ".metrics", "binned_stats": ".metrics", "brier": ".metrics",
    "classwise_ece": ".metrics", "ece": ".metrics", "ece_confidence_interval": ".metrics", "nll": ".metrics",
    "CalibrationLossOutput": ".losses", "FusedLinearCalibrationLoss": ".losses",
    "fused_linear_calibration_loss": ".losses",
    "FusedLinearCrossEntropyLoss": ".nn", "fused_linear_cross_entropy": ".nn",
    "calibration_loss": ".ops.calibration_loss",
    "Top1Rows": ".ops.row_metrics", "top1_rows": ".ops.row_metrics",
    "SmoothReliability": ".smooth", "smooth_ece": ".smooth", "smooth_ece_from_confidences": ".smooth",
    "smooth_reliability": ".smooth",
}
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)


__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "BinStats",
    "CalibrationLossOutput",
    "CalibrationMeter",
    "ConfidenceInterval",
    "EMState",
    "FusedLinearCalibrationLoss",
    "FusedLinearCrossEntropyLoss",
    "Reliability",
    "SmoothReliability",
    "TemperatureScaling",
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
    "fused_linear_cross_entropy",
    "get_backend",
    "is_deterministic",
    "nll",
    "set_backend",
    "set_deterministic",
    "smooth_ece",
    "smooth_ece_from_confidences",
    "smooth_reliability",
    "top1_rows",
]
