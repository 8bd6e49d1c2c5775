"""CalibrationTrainer: CFT / RCFT as a ``transformers.Trainer`` with one decoder pass per step (docs/hf.md).

The trainer patches its model with the fused forward of :mod:`calibkern.hf.patching` (as
:func:`calibkern.hf.apply_fused_loss` does): each training step is one call of the model, whose forward runs the
decoder once and, where the lm_head weight is gathered (FSDP2 / FSDP1 / ZeRO-3 or directly), computes
:func:`calibkern.fused_linear_calibration_loss`

    loss = sft_weight · CE + lam′ · calibration term

without the ``[tokens, V]`` logits; the lm_head module is never called on the sequence. Weights, scaling, the
calibration form, the streaming M-step and the telemetry are the run's :class:`calibkern.hf.loss_policy.LossPolicy`
(``trainer.loss_policy``), the one policy of every calibkern loss path.

Answer positions: the ``answer_mask`` column when the batch has one (``True`` at the answer token in ``labels``,
as :func:`calibkern.hf.data.encode_example` writes it), otherwise the supervised positions whose target is one of
``option_ids``.

Gradient accumulation: Transformers passes ``num_items_in_batch`` (supervised tokens over all micro-batches of
the optimizer step, all ranks when ``average_tokens_across_devices``); CE is summed and divided by it, and the
calibration term — a mean over the micro-batch's answers — is divided by the number of micro-batches. Both are
then exact for micro-batches with the same number of answers (one per row: equal batch sizes). Under data
parallelism the count covers all ranks; the calibration term is also divided by the number of processes and the
loss multiplied by it (as ``Trainer.compute_loss`` does), so CE is the global token mean after DDP's / FSDP's
gradient averaging while the calibration term stays a mean.

Statistics: per-bin accuracies (cft) and the EM state (rcft) come from no-grad passes outside the training steps
(before the first step; at each epoch start) through the model's own forward (``option_logits_only=True`` /
``token_stats_only=True``, so a sharded lm_head is gathered), over this rank's share of the rows, all-reduced
(``BinStats.all_reduce``, ``EMState.mstep``). Logged at each logging step, through ``Trainer.log`` (so every
``report_to`` target sees them), from device-side sums over the steps since the last log — no host sync per
step: ``calib_ece``, ``calib_accuracy``, ``calib_mean_confidence`` (answers of the training batches, all ranks;
with ``option_ids``) and ``calib_term`` (the mean calibration term); for every method ``token_ece``,
``token_accuracy``, ``token_confidence`` of the supervised tokens (``token_stats``, on by default) and
``full_ece`` (``full_stats``), read inside the fused loss (docs/math.md#token-level-calibration).

Label smoothing: ``TrainingArguments.label_smoothing_factor = ε`` goes into the fused cross-entropy, per token
``lse − (1 − ε) z_y − (ε/V) Σ_j z_j`` over CE's denominator, as Transformers' ``LabelSmoother`` computes it
(docs/hf.md#label-smoothing), with every method and the token statistics.

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

from .config import CalibrationConfig
from .data import MCQCollator, resolve_pad_token_id
from .loss_policy import IGNORE_INDEX, LossPolicy, answer_option_labels
from .modeling import check_logit_parity, eval_decoder_passes
from .patching import FusedLoss, option_logits_pass, patch_causal_lm, token_statistics_pass

__all__ = ["CalibrationTrainer", "compute_loss_func", "answer_option_labels", "STATE_FILE"]

STATE_FILE = "calibkern_state.pt"


class _CalibrationCallback(TrainerCallback):
    """Runs the trainer's statistics passes at train begin / epoch begin and the streaming M-step."""

    def __init__(self, trainer: "CalibrationTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._check_answers()
        self.trainer._check_logit_parity()
        self.trainer._prepare_statistics()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._refresh_em(epoch=math.floor((state.epoch or 0.0) + 1e-6), step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.em_state is None:
            return
        trainer.loss_policy.end_optimizer_step()
        every = trainer.calibration.refresh_steps
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            trainer._refresh_em_pass(step=state.global_step)


class _FromPolicy:
    """A trainer attribute that is its loss policy's attribute of the same name."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, trainer, owner=None):
        return self if trainer is None else getattr(trainer.loss_policy, self.name)

    def __set__(self, trainer, value):
        setattr(trainer.loss_policy, self.name, value)


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
        self.calibration = calibration
        # The loss runs inside the model's forward (calibkern.hf.patching), where FSDP2 / FSDP1 / ZeRO-3 gather the
        # lm_head; the M-step runs at each optimizer step (the callback), P is what compute_loss multiplies by.
        self.loss_policy = FusedLoss(calibration, gradient_accumulation_steps=self.args.gradient_accumulation_steps,
                                     label_smoothing=self.args.label_smoothing_factor)
        self.loss_policy.stream_mstep = False
        self.loss_policy.world_size = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        patch_causal_lm(self.model, self.loss_policy, check=calibration.check_logits)
        self.em_refreshed_epoch = -1
        self.em_refreshed_step = -1
        # num_items_in_batch is what makes CE exact under accumulation: ask for it whatever the model accepts,
        # counted over labels[..., 1:] since the loss shifts.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.add_callback(_CalibrationCallback(self))

    # ------------------------------------------------------------------------------------------- the loss

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "answer_mask" not in self._signature_columns:
            self._signature_columns.append("answer_mask")

    bin_accuracy = _FromPolicy()  # cft / token_cft: the per-bin accuracies A_k the loss uses
    bin_counts = _FromPolicy()  # the counts N⁰_k of the statistics pass that estimated them
    em_state = _FromPolicy()  # rcft: the calibkern.EMState the loss uses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One call of the patched model: decoder, then the fused loss where the lm_head is gathered (module
        docstring); the loss times the processes when the Trainer averages tokens across them, as
        ``Trainer.compute_loss`` does."""
        policy = self.loss_policy
        if policy.needs_bin_accuracy:
            self._prepare_statistics()
        policy.gradient_accumulation_steps = getattr(self, "current_gradient_accumulation_steps",
                                                     self.args.gradient_accumulation_steps)
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        # The products with the lm_head weight run under the same autocast as the decoder, as nn.Linear would.
        with self.accelerator.autocast():
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if num_items_in_batch is not None and policy.processes() > 1:
            loss = loss * policy.processes()
        if return_outputs:
            return loss, {"sft_loss": outputs.sft_loss.detach(), "cal_loss": outputs.cal_loss.detach()}
        return loss

    # ------------------------------------------------------------------------------------------- logging

    def log(self, logs: dict, *args, **kwargs):
        """Adds the loss window's ``calib_*`` / ``token_*`` values and, for a mixture-of-experts model with router
        logits on, ``aux_loss`` (the mean unweighted router loss) to the training logs (calibkern.hf.telemetry; all
        ranks reduce together)."""
        if "loss" in logs:
            logs.update(self.loss_policy.window.read())
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
        for _, output in eval_decoder_passes(self.model, self._statistics_batches(),
                                             autocast=self.accelerator.autocast, forward=option_logits_pass):
            yield output.option_logits, output.option_labels

    def _check_logit_parity(self):
        """Before the statistics passes and the first step: on one training row the fused path gives the model's
        own loss and logits, and the row holds nothing the fused path would drop, or the run stops with an error
        naming the model and the difference (calibkern.hf.modeling.check_logit_parity); the patched forward then
        does not check again."""
        dataset = self.train_dataset
        if not self.calibration.check_logits or dataset is None or not hasattr(dataset, "__getitem__") \
                or len(dataset) == 0:
            return
        batch = self._prepare_inputs(self.data_collator([dataset[0]]))
        with self.accelerator.autocast():
            check_logit_parity(self.model, batch, backend=self.calibration.backend)
        self.loss_policy.check_pending = False

    def _check_answers(self):
        """Before the first step: every answer the training rows mark (``answer_mask``) is one of ``option_ids``,
        or the run stops with an error that compares the counts (a config for 3 options on 4-option rows)."""
        option_ids, dataset = self.calibration.option_ids, self.train_dataset
        if option_ids is None or dataset is None or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
            return
        first = dataset[0]
        if not (isinstance(first, dict) and "answer_mask" in first and "labels" in first):
            return
        try:  # a datasets.Dataset reads whole columns at once
            columns = zip(dataset["labels"], dataset["answer_mask"])
        except (TypeError, KeyError, IndexError):
            columns = ((dataset[i]["labels"], dataset[i]["answer_mask"]) for i in range(len(dataset)))
        answers = {int(label) for labels, mask in columns for label, answer in zip(labels, mask) if answer}
        unknown = sorted(answers - set(option_ids))
        if unknown:
            raise ValueError(f"the training rows' answers use {len(answers)} distinct tokens {sorted(answers)} but "
                             f"CalibrationConfig.option_ids has {len(option_ids)} ({option_ids}); {unknown} are not "
                             "among them: give one option id per option letter of the data "
                             "(calibkern.hf.detect_option_ids(tokenizer, n_options))")

    @torch.no_grad()
    def _token_statistics(self) -> calibkern.BinStats:
        """token_cft: the starting model's token statistics over the supervised tokens of this rank's share of
        the statistics rows (the patched forward's token-statistics pass)."""
        stats = calibkern.BinStats.empty(self.calibration.n_bins, device=self.args.device)
        for _, output in eval_decoder_passes(self.model, self._statistics_batches(),
                                             autocast=self.accelerator.autocast, forward=token_statistics_pass):
            stats = stats + output.token_stats
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
        """The calibkern state goes into the checkpoint folder first (a temporary file renamed into place), then
        Transformers writes the rest and rotates old checkpoints: a crash at any point leaves either the previous
        checkpoints untouched or a new one that holds the calibkern state (docs/reliability.md#checkpoints)."""
        if self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            write_calibration_state(self.calibration_state(),
                                    os.path.join(self._get_output_dir(trial=trial), folder))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; on resume, also loads ``calibkern_state.pt`` from the checkpoint
        (:func:`read_calibration_state`: plain tensors and numbers only)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir}")
        if not resume_from_checkpoint:
            self.em_refreshed_epoch = -1  # epochs and steps count from 0 again
            self.em_refreshed_step = -1
        else:
            self.load_calibration_state(read_calibration_state(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)


def write_calibration_state(state: dict, folder: str) -> None:
    """``folder/calibkern_state.pt`` written whole: to a temporary file in ``folder``, flushed to disk, renamed."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, STATE_FILE)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_calibration_state(checkpoint: str) -> dict:
    """The calibkern state of ``checkpoint``, loaded with ``torch.load(weights_only=True)`` — tensors, numbers,
    strings, None and containers of them, nothing that runs code; anything else, or a missing file, is a
    ``ValueError`` / ``FileNotFoundError`` naming the checkpoint and why."""
    import pickle

    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{checkpoint}: this checkpoint has no {STATE_FILE}, so calibkern cannot continue its statistics from "
            "it: it was not written by CalibrationTrainer, or its run stopped while writing it (CalibrationTrainer "
            "writes the file first, so a checkpoint it wrote in full always has it); resume from another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: refused — it holds more than plain tensors and numbers (loading it with "
                         f"weights_only=True failed: {str(error).splitlines()[0]}); a calibkern state never does, and "
                         "loading such a file could run code") from None
    required = {"bin_accuracy", "bin_counts", "em_state", "em_refreshed_epoch"}
    if not isinstance(state, dict) or not required <= set(state):
        raise ValueError(f"{path}: not a calibkern state (expected a dict with bin_accuracy, bin_counts, em_state, "
                         f"em_refreshed_epoch; got {type(state).__name__})")
    return state


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


# ----------------------------------------------------------------------------------------------- logits API


def compute_loss_func(
    calibration: CalibrationConfig,
    *,
    em_state=None,
    gradient_accumulation_steps: int = 1,
    router_aux_loss_coef: float | None = None,
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
    supported here. The returned function has ``.em_state``. The model's own logits need no equivalence check, but
    its other losses do: outputs that carry a router ``aux_loss`` (a mixture-of-experts model with router logits
    on) add ``router_aux_loss_coef · aux_loss`` as the model's own loss would, and are refused while
    ``router_aux_loss_coef`` is None; logits that are not ``[B, T, V]`` over ``labels [B, T]`` are refused.
    """
    if calibration.official_compat:
        raise ValueError("compute_loss_func does not support official_compat; use CalibrationTrainer")
    if calibration.method == "token_cft":
        raise ValueError("compute_loss_func does not support method='token_cft'; use CalibrationTrainer")
    if calibration.method == "cft" and calibration.bin_accuracy is None:
        raise ValueError("compute_loss_func with method='cft' needs calibration.bin_accuracy")
    policy = LossPolicy(calibration, em_state=em_state, gradient_accumulation_steps=gradient_accumulation_steps)

    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if logits.dim() != 3 or logits.shape[:2] != labels.shape:
            raise ValueError(f"compute_loss_func needs logits [B, T, V] for labels [B, T]; got logits "
                             f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
        aux_loss = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        if aux_loss is not None and router_aux_loss_coef is None:
            raise ValueError("the model's outputs carry aux_loss (a router load-balancing loss), which its own loss "
                             "adds as router_aux_loss_coef · aux_loss: pass compute_loss_func(..., "
                             "router_aux_loss_coef=model.router_aux_loss_coef), or set "
                             "config.output_router_logits=False")
        training = torch.is_grad_enabled() and logits.requires_grad  # evaluation runs under no_grad
        sft_weight, lam = policy.loss_weights(training, num_items_in_batch)
        shifted = logits[:, :-1].float()
        target = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        ce = ce / (target.ne(IGNORE_INDEX).sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch)
        option_ids = policy.option_ids.to(logits.device)
        option_labels = answer_option_labels(labels, option_ids)
        option_logits = shifted[..., option_ids].reshape(-1, len(option_ids))
        if policy.form == "hard_bin":
            cal = calibkern.calibration_loss(option_logits, option_labels, policy.bin_accuracy.to(logits.device),
                                             n_bins=calibration.n_bins, backend=calibration.backend)
        else:
            cal = calibkern.em_regularizer(option_logits, option_labels, policy.em_state, backend=calibration.backend)
        loss = sft_weight * ce + lam * cal
        if aux_loss is not None:
            loss = loss + router_aux_loss_coef * aux_loss.to(loss.device)
        if policy.streaming and training:
            policy.stream_estep(option_logits, option_labels)
        return loss

    loss_func.em_state = policy.em_state
    loss_func.loss_policy = policy
    return loss_func
