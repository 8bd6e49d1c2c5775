"""CalibrationTrainer: one decoder pass per step, no lm_head call, LoRA, accumulation, logging, exact resume."""

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import TrainingArguments  # noqa: E402

import calibkern  # noqa: E402
from calibkern.hf import (CalibrationConfig, CalibrationTrainer, build_sft_dataset, compute_loss_func,  # noqa: E402
                          fused_loss_of)
from calibkern.hf.data import MCQCollator, detect_option_ids  # noqa: E402
from calibkern.hf.trainer import STATE_FILE  # noqa: E402
from hf_tiny import make_examples, make_model, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIN_ACCURACY = [0.05 + 0.1 * k for k in range(10)]


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    option_ids = detect_option_ids(tokenizer, 4)
    examples = make_examples(8)
    return tokenizer, option_ids, examples


def _args(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def _config(option_ids, method, **overrides):
    if method == "cft":
        overrides.setdefault("bin_accuracy", BIN_ACCURACY)
    # the logit check is one decoder pass and one lm_head call before training: these tests count the passes
    # of the training steps (tests/test_hf_models.py runs the check)
    return CalibrationConfig(method=method, option_ids=option_ids, **{"check_logits": False, **overrides})


def _trainer(setup, tmp_path, method="cft", model=None, supervise=None, config=None, **args):
    tokenizer, option_ids, examples = setup
    supervise = supervise or ("completion" if method == "cft" else "full")
    dataset = build_sft_dataset(tokenizer, examples, option_ids, supervise=supervise)
    model = model if model is not None else make_model(tokenizer)
    config = config or _config(option_ids, method)
    return CalibrationTrainer(model, _args(tmp_path, **args), dataset, calibration=config)


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("method, em", [("cft", {}), ("rcft", {"refresh": "stream"})])
def test_one_decoder_pass_per_step_and_no_lm_head(setup, tmp_path, method, em):
    tokenizer, option_ids, _ = setup
    model = make_model(tokenizer)
    decoder_calls = _count_calls(model.get_decoder())
    head_calls = _count_calls(model.get_output_embeddings())
    # check_logits=False: only the training steps' passes are counted (the check is one more, before them)
    config = _config(option_ids, method, check_logits=False, **({"em": em} if em else {}))
    trainer = _trainer(setup, tmp_path, method, model=model, config=config)
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(decoder_calls) == 2
    assert head_calls == []
    logged = [entry for entry in trainer.state.log_history if "calib_ece" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert 0.0 <= entry["calib_ece"] <= 1.0 and 0.0 <= entry["calib_accuracy"] <= 1.0
        assert 0.0 < entry["calib_mean_confidence"] <= 1.0 and entry["calib_term"] >= 0.0
    if method == "rcft":
        assert int(trainer.em_state.n_msteps) == 2  # streaming: one M-step per optimizer step


def test_cft_estimates_bin_accuracy_in_one_pass_before_training(setup, tmp_path):
    tokenizer, option_ids, examples = setup
    model = make_model(tokenizer)
    reference_model = copy.deepcopy(model)
    decoder_calls = _count_calls(model.get_decoder())
    config = CalibrationConfig(method="cft", option_ids=option_ids, check_logits=False)  # count the passes alone
    trainer = _trainer(setup, tmp_path, "cft", model=model, config=config)
    trainer.train()
    assert len(decoder_calls) == 1 + 2  # 8 rows in one eval batch, then 2 training steps
    logits, labels = calibkern.hf.evaluation.collect_option_logits(
        reference_model, tokenizer, examples, option_ids, progress=False
    )
    stats = calibkern.binned_stats(logits, labels, 10)
    overall = stats.sum_correct.sum() / stats.counts.sum()
    # a bin the starting model leaves empty takes the overall accuracy
    expected = torch.where(stats.counts > 0, stats.sum_correct / stats.counts.clamp_min(1), overall).float()
    assert bool((stats.counts == 0).any())
    torch.testing.assert_close(trainer.bin_accuracy.cpu(), expected, atol=1e-6, rtol=0)
    assert torch.equal(trainer.bin_counts.cpu(), stats.counts)


def test_cft_bin_prior_shrinks_towards_the_overall_accuracy(setup, tmp_path):
    tokenizer, option_ids, examples = setup
    model = make_model(tokenizer)
    logits, labels = calibkern.hf.evaluation.collect_option_logits(model, tokenizer, examples, option_ids,
                                                                    progress=False)
    stats = calibkern.binned_stats(logits, labels, 10)
    config = CalibrationConfig(method="cft", option_ids=option_ids, bin_prior=4.0)
    trainer = _trainer(setup, tmp_path, "cft", model=model, config=config)
    trainer._prepare_statistics()
    counts, correct = stats.counts.double(), stats.sum_correct.double()
    overall = correct.sum() / counts.sum()
    expected = ((correct + 4.0 * overall) / (counts + 4.0)).float()
    torch.testing.assert_close(trainer.bin_accuracy.cpu(), expected, atol=1e-6, rtol=0)


def test_rcft_epoch_refresh_on_a_held_out_split_runs_outside_training_steps(setup, tmp_path):
    tokenizer, option_ids, _ = setup
    held_out = build_sft_dataset(tokenizer, make_examples(5, seed=9), option_ids, supervise="full")
    model = make_model(tokenizer)
    decoder_calls = _count_calls(model.get_decoder())
    config = CalibrationConfig(method="rcft", option_ids=option_ids, calibration_dataset=held_out, check_logits=False)
    trainer = _trainer(setup, tmp_path, "rcft", model=model, num_train_epochs=2, config=config)
    trainer.train()
    # per epoch: 1 refresh batch (5 held-out rows) + 2 training steps (8 rows in batches of 4)
    assert len(decoder_calls) == 2 * (1 + 2)
    assert trainer.em_refreshed_epoch == 1 and int(trainer.em_state.n_msteps) == 2
    assert float(trainer.em_state.running[0].sum()) == pytest.approx(5.0)  # Σ_k S_k = held-out answers


def test_lora_training_changes_only_adapter_weights(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer, option_ids, _ = setup
    model = get_peft_model(make_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # B starts at zero: give it values so that A's gradient is not zero either
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    decoder_calls = _count_calls(model.get_base_model().get_decoder())
    head_calls = _count_calls(model.get_base_model().get_output_embeddings())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = _trainer(setup, tmp_path, "cft", model=model)
    trainer.train()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_A" in name for name in changed) and any("lora_B" in name for name in changed)
    assert len(decoder_calls) == 2 and head_calls == []


def test_gradient_checkpointing_and_bf16_autocast(setup, tmp_path):
    tokenizer, _, _ = setup
    model = make_model(tokenizer)
    decoder_calls = _count_calls(model.get_decoder())
    head_calls = _count_calls(model.get_output_embeddings())
    trainer = _trainer(setup, tmp_path, "cft", model=model, gradient_checkpointing=True, bf16=True)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len(decoder_calls) == 2 and head_calls == []
    assert model.get_decoder().gradient_checkpointing


def _one_step_parameters(setup, tmp_path, batch_size, accumulation):
    tokenizer, option_ids, _ = setup
    trainer = _trainer(
        setup,
        tmp_path,
        "cft",
        model=make_model(tokenizer),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        config=_config(option_ids, "cft", lam=5.0),
    )
    trainer.train()
    return {name: value.detach().clone() for name, value in trainer.model.named_parameters()}


def test_gradient_accumulation_matches_one_large_batch(setup, tmp_path):
    whole = _one_step_parameters(setup, tmp_path / "a", batch_size=8, accumulation=1)
    accumulated = _one_step_parameters(setup, tmp_path / "b", batch_size=4, accumulation=2)
    initial = dict(make_model(setup[0]).named_parameters())
    for name in whole:
        assert not torch.equal(whole[name], initial[name]) or "norm" in name
        torch.testing.assert_close(accumulated[name], whole[name], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["cft", "rcft"])
def test_compute_loss_func_equals_trainer_loss(setup, tmp_path, method):
    tokenizer, option_ids, examples = setup
    config = _config(option_ids, method, lam=3.0, **({"em": {"refresh": "epoch"}} if method == "rcft" else {}))
    trainer = _trainer(setup, tmp_path, method, config=config)
    if method == "rcft":
        trainer._refresh_em(epoch=0)  # a fitted EM state, so the regulariser is not trivial
    loss_func = compute_loss_func(config, em_state=trainer.em_state)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(6)]))
    model = trainer.model
    expected = trainer.compute_loss(model, batch)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    actual = loss_func(outputs, batch["labels"])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    n_items = batch["labels"][:, 1:].ne(-100).sum()
    expected = trainer.compute_loss(model, batch, num_items_in_batch=n_items)
    torch.testing.assert_close(loss_func(outputs, batch["labels"], num_items_in_batch=n_items), expected)


def test_official_compat_combination(setup, tmp_path):
    tokenizer, option_ids, _ = setup
    config = CalibrationConfig(method="cft", option_ids=option_ids, official_compat=True)
    trainer = _trainer(setup, tmp_path, "cft", config=config)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    loss, parts = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert trainer.bin_counts is not None and int(trainer.bin_counts.sum()) == 8
    torch.testing.assert_close(loss.detach(), 0.5 * parts["sft_loss"] + 0.5e-3 * parts["cal_loss"])


def test_save_and_resume_restore_the_em_state_exactly(setup, tmp_path):
    tokenizer, _, _ = setup
    options = dict(num_train_epochs=3, save_strategy="steps", save_steps=3)
    full = _trainer(setup, tmp_path / "full", "rcft", model=make_model(tokenizer), **options)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"  # mid-way through the second epoch (2 steps per epoch)
    saved = torch.load(checkpoint / STATE_FILE, weights_only=False)
    assert saved["em_refreshed_epoch"] == 1

    resumed = _trainer(setup, tmp_path / "full", "rcft", model=make_model(tokenizer, seed=7), **options)
    resumed.load_calibration_state(saved)
    for name, value in saved["em_state"].items():
        assert torch.equal(resumed.em_state.state_dict()[name], value)
    resumed = _trainer(setup, tmp_path / "full", "rcft", model=make_model(tokenizer, seed=7), **options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.em_refreshed_epoch == full.em_refreshed_epoch == 2  # the third epoch's refresh ran once
    for name, value in full.em_state.state_dict().items():
        assert torch.equal(resumed.em_state.state_dict()[name], value), name
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_missing_calibration_state_on_resume_is_an_error(setup, tmp_path):
    trainer = _trainer(setup, tmp_path, "cft")
    os.makedirs(tmp_path / "checkpoint-1")
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_rcft_refresh_steps_reruns_the_e_step_within_epochs(setup, tmp_path):
    tokenizer, option_ids, _ = setup
    held_out = build_sft_dataset(tokenizer, make_examples(5, seed=9), option_ids, supervise="full")
    model = make_model(tokenizer)
    decoder_calls = _count_calls(model.get_decoder())
    config = CalibrationConfig(method="rcft", option_ids=option_ids, calibration_dataset=held_out, refresh_steps=1,
                               check_logits=False)
    trainer = _trainer(setup, tmp_path, "rcft", model=model, num_train_epochs=2, config=config)
    trainer.train()
    # refreshes before steps 1, 2, 3, 4 (the epoch-start refresh of epoch 2 is the one after step 2; none after
    # the last step) + 4 training steps
    assert len(decoder_calls) == 4 + 4
    assert int(trainer.em_state.n_msteps) == 4
    assert trainer.em_refreshed_epoch == 1 and trainer.em_refreshed_step == 3


def test_config_errors():
    with pytest.raises(ValueError, match="method"):
        CalibrationConfig(method="sft", option_ids=[1, 2])
    with pytest.raises(ValueError, match="bin_accuracy"):
        CalibrationConfig(method="cft", option_ids=[1, 2], bin_accuracy=[0.5] * 3)
    with pytest.raises(ValueError, match="official_compat"):
        CalibrationConfig(method="rcft", option_ids=[1, 2], official_compat=True)
    with pytest.raises(ValueError, match="refresh"):
        CalibrationConfig(method="rcft", option_ids=[1, 2], em={"refresh": "stream"}, calibration_dataset=[{}])
    with pytest.raises(ValueError, match="refresh_steps"):
        CalibrationConfig(method="rcft", option_ids=[1, 2], em={"refresh": "stream"}, refresh_steps=5)
    with pytest.raises(ValueError, match="refresh_steps"):
        CalibrationConfig(method="rcft", option_ids=[1, 2], refresh_steps=0)
    with pytest.raises(ValueError, match="bin_prior"):
        CalibrationConfig(method="cft", option_ids=[1, 2], bin_prior=-1.0)


def test_collator_pads_every_field():
    batch = MCQCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, -100, 7], "answer_mask": [0, 0, 1]},
            {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6], "answer_mask": [0, 1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7], [-100, 6, -100]]
    assert batch["answer_mask"].dtype == torch.bool and batch["answer_mask"].tolist()[1] == [False, True, False]


def test_mixin_with_trl_sft_trainer(setup, tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    from calibkern.hf.data import answer_continuation, format_prompt

    class CalibrationSFTTrainer(CalibrationTrainer, SFTTrainer):
        pass

    tokenizer, option_ids, examples = setup
    rows = [{"prompt": format_prompt(e), "completion": answer_continuation(e.answer)} for e in examples[:8]]
    model = make_model(tokenizer)
    head_calls = _count_calls(model.get_output_embeddings())
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, gradient_checkpointing=False, bf16=False,
    )
    trainer = CalibrationSFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
        calibration=CalibrationConfig(method="cft", option_ids=option_ids, check_logits=False),
    )
    trainer.train()
    assert head_calls == [] and int(trainer.bin_counts.sum()) == 8  # answers found by their option ids
    assert any("calib_ece" in entry for entry in trainer.state.log_history)


def test_resume_keeps_the_starting_models_bin_accuracy(setup, tmp_path):
    tokenizer, option_ids, _ = setup
    config = CalibrationConfig(method="cft", option_ids=option_ids)
    options = dict(max_steps=2, save_strategy="steps", save_steps=1)
    first = _trainer(setup, tmp_path, "cft", model=make_model(tokenizer), config=config, **options)
    first.train()
    resumed = _trainer(setup, tmp_path, "cft", model=make_model(tokenizer, seed=3), config=config, **options)
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint: nothing left to train, state loaded
    assert torch.equal(resumed.bin_accuracy, first.bin_accuracy) and torch.equal(resumed.bin_counts, first.bin_counts)


def test_compute_loss_func_trains_a_plain_trainer(setup, tmp_path):
    from transformers import Trainer

    tokenizer, option_ids, examples = setup
    config = _config(option_ids, "cft")
    dataset = build_sft_dataset(tokenizer, examples, option_ids)
    model = make_model(tokenizer)
    before = model.lm_head.weight.detach().clone()
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=1), train_dataset=dataset,
        data_collator=MCQCollator(tokenizer.pad_token_id), compute_loss_func=compute_loss_func(config),
    )
    trainer.train()
    assert not torch.equal(model.lm_head.weight, before)


def test_statistics_without_answer_positions_are_an_error(setup, tmp_path):
    tokenizer, option_ids, _ = setup
    wrong_ids = [tokenizer.convert_tokens_to_ids(token) for token in ("A", "B", "C", "D")]  # no leading space
    trainer = _trainer(setup, tmp_path, "cft", config=CalibrationConfig(method="cft", option_ids=wrong_ids))
    with pytest.raises(ValueError, match=r"answers use 4 distinct tokens .*option_ids has 4 .*are not among them"):
        trainer.train()
    config = CalibrationConfig(method="rcft", option_ids=option_ids, calibration_dataset=[{"question": "q"}])
    trainer = _trainer(setup, tmp_path, "rcft", config=config)
    with pytest.raises(TypeError, match="build_sft_dataset"):
        trainer.train()


def test_compute_loss_func_scales_for_accumulation_in_training_only():
    """Under gradient accumulation the calibration term is divided by the steps in training (the Trainer sums
    the micro-batches) but not in evaluation, and the streaming M-step runs once per optimizer step."""
    g = torch.Generator().manual_seed(0)
    option_ids = [3, 5, 7, 9]
    labels = torch.full((2, 6), -100)
    labels[:, 4] = torch.tensor([5, 9])
    labels[:, 2] = torch.tensor([11, 12])
    logits = torch.randn(2, 6, 20, generator=g)
    config = CalibrationConfig(method="rcft", option_ids=option_ids, lam=50.0, em={"refresh": "stream"})
    loss_func = compute_loss_func(config, gradient_accumulation_steps=4)
    plain = compute_loss_func(config)
    with torch.no_grad():
        evaluation = loss_func({"logits": logits}, labels, num_items_in_batch=torch.tensor(4))
        expected = plain({"logits": logits}, labels, num_items_in_batch=torch.tensor(4))
    torch.testing.assert_close(evaluation, expected)
    assert int(loss_func.em_state.n_msteps) == 0  # evaluation takes no E- or M-step
    training = [loss_func({"logits": logits.clone().requires_grad_()}, labels, num_items_in_batch=torch.tensor(4))
                for _ in range(8)]
    assert int(loss_func.em_state.n_msteps) == 2  # 8 micro-batches, 4 per optimizer step
    first = plain({"logits": logits.clone().requires_grad_()}, labels, num_items_in_batch=torch.tensor(4))
    sft = compute_loss_func(CalibrationConfig(method="rcft", option_ids=option_ids, lam=0.0))(
        {"logits": logits}, labels, num_items_in_batch=torch.tensor(4))
    torch.testing.assert_close(training[0] - sft, (first - sft) / 4)


@pytest.mark.parametrize("counted", [False, True])
def test_label_smoothing_equals_the_trainers_label_smoother(setup, tmp_path, counted):
    """Calibration off (lam = 0), token and Full-ECE statistics on: the loss and gradients of transformers.Trainer's
    LabelSmoother on the unpatched model's logits, and the statistics of the unsmoothed loss."""
    from transformers import Trainer

    tokenizer, option_ids, _ = setup
    config = _config(option_ids, "cft", lam=0.0, full_stats=True)
    ours = _trainer(setup, tmp_path / "ours", config=config, label_smoothing_factor=0.1)
    model = make_model(tokenizer)
    theirs = Trainer(model=model, args=_args(tmp_path / "theirs", label_smoothing_factor=0.1),
                     train_dataset=ours.train_dataset, data_collator=ours.data_collator)
    assert theirs.label_smoother is not None
    batch = ours._prepare_inputs(ours.data_collator([ours.train_dataset[i] for i in range(6)]))
    batch["labels"][0, -2:] = -100  # rows with fewer supervised tokens: the denominators differ per row
    n_items = batch["labels"][:, 1:].ne(-100).sum() + 3 if counted else None
    losses, grads = [], []
    for trainer, inputs in ((ours, batch), (theirs, {k: v for k, v in batch.items() if k != "answer_mask"})):
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=n_items)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in trainer.model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    plain = _trainer(setup, tmp_path / "plain", config=config)  # the same starting weights, ε = 0
    plain.model.train()  # a training call (grad on), so its statistics enter the window
    unsmoothed = plain.compute_loss(plain.model, dict(batch), num_items_in_batch=n_items).detach()
    assert abs(float(unsmoothed) - float(losses[0])) > 1e-3  # smoothing changed the loss
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
    _assert_same_statistics(fused_loss_of(ours.model).window, fused_loss_of(plain.model).window)


def _assert_same_statistics(smoothed, plain):
    """The token and Full-ECE statistics describe softmax(z), which label smoothing does not change."""
    for name in ("token", "full"):
        got, want = getattr(smoothed, f"{name}_stats"), getattr(plain, f"{name}_stats")
        assert torch.equal(got.counts, want.counts) and torch.equal(got.sum_correct, want.sum_correct), name
        torch.testing.assert_close(got.sum_conf, want.sum_conf, atol=1e-5, rtol=1e-6)


def test_label_smoothing_with_token_cft(setup, tmp_path):
    """token_cft's term folds into the smoothed gradient: one training loss is sft · CE_ε + lam · L_cal, with CE_ε
    the smoothed cross-entropy (calibration off) and L_cal the term of the unsmoothed run."""
    tokenizer, option_ids, _ = setup
    runs = {}
    for name, lam, epsilon in (("term", 0.5, 0.1), ("ce", 0.0, 0.1), ("plain", 0.5, 0.0)):
        config = CalibrationConfig(method="token_cft", bin_accuracy=BIN_ACCURACY, lam=lam, full_stats=True,
                                   check_logits=False)
        trainer = _trainer(setup, tmp_path / name, method="token_cft", config=config,
                           label_smoothing_factor=epsilon)
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
        trainer.model.train()
        runs[name] = (trainer, trainer.compute_loss(trainer.model, dict(batch)))
    (term, loss), (ce, ce_loss), (plain, _) = runs["term"], runs["ce"], runs["plain"]
    window, plain_window = fused_loss_of(term.model).window, fused_loss_of(plain.model).window
    cal = plain_window.cal_sum / plain_window.calls
    torch.testing.assert_close(loss.detach(), ce_loss.detach() + 0.5 * cal.to(loss.dtype), atol=1e-6, rtol=1e-6)
    _assert_same_statistics(window, plain_window)
