"""Token-level evaluation of a causal LM on text rows against its own full logits in float64; the trainer's
token_cft method and token telemetry."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import calibkern  # noqa: E402
from calibkern import BinStats  # noqa: E402
from calibkern.hf import CalibrationConfig, CalibrationTrainer, build_sft_dataset  # noqa: E402
from calibkern.hf.data import MCQCollator, MCQDataError, detect_option_ids  # noqa: E402
from calibkern.hf.modeling import decoder_forward  # noqa: E402
from calibkern.hf.token_evaluation import (  # noqa: E402
    encode_text_row,
    evaluate_tokens,
    load_text_rows,
    write_token_evaluation,
)
from calibkern.reference import bin_index  # noqa: E402
from hf_tiny import make_examples, make_model, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = [{"text": "which goes with red 3? Answer: B"}, {"prompt": "which goes with the", "completion": " blue moon"},
        {"text": "the cat and the dog and the star and the fish and the bird"}]


def direct(model, tokenizer, rows, n_bins=10):
    """Token and Full-ECE statistics and the NLL from ``model(input_ids).logits`` in float64, row by row."""
    token, full, nll, n = BinStats.empty(n_bins), BinStats.empty(n_bins), 0.0, 0
    for row in rows:
        encoded = encode_text_row(tokenizer, row)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([encoded["input_ids"]])).logits[0, :-1].double()
        labels = torch.tensor(encoded["labels"][1:])
        keep = labels != -100
        logits, labels = logits[keep], labels[keep]
        p = torch.softmax(logits, 1)
        conf, pred = p.max(1).values, logits.argmax(1)
        token = token + BinStats.from_confidences(conf, pred == labels, n_bins)
        full_bins = bin_index(p, n_bins).reshape(-1)
        full = full + BinStats.from_bins(full_bins, p.reshape(-1), F.one_hot(labels, p.shape[1]).reshape(-1), n_bins)
        nll += float(F.cross_entropy(logits, labels, reduction="sum"))
        n += int(keep.sum())
    return token, full, nll / n


def test_metrics_equal_the_model_s_own_logits(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer).eval()
    result = evaluate_tokens(model, tokenizer, ROWS, batch_size=2, progress=False)
    token, full, nll = direct(model, tokenizer, ROWS)
    assert torch.equal(result.token_stats.counts, token.counts)
    assert torch.equal(result.token_stats.sum_correct, token.sum_correct)
    assert torch.equal(result.full_stats.counts, full.counts)
    torch.testing.assert_close(result.full_stats.sum_conf, full.sum_conf, atol=1e-5, rtol=1e-5)
    metrics = result.metrics
    assert metrics["n_tokens"] == int(token.total()) and metrics["n_skipped"] == 0
    for key, want in (("token_ece", token.ece()), ("token_accuracy", token.accuracy()),
                      ("token_confidence", token.mean_confidence()), ("full_ece", full.ece()), ("nll", nll)):
        assert metrics[key] == pytest.approx(float(want), abs=1e-5), key
    write_token_evaluation(result, tmp_path)
    written = json.loads((tmp_path / "token_metrics.json").read_text())
    assert written["token_ece"] == metrics["token_ece"] and sum(written["reliability"]["counts"]) == metrics["n_tokens"]
    assert (tmp_path / "token_reliability.png").stat().st_size > 0


def test_completion_only_scores_the_completion():
    tokenizer = make_tokenizer()
    encoded = encode_text_row(tokenizer, {"prompt": "which goes with the", "completion": " blue moon"})
    completion = tokenizer(" blue moon")["input_ids"]
    assert encoded["labels"][-len(completion):] == completion
    assert encoded["labels"][:-len(completion)] == [-100] * (len(encoded["labels"]) - len(completion))


def test_load_text_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a b"}\n\n{"prompt": "q", "completion": " a"}\n')
    assert load_text_rows(path) == [{"text": "a b"}, {"prompt": "q", "completion": " a"}]
    for bad in ('{"question": "x"}', '{"text": ""}', '{"prompt": 1, "completion": "a"}', "[1]", "{"):
        path.write_text(bad + "\n")
        with pytest.raises(MCQDataError, match="rows.jsonl:1"):
            load_text_rows(path)


def test_cli_evaluate_token_level(tmp_path, capsys):
    from calibkern.cli import main

    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    args = ["evaluate", "--token-level", "--model", str(tmp_path / "model"), "--data", str(data), "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "token_metrics.json").read_text())
    assert metrics["n_tokens"] > 0 and 0.0 <= metrics["full_ece"] <= metrics["token_ece"] + 1.0
    assert "token ECE" in capsys.readouterr().out
    assert main(args[:4] + ["--out", str(tmp_path / "bad")]) == 2
    assert main(args + ["--out", str(tmp_path / "bad"), "--temperature", "2"]) == 2
    assert "--temperature" in capsys.readouterr().err


def _trainer(tmp_path, config, supervise="full"):
    from transformers import TrainingArguments

    tokenizer = make_tokenizer()
    dataset = build_sft_dataset(tokenizer, make_examples(8), detect_option_ids(tokenizer, 4), supervise=supervise)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             num_train_epochs=1, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    return CalibrationTrainer(make_model(tokenizer), args, dataset, calibration=config), dataset


def test_token_cft_bin_accuracy_is_the_starting_model_s_token_statistics(tmp_path):
    trainer, dataset = _trainer(tmp_path, CalibrationConfig(method="token_cft", lam=2.0, check_logits=False))
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        hidden, weight, bias, _ = decoder_forward(trainer.model, batch)
        start = calibkern.fused_linear_calibration_loss(hidden, weight, batch["labels"], option_ids=None, bias=bias,
                                                        calibration=None, token_stats=True).token_stats
    trainer.train()
    torch.testing.assert_close(trainer.bin_accuracy, start.bin_accuracy())
    logged = [entry for entry in trainer.state.log_history if "token_ece" in entry]
    assert len(logged) == 2 and all("calib_ece" not in entry and entry["calib_term"] > 0 for entry in logged)
    assert all(0.0 <= entry[key] <= 1.0 for entry in logged
               for key in ("token_ece", "token_accuracy", "token_confidence"))


def test_cft_logs_token_telemetry_and_full_ece(tmp_path):
    tokenizer = make_tokenizer()
    config = CalibrationConfig(method="cft", option_ids=detect_option_ids(tokenizer, 4), bin_accuracy=[0.5] * 10,
                               full_stats=True, check_logits=False)
    trainer, _ = _trainer(tmp_path, config, supervise="completion")
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "token_ece" in entry]
    assert logged and all({"calib_ece", "token_accuracy", "token_confidence", "full_ece"} <= set(entry)
                          for entry in logged)


@pytest.mark.parametrize("changes, error, name", [
    ({"method": "cft"}, ValueError, "option_ids"),
    ({"method": "rcft"}, ValueError, "option_ids"),
    ({"token_stats": 1}, TypeError, "token_stats"),
    ({"bin_accuracy": [0.5] * 3}, ValueError, "bin_accuracy"),
    ({"em": {"refresh": "stream"}}, ValueError, "em"),
])
def test_config_errors(changes, error, name):
    with pytest.raises(error, match=name):
        CalibrationConfig(**{"method": "token_cft", **changes})


def test_apply_fused_loss_returns_token_statistics():
    from calibkern.hf import apply_fused_loss

    tokenizer = make_tokenizer()
    dataset = build_sft_dataset(tokenizer, make_examples(4), detect_option_ids(tokenizer, 4), supervise="full")
    batch = MCQCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    model = make_model(tokenizer)
    with torch.no_grad():
        hidden, weight, bias, _ = decoder_forward(model, batch)
        want = calibkern.fused_linear_calibration_loss(hidden, weight, batch["labels"], option_ids=None, bias=bias,
                                                       calibration=None, token_stats=True)
        out = apply_fused_loss(model)(**batch)
    assert out.full_stats is None
    assert torch.equal(out.token_stats.counts, want.token_stats.counts)
    torch.testing.assert_close(out.token_stats.sum_conf, want.token_stats.sum_conf)
    torch.testing.assert_close(out.loss, want.loss)
