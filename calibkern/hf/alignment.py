"""Preference alignment with TRL's ``DPOTrainer`` (docs/demo.md, docs/hf.md): the stage that makes the model
over-confident.

A preference pair is a multiple-choice question with a *chosen* and a *rejected* option. The DPO data set holds
``prompt`` (the formatted prompt, ending at the answer cue), ``chosen`` and ``rejected`` (the continuations
``" <letter>"``); TRL tokenises ``prompt + completion`` together and appends EOS, so the answer tokens are the
same option ids that evaluation reads. :func:`train_dpo` runs the real ``trl.DPOTrainer`` (sigmoid loss,
``beta``). The reference model is a frozen copy of ``model`` as it enters (TRL would otherwise reload it from
``model.config._name_or_path``, which an in-memory model does not have); with a ``peft_config`` TRL uses the
base model with the adapters disabled instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .data import DEFAULT_TEMPLATE, MCQExample, answer_continuation, format_prompt

__all__ = ["PreferencePair", "preference_dataset", "train_dpo"]


@dataclass(frozen=True)
class PreferencePair:
    """Option ``chosen`` is preferred to option ``rejected`` for ``example`` (0-based option indices)."""

    example: MCQExample
    chosen: int
    rejected: int

    def __post_init__(self):
        n = self.example.n_options
        if not (0 <= self.chosen < n and 0 <= self.rejected < n) or self.chosen == self.rejected:
            raise ValueError(
                f"{self.example.source}: a preference pair needs two different options in [0, {n}), "
                f"got chosen={self.chosen}, rejected={self.rejected}"
            )


def preference_dataset(pairs: Sequence[PreferencePair], template: str = DEFAULT_TEMPLATE):
    """A ``datasets.Dataset`` with ``prompt``, ``chosen``, ``rejected`` text columns, one row per pair."""
    import datasets

    if not pairs:
        raise ValueError("pairs is empty")
    return datasets.Dataset.from_list(
        [
            {
                "prompt": format_prompt(pair.example, template),
                "chosen": answer_continuation(pair.chosen),
                "rejected": answer_continuation(pair.rejected),
            }
            for pair in pairs
        ]
    )


def train_dpo(
    model,
    tokenizer,
    train_dataset,
    *,
    output_dir: str,
    beta: float = 0.1,
    learning_rate: float = 1e-3,
    per_device_train_batch_size: int = 16,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    seed: int = 0,
    peft_config=None,
    quiet: bool = False,
    **dpo_config,
):
    """Align ``model`` with ``trl.DPOTrainer`` on a :func:`preference_dataset`; returns the trained trainer
    (``trainer.model`` is the aligned model). Other ``DPOConfig`` fields go in ``dpo_config``; calibkern's
    defaults differ from TRL's for small CPU runs: no gradient checkpointing, bf16 only on CUDA, no
    checkpoints, no ``report_to`` targets. ``quiet=True``: nothing on the console (no progress bar, no printed
    logs)."""
    import copy

    import torch
    from trl import DPOConfig, DPOTrainer

    options = dict(
        output_dir=output_dir,
        beta=beta,
        learning_rate=learning_rate,
        per_device_train_batch_size=per_device_train_batch_size,
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        seed=seed,
        gradient_checkpointing=False,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        save_strategy="no",
        report_to=[],
    )
    options.update(dpo_config)
    reference = None
    if peft_config is None and not hasattr(model, "peft_config"):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=DPOConfig(**options),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if quiet:
        from .trainer import silence_console

        silence_console(trainer)
    trainer.train()
    return trainer
