"""Evaluation equals a direct forward pass; metrics and predictions files; baselines; the DPO stage."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

import calibkern  # noqa: E402
from calibkern.hf import (  # noqa: E402
    PreferencePair,
    evaluate,
    fit_temperature,
    preference_dataset,
    temperature_scaling,
    train_dpo,
    write_evaluation,
)
from helpers import METRIC_KEYS  # noqa: E402
from calibkern.hf.data import MCQExample, detect_option_ids, format_prompt  # noqa: E402
from hf_tiny import make_examples, make_model, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    examples = make_examples(10, seed=3)
    # different prompt lengths, so the batch is padded
    examples.append(MCQExample("a much longer question about the red moon and the blue sun?", ("a", "b", "c", "d"), 1))
    return tokenizer, detect_option_ids(tokenizer, 4), examples


def test_probabilities_equal_a_direct_forward_pass(setup, tmp_path):
    tokenizer, option_ids, examples = setup
    model = make_model(tokenizer, seed=1)
    result = evaluate(model, tokenizer, examples, batch_size=4, progress=False)
    assert model.training  # the training mode is restored
    model.eval()
    with torch.no_grad():
        for example, prediction in zip(examples, result.predictions):
            ids = tokenizer(format_prompt(example), return_tensors="pt")["input_ids"]
            expected = model(ids).logits[0, -1, option_ids].softmax(-1)
            torch.testing.assert_close(torch.tensor(prediction["probs"]), expected, atol=1e-5, rtol=1e-5)
            assert prediction["pred"] == int(expected.argmax()) and prediction["label"] == example.answer
            assert prediction["confidence"] == pytest.approx(float(expected.max()), abs=1e-5)

    assert set(result.metrics) == METRIC_KEYS and result.metrics["n"] == len(examples)
    assert result.metrics["ece"] == pytest.approx(float(calibkern.ece(result.option_logits, result.labels, 10)))
    assert result.metrics["smece"] == float(calibkern.smooth_ece(result.option_logits, result.labels))
    low, high = result.metrics["ece_ci"]
    assert low <= high
    write_evaluation(result, tmp_path)
    assert set(json.loads((tmp_path / "metrics.json").read_text())) == METRIC_KEYS
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(examples) and set(json.loads(lines[0])) == {"probs", "pred", "label", "confidence"}


def test_evaluation_needs_one_number_of_options(setup):
    tokenizer, option_ids, examples = setup
    mixed = examples[:2] + [MCQExample("q?", ("a", "b"), 0, source="f.jsonl:9")]
    with pytest.raises(ValueError, match="f.jsonl:9: 2 choices"):
        evaluate(make_model(tokenizer), tokenizer, mixed, option_ids, progress=False)


def test_fit_temperature_recovers_the_generating_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 4, generator=generator) * 2.0
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
    # the model is over-confident by a factor 3: T ≈ 3 brings it back
    temperature = fit_temperature(logits * 3.0, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    tempered = calibkern.nll(logits * 3.0, labels, temperature=temperature)
    assert tempered < calibkern.nll(logits * 3.0, labels)


def test_temperature_scaling_keeps_accuracy(setup):
    tokenizer, option_ids, examples = setup
    model = make_model(tokenizer, seed=2)
    temperature, result = temperature_scaling(model, tokenizer, examples[:6], examples[6:], option_ids, progress=False)
    plain = evaluate(model, tokenizer, examples[6:], option_ids, progress=False)
    assert result.metrics["temperature"] == temperature != 1.0
    assert result.metrics["accuracy"] == plain.metrics["accuracy"]


def test_alignment_uses_trl_dpo_trainer(setup, tmp_path):
    import trl

    tokenizer, option_ids, examples = setup
    model = make_model(tokenizer, seed=4)
    pairs = [PreferencePair(e, e.answer, (e.answer + 1) % 4) for e in examples[:8]]
    dataset = preference_dataset(pairs)
    assert dataset[0]["chosen"] == " " + "ABCD"[examples[0].answer] and dataset[0]["prompt"].endswith("### Answer:")
    before = evaluate(model, tokenizer, examples[:8], option_ids, progress=False)
    trainer = train_dpo(
        model, tokenizer, dataset, output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
        learning_rate=1e-2, disable_tqdm=True,
    )
    assert type(trainer) is trl.DPOTrainer
    after = evaluate(trainer.model, tokenizer, examples[:8], option_ids, progress=False)
    chosen = [pair.chosen for pair in pairs]
    p_before = torch.tensor([p["probs"][c] for p, c in zip(before.predictions, chosen)])
    p_after = torch.tensor([p["probs"][c] for p, c in zip(after.predictions, chosen)])
    assert p_after.mean() > p_before.mean()  # DPO moved probability onto the chosen answers
    with pytest.raises(ValueError, match="two different options"):
        PreferencePair(examples[0], 1, 1)


def test_label_smoothing_baseline_trains_with_the_smoothing_factor(setup, tmp_path):
    from transformers import TrainingArguments

    from calibkern.hf import build_sft_dataset, train_label_smoothing

    tokenizer, option_ids, examples = setup
    dataset = build_sft_dataset(tokenizer, examples[:8], option_ids)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True,
    )
    model = make_model(tokenizer, seed=5)
    before = model.lm_head.weight.detach().clone()
    trainer = train_label_smoothing(model, dataset, args, epsilon=0.2, tokenizer=tokenizer)
    assert trainer.label_smoother is not None and trainer.label_smoother.epsilon == 0.2
    assert not torch.equal(model.lm_head.weight, before)
