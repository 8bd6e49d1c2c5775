"""The pipeline's stages on any Hugging Face causal LM and multiple-choice data (docs/demo.md).

Each training stage fine-tunes a *copy* of the model it is given (the input stays as it was, so later stages
can start from the same aligned model) and returns the trained model; LoRA adapters, when asked for, are
merged back so every stage's output is a plain causal LM:

* :func:`align` — DPO with ``trl.DPOTrainer`` on preference pairs (:func:`calibkern.hf.train_dpo`);
* :func:`label_smoothing` — completion-only SFT with label smoothing over the vocabulary;
* :func:`cft` — :class:`calibkern.hf.CalibrationTrainer`, ``method="cft"``: completion-only SFT + ``lam`` ·
  hard-bin term, bin accuracies from one pass of the starting model over the training rows;
* :func:`rcft` — ``method="rcft"``: full-sequence SFT + ``lam`` · EM regulariser, the E-step refreshed at every
  epoch start (and every ``refresh_steps`` steps) on a held-out calibration split (``lam = 0`` is the ablation
  ``rcft_no_reg``);
* :func:`temperature_scaling` — T fitted by NLL on the calibration split (no training).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import hf
from ..hf.data import MCQExample


@dataclass
class LoraOptions:
    """PEFT LoRA adapters for the training stages (``r = 0``: full fine-tuning)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM")


@dataclass
class TrainOptions:
    """What every training stage shares: epochs, learning rate, batch size, seed, LoRA, progress bars."""

    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    lora: LoraOptions = field(default_factory=LoraOptions)
    progress: bool = True


def _training_args(options: TrainOptions, output_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=options.epochs,
        learning_rate=options.lr,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=max(options.batch_size, 128),
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=options.seed,
        data_seed=options.seed,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=not options.progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def _trainable_copy(model, lora: LoraOptions):
    """A deep copy of ``model`` in training mode, wrapped with LoRA adapters when ``lora`` is enabled."""
    trainable = copy.deepcopy(model)
    trainable.train()
    if lora.enabled:
        from peft import get_peft_model

        trainable = get_peft_model(trainable, lora.peft_config())
    return trainable


def _finished(model):
    """The trained model as a plain causal LM in eval mode: LoRA adapters merged, calibkern's fused forward
    removed (``calibkern.hf.remove_fused_loss``), and Accelerate's traces removed (its autocast ``forward``
    wrapper closes over *this* object, so a deep copy of a model that keeps it would run the original's weights,
    and ``_is_accelerate_prepared`` would stop the next trainer from preparing it)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    hf.remove_fused_loss(model)
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_is_accelerate_prepared", None)
    return model.eval()


def _sft_dataset(tokenizer, examples, option_ids, template, supervise):
    return hf.build_sft_dataset(tokenizer, list(examples), option_ids, template=template, supervise=supervise)


def align(model, tokenizer, pairs: Sequence[hf.PreferencePair], options: TrainOptions, *, beta: float = 0.1,
          template: str = hf.DEFAULT_TEMPLATE, max_steps: int = -1):
    """DPO-aligned copy of ``model`` (``trl.DPOTrainer``, sigmoid loss, ``beta``)."""
    policy = copy.deepcopy(model).train()
    with tempfile.TemporaryDirectory() as scratch:
        trainer = hf.train_dpo(
            policy, tokenizer, hf.preference_dataset(list(pairs), template), output_dir=scratch, beta=beta,
            learning_rate=options.lr, per_device_train_batch_size=options.batch_size,
            num_train_epochs=options.epochs, max_steps=max_steps, seed=options.seed,
            peft_config=options.lora.peft_config() if options.lora.enabled else None,
            lr_scheduler_type="constant", warmup_steps=0, logging_strategy="no", disable_tqdm=not options.progress,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, quiet=not options.progress,
        )
    return _finished(trainer.model)


def label_smoothing(model, tokenizer, examples: Sequence[MCQExample], option_ids, options: TrainOptions, *,
                    epsilon: float = 0.1, template: str = hf.DEFAULT_TEMPLATE):
    """Completion-only SFT with label smoothing ``epsilon`` over the vocabulary."""
    trainable = _trainable_copy(model, options.lora)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = hf.train_label_smoothing(
            trainable, _sft_dataset(tokenizer, examples, option_ids, template, "completion"),
            _training_args(options, scratch), epsilon=epsilon, tokenizer=tokenizer, quiet=not options.progress)
    return _finished(trainer.model)


def _calibration_trainer(model, tokenizer, dataset, calibration: hf.CalibrationConfig, options: TrainOptions,
                         scratch: str):
    trainable = _trainable_copy(model, options.lora)
    trainer = hf.CalibrationTrainer(trainable, _training_args(options, scratch), dataset, calibration=calibration,
                                    processing_class=tokenizer)
    return hf.silence_console(trainer) if not options.progress else trainer


def cft(model, tokenizer, examples: Sequence[MCQExample], option_ids, options: TrainOptions, *, lam: float = 1.0,
        n_bins: int = 10, template: str = hf.DEFAULT_TEMPLATE, bin_prior: float = 0.0):
    """CFT: completion-only SFT + ``lam`` · hard-bin calibration term (docs/math.md#cft-term); ``bin_prior``: see
    :class:`calibkern.hf.CalibrationConfig`."""
    calibration = hf.CalibrationConfig(method="cft", option_ids=option_ids, n_bins=n_bins, lam=lam,
                                       bin_prior=bin_prior)
    dataset = _sft_dataset(tokenizer, examples, option_ids, template, "completion")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _calibration_trainer(model, tokenizer, dataset, calibration, options, scratch)
        trainer.train()
    return _finished(trainer.model)


def rcft(model, tokenizer, examples: Sequence[MCQExample], calibration_examples: Sequence[MCQExample], option_ids,
         options: TrainOptions, *, lam: float = 1.0, n_bins: int = 10, template: str = hf.DEFAULT_TEMPLATE,
         em: dict | None = None, refresh_steps: int | None = None):
    """RCFT: full-sequence SFT + ``lam`` · EM regulariser (docs/math.md#em-regulariser), E-step on
    ``calibration_examples``
    (a held-out split) at every epoch start and, with ``refresh_steps``, after every ``refresh_steps`` optimizer
    steps (skipped at ``lam = 0``, where the EM state has no effect on training)."""
    calibration = hf.CalibrationConfig(
        method="rcft", option_ids=option_ids, n_bins=n_bins, lam=lam, em=dict(em or {"refresh": "epoch"}),
        calibration_dataset=_sft_dataset(tokenizer, calibration_examples, option_ids, template, "completion"),
        refresh_steps=refresh_steps if lam > 0 else None)
    dataset = _sft_dataset(tokenizer, examples, option_ids, template, "full")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _calibration_trainer(model, tokenizer, dataset, calibration, options, scratch)
        trainer.train()
    return _finished(trainer.model)


def evaluate(model, tokenizer, examples: Sequence[MCQExample], option_ids, *, n_bins: int = 10,
             template: str = hf.DEFAULT_TEMPLATE, seed: int = 0, progress: bool = True,
             temperature: float = 1.0) -> hf.EvaluationResult:
    """Option-logit evaluation (:func:`calibkern.hf.evaluate`), in batches of 256 rows: every stage of the demo and
    of ``calibkern pipeline`` and ``calibkern evaluate`` read a model the same way."""
    return hf.evaluate(model, tokenizer, list(examples), option_ids, template=template, n_bins=n_bins,
                       temperature=temperature, batch_size=256, progress=progress, seed=seed)


def temperature_scaling(model, tokenizer, calibration_examples, test_examples, option_ids, *, n_bins: int = 10,
                        template: str = hf.DEFAULT_TEMPLATE, seed: int = 0, progress: bool = True):
    """``(T, result)``: T fitted by NLL on ``calibration_examples``, ``test_examples`` evaluated at T."""
    return hf.temperature_scaling(model, tokenizer, list(calibration_examples), list(test_examples), option_ids,
                                  template=template, n_bins=n_bins, batch_size=256, progress=progress, seed=seed)


def save_model(model, tokenizer, directory: str | os.PathLike, record: dict | None = None) -> None:
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory (``from_pretrained`` loads it), with ``record``
    (:func:`calibkern.pipeline.io.training_record`: template, option ids) beside them when given."""
    from .io import write_training_record

    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if record is not None:
        write_training_record(os.fspath(directory), record)
