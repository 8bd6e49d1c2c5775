"""The command-line contract: every subcommand turns a user error into ``calibkern: error: <what, where>`` on
stderr with exit status 2, never a traceback; ``--debug`` shows the traceback instead."""

import json

import pytest

pytest.importorskip("transformers")

from calibkern.cli import main  # noqa: E402

GOOD_ROW = {"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 1}


@pytest.fixture()
def files(tmp_path):
    """Paths the bad inputs are made of: good and broken data files, a file, a model directory with a
    malformed config.json, a malformed YAML and results.json."""
    (tmp_path / "good.jsonl").write_text(json.dumps(GOOD_ROW) + "\n", encoding="utf-8")
    (tmp_path / "good.csv").write_text("question,A,B,answer\nWhich?,x,y,B\n", encoding="utf-8")
    (tmp_path / "superscript.csv").write_text("question,A,B,answer\nWhich?,x,y,²\n", encoding="utf-8")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD_ROW).encode() + b"\n" + b'{"question": "caf\xe9"}\n')
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "bad_model").mkdir()
    (tmp_path / "bad_model" / "config.json").write_text("{ not json")
    (tmp_path / "bad_model" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "config.json").write_text("{}")
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "lora.yaml").write_text("model: m\nlora: {rank: 4}\ndata: {pairs: p, train: t, calibration: c, test: t}\n")
    (tmp_path / "data_list.yaml").write_text("model: m\ndata: [train.jsonl]\n")
    (tmp_path / "epochs.yaml").write_text("model: m\ndata: {pairs: p, train: t, calibration: c, test: t}\n"
                                          "cft: {epochs: two}\n")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "results.json").write_text("{}")
    (tmp_path / "escaping").mkdir()
    (tmp_path / "escaping" / "results.json").write_text(json.dumps({"stages": {"x/../../victim/evil": {}}}))
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "template.yaml").write_text(
        "model: m\ntemplate: '{question} {options} {foo}'\ndata: {pairs: p, train: t, calibration: c, test: t}\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("[1, 2")
    names = ("good.jsonl", "good.csv", "superscript.csv", "latin1.jsonl", "a_file", "bad_model", "bad.yaml",
             "template.yaml", "run", "missing", "out", "no_tokenizer", "deep.jsonl", "lora.yaml", "data_list.yaml",
             "epochs.yaml", "earlier", "escaping")
    return {name.replace(".", "_"): str(tmp_path / name) for name in names}


# (subcommand arguments with {placeholders} from `files`, a fragment the message must hold)
CASES = [
    ("evaluate --model {bad_model} --data {good_jsonl} --out {out} --template '{{question}} {{options}} {{foo}}'",
     "unknown field {foo}"),
    ("evaluate --model {bad_model} --data {good_jsonl} --out {out} --template '{{question}} {{options}} {{0}}'",
     "unknown field {0}"),
    ("evaluate --model {bad_model} --data {good_jsonl} --out {out} --template 'Q: {{question}}'",
     "must contain {options}"),
    ("evaluate --model {bad_model} --data {good_jsonl} --out {out} --template '{{question}} {{options'",
     "not a valid format string"),
    ("evaluate --model {bad_model} --data {good_jsonl} --out {a_file}", "exists and is not a directory"),
    ("evaluate --model {bad_model} --data {good_jsonl} --out {out} --n-bins 0", "--n-bins must be ≥ 1"),
    ("evaluate --model {missing} --data {good_jsonl} --out {out}", "model directory not found"),
    ("evaluate --model {bad_model} --data {good_jsonl} --out {out}", "bad_model: cannot load the model"),
    ("evaluate --model {bad_model} --data {missing} --out {out}", "data file not found"),
    ("evaluate --model {bad_model} --data {superscript_csv} --out {out}", "superscript.csv:2: answer"),
    ("evaluate --model {bad_model} --data {latin1_jsonl} --out {out}", "latin1.jsonl:2: not valid UTF-8"),
    ("align --model {bad_model} --data {good_csv} --out {out}", "preference pairs must be JSONL"),
    ("align --model {bad_model} --data {good_jsonl} --out {a_file}", "exists and is not a directory"),
    ("baselines --model {bad_model} --data {good_jsonl} --calibration-data {missing} --train-data {good_jsonl} "
     "--out {out}", "data file not found"),
    ("cft --model {bad_model} --data {good_jsonl} --out {out} --template '{{options}}'", "must contain {question}"),
    ("rcft --model {missing} --data {good_jsonl} --calibration-data {good_jsonl} --out {out}",
     "model directory not found"),
    ("pipeline --config {missing}", "config file not found"),
    ("pipeline --config {bad_yaml}", "malformed YAML"),
    ("pipeline --config {template_yaml}", "template.yaml: template"),
    ("report {missing}", "no results.json"),
    ("report {run}", "results.json:1: malformed JSON"),
    ("demo --out {a_file}", "exists and is not a directory"),
    ("demo --out {out} --set no_such_field=1", "expected KEY=VALUE"),
    ("demo --out {out} --set seed=abc", "seed"),
    ("demo --out {out} --n-bins 0", "--n-bins must be ≥ 1"),
    ("demo --out {out} --seeds 0,x", "--seeds must be comma-separated integers"),
    ("demo --out {out} --seeds 1,1", "--seeds must be distinct non-negative integers"),
    ("demo --out {out} --seeds=-1", "--seeds must be distinct non-negative integers"),
    ("evaluate --model {no_tokenizer} --data {good_jsonl} --out {out}", "no_tokenizer: no tokenizer files"),
    ("evaluate --model {bad_model} --data {deep_jsonl} --out {out}", "deep.jsonl:1: JSON nested too deeply"),
    ("evaluate --model {bad_model} --data {good_jsonl} --out {out} --n-bins 3000000000",
     "--n-bins = 3,000,000,000 is too large"),
    (f"evaluate --model {{bad_model}} --data {{good_jsonl}} --out {{out}} --n-bins {2**62}", "is too large"),
    ("evaluate --model {bad_model} --data {good_jsonl} --out /proc/nope/x", "--out /proc/nope/x: cannot write there"),
    ("evaluate --model {bad_model} --data {good_jsonl} --out {earlier}", "already holds an interrupted run"),
    ("cft --model {bad_model} --data {good_jsonl} --out {bad_model}", "is or contains the input"),
    ("demo --out {earlier}", "pass --overwrite"),
    ("pipeline --config {lora_yaml}", "lora.yaml: unknown lora key(s) rank"),
    ("pipeline --config {data_list_yaml}", "data_list.yaml: data must be a mapping, got list"),
    ("pipeline --config {epochs_yaml}", "epochs.yaml: cft.epochs must be a number, got str 'two'"),
    ("report {escaping}", "stage name: 'x/../../victim/evil' is not a plain file name"),
    ("report {earlier}", "expected an object with a 'stages' object"),
]


@pytest.mark.parametrize("command, fragment", CASES, ids=[f"{c.split()[0]}-{i}" for i, (c, _) in enumerate(CASES)])
def test_user_errors_exit_2_with_one_line(files, capsys, command, fragment):
    import shlex

    argv = [part.format(**files) for part in shlex.split(command)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibkern: error: ") and "Traceback" not in err, err
    assert fragment in err, err


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="unknown field"):
        main(["--debug", "evaluate", "--model", files["bad_model"], "--data", files["good_jsonl"], "--out",
              files["out"], "--template", "{question} {options} {foo}"])


@pytest.mark.parametrize("variable, value, command", [
    ("CALIBKERN_BACKEND", "bogus", ["info"]),
    ("CALIBKERN_JIT", "no", ["info"]),
    ("CALIBKERN_BACKEND", "bogus", ["report", "nowhere"]),
])
def test_environment_values_are_checked(monkeypatch, capsys, variable, value, command):
    monkeypatch.setenv(variable, value)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"calibkern: error: {variable}={value!r} is ") and "Traceback" not in err, err


def test_template_escapes_are_read():
    from calibkern.cli import TEMPLATE_HELP, read_escapes
    from calibkern.hf.data import DEFAULT_TEMPLATE

    assert "'" + DEFAULT_TEMPLATE.replace("\n", "\\n") + "'" in TEMPLATE_HELP  # the default the help shows

    assert read_escapes(r"{question}\n{options}\tAnswer: \\n") == "{question}\n{options}\tAnswer: \\n"


def test_a_csv_cell_over_128_kib_is_read(tmp_path):
    from calibkern.hf.data import load_mcq

    passage = "word " * 60_000  # 300 KB, past csv's default field limit of 128 KiB
    (tmp_path / "long.csv").write_text(f"question,A,B,answer\n{passage},x,y,B\n", encoding="utf-8")
    assert [(e.question, e.answer) for e in load_mcq(tmp_path / "long.csv")] == [(passage, 1)]


def test_bin_and_resample_counts_beyond_memory_are_refused_up_front():
    """The API's bounds (calibkern/_validate.py): n_bins past a quarter of the machine's memory at 64 bytes a bin
    (or 2³¹), and n_boot × n_bins past it at 24 bytes each, are a ValueError saying how much memory they would
    take, before anything is allocated."""
    import torch

    import calibkern
    from calibkern import _validate

    logits, labels = torch.randn(8, 4), torch.randint(0, 4, (8,))
    too_many_bins = _validate.MEMORY_BYTES // 256 + 1
    for n_bins in (min(too_many_bins, 2**31), 2**62):
        with pytest.raises(ValueError, match="n_bins = .* is too large: the per-bin statistics would take"):
            calibkern.ece(logits, labels, n_bins=n_bins)
    too_many_replicates = min(_validate.MEMORY_BYTES // (4 * 24 * 10) + 1, 2**31)
    with pytest.raises(ValueError, match=f"n_boot = {too_many_replicates:,} is too large"):
        calibkern.ece_confidence_interval(logits, labels, n_boot=too_many_replicates)
    with pytest.raises(ValueError, match=f"n_boot = {too_many_replicates:,} is too large"):
        calibkern.binned_stats(logits, labels).confidence_interval(n_boot=too_many_replicates)
    assert calibkern.ece_confidence_interval(logits, labels, n_boot=100).low <= 1.0
