"""``calibkern.hf.TokenTelemetryCallback`` with the real ``transformers.Trainer`` on a model patched by
``apply_fused_loss`` (docs/hf.md#token-telemetry): the logged ``token_*`` / ``full_ece`` / ``calib_*`` values are
those of the fused pass over the rows of the logging window (two steps of four rows, learning rate 0, so every
step runs the starting model), they reach the callbacks after it and ``state.log_history``, and an unpatched
model is refused by name."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import calibkern  # noqa: E402
from calibkern.hf import (CalibrationConfig, MCQCollator, TokenTelemetryCallback, apply_fused_loss,  # noqa: E402
                          build_sft_dataset, detect_option_ids)
from calibkern.hf.loss_policy import answer_option_labels  # noqa: E402
from calibkern.hf.modeling import decoder_forward, option_logits_at  # noqa: E402
from hf_tiny import make_examples, make_model, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = 8


class Recorder(TrainerCallback):
    """The logs as a callback after the telemetry sees them."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    option_ids = detect_option_ids(tokenizer, 4)
    dataset = build_sft_dataset(tokenizer, make_examples(ROWS), option_ids, supervise="completion")
    return tokenizer, option_ids, dataset


def expected(model, tokenizer, option_ids, dataset):
    """The starting model's statistics over every row: token and Full-ECE statistics of the fused pass, and the
    answers' binned statistics."""
    batch = MCQCollator(tokenizer.pad_token_id)([dataset[i] for i in range(ROWS)])
    with torch.no_grad():
        hidden, weight, bias, softcap = decoder_forward(model, batch)
        fused = calibkern.fused_linear_calibration_loss(hidden, weight, batch["labels"], option_ids=None, bias=bias,
                                                        calibration=None, token_stats=True, full_stats=True)
        ids = torch.tensor(option_ids)
        logits = option_logits_at(hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, bias, ids, softcap)
        answers = calibkern.binned_stats(logits, answer_option_labels(batch["labels"], ids, batch["answer_mask"]), 10)
    return {"token_ece": float(fused.token_stats.ece()), "token_accuracy": float(fused.token_stats.accuracy()),
            "token_confidence": float(fused.token_stats.mean_confidence()), "full_ece": float(fused.full_stats.ece()),
            "calib_ece": float(answers.ece()), "calib_accuracy": float(answers.accuracy()),
            "calib_mean_confidence": float(answers.mean_confidence())}


def train(model, dataset, tokenizer, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=ROWS // 2, max_steps=2,
                             logging_steps=2, learning_rate=0.0, optim="sgd", report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0)
    recorder = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=MCQCollator(tokenizer.pad_token_id),
                      callbacks=[recorder])
    trainer.callback_handler.callbacks.insert(0, TokenTelemetryCallback())
    trainer.train()
    (history,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    (seen,) = [entry for entry in recorder.logs if "loss" in entry]
    return history, seen


@pytest.mark.parametrize("method", [None, "cft"])
def test_logged_telemetry_is_the_fused_pass_over_the_window(setup, tmp_path, method):
    tokenizer, option_ids, dataset = setup
    model = make_model(tokenizer)
    want = expected(model, tokenizer, option_ids, dataset)
    calibration = None if method is None else CalibrationConfig(
        method=method, option_ids=option_ids, bin_accuracy=[0.5] * 10, full_stats=True)
    history, seen = train(apply_fused_loss(model, calibration), dataset, tokenizer, tmp_path)
    keys = ["token_ece", "token_accuracy", "token_confidence"]
    keys += [] if method is None else ["full_ece", "calib_ece", "calib_accuracy", "calib_mean_confidence"]
    for key in keys:
        assert history[key] == pytest.approx(want[key], abs=1e-6), key
        assert seen[key] == history[key], key
    assert method is not None or not {"full_ece", "calib_ece", "calib_term"} & set(history)
    assert method is None or history["calib_term"] > 0


def test_an_unpatched_model_is_refused(setup, tmp_path):
    tokenizer, _, dataset = setup
    with pytest.raises(ValueError, match="apply_fused_loss"):
        train(make_model(tokenizer), dataset, tokenizer, tmp_path)


def test_a_moe_models_router_loss_is_logged(setup, tmp_path):
    """Mixtral with router logits on, one step over every row at learning rate 0: the logged aux_loss is the
    model's own (unweighted) aux_loss on that batch."""
    from hf_tiny import make_extra_model

    tokenizer, _, dataset = setup
    model = make_extra_model("mixtral", tokenizer)
    batch = MCQCollator(tokenizer.pad_token_id)([dataset[i] for i in range(ROWS)])
    model.train()
    with torch.no_grad():
        want = float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).aux_loss)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=ROWS, max_steps=1, logging_steps=1,
                             learning_rate=0.0, optim="sgd", report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=apply_fused_loss(model), args=args, train_dataset=dataset,
                      data_collator=MCQCollator(tokenizer.pad_token_id))
    trainer.callback_handler.callbacks.insert(0, TokenTelemetryCallback())
    trainer.train()
    (history,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert history["aux_loss"] == pytest.approx(want, rel=1e-5)
