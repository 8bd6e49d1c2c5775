"""The ``calibkern`` program: every subcommand on a tiny model, and errors that name the bad file."""

import json
import runpy
import sys

import pytest

pytest.importorskip("trl")

from calibkern.cli import main  # noqa: E402
from calibkern.pipeline import DemoConfig, build_world  # noqa: E402
from calibkern.pipeline.demo import tokenizer_corpus, write_splits  # noqa: E402
from calibkern.pipeline.model import tiny_llama  # noqa: E402
from calibkern.pipeline.stages import save_model  # noqa: E402
from calibkern.pipeline.tokenizer import train_tokenizer  # noqa: E402

TEMPLATE = DemoConfig.small().template
TRAINING = ["--epochs", "1", "--batch-size", "16", "--no-progress", "--template", TEMPLATE]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny model and the small demo's splits as JSONL files."""
    root = tmp_path_factory.mktemp("cli")
    config = DemoConfig.small()
    world = build_world(config)
    world.pairs = world.pairs[:16]
    tokenizer = train_tokenizer(tokenizer_corpus(world, config.template), config.vocab_size)
    save_model(tiny_llama(tokenizer), tokenizer, root / "model")
    write_splits(world, str(root / "data"))
    return root


def test_help_runs_as_a_module(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["calibkern", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("calibkern", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "align", "evaluate", "baselines", "cft", "rcft", "pipeline", "report"):
        assert command in out


def test_evaluate_writes_metrics_and_predictions(workspace):
    out = workspace / "eval"
    data = workspace / "data" / "test.jsonl"
    assert main(["evaluate", "--model", str(workspace / "model"), "--data", str(data), "--out", str(out),
                 "--template", TEMPLATE, "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ece", "ece_debiased", "ece_l2", "mce", "cw_ece", "accuracy", "mean_confidence", "nll", "brier", "n",
            "ece_ci"} <= set(metrics)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["n"] == len(data.read_text().splitlines())
    assert set(rows[0]) == {"probs", "pred", "label", "confidence"}


def test_training_subcommands_write_loadable_models(workspace, capsys):
    model, data = str(workspace / "model"), workspace / "data"
    assert main(["align", "--model", model, "--data", str(data / "pairs.jsonl"), "--out", str(workspace / "dpo"),
                 *TRAINING]) == 0
    assert main(["cft", "--model", str(workspace / "dpo"), "--data", str(data / "cft.jsonl"),
                 "--out", str(workspace / "cft"), *TRAINING]) == 0
    assert main(["rcft", "--model", str(workspace / "dpo"), "--data", str(data / "new.jsonl"),
                 "--calibration-data", str(data / "calibration.jsonl"), "--out", str(workspace / "rcft"),
                 "--lora-r", "2", *TRAINING]) == 0
    assert main(["baselines", "--model", str(workspace / "dpo"), "--data", str(data / "test.jsonl"),
                 "--calibration-data", str(data / "calibration.jsonl"), "--train-data", str(data / "cft.jsonl"),
                 "--out", str(workspace / "baselines"), *TRAINING]) == 0
    for directory in ("dpo", "cft", "rcft", "baselines/label_smoothing/model"):
        assert (workspace / directory / "config.json").is_file(), directory
    scaled = json.loads((workspace / "baselines" / "temperature_scaling" / "metrics.json").read_text())
    assert scaled["temperature"] > 0
    printed = capsys.readouterr()
    assert "train_runtime" not in printed.out + printed.err  # --no-progress: no trainer logs on the console


def test_pipeline_from_yaml_then_report(workspace):
    data = workspace / "data"
    out = workspace / "pipeline"
    config = workspace / "pipeline.yaml"
    stage = {"epochs": 1, "batch_size": 16}
    config.write_text(json.dumps({  # JSON is YAML
        "model": str(workspace / "model"), "out": str(out), "template": TEMPLATE,
        "data": {"pairs": str(data / "pairs.jsonl"), "train": str(data / "cft.jsonl"), "new": str(data / "new.jsonl"),
                 "calibration": str(data / "calibration.jsonl"), "test": str(data / "test.jsonl")},
        "dpo": stage, "cft": {**stage, "bin_prior": 2.0}, "label_smoothing": stage,
        "rcft": {**stage, "refresh_steps": 1}}))
    assert main(["pipeline", "--config", str(config), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["stages"]) == {"base", "dpo", "temperature_scaling", "label_smoothing", "cft", "rcft",
                                      "rcft_no_reg"}
    (out / "results.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").is_file() and (out / "reliability_all.png").is_file()


@pytest.mark.parametrize("command", ["evaluate", "cft"])
def test_missing_model_directory_is_named(workspace, tmp_path, capsys, command):
    missing = tmp_path / "no-such-model"
    extra = TRAINING if command == "cft" else ["--no-progress"]
    status = main([command, "--model", str(missing), "--data", str(workspace / "data" / "test.jsonl"),
                   "--out", str(tmp_path / "out"), *extra])
    assert status != 0
    assert str(missing) in capsys.readouterr().err


def test_missing_data_file_is_named(workspace, tmp_path, capsys):
    missing = tmp_path / "absent.jsonl"
    assert main(["evaluate", "--model", str(workspace / "model"), "--data", str(missing),
                 "--out", str(tmp_path / "out")]) != 0
    assert str(missing) in capsys.readouterr().err


def test_malformed_row_names_file_and_line(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n'
                   '{"question": "q", "choices": ["a", "b"], "answer": "E"}\n')
    assert main(["evaluate", "--model", str(workspace / "model"), "--data", str(bad),
                 "--out", str(tmp_path / "out")]) != 0
    assert f"{bad}:2" in capsys.readouterr().err


def test_bad_rejected_option_names_file_and_line(workspace, tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0, "rejected": 0}\n')
    assert main(["align", "--model", str(workspace / "model"), "--data", str(bad), "--out", str(tmp_path / "o"),
                 *TRAINING]) != 0
    assert f"{bad}:1" in capsys.readouterr().err


def test_pipeline_config_errors_name_the_file(tmp_path, capsys):
    missing = tmp_path / "absent.yaml"
    assert main(["pipeline", "--config", str(missing)]) != 0
    assert str(missing) in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("model: m\nmodle: typo\n")
    assert main(["pipeline", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert str(config) in err and "modle" in err


def test_report_without_results_names_the_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) != 0
    assert "results.json" in capsys.readouterr().err


def test_unknown_demo_override_is_an_error(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--set", "nonsense=1"]) != 0
    assert "nonsense" in capsys.readouterr().err
