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


class _RunsCode:
    """A pickled object that would create ``path`` when unpickled (what a hostile checkpoint could hold)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_calibkern_state_holding_a_pickled_object_is_refused_without_running_it(setup, tmp_path):
    from calibkern.hf.trainer import STATE_FILE

    checkpoint = tmp_path / "run" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"bin_accuracy": None, "bin_counts": None, "em_state": _RunsCode(marker), "em_refreshed_epoch": 0},
               checkpoint / STATE_FILE)
    trainer = make_trainer(setup, tmp_path / "run", "cft", None)
    with pytest.raises(ValueError, match=f"{STATE_FILE}: refused — it holds more than plain tensors and numbers"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="checkpoint-1: this checkpoint has no calibkern_state.pt"):
        (checkpoint / STATE_FILE).unlink()
        trainer.train(resume_from_checkpoint=str(checkpoint))


class _CrashAtSave(TrainerCallback):
    """Arms ``crash`` (a function) for the checkpoint of ``step``."""

    def __init__(self, step, armed):
        self.step, self.armed = step, armed

    def on_step_end(self, args, state, control, **kwargs):
        self.armed["on"] = state.global_step == self.step


@pytest.mark.parametrize("where", ["renaming calibkern's state", "writing the trainer's files"])
def test_a_crash_while_a_checkpoint_is_saved_leaves_a_whole_one_to_resume(setup, tmp_path, monkeypatch, where):
    """save_total_limit=1, a crash while checkpoint-3 is written — while calibkern's state is renamed into place,
    or after it, while Transformers writes its files: checkpoint-2 is still there, whole (rotation comes last),
    no temporary file is left, a folder without the state is named as such on resume, and checkpoint-2
    resumes."""
    import os

    import transformers

    from calibkern.hf import trainer as trainer_module

    armed = {"on": False}
    if where == "renaming calibkern's state":
        real_replace = os.replace

        def replace(source, target):
            if armed["on"] and trainer_module.STATE_FILE in str(target):
                raise KeyboardInterrupt("killed")
            return real_replace(source, target)

        monkeypatch.setattr(trainer_module.os, "replace", replace)
    else:
        real_save_rng = transformers.Trainer._save_rng_state

        def save_rng(self, output_dir):
            if armed["on"]:
                raise KeyboardInterrupt("killed")
            return real_save_rng(self, output_dir)

        monkeypatch.setattr(transformers.Trainer, "_save_rng_state", save_rng)
    trainer = make_trainer(setup, tmp_path, "cft", None)
    trainer.args.save_steps, trainer.args.save_total_limit, trainer.args.max_steps = 1, 1, 3
    trainer.add_callback(_CrashAtSave(3, armed))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    state_file = trainer_module.STATE_FILE
    previous = tmp_path / "checkpoint-2"
    assert (previous / state_file).exists() and (previous / "trainer_state.json").exists()
    assert not any(".tmp-" in name for _, _, names in os.walk(tmp_path) for name in names)
    partial = tmp_path / "checkpoint-3"
    assert (partial / state_file).exists() == (where == "writing the trainer's files")
    if not (partial / state_file).exists():
        with pytest.raises(FileNotFoundError, match="checkpoint-3: this checkpoint has no"):
            make_trainer(setup, tmp_path, "cft", None).train(resume_from_checkpoint=str(partial))
    monkeypatch.undo()
    resumed = make_trainer(setup, tmp_path, "cft", None)
    resumed.args.max_steps = 3
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 3
