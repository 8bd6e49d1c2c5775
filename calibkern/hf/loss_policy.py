"""LossPolicy: what every calibkern training-loss path computes (docs/hf.md#one-loss-policy).

:class:`calibkern.hf.CalibrationTrainer`, :func:`calibkern.hf.compute_loss_func` and the patched forward of
:func:`calibkern.hf.apply_fused_loss` all take from one :class:`LossPolicy`:

* the calibration form: cft → ``hard_bin`` (per-bin accuracies ``A_k``), rcft → ``em`` (a
  :class:`calibkern.EMState`), token_cft → ``token_hard_bin``; ``official_compat`` adds the published code's
  hard-bin term on the option logits;
* the weights and their scaling, the Hugging Face convention:

      loss = sft_weight · CE + lam′ · L_cal,   lam′ = lam / (G · P) with num_items_in_batch in training,
                                               lam / P with it in evaluation, lam without it,

  with ``G`` the gradient-accumulation steps and ``P`` the processes the Trainer multiplies the loss by
  (``average_tokens_across_devices``): CE = Σ / num_items_in_batch is the global token mean and the calibration
  term the mean of the micro-batches' means. token_cft's term ``Σ_t (c_t − A_b)² / n`` shares CE's denominator,
  so it is scaled as CE is: ``lam′ = lam``;
* when the streaming EM M-step runs (rcft, ``em={"refresh": "stream"}``): every training call adds its answers to
  the E-step; the M-step (all-reduced over :attr:`em_group`) runs after every ``G`` training calls, or at each
  optimizer step when the caller says so (:meth:`end_optimizer_step`, CalibrationTrainer). Under tensor
  parallelism every rank of a vocabulary split holds the same answers: with ``em_group`` None (the whole world)
  each rank's statistics are divided by the split's size (from the lm_head ``DTensor``'s mesh, recorded by the
  E-step), so every answer counts once; ``em_group`` = the data-parallel group reduces over it instead;
* the telemetry: every training call's statistics go into :attr:`window`
  (:class:`calibkern.hf.telemetry.LossWindow`);
* ``label_smoothing = ε`` (``TrainingArguments.label_smoothing_factor``, CalibrationTrainer): the cross-entropy per
  supervised token becomes ``lse − (1 − ε) z_y − (ε/V) Σ_j z_j``, inside the fused kernel — what
  Transformers' ``LabelSmoother`` computes, both parts over the same denominator (the supervised tokens or
  ``num_items_in_batch``); the token statistics and token_cft's term read the softmax back from the smoothed
  gradient, so every method and telemetry combines with it (docs/hf.md#label-smoothing).
"""

from __future__ import annotations

import torch

from ..losses import option_labels as option_labels_of
from .config import CalibrationConfig
from .telemetry import LossWindow

__all__ = ["CALIBRATION_FORM", "IGNORE_INDEX", "LossPolicy", "answer_option_labels"]

IGNORE_INDEX = -100
CALIBRATION_FORM = {"cft": "hard_bin", "rcft": "em", "token_cft": "token_hard_bin"}


def answer_option_labels(
    labels: torch.Tensor, option_ids: torch.Tensor, answer_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B·(T-1)]`` option label per *predicting* position (position t predicts ``labels[t+1]``):
    :func:`calibkern.losses.option_labels` of the shifted labels, with ``answer_mask[:, 1:]`` when given."""
    answers = None if answer_mask is None else answer_mask[:, 1:].bool()
    return option_labels_of(labels[:, 1:], option_ids, answers, IGNORE_INDEX).reshape(-1)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_label_smoothing(epsilon) -> float:
    """ε in [0, 1)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label_smoothing (TrainingArguments.label_smoothing_factor) must lie in [0, 1), "
                         f"got {epsilon!r}")
    return float(epsilon)


class LossPolicy:
    """The policy of one training run (module docstring). ``calibration``: a :class:`CalibrationConfig` or None
    (plain cross-entropy). State: ``bin_accuracy`` / ``bin_counts`` (cft, token_cft; start as
    ``calibration.bin_accuracy``), ``em_state`` (rcft: the one given or a new one from ``calibration.em``).
    Settings a trainer may change between calls: ``gradient_accumulation_steps`` (``G``), ``world_size`` (``P``;
    None: the ``torch.distributed`` world) and ``stream_mstep`` (False: the M-step waits for
    :meth:`end_optimizer_step`), ``em_group`` (the process group of the streaming M-step's all-reduce; None: the
    world, each answer counted once across a vocabulary split). ``label_smoothing``: ε of the cross-entropy
    (module docstring)."""

    def __init__(self, calibration: CalibrationConfig | None, *, em_state=None, gradient_accumulation_steps: int = 1,
                 label_smoothing: float = 0.0):
        if calibration is not None and not isinstance(calibration, CalibrationConfig):
            raise TypeError(f"calibration must be a CalibrationConfig or None, got {type(calibration).__name__}")
        if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
                or gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be a positive int, got {gradient_accumulation_steps!r}")
        method = None if calibration is None else calibration.method
        if em_state is not None and method != "rcft":
            raise ValueError("em_state applies to a CalibrationConfig with method='rcft' only")
        self.calibration = calibration
        self.option_ids = None if calibration is None or calibration.option_ids is None \
            else torch.tensor(calibration.option_ids)
        self.bin_accuracy = None
        if calibration is not None and calibration.bin_accuracy is not None:
            self.bin_accuracy = torch.as_tensor(calibration.bin_accuracy, dtype=torch.float32)
        self.bin_counts = None
        self.em_state = em_state if em_state is not None or method != "rcft" else calibration.new_em_state()
        self.token_stats = True if calibration is None else calibration.token_stats
        self.full_stats = False if calibration is None else calibration.full_stats
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.world_size: int | None = None
        self.stream_mstep = True
        self.em_group = None
        self.vocabulary_replicas = 1  # the E-step's lm_head split: the ranks holding each answer (em_group None)
        self.window = LossWindow(answers=self.option_ids is not None)
        self._micro_batches = 0  # streaming training calls since the last M-step

    @property
    def form(self) -> str | None:
        """The ``calibration`` form of :func:`calibkern.fused_linear_calibration_loss` (None: plain CE, or the
        CE part of ``official_compat``, whose term :meth:`official_term` computes)."""
        calibration = self.calibration
        return None if calibration is None or calibration.official_compat else CALIBRATION_FORM[calibration.method]

    @property
    def streaming(self) -> bool:
        return self.em_state is not None and self.calibration.refresh == "stream"

    @property
    def needs_bin_accuracy(self) -> bool:
        """cft / token_cft (official_compat included) before the per-bin accuracies are known."""
        return self.calibration is not None and self.calibration.method in ("cft", "token_cft") \
            and self.bin_accuracy is None

    def processes(self) -> int:
        return _world_size() if self.world_size is None else self.world_size

    def loss_weights(self, training: bool, num_items_in_batch) -> tuple[float, float]:
        """``(sft_weight, lam′)`` (module docstring)."""
        if self.calibration is None:
            return 1.0, 0.0
        sft_weight, lam = self.calibration.loss_weights
        if num_items_in_batch is None:
            return sft_weight, lam
        if self.calibration.method == "token_cft":  # Σ_t / num_items_in_batch, scaled as CE is
            return sft_weight, lam
        steps = self.gradient_accumulation_steps if training else 1
        return sft_weight, lam / (steps * self.processes())

    def fused_arguments(self, device: torch.device, training: bool, num_items_in_batch, answer_mask) -> dict:
        """Keyword arguments of :func:`calibkern.fused_linear_calibration_loss` for one call (all but the hidden
        states, weight, labels, bias and soft cap)."""
        calibration, form = self.calibration, self.form
        if form in ("hard_bin", "token_hard_bin") and self.bin_accuracy is None:
            raise ValueError(f"method={calibration.method!r} needs the per-bin accuracies: set "
                             "CalibrationConfig.bin_accuracy (or use CalibrationTrainer, which estimates them before "
                             "the first step)")
        sft_weight, lam = self.loss_weights(training, num_items_in_batch)
        plain = calibration is None
        return dict(
            option_ids=None if self.option_ids is None else self.option_ids.to(device),
            calibration=form,
            bin_accuracy=self.bin_accuracy.to(device) if form in ("hard_bin", "token_hard_bin") else None,
            em_state=self.em_state if form == "em" else None, lam=lam, sft_weight=sft_weight,
            n_bins=10 if plain else calibration.n_bins, shift=True,
            answer_mask=None if self.option_ids is None else answer_mask,  # no options, no answers
            num_items_in_batch=num_items_in_batch, chunk_size=None if plain else calibration.chunk_size,
            backend=None if plain else calibration.backend, token_stats=self.token_stats, full_stats=self.full_stats,
            label_smoothing=self.label_smoothing)

    @property
    def needs_option_logits(self) -> bool:
        """Whether a training call also needs the option logits: the official_compat term, the streaming E-step."""
        return self.calibration is not None and (self.calibration.official_compat or self.streaming)

    def official_term(self, option_logits: torch.Tensor, option_labels: torch.Tensor) -> torch.Tensor:
        """official_compat's hard-bin term (per-bin sums over ``N⁰_k``, top bin excluded), torch backend."""
        import calibkern

        return calibkern.calibration_loss(option_logits, option_labels, self.bin_accuracy.to(option_logits.device),
                                          n_bins=self.calibration.n_bins, bin_counts=self.bin_counts.double(),
                                          official_compat=True, backend="torch")

    @torch.no_grad()
    def stream_estep(self, option_logits: torch.Tensor, option_labels: torch.Tensor) -> None:
        """A training call's E-step (streaming rcft); the M-step after every ``G`` calls when ``stream_mstep``."""
        self.em_state.estep(option_logits.detach(), option_labels)
        self._micro_batches += 1
        if self.stream_mstep and self._micro_batches >= self.gradient_accumulation_steps:
            self.end_optimizer_step()

    def end_optimizer_step(self) -> None:
        """The streaming M-step (all-reduced over ``em_group``, class docstring), once per optimizer step; no-op
        otherwise."""
        if self.streaming:
            if self.em_group is None and self.vocabulary_replicas > 1:  # the world sum then counts each answer once
                self.em_state.accum /= self.vocabulary_replicas
            self.em_state.mstep(self.em_group)
            self._micro_batches = 0
