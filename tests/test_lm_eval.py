"""``calibkern evaluate --lm-eval``: lm-evaluation-harness samples files to calibration reports.

The round trip runs the real harness on a tiny local model and task and compares with ``calibkern.hf.evaluate``;
the other tests write samples lines by hand: mixed choice counts equal the rows one by one, normalisation,
the newest file per task, and every malformed input an error naming ``file:line`` or a counted skip.
"""

import json
import math
import os
import shutil
import threading
import types

import pytest
import torch

pytest.importorskip("transformers")

import calibkern  # noqa: E402
from calibkern.cli import main  # noqa: E402
from calibkern.integrations import lm_eval as ck_lm_eval  # noqa: E402

DATE = "2026-12-07T10-00-00.000001"


def sample_line(lls, target, *, doc_id=0, context="Q: which?\nA:", choices=None, metrics=("acc", "acc_norm"),
                filter_name="none", doc=None, logged=None):
    """One lm-eval ``multiple_choice`` samples line as ``EvaluationTracker.save_results_samples`` writes it, with
    the per-row metrics ``logged`` (``{"acc": 1.0, …}``) when given."""
    choices = choices or [chr(ord("A") + i) for i in range(len(lls))]
    return json.dumps({
        "doc_id": doc_id, "doc": {"q": doc_id} if doc is None else doc, "target": str(target),
        "arguments": {f"gen_args_{i}": {"arg_0": context, "arg_1": " " + c} for i, c in enumerate(choices)},
        "resps": [[[str(ll), "False"]] for ll in lls],
        "filtered_resps": [[str(ll), "False"] for ll in lls],
        "filter": filter_name, "metrics": list(metrics), **(logged or {}),
    })


def write_results(directory, configs, date=DATE, model="m"):
    """The ``results_<date>.json`` beside a samples file: lm-eval's ``configs`` per task and the model's name."""
    (directory / f"results_{date}.json").write_text(json.dumps({"configs": configs, "model_name": model}))


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
    logged = {"acc": 0.0, "acc_norm": 0.0}  # a text target, as lm-eval maps it; argmax ℓ/len is choice 2
    write_samples(tmp_path, "norm", [sample_line(lls, "maybe", choices=choices, logged=logged),
                                     sample_line(lls, "no", choices=choices, logged={"acc": 1.0, "acc_norm": 0.0})])
    raw = ck_lm_eval.evaluate_samples(tmp_path, progress=False).results["norm"]
    norm = ck_lm_eval.evaluate_samples(tmp_path, normalize="chars", progress=False).results["norm"]
    expected = torch.softmax(torch.tensor([ll / len(c) for ll, c in zip(lls, choices)]), 0)
    assert norm.predictions[0]["probs"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert raw.predictions[0]["pred"] == 0 and norm.predictions[0]["pred"] == 2 and norm.labels.tolist() == [1, 0]
    # lm-eval's names are lm-eval's numbers, from the raw log-likelihoods under either normalisation
    p = torch.softmax(torch.tensor(lls, dtype=torch.float64), 0)
    brier_score = float(((p - torch.eye(3, dtype=torch.float64)[[1, 0]]) ** 2).sum(1).mean())
    for report in (raw, norm):
        assert (report.metrics["acc"], report.metrics["acc_norm"]) == (0.5, 0.0)
        assert report.metrics["brier_score"] == pytest.approx(brier_score, rel=1e-12)
    assert raw.metrics["brier"] == pytest.approx(brier_score, abs=1e-6) != norm.metrics["brier"]


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
    assert skipped["target is neither an index into the choices nor one choice's text"] == {"count": 2,
                                                                                          "first": first}
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
    assert "multi_gold: task skipped" in markdown and "2 rows skipped: target is neither an index" in markdown


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
    provenance = metrics.pop("provenance")  # what produced the numbers, in every JSON the report writes
    assert provenance["calibkern"] == calibkern.__version__ and provenance["torch"] == torch.__version__
    assert json.loads((out / "summary.json").read_text())["provenance"] == provenance
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


# ---- how lm-eval's target is read, and the cross-check against its per-row metrics ------------------------------

@pytest.mark.parametrize("doc_to_target, doc, target, choices, gold", [
    ("answer", {"answer": "2"}, "2", ["1", "2", "3"], 1),        # a field holding the text: choices.index
    ("answer", {"answer": 2}, "2", ["1", "2", "3"], 2),          # a field holding an integer: the index
    ("{{answer}}", {"answer": "2"}, "2", ["1", "2", "3"], 2),    # a template rendering a numeral: the index
    ("{{answer}}", {"answer": "y"}, "y", ["x", "y", "z"], 1),    # a template rendering text: choices.index
    (0, {}, "0", ["1", "2", "3"], 0),                            # an integer doc_to_target
    (None, {}, "2", ["0", "1", "2"], 2),                         # no configuration: index and text agree
    (None, {}, "1", ["a", "b"], 1),
])
def test_the_target_is_read_as_lm_eval_reads_it(tmp_path, doc_to_target, doc, target, choices, gold):
    lls = [-1.0 - i for i in range(len(choices))]
    logged = {"acc": float(gold == 0)}
    write_samples(tmp_path, "t", [sample_line(lls, target, choices=choices, doc=doc, logged=logged, doc_id=i)
                                  for i in range(2)])
    if doc_to_target is not None:
        write_results(tmp_path, {"t": {"output_type": "multiple_choice", "doc_to_target": doc_to_target}})
    report = ck_lm_eval.evaluate_samples(tmp_path, progress=False)
    assert report.failed == {} and report.samples["t"].labels.tolist() == [gold, gold]
    assert report.samples["t"].cross_checked == {"acc": 2, "acc_norm": 0}  # acc_norm not logged here


def test_a_numeral_target_without_the_configuration_is_refused(tmp_path):
    write_samples(tmp_path, "t", [sample_line([-1.0, -2.0, -3.0], "2", choices=["1", "2", "3"])])
    report = ck_lm_eval.evaluate_samples(tmp_path, progress=False)
    assert "samples_t_" in report.failed["t"] and ".jsonl:1: the target '2' is choice 2 read as an index but " \
        "choice 1 read as text" in report.failed["t"] and "results_<date>.json" in report.failed["t"]


def test_a_row_that_disagrees_with_lm_eval_stops_its_task(tmp_path, capsys):
    run = tmp_path / "run"
    rows = [sample_line([-1.0, -2.0], 0, doc_id=i, logged={"acc": 1.0, "acc_norm": 1.0}) for i in range(3)]
    wrong = json.loads(rows[2])
    wrong["acc"] = 0.0
    write_samples(run, "acc_differs", rows[:2] + [json.dumps(wrong)])
    write_samples(run, "gold_differs", [sample_line([-1.0, -2.0], 0, logged={"brier_score": [1, "[0.7 0.3]"]})])
    write_samples(run, "agrees", rows)
    assert main(["evaluate", "--lm-eval", str(run), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibkern: error: ") and "2 tasks failed" in err and "Traceback" not in err
    assert f"samples_acc_differs_{DATE}.jsonl:3: lm-eval logged acc = 0.0 for this row, but its target '0' " \
        "read as choice 0 ('A') gives 1" in err
    assert f"samples_gold_differs_{DATE}.jsonl:1: lm-eval logged gold 1 in brier_score" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["failed"]) == {"acc_differs", "gold_differs"}
    assert summary["tasks"]["agrees"]["metrics"]["acc"] == 1.0 and summary["micro_average"]["tasks"] == ["agrees"]
    assert not (tmp_path / "out" / "acc_differs").exists() and (tmp_path / "out" / "agrees" / "metrics.json").exists()
    assert "acc_differs: **failed**: " in (tmp_path / "out" / "summary.md").read_text()
    many = ck_lm_eval.LmEvalReport({}, {}, None, 10, "none", 1.0, failed={f"t{i}": "why" for i in range(7)})
    assert ck_lm_eval.report_problems({".": many}).endswith("failed: t0: why; t1: why; t2: why; t3: why; t4: why; "
                                                            "and 2 more")


# ---- files, folders and hostile names -------------------------------------------------------------------------------

REPORT_FILES = {"metrics.json", "predictions.jsonl", "reliability.png", "summary.json", "summary.md"}


def report_files_outside(root, out):
    """The report files below ``root`` that are not below ``out``."""
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
            if f in REPORT_FILES and os.path.commonpath([d, str(out)]) != str(out)]


def test_names_from_files_never_leave_the_output_folder(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "parent" / "out"
    write_samples(run, "..", [sample_line([-1.0, -2.0], 0, doc_id=i) for i in range(2)])
    write_samples(run, "good", [sample_line([-1.0, -2.0], 1, doc_id=i) for i in range(2)])
    out.parent.mkdir()
    assert main(["evaluate", "--lm-eval", str(run), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "1 task failed: ..: task name (from " in err and "'..' is not a plain file name" in err
    assert report_files_outside(tmp_path, out) == [] and (out / "good" / "metrics.json").exists()
    assert json.loads((out / "summary.json").read_text())["failed"][".."].startswith("task name (from ")

    report = ck_lm_eval.evaluate_samples(run / f"samples_good_{DATE}.jsonl", progress=False)
    result = report.results["good"]
    for name in ("../../escaped", "a/b", "..", ".", "", "summary.json", "a\\b", "tab\t"):
        report.results = {name: result}
        with pytest.raises(ValueError, match="is not a plain file name|is the name of a report file"):
            ck_lm_eval.write_report(report, tmp_path / "api")
    with pytest.raises(ValueError, match="model folder: '..' is not a plain file name"):
        ck_lm_eval.write_reports({"../x": report, "b": report}, tmp_path / "api")
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "t").symlink_to(tmp_path / "parent")  # an existing link inside the output folder
    report.results = {"t": result}
    with pytest.raises(ValueError, match="resolves outside the output directory"):
        ck_lm_eval.write_report(report, tmp_path / "api")
    assert report_files_outside(tmp_path, out) == [] and os.listdir(tmp_path / "api") == ["t"]


def test_symlinked_folders_are_read_once(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    top = write_samples(root, "t", [sample_line([-1.0, -2.0], 0)])
    linked = write_samples(elsewhere, "u", [sample_line([-1.0, -2.0], 0)])
    for name in ("a", "b"):
        (root / name).symlink_to(".")                       # each link leads back: 2^depth paths to one folder
    (root / "model").symlink_to(elsewhere)                   # a linked folder is read, once
    (elsewhere / "up").symlink_to(root)
    found = {}
    walk = threading.Thread(target=lambda: found.update(ck_lm_eval.find_model_folders(root)), daemon=True)
    walk.start()
    walk.join(timeout=20)
    assert not walk.is_alive(), "the walk followed the links round"
    assert found == {".": {"t": str(top)}, "model": {"u": str(root / "model" / linked.name)}}


def test_model_folders_are_reported_one_by_one_or_refused(tmp_path, capsys):
    root = tmp_path / "root"
    for model in ("m1", "m2"):
        write_samples(root / model, "t", [sample_line([-1.0, -2.0], i % 2, doc_id=i) for i in range(2 + int(model[1]))])
    assert main(["evaluate", "--lm-eval", str(root), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["models"]) == ["m1", "m2"]
    for model, n in (("m1", 3), ("m2", 4)):
        assert json.loads((tmp_path / "out" / model / "t" / "metrics.json").read_text())["n"] == n
        assert summary["models"][model]["tasks"]["t"]["rows_used"] == n
    with pytest.raises(ValueError, match=r"holds the samples of 2 model folders \(m1, m2\)"):
        ck_lm_eval.evaluate_samples(root)

    write_samples(root, "t", [sample_line([-1.0, -2.0], 0)])  # the root holds a run itself, beside m1 and m2
    assert main(["evaluate", "--lm-eval", str(root), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "the model folders '.' and 'm1', 'm2' lie one inside the other" in capsys.readouterr().err

    write_results(root / "m1", {}, date=DATE, model="org/model-a")
    write_results(root / "m1", {}, date="2026-12-08T10-00-00.000001", model="org/model-b")
    with pytest.raises(ValueError, match="the folder '.' holds runs of 2 models: org/model-a .*; org/model-b"):
        ck_lm_eval.evaluate_samples(root / "m1")
    one_file = ck_lm_eval.evaluate_samples(root / "m1" / f"samples_t_{DATE}.jsonl", progress=False)
    assert one_file.results["t"].metrics["n"] == 3  # a file named by itself is one run


@pytest.mark.parametrize("where", ["line", "doc", "results"])
def test_deep_nesting_is_an_error_not_a_crash(tmp_path, capsys, where):
    deep = "[" * 100_000 + "]" * 100_000
    line = sample_line([-1.0, -2.0], 0)
    if where == "line":
        line = deep
    elif where == "doc":
        line = line.replace('"doc": {"q": 0}', '"doc": ' + "[" * 70 + "]" * 70)
    write_samples(tmp_path / "run", "t", [line, sample_line([-1.0, -2.0], 1)])
    if where == "results":
        (tmp_path / "run" / f"results_{DATE}.json").write_text('{"configs": ' + deep + "}")
    assert main(["evaluate", "--lm-eval", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibkern: error: ") and "Traceback" not in err
    assert f"{'.json' if where == 'results' else '.jsonl:1'}: JSON nested deeper than 64 levels" in err


def test_a_truncated_or_missing_file_stops_only_its_task(tmp_path, capsys):
    run = tmp_path / "run"
    write_samples(run, "whole", [sample_line([-1.0, -2.0], i % 2, doc_id=i) for i in range(3)])
    cut = write_samples(run, "cut", [sample_line([-1.0, -2.0], 0)] * 2)
    cut.write_bytes(cut.read_bytes()[:-40])
    (run / f"samples_gone_{DATE}.jsonl").symlink_to(tmp_path / "nowhere")
    assert main(["evaluate", "--lm-eval", str(run), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 tasks failed: " in err and f"samples_cut_{DATE}.jsonl:2: not a JSON line" in err
    assert f"samples_gone_{DATE}.jsonl: not a readable file" in err
    assert json.loads((tmp_path / "out" / "whole" / "metrics.json").read_text())["n"] == 3


# ---- the real harness ---------------------------------------------------------------------------------------------

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: {choices}
doc_to_target: {target}
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: brier_score
"""
NUMERALS = ["2", "3", "4", "5"]  # as indices "2" and "3" name other choices, "4" and "5" none


def run_lm_eval(model_dir, task_dir, out_dir, tasks):
    """``lm_eval --model hf --model_args pretrained=DIR --tasks … --include_path TASKS --log_samples
    --output_path OUT`` through the Python API, saving as the command line does (lm_eval's _cli/run.py)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    tracker = EvaluationTracker(output_path=str(out_dir))
    results = simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=tasks, device="cpu",
                              batch_size=8, log_samples=True, evaluation_tracker=tracker,
                              task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return results


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """Two tiny Llamas evaluated by the real lm_eval, offline, into one output root (``ROOT/<model>/``), on a
    letter task (``doc_to_target`` a template giving the index) and a numeral task (``doc_to_target`` a field
    holding the answer's text)."""
    pytest.importorskip("lm_eval")
    import datasets
    import huggingface_hub
    from calibkern.hf.data import DEFAULT_TEMPLATE, format_prompt
    from hf_tiny import make_examples, make_model, make_tokenizer

    path = tmp_path_factory.mktemp("harness")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            patch.setenv(name, "1")
        # read at import: the flags themselves, so that nothing is fetched and the cache stays in the test folder
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", path / "datasets_cache")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        tokenizer = make_tokenizer()  # " A" … " D" are single tokens
        examples = make_examples(32, seed=5)
        prompts = [format_prompt(e, DEFAULT_TEMPLATE) for e in examples]
        (path / "letters.jsonl").write_text("".join(
            json.dumps({"prompt": p, "answer": e.answer}) + "\n" for p, e in zip(prompts, examples)))
        (path / "numerals.jsonl").write_text("".join(
            json.dumps({"prompt": p, "answer": NUMERALS[e.answer]}) + "\n" for p, e in zip(prompts, examples)))
        (path / "tasks").mkdir()
        (path / "tasks" / "tiny_mcq.yaml").write_text(TASK_YAML.format(
            name="tiny_mcq", data=path / "letters.jsonl", choices='["A", "B", "C", "D"]', target='"{{answer}}"'))
        (path / "tasks" / "tiny_numeral.yaml").write_text(TASK_YAML.format(
            name="tiny_numeral", data=path / "numerals.jsonl", choices=json.dumps(NUMERALS), target="answer"))
        results, folders = {}, {}
        for seed in (0, 1):
            model = path / f"model{seed}"
            make_model(tokenizer, seed=seed).save_pretrained(model)
            tokenizer.save_pretrained(model)
            results[model.name] = run_lm_eval(model, path / "tasks", path / "lm_eval_out", ["tiny_mcq", "tiny_numeral"])
            folders[model.name], = (path / "lm_eval_out").glob(f"*__{model.name}")
    return types.SimpleNamespace(path=path, examples=examples, results=results, folders=folders,
                                 root=path / "lm_eval_out")


def lm_eval_metric(results, task, name):
    return float(results["results"][task][f"{name},none"])


def test_round_trip_through_the_real_harness(harness, tmp_path):
    from calibkern.pipeline import io

    out = tmp_path / "report"
    assert main(["evaluate", "--lm-eval", str(harness.folders["model0"]), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "tiny_mcq" / "metrics.json").read_text())

    model, tokenizer = io.load_model(harness.path / "model0")
    expected = calibkern.hf.evaluate(model, tokenizer, harness.examples, progress=False).metrics
    assert set(metrics) == set(expected) | {"acc", "acc_norm", "brier_score", "provenance"}
    for name in ("ece", "ece_debiased", "ece_l2", "mce", "cw_ece", "accuracy", "mean_confidence", "nll", "brier"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-6), name
    assert metrics["n"] == expected["n"] == 32
    results = harness.results["model0"]
    assert metrics["accuracy"] == metrics["acc"] == pytest.approx(lm_eval_metric(results, "tiny_mcq", "acc"),
                                                                  abs=1e-12)
    assert metrics["brier_score"] == pytest.approx(lm_eval_metric(results, "tiny_mcq", "brier_score"), rel=1e-12)
    assert metrics["acc_norm"] == pytest.approx(lm_eval_metric(results, "tiny_mcq", "acc_norm"), abs=1e-12)

    samples_file, = harness.folders["model0"].glob("samples_tiny_mcq_*.jsonl")
    logged = [json.loads(line) for line in samples_file.read_text().splitlines()]
    predictions = [json.loads(line) for line in (out / "tiny_mcq" / "predictions.jsonl").read_text().splitlines()]
    assert [float(p["pred"] == p["label"]) for p in predictions] == [row["acc"] for row in logged]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["tiny_mcq"]["rows_read"] == summary["tasks"]["tiny_mcq"]["rows_used"] == 32
    assert summary["tasks"]["tiny_mcq"]["cross_checked"] == {"acc": 32, "acc_norm": 32}
    assert os.path.samefile(summary["tasks"]["tiny_mcq"]["file"], samples_file)


@pytest.mark.parametrize("normalize", ["none", "chars"])
def test_numeral_choices_with_a_text_target_give_lm_evals_numbers(harness, normalize):
    report = ck_lm_eval.evaluate_samples(harness.folders["model0"], normalize=normalize, progress=False)
    results, task = harness.results["model0"], "tiny_numeral"
    metrics = report.results[task].metrics
    assert report.failed == {} and report.samples[task].rows_skipped == 0 and metrics["n"] == 32
    assert report.samples[task].labels.tolist() == [e.answer for e in harness.examples]
    assert metrics["accuracy"] == pytest.approx(lm_eval_metric(results, task, "acc_norm" if normalize == "chars"
                                                               else "acc"), abs=1e-12)
    for name in ("acc", "acc_norm", "brier_score"):  # lm-eval's names: lm-eval's numbers, whatever --normalize
        assert metrics[name] == pytest.approx(lm_eval_metric(results, task, name), rel=1e-12, abs=1e-12), name
    samples_file, = harness.folders["model0"].glob(f"samples_{task}_*.jsonl")
    logged = [json.loads(line)["acc_norm" if normalize == "chars" else "acc"]
              for line in samples_file.read_text().splitlines()]
    assert [float(p["pred"] == p["label"]) for p in report.results[task].predictions] == logged


def test_numeral_targets_need_the_runs_results_file(harness, tmp_path):
    samples_file, = harness.folders["model0"].glob("samples_tiny_numeral_*.jsonl")
    shutil.copy(samples_file, tmp_path)  # without results_<date>.json: "2" may be index 2 or the choice "2"
    report = ck_lm_eval.evaluate_samples(tmp_path, progress=False)
    assert report.results == {} and "keep the run's results_<date>.json" in report.failed["tiny_numeral"]
    lines = samples_file.read_text().splitlines()
    row = json.loads(lines[3])
    row["acc"] = 1.0 - row["acc"]  # a log that disagrees with the way calibkern reads it
    folder = tmp_path / "edited"
    shutil.copytree(harness.folders["model0"], folder)
    (folder / samples_file.name).write_text("\n".join(lines[:3] + [json.dumps(row)] + lines[4:]) + "\n")
    report = ck_lm_eval.evaluate_samples(folder, progress=False)
    assert list(report.results) == ["tiny_mcq"]
    assert f"{samples_file.name}:4: lm-eval logged acc = {row['acc']}" in report.failed["tiny_numeral"]


def test_a_root_of_two_models_is_reported_per_model(harness, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", "--lm-eval", str(harness.root), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["models"]) == sorted(folder.name for folder in harness.folders.values())
    for model, folder in harness.folders.items():
        for task in ("tiny_mcq", "tiny_numeral"):
            metrics = json.loads((out / folder.name / task / "metrics.json").read_text())
            assert metrics["accuracy"] == pytest.approx(lm_eval_metric(harness.results[model], task, "acc"), abs=1e-12)
            assert summary["models"][folder.name]["tasks"][task]["file"].startswith(str(folder))
    accuracies = {folder.name: json.loads((out / folder.name / "tiny_mcq" / "metrics.json").read_text())["accuracy"]
                  for folder in harness.folders.values()}
    assert len(set(accuracies.values())) == 2  # two models, two numbers: nothing pooled
    with pytest.raises(ValueError, match="holds the samples of 2 model folders"):
        ck_lm_eval.read_samples(harness.root)


def test_a_truncated_samples_file_of_the_real_harness_stops_its_task_only(harness, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(harness.folders["model1"], folder)
    cut, = folder.glob("samples_tiny_numeral_*.jsonl")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])
    out = tmp_path / "out"
    assert main(["evaluate", "--lm-eval", str(folder), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibkern: error: ") and "1 task failed: tiny_numeral: " in err
    assert f"{cut.name}:22: not a JSON line" in err
    whole = ck_lm_eval.evaluate_samples(harness.folders["model1"], progress=False).results["tiny_mcq"].metrics
    written = json.loads((out / "tiny_mcq" / "metrics.json").read_text())
    assert written.pop("provenance") and written == json.loads(json.dumps(whole))
