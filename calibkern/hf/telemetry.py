"""Training telemetry of the fused loss: device-side sums over the training calls since the last log.

Every training call of a model patched by :func:`calibkern.hf.apply_fused_loss` (and so every step of
:class:`calibkern.hf.CalibrationTrainer`) adds its statistics to the :class:`LossWindow` of its loss policy —
tensor additions on the device, no host sync. At a logging step the window is summed over the processes and read
once (docs/hf.md#token-telemetry):

* ``calib_ece``, ``calib_accuracy``, ``calib_mean_confidence``: the answers' binned statistics (with ``option_ids``);
* ``calib_term``: the mean calibration term over the calls, averaged over the processes;
* ``token_ece``, ``token_accuracy``, ``token_confidence``: the supervised tokens (docs/math.md#token-level-calibration);
* ``full_ece``: the Full-ECE of the supervised tokens (``CalibrationConfig(full_stats=True)``);
* ``aux_loss``: a mixture-of-experts model's mean router load-balancing loss (unweighted), averaged over the
  processes, when its router logits are on.

:class:`TokenTelemetryCallback` adds these entries to the logs of a plain ``transformers.Trainer`` or TRL
``SFTTrainer`` training a patched model.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..metrics import BinStats
from .modeling import FUSED_LOSS_ATTRIBUTE, causal_lm_of

__all__ = ["LossWindow", "TokenTelemetryCallback"]


def _processes() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _add(total: BinStats | None, new: BinStats | None) -> BinStats | None:
    return new if total is None else total if new is None else total + new


class LossWindow:
    """Sums of the fused loss's statistics over the training calls since the last :meth:`read` (module docstring)."""

    def __init__(self, answers: bool = True):
        self.answers = answers  # whether the answers' calib_* are meaningful (cft / rcft: option_ids)
        self.reset()

    def reset(self) -> None:
        self.bin_stats = self.token_stats = self.full_stats = self.cal_sum = self.aux_sum = None
        self.calls = self.aux_calls = 0

    def add(self, bin_stats: BinStats | None, cal_loss: torch.Tensor | None, token_stats: BinStats | None,
            full_stats: BinStats | None) -> None:
        """Add one training call's statistics (device tensors, no sync)."""
        self.bin_stats = _add(self.bin_stats, bin_stats)
        self.token_stats = _add(self.token_stats, token_stats)
        self.full_stats = _add(self.full_stats, full_stats)
        if cal_loss is not None:
            cal_loss = cal_loss.detach().float()
            self.cal_sum = cal_loss if self.cal_sum is None else self.cal_sum + cal_loss
        self.calls += 1

    def add_aux(self, aux_loss: torch.Tensor) -> None:
        """Add one training call's router auxiliary loss (unweighted; a device tensor, no sync)."""
        aux_loss = aux_loss.detach().float()
        self.aux_sum = aux_loss if self.aux_sum is None else self.aux_sum + aux_loss.to(self.aux_sum.device)
        self.aux_calls += 1

    def read(self) -> dict[str, float]:
        """The window's log entries, summed over the processes (every rank must call it together, as the
        Trainer logs on every rank), then an empty window. Empty when no training call ran since the last read."""
        import torch.distributed as dist

        logs: dict[str, float] = {}
        if self.calls == 0 and self.aux_calls == 0:
            return logs
        processes = _processes()
        for stats in (self.bin_stats, self.token_stats, self.full_stats):
            if stats is not None and processes > 1:
                stats.all_reduce()
        if self.bin_stats is not None and self.answers:
            logs["calib_ece"] = float(self.bin_stats.ece())
            logs["calib_accuracy"] = float(self.bin_stats.accuracy())
            logs["calib_mean_confidence"] = float(self.bin_stats.mean_confidence())
        means = (("calib_term", self.cal_sum, self.calls), ("aux_loss", self.aux_sum, self.aux_calls))
        for name, total, calls in means:
            if total is not None:
                mean = total / calls
                if processes > 1:
                    dist.all_reduce(mean)
                    mean = mean / processes
                logs[name] = float(mean)
        if self.token_stats is not None:
            logs["token_ece"] = float(self.token_stats.ece())
            logs["token_accuracy"] = float(self.token_stats.accuracy())
            logs["token_confidence"] = float(self.token_stats.mean_confidence())
        if self.full_stats is not None:
            logs["full_ece"] = float(self.full_stats.ece())
        self.reset()
        return logs


class TokenTelemetryCallback(TrainerCallback):
    """Adds the fused loss's telemetry (``token_ece``, ``token_accuracy``, ``token_confidence``, ``full_ece``, for
    cft / rcft ``calib_*``, for a mixture-of-experts model ``aux_loss``) to each training log of a
    ``transformers.Trainer`` whose model is patched by :func:`calibkern.hf.apply_fused_loss`. The sums stay on the
    device between logs; they are read (one all-reduce under data parallelism) at logging steps only.

    The entries go into ``trainer.state.log_history`` and into the ``logs`` seen by the callbacks after this one; so
    that the ``report_to`` integrations see them too, put it first:
    ``trainer.callback_handler.callbacks.insert(0, TokenTelemetryCallback())``.
    """

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or model is None:
            return
        policy = getattr(causal_lm_of(model), FUSED_LOSS_ATTRIBUTE, None)
        if policy is None:
            raise ValueError("TokenTelemetryCallback needs a model patched by calibkern.hf.apply_fused_loss")
        entries = policy.window.read()
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)
