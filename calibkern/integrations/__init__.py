"""Reading other tools' outputs into calibkern's metrics: :mod:`calibkern.integrations.lm_eval` turns an
lm-evaluation-harness run into a calibration report (docs/lm_eval.md)."""
