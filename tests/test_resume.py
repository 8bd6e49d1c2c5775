"""Exact resume (docs/math.md#em-regulariser, docs/hf.md): a CalibrationTrainer run interrupted right after a
checkpoint and resumed
from it in a fresh trainer (fresh, differently initialised model) ends with the same per-bin accuracies
(CFT), the same EM state (RCFT, refreshed by streaming at every step), the same logged losses and
calibration statistics after the checkpoint, the same weights and the same final loss as the run that was
never interrupted. Seeded, CPU, a tiny Llama.
"""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from calibkern.hf import CalibrationConfig, CalibrationTrainer, build_sft_dataset  # noqa: E402
from calibkern.hf.data import detect_option_ids  # noqa: E402
from hf_tiny import make_examples, make_model, make_tokenizer  # noqa: E402

ROWS, BATCH, EPOCHS = 8, 4, 2
STEPS_PER_EPOCH = ROWS // BATCH
CHECKPOINT_STEP = STEPS_PER_EPOCH + 1  # inside the second epoch


class StopAfterCheckpoint(TrainerCallback):
    """Ends training right after the checkpoint of ``step`` is written (an interruption)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    return tokenizer, detect_option_ids(tokenizer, 4), make_examples(ROWS, seed=3)


def make_trainer(setup, output_dir, method, em, model_seed=0):
    tokenizer, option_ids, examples = setup
    supervise = "completion" if method == "cft" else "full"
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=BATCH, per_device_eval_batch_size=8,
        num_train_epochs=EPOCHS, learning_rate=1e-2, logging_steps=1, save_strategy="steps",
        save_steps=CHECKPOINT_STEP, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
    )
    config = CalibrationConfig(method=method, option_ids=option_ids, lam=2.0, **({"em": em} if em else {}))
    return CalibrationTrainer(make_model(tokenizer, seed=model_seed), args,
                              build_sft_dataset(tokenizer, examples, option_ids, supervise=supervise),
                              calibration=config)


def final_loss(trainer):
    """The loss of the trained model on the training rows (eval mode, no statistics recorded)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(ROWS)])
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))


def logs_after(trainer, step):
    return [entry for entry in trainer.state.log_history if entry["step"] > step and "loss" in entry]


@pytest.mark.parametrize("method, em", [("cft", None), ("rcft", {"refresh": "stream", "momentum": 0.5})],
                         ids=["cft", "rcft-stream"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(setup, tmp_path, method, em):
    whole = make_trainer(setup, tmp_path / "whole", method, em)
    whole.train()

    interrupted = make_trainer(setup, tmp_path / "interrupted", method, em)
    interrupted.add_callback(StopAfterCheckpoint(CHECKPOINT_STEP))
    interrupted.train()
    assert interrupted.state.global_step == CHECKPOINT_STEP

    resumed = make_trainer(setup, tmp_path / "interrupted", method, em, model_seed=7)
    resumed.train(resume_from_checkpoint=str(tmp_path / "interrupted" / f"checkpoint-{CHECKPOINT_STEP}"))
    assert resumed.state.global_step == whole.state.global_step == EPOCHS * STEPS_PER_EPOCH

    if method == "cft":  # estimated once, by the starting model: the resumed run must not re-estimate
        assert torch.equal(resumed.bin_accuracy, whole.bin_accuracy)
        assert torch.equal(resumed.bin_counts, whole.bin_counts)
    else:
        assert int(resumed.em_state.n_msteps) == EPOCHS * STEPS_PER_EPOCH
        for name, value in whole.em_state.state_dict().items():
            assert torch.equal(resumed.em_state.state_dict()[name], value), name

    resumed_logs, whole_logs = logs_after(resumed, CHECKPOINT_STEP), logs_after(whole, CHECKPOINT_STEP)
    assert len(resumed_logs) == len(whole_logs) == EPOCHS * STEPS_PER_EPOCH - CHECKPOINT_STEP
    for got, want in zip(resumed_logs, whole_logs):
        for key in ("loss", "calib_ece", "calib_accuracy", "calib_mean_confidence", "calib_term"):
            assert got[key] == want[key], (got["step"], key)

    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(final_loss(resumed), final_loss(whole))
