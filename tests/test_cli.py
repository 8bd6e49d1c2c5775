"""The ``calibkern`` program: every subcommand on a tiny model, and errors that name the bad file."""

import errno
import json
import os
import runpy
import sys
from pathlib import Path

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
    # --no-progress: no trainer logs, progress bars or library warnings on the console
    assert "train_runtime" not in printed.out + printed.err
    assert "it/s]" not in printed.err and "Warning" not in printed.err, printed.err


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


# ---- models remember their template ----------------------------------------------------------------------------------

def test_evaluate_uses_the_template_a_model_was_trained_with(workspace, capsys):
    """``calibkern cft`` records its template beside the model; ``calibkern evaluate`` without ``--template`` uses
    it (and says so) and reproduces the numbers of an evaluation with that template; another template is warned."""
    from calibkern import hf
    from calibkern.pipeline import io, stages

    model, data = workspace / "cft_recorded", workspace / "data"
    assert main(["cft", "--model", str(workspace / "model"), "--data", str(data / "cft.jsonl"), "--out", str(model),
                 *TRAINING]) == 0
    record = json.loads((model / io.TRAINING_RECORD).read_text())
    assert record["template"] == TEMPLATE and record["stage"] == "cft" and record["provenance"]["seed"] == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(data / "test.jsonl"), "--out",
                 str(workspace / "recorded_eval"), "--no-progress"]) == 0
    assert "using the template" in capsys.readouterr().err
    loaded, tokenizer = io.load_model(model)
    rows = hf.load_mcq(data / "test.jsonl")
    expected = stages.evaluate(loaded, tokenizer, rows, hf.detect_option_ids(tokenizer, 4, TEMPLATE),
                               template=TEMPLATE, progress=False).metrics
    metrics = json.loads((workspace / "recorded_eval" / "metrics.json").read_text())
    assert {k: metrics[k] for k in expected} == json.loads(json.dumps(expected))
    assert main(["evaluate", "--model", str(model), "--data", str(data / "test.jsonl"), "--out",
                 str(workspace / "other_eval"), "--no-progress", "--template", r"Q: {question}\n{options}\nA:"]) == 0
    assert "warning: --template 'Q: {question}\\n{options}\\nA:' differs" in capsys.readouterr().err


# ---- output folders --------------------------------------------------------------------------------------------------

def _evaluate_into(workspace, out, *extra):
    return main(["evaluate", "--model", str(workspace / "model"), "--data", str(workspace / "data" / "test.jsonl"),
                 "--out", str(out), "--template", TEMPLATE, "--no-progress", *extra])


def test_earlier_results_are_replaced_only_with_overwrite(workspace, tmp_path, capsys):
    from calibkern.pipeline.outputs import MARKER

    out = tmp_path / "eval"
    assert _evaluate_into(workspace, out) == 0
    first = json.loads((out / MARKER).read_text())
    assert first["command"] == "evaluate"
    assert _evaluate_into(workspace, out) == 2
    assert "already holds earlier results (metrics.json); pass --overwrite" in capsys.readouterr().err
    (out / "mine.txt").write_text("kept until --overwrite")
    assert _evaluate_into(workspace, out, "--overwrite") == 0
    assert not (out / "mine.txt").exists() and (out / "metrics.json").is_file() and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no partial folder, no lock left


def test_a_command_never_writes_over_its_input(workspace, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for path in (workspace / "model").iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for out in (model, tmp_path):
        status = main(["cft", "--model", str(model), "--data", str(workspace / "data" / "cft.jsonl"), "--out", str(out),
                       "--overwrite", *TRAINING])
        assert status == 2
        assert "is or contains the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


HOLD = """
import os, sys, time
from calibkern.pipeline.outputs import StagedOutput
with StagedOutput(sys.argv[1], overwrite=True) as staged:
    open(os.path.join(staged.path, "metrics.json"), "w").write("{}")
    print(staged.path, flush=True)
    time.sleep(60)
"""


def _holder(out):
    import subprocess

    process = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def test_a_second_run_on_the_same_folder_refuses_and_a_killed_one_leaves_the_old_folder(workspace, tmp_path, capsys):
    """Two runs at once: the second stops naming the first's pid. A run killed (SIGKILL) while writing leaves
    the earlier folder as it was and no lock; the next run clears its partial folder."""
    import signal

    out = tmp_path / "eval"
    assert _evaluate_into(workspace, out) == 0
    before = (out / "metrics.json").read_text()
    process, partial = _holder(out)
    try:
        assert _evaluate_into(workspace, out, "--overwrite") == 2
        assert f"another calibkern run (pid {process.pid}) is writing it" in capsys.readouterr().err
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (out / "metrics.json").read_text() == before and os.path.isdir(partial)
    assert _evaluate_into(workspace, out, "--overwrite") == 0
    assert not os.path.exists(partial) and sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_is_refused_naming_the_option(tmp_path, monkeypatch, code):
    """flock fails as on NFS without its lock service: the run stops before writing, naming --out and the way
    out; nothing is left beside the folder."""
    import fcntl

    from calibkern.pipeline.outputs import StagedOutput

    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ValueError, match=r"--out .*eval: cannot lock .*choose an --out on a file system with locks"):
        with StagedOutput(str(tmp_path / "eval")):
            pass
    assert {path.name for path in tmp_path.iterdir()} <= {".eval.lock"}  # no folder, no partial one


def test_an_error_while_writing_keeps_the_earlier_folder(tmp_path):
    from calibkern.pipeline.outputs import StagedOutput

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(out, overwrite=True) as staged:
            (Path(staged.path) / "results.json").write_text("new, half written")
            raise KeyboardInterrupt
    assert (out / "results.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("name", ["x/../../victim/evil", "..", "", "a\\b", "a\x00b", "."])
def test_names_from_inputs_stay_one_path_component(name):
    from calibkern.pipeline.outputs import check_name

    with pytest.raises(ValueError, match="stage name"):
        check_name(name, "stage name")
    assert check_name("rcft_no_reg", "stage name") == "rcft_no_reg"


# ---- the CLI without the hf extra ------------------------------------------------------------------------------------

HF_PACKAGES = ("transformers", "trl", "peft", "datasets", "accelerate", "tokenizers")


def test_info_help_and_report_run_without_transformers(tmp_path):
    """transformers and the other hf packages made unimportable (a finder on sys.meta_path, helpers.run_without):
    ``--help`` imports neither torch nor transformers, ``info`` and ``report`` work, an HF command names the extra."""
    import time

    from calibkern.pipeline.outputs import MARKER
    from helpers import run_without

    run = tmp_path / "run"
    run.mkdir()
    metrics = {"ece": 0.1, "accuracy": 0.5, "ece_ci": [0.05, 0.15], "n": 4}
    (run / "results.json").write_text(json.dumps({"stages": {"base": metrics}, "reliability": {"base": {
        "accuracy": [0.0, 0.5], "confidence": [0.0, 0.6], "counts": [0, 4]}}}))
    (run / MARKER).write_text("{}")

    def calibkern(*argv):
        return run_without(HF_PACKAGES, f"import sys; sys.argv = ['calibkern', *{list(argv)!r}]\n"
                                        "from calibkern.cli import main; sys.exit(main())")

    start = time.perf_counter()
    assert calibkern("--help").returncode == 0
    print(f"calibkern --help without transformers: {time.perf_counter() - start:.2f} s")
    loaded = run_without(HF_PACKAGES, "import sys; from calibkern.cli import build_parser; build_parser().format_help(); "
                                      "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))")
    assert loaded.stdout.strip() == "[]", loaded.stderr
    info = calibkern("info")
    assert info.returncode == 0 and "cpp" in info.stdout, info.stderr
    report = calibkern("report", str(run), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "reliability_base.png").is_file() and (tmp_path / "report" / MARKER).is_file()
    cft = calibkern("cft", "--model", "m", "--data", "d", "--out", "o")
    assert cft.returncode == 2 and "pip install 'calibkern[hf]'" in cft.stderr and "Traceback" not in cft.stderr
