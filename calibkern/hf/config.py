"""CalibrationConfig: what the calibration-aware trainer optimises (docs/math.md, docs/hf.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..em import EMState

__all__ = ["CalibrationConfig", "OFFICIAL_ALPHA", "OFFICIAL_CAL_SCALE"]

# The published reference code's combination: (1 − α)·L_SFT + α·1e-3·L_cal, α = 0.5 (docs/math.md#cft-term).
OFFICIAL_ALPHA = 0.5
OFFICIAL_CAL_SCALE = 1e-3
EM_OPTIONS = {"refresh", "momentum", "prior", "fixed_components"}  # EMState's keyword arguments
METHODS = ("cft", "rcft", "token_cft")


@dataclass
class CalibrationConfig:
    """Options of :class:`calibkern.hf.CalibrationTrainer` and :func:`calibkern.hf.compute_loss_func`.

    * ``method="cft"``: loss ``sft_weight · L_SFT + lam · L_hard-bin`` (docs/math.md#cft-term) — feed
      completion-only
      labels (``L_SFT1``). The per-bin accuracies ``A_k`` (and counts ``N⁰_k``) come from one no-grad pass over
      the training set (or ``calibration_dataset``) with the starting model, unless ``bin_accuracy`` is given:
      ``A_k = (a_k + bin_prior · Ā) / (n_k + bin_prior)`` with ``Ā`` the overall accuracy of that pass — a bin
      the starting model leaves empty takes ``Ā`` (any ``bin_prior``, 0 included), and ``bin_prior > 0``
      shrinks sparsely filled bins towards it (their accuracy is a few rows' noise).
    * ``method="rcft"``: loss ``sft_weight · L_SFT + lam · L_EM`` (docs/math.md#em-regulariser) — feed
      full-sequence labels (``L_SFT2``). ``em`` holds the :class:`calibkern.EMState` options
      (``refresh="epoch"|"stream"``, ``momentum``, ``prior``, ``fixed_components``); ``n_components = n_bins``.
      With ``refresh="epoch"`` the E-step runs as a no-grad pass at the start of every epoch over the training set,
      or over ``calibration_dataset`` when given (prefer a held-out split once the model can memorise the training
      set: there the training accuracy → 1 and the targets follow it). With ``refresh="stream"`` each training
      batch's statistics update the state after every optimizer step (no extra passes). ``refresh_steps``
      (``refresh="epoch"`` only): also rerun the E-step pass and the M-step after every ``refresh_steps`` optimizer
      steps, so the statistics follow a model whose confidence moves within an epoch (each refresh costs one no-grad
      pass over the statistics rows).
    * ``method="token_cft"``: loss ``sft_weight · CE + lam · Σ_t (c_t − A_{b(c_t)})² / n`` over every
      supervised token (``calibration="token_hard_bin"``, docs/math.md#token-level-calibration) — any SFT text,
      no options (``option_ids`` may be None). ``A_k`` are the starting model's per-bin token accuracies from
      the same kind of no-grad pass as cft's, over the supervised tokens (an empty bin takes the overall
      accuracy; ``bin_prior`` as for cft), unless ``bin_accuracy`` is given.
    * ``token_stats`` (default on): log ``token_ece``, ``token_accuracy`` and ``token_confidence`` of the
      supervised tokens of the training batches at each logging step; ``full_stats``: also ``full_ece``.
    * ``official_compat=True`` (cft only): the published reference code's loss,
      ``(1 − α)·L_SFT + α·1e-3·L_cal`` with α = 0.5, the hard-bin term in its ``official_compat`` form
      (per-bin sums over ``N⁰_k``, top bin excluded, gradients through the targets), on the torch backend;
      ``lam`` and ``sft_weight`` are then ignored.
    * ``option_ids``: the option letters' token ids (:func:`calibkern.hf.data.detect_option_ids`).
    * ``chunk_size`` / ``backend``: passed to :func:`calibkern.fused_linear_calibration_loss`.
    * ``check_logits`` (default on): the equivalence check — before the statistics passes and the first step,
      calibkern's loss and logits on a slice of one training row are compared with the model's own forward
      (loss with auxiliary losses, logits shape and values); a model calibkern cannot reproduce is refused there,
      naming the first difference (:func:`calibkern.hf.modeling.check_logit_parity`, docs/hf.md#the-equivalence-check).
    * ``refresh_batch_size``: batch size of the no-grad passes (default: the per-device eval batch size).
    """

    method: str
    option_ids: Sequence[int] | None = None
    n_bins: int = 10
    lam: float = 1.0
    sft_weight: float = 1.0
    bin_accuracy: Sequence[float] | Any | None = None
    em: dict = field(default_factory=dict)
    official_compat: bool = False
    calibration_dataset: Any = None
    chunk_size: int | None = None
    backend: str | None = None
    refresh_batch_size: int | None = None
    refresh_steps: int | None = None
    bin_prior: float = 0.0
    check_logits: bool = True
    token_stats: bool = True
    full_stats: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")
        if self.option_ids is None and self.method != "token_cft":
            raise ValueError(f"option_ids is required with method={self.method!r} (only 'token_cft' needs none)")
        if self.option_ids is not None:
            self.option_ids = [int(i) for i in self.option_ids]
            if len(self.option_ids) < 2:
                raise ValueError(f"option_ids needs at least 2 ids, got {self.option_ids}")
            if len(set(self.option_ids)) != len(self.option_ids):
                raise ValueError(f"option_ids must be distinct, got {self.option_ids}")
        for flag in ("token_stats", "full_stats"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if not isinstance(self.n_bins, int) or self.n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {self.n_bins!r}")
        if self.lam < 0 or self.sft_weight < 0:
            raise ValueError(f"lam and sft_weight must be ≥ 0, got lam={self.lam}, sft_weight={self.sft_weight}")
        if self.official_compat and self.method != "cft":
            raise ValueError("official_compat applies to method='cft' only")
        if self.official_compat and self.bin_accuracy is not None:
            raise ValueError(
                "official_compat estimates bin_accuracy and the counts N⁰_k itself; leave bin_accuracy None"
            )
        if self.method == "rcft" and self.bin_accuracy is not None:
            raise ValueError("bin_accuracy applies to method 'cft' or 'token_cft' only")
        if self.bin_accuracy is not None and len(self.bin_accuracy) != self.n_bins:
            raise ValueError(f"bin_accuracy must have n_bins={self.n_bins} values, got {len(self.bin_accuracy)}")
        if self.method != "rcft" and self.em:
            raise ValueError("em options apply to method='rcft' only")
        if self.method == "rcft":
            self.new_em_state()  # the EMState's own checks of every em option, now rather than at training
        if self.em.get("refresh") == "stream" and self.calibration_dataset is not None:
            raise ValueError("calibration_dataset needs em refresh='epoch' (streaming uses the training batches)")

        if not self.bin_prior >= 0:
            raise ValueError(f"bin_prior must be ≥ 0, got {self.bin_prior!r}")
        if self.refresh_steps is not None:
            steps = self.refresh_steps
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"refresh_steps must be a positive int or None, got {self.refresh_steps!r}")
            if self.method != "rcft" or self.em.get("refresh", "epoch") != "epoch":
                raise ValueError("refresh_steps applies to method='rcft' with em refresh='epoch'")

    def new_em_state(self) -> EMState:
        """A fresh :class:`calibkern.EMState` with ``n_bins`` components and the ``em`` options."""
        unknown = sorted(set(self.em) - EM_OPTIONS)
        if unknown:
            raise ValueError(f"em has unknown option(s) {', '.join(map(repr, unknown))}; the options are "
                             f"{', '.join(sorted(EM_OPTIONS))}")
        return EMState(n_components=self.n_bins, **self.em)

    @property
    def refresh(self) -> str:
        """The EM refresh mode (rcft): ``"epoch"`` (default) or ``"stream"``."""
        return self.em.get("refresh", "epoch")

    @property
    def loss_weights(self) -> tuple[float, float]:
        """``(sft_weight, lam)`` as applied: the official combination when ``official_compat``."""
        if self.official_compat:
            return 1.0 - OFFICIAL_ALPHA, OFFICIAL_ALPHA * OFFICIAL_CAL_SCALE
        return self.sft_weight, self.lam
