"""CalibrationTrainer: CFT / RCFT as a ``transformers.Trainer`` with one decoder pass per step (docs/hf.md).

Each training step runs the decoder once (:func:`calibkern.hf.modeling.decoder_forward`) and hands the final
hidden states and the lm_head weight to :func:`calibkern.fused_linear_calibration_loss`, which computes

    loss = sft_weight · CE + lam · calibration term

without the ``[tokens, V]`` logits; the lm_head module is never called on the sequence.

Answer positions: the ``answer_mask`` column when the batch has one (``True`` at the answer token in ``labels``,
as :func:`calibkern.hf.data.encode_example` writes it), otherwise the supervised positions whose target is one of
``option_ids``.

Gradient accumulation: Transformers passes ``num_items_in_batch`` (supervised tokens over all micro-batches of
the optimizer step, all ranks when ``average_tokens_across_devices``); CE is summed and divided by it, and the
calibration term — a mean over the micro-batch's answers — is divided by the number of micro-batches. Both are
then exact for micro-batches with the same number of answers (one per row: equal batch sizes). Under data
parallelism the count covers all ranks, so it is divided by the number of processes before the loss, to cancel
DDP's gradient averaging for CE while the calibration term stays a mean.

Statistics: per-bin accuracies (cft) and the EM state (rcft) come from no-grad passes outside the training steps
(before the first step; at each epoch start), over this rank's share of the rows, all-reduced
(``BinStats.all_reduce``, ``EMState.mstep``). Logged at each logging step, through ``Trainer.log`` (so every
``report_to`` target sees them), from device-side sums over the steps since the last log — no host sync per
step: ``calib_ece``, ``calib_accuracy``, ``calib_mean_confidence`` (answers of the training batches, all ranks;
with ``option_ids``) and ``calib_term`` (the mean calibration term); for every method ``token_ece``,
``token_accuracy``, ``token_confidence`` of the supervised tokens (``token_stats``, on by default) and
``full_ece`` (``full_stats``), read inside the fused loss (docs/math.md#token-level-calibration).

token_cft: the token term ``Σ_t (c_t − A_b)² / n`` shares the cross-entropy's denominator
(``num_items_in_batch``), so it is not divided by the accumulation steps; ``A_k`` come from a no-grad pass of
the fused loss's token statistics over the statistics rows.

Checkpoints: ``calibkern_state.pt`` in each checkpoint directory holds the bin accuracies and counts, the EM
state and the index of the last epoch whose refresh ran; ``train(resume_from_checkpoint=...)`` loads it, so a
resumed run neither repeats nor skips a refresh and continues from the same statistics.

Mixing in with TRL: ``class CalibrationSFTTrainer(CalibrationTrainer, trl.SFTTrainer)`` — keyword arguments
pass through; the default data collator then stays SFTTrainer's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

import calibkern

from ..losses import option_labels as option_labels_of
from .config import CalibrationConfig
from .data import MCQCollator, resolve_pad_token_id
from .modeling import check_logit_parity, decoder_forward, eval_decoder_passes, option_logits_at

__all__ = ["CalibrationTrainer", "compute_loss_func", "answer_option_labels", "STATE_FILE"]

STATE_FILE = "calibkern_state.pt"
IGNORE_INDEX = -100


def answer_option_labels(
    labels: torch.Tensor, option_ids: torch.Tensor, answer_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B·(T-1)]`` option label per *predicting* position (position t predicts ``labels[t+1]``):
    :func:`calibkern.losses.option_labels` of the shifted labels, with ``answer_mask[:, 1:]`` when given."""
    answers = None if answer_mask is None else answer_mask[:, 1:].bool()
    return option_labels_of(labels[:, 1:], option_ids, answers, IGNORE_INDEX).reshape(-1)


class _CalibrationCallback(TrainerCallback):
    """Runs the trainer's statistics passes at train begin / epoch begin and the streaming M-step."""

    def __init__(self, trainer: "CalibrationTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._check_logit_parity()
        self.trainer._prepare_statistics()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._refresh_em(epoch=math.floor((state.epoch or 0.0) + 1e-6), step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.em_state is None:
            return
        if trainer.calibration.refresh == "stream":
            trainer.em_state.mstep()
        every = trainer.calibration.refresh_steps
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            trainer._refresh_em_pass(step=state.global_step)


class CalibrationTrainer(Trainer):
    """``transformers.Trainer`` for CFT / RCFT (module docstring); ``calibration`` is a :class:`CalibrationConfig`.

    ``CalibrationTrainer(model, args, train_dataset, *, calibration, **trainer_kwargs)``; the features are
    ``input_ids``, ``attention_mask``, ``labels`` (``-100`` = unsupervised) and optionally ``answer_mask``. Without a
    ``data_collator`` the rows are right-padded by :class:`calibkern.hf.data.MCQCollator`.
    """

    def __init__(self, model=None, args=None, train_dataset=None, *, calibration: CalibrationConfig, **kwargs):
        if not isinstance(calibration, CalibrationConfig):
            raise TypeError(f"calibration must be a CalibrationConfig, got {type(calibration).__name__}")
        next_class = type(self).__mro__[type(self).__mro__.index(CalibrationTrainer) + 1]
        if kwargs.get("data_collator") is None and next_class is Trainer:
            kwargs["data_collator"] = MCQCollator(resolve_pad_token_id(model, kwargs.get("processing_class")))
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError(f"TrainingArguments(label_smoothing_factor={self.args.label_smoothing_factor}) is not "
                             "applied by CalibrationTrainer, whose fused loss computes the cross-entropy itself; set "
                             "it to 0 (calibkern.pipeline.stages.label_smoothing is the label-smoothing baseline)")
        self.calibration = calibration
        device = self.args.device
        self.option_ids = (None if calibration.option_ids is None
                           else torch.tensor(calibration.option_ids, dtype=torch.long, device=device))
        self.bin_accuracy = None
        self.bin_counts = None
        if calibration.bin_accuracy is not None:
            self.bin_accuracy = torch.as_tensor(calibration.bin_accuracy, dtype=torch.float32, device=device)
        self.em_state = None
        if calibration.method == "rcft":
            self.em_state = calibration.new_em_state()
        self.em_refreshed_epoch = -1
        self.em_refreshed_step = -1
        # num_items_in_batch is what makes CE exact under accumulation: ask for it whatever the model accepts,
        # counted over labels[..., 1:] since the loss shifts.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._reset_window()
        self.add_callback(_CalibrationCallback(self))

    # ------------------------------------------------------------------------------------------- the loss

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "answer_mask" not in self._signature_columns:
            self._signature_columns.append("answer_mask")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One decoder pass, then the fused loss on the final hidden states (module docstring)."""
        calibration = self.calibration
        sft_weight, lam = calibration.loss_weights
        if num_items_in_batch is not None:
            self.loss_is_scaled_for_ga = True
            if model.training and calibration.method != "token_cft":
                lam = lam / getattr(self, "current_gradient_accumulation_steps", 1)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                num_items_in_batch = num_items_in_batch / self.accelerator.num_processes
        else:
            self.loss_is_scaled_for_ga = False
        if calibration.method in ("cft", "token_cft") and self.bin_accuracy is None:
            self._prepare_statistics()
        labels = inputs["labels"]
        answer_mask = inputs.get("answer_mask") if self.option_ids is not None else None
        form = None if calibration.official_compat else _CALIBRATION_FORM[calibration.method]
        # The products with the lm_head weight run under the same autocast as the decoder, as nn.Linear would.
        with self.accelerator.autocast():
            hidden, weight, bias, softcap = decoder_forward(model, inputs)
            fused = calibkern.fused_linear_calibration_loss(
                hidden,
                weight,
                labels,
                option_ids=self.option_ids,
                bias=bias,
                calibration=form,
                bin_accuracy=self.bin_accuracy if form in ("hard_bin", "token_hard_bin") else None,
                em_state=self.em_state if form == "em" else None,
                lam=lam,
                sft_weight=sft_weight,
                n_bins=calibration.n_bins,
                shift=True,
                answer_mask=answer_mask,
                num_items_in_batch=num_items_in_batch,
                chunk_size=calibration.chunk_size,
                logit_softcap=softcap,
                backend=calibration.backend,
                token_stats=calibration.token_stats,
                full_stats=calibration.full_stats,
            )
        loss, cal_loss, stats = fused.loss, fused.cal_loss, fused.bin_stats
        if calibration.official_compat:
            option_logits, option_labels = self._answer_option_logits(hidden, weight, bias, softcap, labels,
                                                                      answer_mask)
            cal_loss = calibkern.calibration_loss(
                option_logits,
                option_labels,
                self.bin_accuracy,
                n_bins=calibration.n_bins,
                bin_counts=self.bin_counts.double(),
                official_compat=True,
                backend="torch",
            )
            loss = loss + lam * cal_loss
        if self.em_state is not None and calibration.refresh == "stream" and model.training:
            with torch.no_grad():
                self.em_state.estep(*self._answer_option_logits(hidden, weight, bias, softcap, labels, answer_mask))
        if model.training and torch.is_grad_enabled():
            self._record(stats, cal_loss, fused.token_stats, fused.full_stats)
        if return_outputs:
            return loss, {"sft_loss": fused.sft_loss.detach(), "cal_loss": cal_loss.detach()}
        return loss

    def _answer_option_logits(self, hidden, weight, bias, softcap, labels, answer_mask):
        """``(option_logits [B·(T-1), K], option_labels)`` at every predicting position, non-answers ignored
        (``-100``): a ``[tokens, K]`` product, cheap next to the decoder, with static shapes."""
        option_labels = answer_option_labels(labels, self.option_ids, answer_mask)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return option_logits_at(hidden, weight, bias, self.option_ids, softcap), option_labels

    # ------------------------------------------------------------------------------------------- logging

    def _reset_window(self):
        self._window_stats = None
        self._window_cal = None
        self._window_batches = 0
        self._window_token = {"token": None, "full": None}

    def _record(self, stats, cal_loss, token_stats=None, full_stats=None):
        """Add a micro-batch's statistics to the logging window (device tensors, no sync)."""
        self._window_stats = stats if self._window_stats is None else self._window_stats + stats
        for name, new in (("token", token_stats), ("full", full_stats)):
            if new is not None:
                old = self._window_token[name]
                self._window_token[name] = new if old is None else old + new
        cal_loss = cal_loss.detach().float()
        self._window_cal = cal_loss if self._window_cal is None else self._window_cal + cal_loss
        self._window_batches += 1

    def log(self, logs: dict, *args, **kwargs):
        """Adds the window's ``calib_*`` values to the training logs (all ranks reduce together)."""
        if "loss" in logs and self._window_stats is not None:
            stats = self._window_stats
            if self.accelerator.num_processes > 1:
                stats.all_reduce()
            cal = self.accelerator.reduce(self._window_cal / self._window_batches, reduction="mean")
            if self.option_ids is not None:
                logs["calib_ece"] = float(stats.ece())
                logs["calib_accuracy"] = float(stats.accuracy())
                logs["calib_mean_confidence"] = float(stats.mean_confidence())
            logs["calib_term"] = float(cal)
            token, full = self._window_token["token"], self._window_token["full"]
            for window in (token, full):
                if window is not None and self.accelerator.num_processes > 1:
                    window.all_reduce()
            if token is not None:
                logs["token_ece"] = float(token.ece())
                logs["token_accuracy"] = float(token.accuracy())
                logs["token_confidence"] = float(token.mean_confidence())
            if full is not None:
                logs["full_ece"] = float(full.ece())
            self._reset_window()
        return super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------------------------- statistics

    def _statistics_dataset(self):
        dataset = self.calibration.calibration_dataset
        dataset = self.train_dataset if dataset is None else dataset
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="statistics")
        except ImportError:
            pass
        first = dataset[0] if len(dataset) else {}
        if not (isinstance(first, dict) and "input_ids" in first and "labels" in first):
            raise TypeError(
                "the statistics rows (train_dataset or calibration_dataset) must be tokenised features with "
                "input_ids and labels, e.g. from calibkern.hf.build_sft_dataset"
            )
        return dataset

    def _statistics_batches(self):
        """This rank's share of the statistics rows as collated batches, in order, batched by hand (no
        DataLoader), so no RNG is consumed."""
        dataset = self._statistics_dataset()
        batch_size = self.calibration.refresh_batch_size or self.args.per_device_eval_batch_size
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        indices = list(range(rank, len(dataset), world))
        return (self._prepare_inputs(self.data_collator([dataset[i] for i in indices[start : start + batch_size]]))
                for start in range(0, len(indices), batch_size))

    @torch.no_grad()
    def _answer_logits(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(option_logits, option_labels)`` per batch over this rank's share of the statistics rows, with the
        model in eval mode."""
        for batch, output in eval_decoder_passes(self.model, self._statistics_batches(),
                                                 autocast=self.accelerator.autocast):
            yield self._answer_option_logits(*output, batch["labels"], batch.get("answer_mask"))

    def _check_logit_parity(self):
        """Before the first step: the fused path gives the model's own logits on one training row, or the run
        stops with an error naming the model (calibkern.hf.modeling.check_logit_parity)."""
        dataset = self.train_dataset
        if not self.calibration.check_logits or dataset is None or not hasattr(dataset, "__getitem__") \
                or len(dataset) == 0:
            return
        check_logit_parity(self.model, self._prepare_inputs(self.data_collator([dataset[0]])))

    @torch.no_grad()
    def _token_statistics(self) -> calibkern.BinStats:
        """token_cft: the starting model's token statistics over the supervised tokens of this rank's share of
        the statistics rows (the fused loss without gradient, no option term)."""
        stats = calibkern.BinStats.empty(self.calibration.n_bins, device=self.args.device)
        for batch, (hidden, weight, bias, softcap) in eval_decoder_passes(self.model, self._statistics_batches(),
                                                                          autocast=self.accelerator.autocast):
            stats = stats + calibkern.fused_linear_calibration_loss(
                hidden, weight, batch["labels"], option_ids=None, bias=bias, calibration=None,
                n_bins=self.calibration.n_bins, chunk_size=self.calibration.chunk_size, logit_softcap=softcap,
                backend=self.calibration.backend, token_stats=True).token_stats
        return stats

    def _prepare_statistics(self):
        """cft / token_cft: per-bin accuracies ``A_k`` and counts ``N⁰_k`` of the starting model (once, unless
        given): of the answers (cft) or of every supervised token (token_cft)."""
        if self.calibration.method not in ("cft", "token_cft") or self.bin_accuracy is not None:
            return
        if self.calibration.method == "token_cft":
            stats = self._token_statistics()
        else:
            stats = calibkern.BinStats.empty(self.calibration.n_bins, device=self.args.device)
            for option_logits, option_labels in self._answer_logits():
                stats = stats + calibkern.binned_stats(option_logits, option_labels, self.calibration.n_bins)
        if self.accelerator.num_processes > 1:
            stats.all_reduce()
        if int(stats.counts.sum()) == 0:
            raise ValueError(_NO_TOKENS if self.calibration.method == "token_cft" else _NO_ANSWERS)
        if self.calibration.official_compat:  # the published code: an empty bin's accuracy is 0/0 → 0
            accuracy = stats.sum_correct / stats.counts.clamp_min(1).double()
        else:
            accuracy = stats.bin_accuracy(prior=self.calibration.bin_prior)
        self.bin_accuracy = accuracy.to(torch.float32)
        self.bin_counts = stats.counts

    def _refresh_em(self, epoch: int, step: int = 0):
        """rcft, refresh="epoch": one E-step pass and an M-step at the start of each epoch, once per epoch
        (skipped when a ``refresh_steps`` refresh already ran at this step: the model has not changed)."""
        if self.em_state is None or self.calibration.refresh != "epoch" or epoch <= self.em_refreshed_epoch:
            return
        if self.em_refreshed_step != step:
            self._refresh_em_pass(step)
        self.em_refreshed_epoch = epoch

    def _refresh_em_pass(self, step: int):
        """One no-grad E-step pass over the statistics rows, then the M-step (rcft, refresh="epoch")."""
        for option_logits, option_labels in self._answer_logits():
            self.em_state.estep(option_logits, option_labels)
        self.em_state.mstep()
        if float(self.em_state.running[0].sum()) == 0.0:
            raise ValueError(_NO_ANSWERS)
        self.em_refreshed_step = step

    # ------------------------------------------------------------------------------------------- checkpoints

    def calibration_state(self) -> dict:
        """What a checkpoint needs to continue exactly: bin statistics, EM state, last refreshed epoch."""
        return {
            "bin_accuracy": self.bin_accuracy,
            "bin_counts": self.bin_counts,
            "em_state": None if self.em_state is None else self.em_state.state_dict(),
            "em_refreshed_epoch": self.em_refreshed_epoch,
            "em_refreshed_step": self.em_refreshed_step,
        }

    def load_calibration_state(self, state: dict):
        device = self.args.device
        self.bin_accuracy = None if state["bin_accuracy"] is None else state["bin_accuracy"].to(device)
        self.bin_counts = None if state["bin_counts"] is None else state["bin_counts"].to(device)
        if state["em_state"] is not None:
            if self.em_state is None:
                raise ValueError("the checkpoint holds an EM state but this trainer's method is not 'rcft'")
            self.em_state.load_state_dict(state["em_state"])
        self.em_refreshed_epoch = state["em_refreshed_epoch"]
        self.em_refreshed_step = state.get("em_refreshed_step", -1)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), folder)
            torch.save(self.calibration_state(), os.path.join(folder, STATE_FILE))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; on resume, also loads ``calibkern_state.pt`` from the checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir}")
        if not resume_from_checkpoint:
            self.em_refreshed_epoch = -1  # epochs and steps count from 0 again
            self.em_refreshed_step = -1
        else:
            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path}: checkpoint has no calibkern state (not written by CalibrationTrainer?)"
                )
            self.load_calibration_state(torch.load(path, map_location="cpu", weights_only=False))
        return super().train(resume_from_checkpoint, *args, **kwargs)


_CALIBRATION_FORM = {"cft": "hard_bin", "rcft": "em", "token_cft": "token_hard_bin"}
_NO_ANSWERS = (
    "no answer positions in the statistics rows: no supervised label is one of option_ids "
    "(check option_ids against the tokenizer, or pass answer_mask)"
)


_NO_TOKENS = "no supervised tokens in the statistics rows (every label is -100)"


def silence_console(trainer: Trainer) -> Trainer:
    """Remove the callbacks that write to the console: the progress bars and, when ``disable_tqdm`` is set,
    the ``PrinterCallback`` that prints every log dict (the end-of-training summary included)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ----------------------------------------------------------------------------------------------- logits API


def compute_loss_func(
    calibration: CalibrationConfig,
    *,
    em_state=None,
    gradient_accumulation_steps: int = 1,
):
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for a plain ``Trainer`` that keeps logits.

    Computes the trainer's loss from ``outputs.logits [B, T, V]``: shifted CE over the supervised tokens (sum /
    ``num_items_in_batch`` when given, else mean) times ``sft_weight``, plus ``lam`` × the calibration term on
    the option logits at the answer positions (supervised targets that are option ids — a plain Trainer passes
    only ``labels``, so use completion-only labels or a template whose option tokens do not occur earlier).
    cft needs ``calibration.bin_accuracy``. rcft uses ``em_state`` (default: a new ``EMState`` from
    ``calibration.em``); with ``refresh="stream"`` each training call adds its E-step statistics and runs the
    M-step after computing the loss; with ``refresh="epoch"`` refreshing the state is the caller's job. Under
    gradient accumulation pass ``gradient_accumulation_steps`` so the calibration term is divided as in the
    trainer (in training only: an evaluation call, under ``no_grad``, is not divided) and the streaming M-step
    runs once per optimizer step (after every ``gradient_accumulation_steps`` training calls); under data
    parallelism with ``num_items_in_batch`` it is also divided by the number of processes, which the Trainer
    multiplies the loss by (``average_tokens_across_devices=True``, its default). ``official_compat`` is not
    supported here. The returned function has ``.em_state``.
    """
    if calibration.official_compat:
        raise ValueError("compute_loss_func does not support official_compat; use CalibrationTrainer")
    if calibration.method == "token_cft":
        raise ValueError("compute_loss_func does not support method='token_cft'; use CalibrationTrainer")
    if calibration.method == "cft" and calibration.bin_accuracy is None:
        raise ValueError("compute_loss_func with method='cft' needs calibration.bin_accuracy")
    if calibration.method == "rcft" and em_state is None:
        em_state = calibration.new_em_state()
    sft_weight, lam = calibration.loss_weights

    micro_batches = 0  # training calls since the last streaming M-step

    def loss_func(outputs, labels, num_items_in_batch=None):
        nonlocal micro_batches
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        training = torch.is_grad_enabled() and logits.requires_grad  # evaluation runs under no_grad
        shifted = logits[:, :-1].float()
        target = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        if num_items_in_batch is not None:
            ce = ce / num_items_in_batch
            # The Trainer multiplies this loss by the number of processes (average_tokens_across_devices).
            scale = lam / (gradient_accumulation_steps * _world_size()) if training else lam / _world_size()
        else:
            ce = ce / target.ne(IGNORE_INDEX).sum().clamp_min(1)
            scale = lam
        option_ids = torch.tensor(calibration.option_ids, dtype=torch.long, device=logits.device)
        option_labels = answer_option_labels(labels, option_ids)
        option_logits = shifted[..., option_ids].reshape(-1, len(option_ids))
        if calibration.method == "cft":
            bin_accuracy = torch.as_tensor(calibration.bin_accuracy, dtype=torch.float32, device=logits.device)
            cal = calibkern.calibration_loss(
                option_logits, option_labels, bin_accuracy, n_bins=calibration.n_bins, backend=calibration.backend
            )
        else:
            cal = calibkern.em_regularizer(option_logits, option_labels, em_state, backend=calibration.backend)
        loss = sft_weight * ce + scale * cal
        if em_state is not None and calibration.refresh == "stream" and training:
            em_state.estep(option_logits.detach(), option_labels)
            micro_batches += 1
            if micro_batches == gradient_accumulation_steps:  # one M-step per optimizer step, as the trainer
                em_state.mstep()
                micro_batches = 0
        return loss

    loss_func.em_state = em_state
    return loss_func
