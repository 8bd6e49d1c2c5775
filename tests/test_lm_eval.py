"""``calibkern evaluate --lm-eval``: lm-evaluation-harness samples files to calibration reports.

The round trip runs the real harness on a tiny local model and task and compares with ``calibkern.hf.evaluate``;
the other tests write samples lines by hand: mixed choice counts equal the rows one by one, normalisation,
the newest file per task, and every malformed input an error naming ``file:line`` or a counted skip.
"""

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

import calibkern  # noqa: E402
from calibkern.cli import main  # noqa: E402
from calibkern.integrations import lm_eval as ck_lm_eval  # noqa: E402

DATE = "2026-12-07T10-00-00.000001"


def sample_line(lls, target, *, doc_id=0, context="Q: which?\nA:", choices=None, metrics=("acc", "acc_norm"),
                filter_name="none"):
    """One lm-eval ``multiple_choice`` samples line as ``EvaluationTracker.save_results_samples`` writes it."""
    choices = choices or [chr(ord("A") + i) for i in range(len(lls))]
    return json.dumps({
        "doc_id": doc_id, "doc": {"q": doc_id}, "target": str(target),
        "arguments": {f"gen_args_{i}": {"arg_0": context, "arg_1": " " + c} for i, c in enumerate(choices)},
        "resps": [[[str(ll), "False"]] for ll in lls],
        "filtered_resps": [[str(ll), "False"] for ll in lls],
        "filter": filter_name, "metrics": list(metrics),
    })


def write_samples(directory, task, lines, date=DATE):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"samples_{task}_{date}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def mixed_rows(n=41, seed=0):
    """``n`` rows of 2 to 5 choices with random log-likelihoods and gold indices."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        k = 2 + i % 4
        lls = (torch.randn(k, generator=generator, dtype=torch.float64) * 2 - 8).tolist()
        rows.append((lls, int(torch.randint(k, (1,), generator=generator))))
    return rows


def test_mixed_choice_counts_equal_the_rows_one_by_one(tmp_path):
    rows = mixed_rows()
    path = write_samples(tmp_path, "mixed", [sample_line(lls, y, doc_id=i) for i, (lls, y) in enumerate(rows)])
    logits, labels = ck_lm_eval.read_samples(path)["mixed"]
    assert logits.dtype == torch.float64 and logits.shape == (41, 5)
    assert torch.isneginf(logits).sum() == sum(5 - len(lls) for lls, _ in rows)
    assert labels.tolist() == [y for _, y in rows]

    report = ck_lm_eval.evaluate_samples(tmp_path, n_bins=7, progress=False)
    metrics = report.results["mixed"].metrics
    one_by_one = [(torch.tensor([lls], dtype=torch.float64).float(), torch.tensor([y])) for lls, y in rows]
    stats = sum((calibkern.binned_stats(z, y, 7) for z, y in one_by_one[1:]), calibkern.binned_stats(*one_by_one[0], 7))
    assert metrics["n"] == 41
    assert metrics["ece"] == pytest.approx(float(stats.ece("l1")), abs=1e-6)
    assert metrics["ece_l2"] == pytest.approx(float(stats.ece("l2")), abs=1e-6)
    assert metrics["mce"] == pytest.approx(float(stats.mce()), abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(float(stats.accuracy()), abs=1e-12)
    assert metrics["mean_confidence"] == pytest.approx(float(stats.mean_confidence()), abs=1e-6)
    for name, fn in (("nll", calibkern.nll), ("brier", calibkern.brier)):
        assert metrics[name] == pytest.approx(sum(float(fn(z, y)) for z, y in one_by_one) / 41, abs=1e-6)

    predictions = report.results["mixed"].predictions
    for row, (lls, y) in zip(predictions, rows):
        assert row["probs"] == pytest.approx(torch.softmax(torch.tensor(lls), 0).tolist(), abs=1e-6)
        assert row["label"] == y and row["pred"] == max(range(len(lls)), key=lls.__getitem__)
    assert [row["doc_id"] for row in predictions] == list(range(41))
    assert report.micro == metrics  # one task: the micro-average is that task


def test_the_pads_stay_zero_under_any_temperature():
    logits = torch.tensor([[-3.0, -1e6, -math.inf], [-2.0, -5.0, -4.0]], dtype=torch.float64)
    for temperature in (0.05, 1.0, 40.0):
        z = ck_lm_eval.padded_option_logits(logits, temperature)
        assert z.dtype == torch.float32 and torch.isfinite(z).all()
        probs = torch.softmax(z / temperature, dim=-1)
        assert probs[0, 2] == 0 and probs[0, 0] == 1
        assert probs[1].tolist() == pytest.approx(torch.softmax(logits[1] / temperature, 0).tolist(), abs=1e-6)


def test_normalize_chars_divides_by_the_choice_length(tmp_path):
    lls, choices = [-6.0, -9.0, -30.0], ["no", "maybe", "a much longer answer"]
    write_samples(tmp_path, "norm", [sample_line(lls, "maybe", choices=choices)])  # a text target, as lm-eval maps it
    raw = ck_lm_eval.evaluate_samples(tmp_path, progress=False).results["norm"]
    norm = ck_lm_eval.evaluate_samples(tmp_path, normalize="chars", progress=False).results["norm"]
    expected = torch.softmax(torch.tensor([ll / len(c) for ll, c in zip(lls, choices)]), 0)
    assert norm.predictions[0]["probs"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert raw.predictions[0]["pred"] == 0 and norm.predictions[0]["pred"] == 2 and norm.labels.tolist() == [1]


def test_the_newest_file_per_task_is_read(tmp_path):
    write_samples(tmp_path / "model", "arc", [sample_line([-1.0, -2.0], 1)], date="2026-01-01T00-00-00.000001")
    newest = write_samples(tmp_path / "model", "arc", [sample_line([-1.0, -2.0], 0)])
    other = write_samples(tmp_path / "model", "hella_swag_x", [sample_line([-1.0, -2.0, -3.0], 2)])
    assert ck_lm_eval.find_samples_files(tmp_path) == {"arc": str(newest), "hella_swag_x": str(other)}
    assert ck_lm_eval.read_samples(tmp_path)["arc"][1].tolist() == [0]


def test_every_skip_is_counted_with_its_reason(tmp_path):
    run = tmp_path / "run"
    good = [sample_line([-1.0, -2.0, -3.0], i % 3, doc_id=i) for i in range(6)]
    write_samples(run, "good", good + [
        sample_line([-1.0, -2.0], 7, doc_id=6),               # not an index into the choices
        sample_line([-1.0, "nan"], 0, doc_id=7),              # a non-finite log-likelihood
        sample_line([-1.0, -2.0], "Paris", doc_id=8),         # neither an index nor a choice
        sample_line([-1.0, -2.0], 0, doc_id=9, filter_name="other"),
    ])
    write_samples(run, "multi_gold", [sample_line([-1.0, -2.0], 0), sample_line([-1.0, -2.0], [0, 1])])
    write_samples(run, "mutual_info", [sample_line([-1.0, -2.0, -1.5, -2.5], 0, metrics=("acc_mutual_info",))])
    write_samples(run, "generate", [json.dumps({"doc_id": 0, "target": "x", "filtered_resps": ["text"],
                                                "arguments": {"gen_args_0": {"arg_0": "Q", "arg_1": {"until": []}}}})])
    write_samples(run, "rolling", [json.dumps({"doc_id": 0, "target": "x", "filtered_resps": ["-12.5"],
                                               "arguments": {"gen_args_0": {"arg_0": "text"}}})])
    multiple_input = json.loads(sample_line([-1.0, -2.0], 0))
    multiple_input["arguments"]["gen_args_1"]["arg_0"] = "another context"
    write_samples(run, "winogrande_like", [json.dumps(multiple_input)])
    write_samples(run, "declared", [sample_line([-1.0, -2.0], 0)], date="2026-12-07T11-00-00.000001")
    (run / "results_2026-12-07T11-00-00.000001.json").write_text(
        json.dumps({"configs": {"declared": {"output_type": "generate_until"}}}), encoding="utf-8")

    out = tmp_path / "report"
    assert main(["evaluate", "--lm-eval", str(run), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    good_task = summary["tasks"]["good"]
    assert (good_task["rows_read"], good_task["rows_used"], good_task["rows_skipped"]) == (10, 6, 4)
    skipped = good_task["skipped_rows"]
    first = f"{run}/samples_good_{DATE}.jsonl:7"
    assert skipped["target is not an index into the choices"] == {"count": 2, "first": first}
    assert skipped["a log-likelihood is NaN or infinite"]["count"] == 1
    assert skipped["filter 'other' (the report reads filter 'none')"]["count"] == 1
    assert good_task["metrics"]["n"] == 6
    reasons = {task: t["skip_reason"] for task, t in summary["tasks"].items() if task != "good"}
    assert "multi-gold" in reasons["multi_gold"] and reasons["multi_gold"].endswith(".jsonl:2)")
    assert "acc_mutual_info" in reasons["mutual_info"]
    assert "generate_until" in reasons["generate"] and "generate_until" in reasons["declared"]
    assert "loglikelihood_rolling" in reasons["rolling"]
    assert "multiple-input" in reasons["winogrande_like"]
    for task, t in summary["tasks"].items():
        assert t["rows_used"] + t["rows_skipped"] == t["rows_read"] >= 1
        assert (out / task / "metrics.json").exists() == (task == "good")
    assert summary["micro_average"]["tasks"] == ["good"]
    markdown = (out / "summary.md").read_text()
    assert "multi_gold: task skipped" in markdown and "2 rows skipped: target is not an index" in markdown


def test_the_micro_average_pools_the_rows_of_every_task(tmp_path):
    rows = mixed_rows(24, seed=3)
    write_samples(tmp_path / "split", "a", [sample_line(lls, y) for lls, y in rows[:10]])
    write_samples(tmp_path / "split", "b", [sample_line(lls, y) for lls, y in rows[10:]])
    write_samples(tmp_path / "all", "ab", [sample_line(lls, y) for lls, y in rows])
    report = ck_lm_eval.evaluate_samples(tmp_path / "split", progress=False)
    pooled = ck_lm_eval.evaluate_samples(tmp_path / "all", progress=False)
    assert report.micro == pooled.results["ab"].metrics == pooled.micro


def test_cli_writes_the_report_files(tmp_path):
    write_samples(tmp_path / "run", "t", [sample_line(lls, y, doc_id=i) for i, (lls, y) in enumerate(mixed_rows(9))])
    out = tmp_path / "out"
    assert main(["evaluate", "--lm-eval", str(tmp_path / "run"), "--out", str(out), "--n-bins", "5",
                 "--no-progress"]) == 0
    metrics = json.loads((out / "t" / "metrics.json").read_text())
    expected = ck_lm_eval.evaluate_samples(tmp_path / "run", n_bins=5, progress=False).results["t"].metrics
    assert metrics == json.loads(json.dumps(expected))
    rows = [json.loads(line) for line in (out / "t" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and set(rows[0]) == {"probs", "pred", "label", "confidence", "doc_id"}
    assert (out / "t" / "reliability.png").stat().st_size > 0
    assert "| t | 9 | 9 | 0 |" in (out / "summary.md").read_text()


@pytest.mark.parametrize("content, fragment", [
    (sample_line([-1.0, -2.0], 0) + "\n{not json\n", ".jsonl:2: not a JSON line"),
    ('[1, 2]\n', ".jsonl:1: a samples line is a JSON object"),
    ('{"doc_id": 0, "target": "0"}\n', ".jsonl:1: no 'arguments' object or 'filtered_resps' list"),
    ('{"target": "0", "arguments": {"gen_args_0": {"arg_0": "q", "arg_1": " A"}}, "filtered_resps": []}\n',
     ".jsonl:1: 1 requests in 'arguments' but 0 'filtered_resps'"),
    ('{"target": "0", "arguments": {"gen_args_0": {"arg_0": "q", "arg_1": " A"}}, "filtered_resps": [["x"]]}\n',
     ".jsonl:1: filtered_resps[0] is not a log-likelihood"),
])
def test_malformed_lines_are_errors_naming_file_and_line(tmp_path, capsys, content, fragment):
    (tmp_path / f"samples_t_{DATE}.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        ck_lm_eval.load_task_samples(tmp_path / f"samples_t_{DATE}.jsonl")
    assert main(["evaluate", "--lm-eval", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibkern: error: ") and fragment in err and "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["--lm-eval", "{run}", "--model", "m"], "give it without --model and --data"),
    (["--model", "m"], "evaluate needs --model and --data, or --lm-eval PATH"),
    (["--model", "m", "--data", "d", "--normalize", "chars"], "--normalize applies to --lm-eval only"),
    (["--lm-eval", "{run}/missing"], "lm-eval output not found"),
    (["--lm-eval", "{run}", "--n-bins", "0"], "--n-bins must be ≥ 1"),
    (["--lm-eval", "{run}"], "no multiple-choice task could be evaluated"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, argv, fragment):
    write_samples(tmp_path / "run", "mi", [sample_line([-1.0, -2.0, -3.0, -4.0], 0, metrics=("acc_mutual_info",))])
    argv = [a.format(run=tmp_path / "run") for a in argv]
    assert main(["evaluate", *argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibkern: error: ") and fragment in err and "Traceback" not in err, err


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="normalize"):
        ck_lm_eval.evaluate_samples(tmp_path, normalize="bytes")
    with pytest.raises(FileNotFoundError, match="lm-eval output not found"):
        ck_lm_eval.read_samples(tmp_path / "missing")
    with pytest.raises(ValueError, match="no samples_"):
        ck_lm_eval.read_samples(tmp_path)


# ---- the real harness ---------------------------------------------------------------------------------------------

TASK_YAML = """task: tiny_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def run_lm_eval(model_dir, task_dir, out_dir):
    """``lm_eval --model hf --model_args pretrained=DIR --tasks tiny_mcq --include_path TASKS --log_samples
    --output_path OUT`` through the Python API, saving as the command line does (lm_eval's _cli/run.py)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    tracker = EvaluationTracker(output_path=str(out_dir))
    results = simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=["tiny_mcq"], device="cpu",
                              batch_size=8, log_samples=True, evaluation_tracker=tracker,
                              task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return results


def test_round_trip_through_the_real_harness(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from calibkern.hf.data import DEFAULT_TEMPLATE, format_prompt
    from calibkern.pipeline import io
    from hf_tiny import make_examples, make_model, make_tokenizer

    import datasets
    import huggingface_hub

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    # read at import: the flags themselves, so that nothing is fetched and the cache stays in tmp_path
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tokenizer = make_tokenizer()  # " A" … " D" are single tokens
    make_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    examples = make_examples(32, seed=5)
    (tmp_path / "task.jsonl").write_text("".join(
        json.dumps({"prompt": format_prompt(e, DEFAULT_TEMPLATE), "answer": e.answer}) + "\n" for e in examples))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mcq.yaml").write_text(TASK_YAML.format(data=tmp_path / "task.jsonl"))

    results = run_lm_eval(tmp_path / "model", tmp_path / "tasks", tmp_path / "lm_eval_out")
    out = tmp_path / "report"
    assert main(["evaluate", "--lm-eval", str(tmp_path / "lm_eval_out"), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "tiny_mcq" / "metrics.json").read_text())

    model, tokenizer = io.load_model(tmp_path / "model")
    expected = calibkern.hf.evaluate(model, tokenizer, examples, progress=False).metrics
    assert set(metrics) == set(expected)
    for name in ("ece", "ece_debiased", "ece_l2", "mce", "cw_ece", "accuracy", "mean_confidence", "nll", "brier"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-6), name
    assert metrics["n"] == expected["n"] == 32
    assert metrics["accuracy"] == pytest.approx(results["results"]["tiny_mcq"]["acc,none"], abs=1e-12)
    assert main(["evaluate", "--lm-eval", str(tmp_path / "lm_eval_out"), "--out", str(tmp_path / "norm"),
                 "--normalize", "chars", "--no-progress"]) == 0
    normalized = json.loads((tmp_path / "norm" / "tiny_mcq" / "metrics.json").read_text())
    assert normalized["accuracy"] == pytest.approx(results["results"]["tiny_mcq"]["acc_norm,none"], abs=1e-12)

    samples_file, = (tmp_path / "lm_eval_out").rglob("samples_tiny_mcq_*.jsonl")
    logged = [json.loads(line) for line in samples_file.read_text().splitlines()]
    predictions = [json.loads(line) for line in (out / "tiny_mcq" / "predictions.jsonl").read_text().splitlines()]
    assert [float(p["pred"] == p["label"]) for p in predictions] == [row["acc"] for row in logged]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["tiny_mcq"]["rows_read"] == summary["tasks"]["tiny_mcq"]["rows_used"] == 32
    assert os.path.samefile(summary["tasks"]["tiny_mcq"]["file"], samples_file)
