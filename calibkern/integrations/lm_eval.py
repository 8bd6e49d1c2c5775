"""The calibration report of an lm-evaluation-harness run (docs/lm_eval.md).

``lm_eval … --log_samples --output_path OUT`` writes ``OUT/<model>/samples_<task>_<date>.jsonl``: one JSON line
per document, with the log-likelihood ``ℓ_i = log P(choice_i | context)`` of each choice in
``filtered_resps[i][0]`` and the gold index in ``target``. Per task the option logits are ``z_i = ℓ_i`` —
``ℓ_i / len(choice_i)`` with ``normalize="chars"`` (lm-eval's ``acc_norm``) — so the confidence is
``max_i softmax(z)_i`` (as lm-eval's ``brier_score``), and the metrics are
:func:`calibkern.hf.evaluation.calibration_metrics`, the set ``calibkern evaluate`` writes
(docs/lm_eval.md#what-is-computed).

Rows with fewer choices than the task's widest row are padded: ``-inf`` in :func:`read_samples`, and, for the
metrics, ``log_softmax`` of each row's own choices with the pads at ``-1e4·max(1, T)``, where ``exp`` underflows
to exactly 0 in float32 — every row's probabilities, confidence and prediction are those of its choices alone.

Malformed input (docs/lm_eval.md#errors-and-skips): a line that is not a JSON object or lacks the multiple-choice
fields is a ``ValueError`` naming ``file:line``; a task that is not multiple-choice (``generate_until``,
``loglikelihood``, ``loglikelihood_rolling``), uses ``acc_mutual_info``, puts the choices in the contexts or
has a list of gold indices is skipped with the reason; a row whose target is not an index into its choices,
with a non-finite log-likelihood or fewer than two choices is skipped and counted.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from .. import _validate as V
from ..hf.evaluation import EvaluationResult, calibration_metrics, predictions_from_logits, write_evaluation

__all__ = [
    "NORMALIZATIONS",
    "TaskSamples",
    "LmEvalReport",
    "find_samples_files",
    "load_task_samples",
    "read_samples",
    "padded_option_logits",
    "evaluate_samples",
    "write_report",
]

NORMALIZATIONS = ("none", "chars")
SAMPLES_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[\d.\-]+)\.jsonl$")
PAD_GAP = 1e4  # a padded choice sits this far (times max(1, T)) below the row's top log-probability

MUTUAL_INFO = ("uses acc_mutual_info: its requests hold unconditional log-likelihoods after the conditional ones, "
               "not one log-likelihood per choice")
NOT_MULTIPLE_CHOICE = "output_type {}, not multiple_choice: there are no option probabilities to calibrate"


class _RowSkipped(Exception):
    """A row that is left out and counted; ``args[0]`` is the reason."""


class _TaskSkipped(Exception):
    """A task that cannot be read as multiple choice; ``args[0]`` is the reason."""


@dataclass
class TaskSamples:
    """One task's rows from one samples file.

    ``logits [N, K]`` float64 (lm-eval's log-likelihoods, normalised as asked; ``-inf`` pads rows with fewer than
    ``K`` choices), ``labels [N]`` int64 and ``doc_ids`` of the ``N`` rows used; ``rows_read`` lines; ``skipped``
    maps each reason to the ``file:line`` of every row skipped for it; ``skip_reason`` is set when the whole
    task is skipped (then ``N = 0``).
    """

    task: str
    path: str
    logits: torch.Tensor
    labels: torch.Tensor
    doc_ids: list = field(default_factory=list)
    rows_read: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    skip_reason: str | None = None

    @property
    def rows_used(self) -> int:
        return int(self.labels.numel())

    @property
    def rows_skipped(self) -> int:
        return self.rows_read - self.rows_used


@dataclass
class LmEvalReport:
    """Per task its :class:`TaskSamples` and, when evaluated, its :class:`EvaluationResult`; ``micro`` the metrics
    over every used row of every evaluated task together (``None`` when none was)."""

    samples: dict[str, TaskSamples]
    results: dict[str, EvaluationResult]
    micro: dict | None
    n_bins: int
    normalize: str
    temperature: float


def _task_of(path: str) -> str:
    name = os.path.basename(path)
    match = SAMPLES_NAME.match(name)
    if match:
        return match["task"]
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return stem[len("samples_"):] if stem.startswith("samples_") else stem


def find_samples_files(path: str | os.PathLike) -> dict[str, str]:
    """``{task: samples file}``: ``path`` itself if it is a file, else the newest ``samples_<task>_<date>.jsonl``
    of each task anywhere below the directory ``path``."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {_task_of(path): path}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"lm-eval output not found: {path}")
    newest: dict[str, tuple[str, str]] = {}
    for file in sorted(glob.glob(os.path.join(glob.escape(path), "**", "samples_*.jsonl"), recursive=True)):
        match = SAMPLES_NAME.match(os.path.basename(file))
        date = match["date"] if match else ""
        task = _task_of(file)
        if task not in newest or date >= newest[task][0]:
            newest[task] = (date, file)
    if not newest:
        raise ValueError(f"{path}: no samples_*.jsonl below it (lm_eval writes them with --log_samples)")
    return {task: newest[task][1] for task in sorted(newest)}


def _task_config(path: str, task: str) -> dict:
    """The task's entry of ``configs`` in ``results_<date>.json`` beside the samples file (``{}`` if none)."""
    match = SAMPLES_NAME.match(os.path.basename(path))
    if match is None:
        return {}
    try:
        with open(os.path.join(os.path.dirname(path), f"results_{match['date']}.json"), encoding="utf-8") as handle:
            results = json.load(handle)
    except (OSError, ValueError):  # no results file, or one this report does not need: read the samples alone
        return {}
    config = results.get("configs", {}).get(task) if isinstance(results, dict) else None
    return config if isinstance(config, dict) else {}


def _config_skip_reason(config: dict) -> str | None:
    output_type = config.get("output_type", "multiple_choice")
    if output_type != "multiple_choice":
        return NOT_MULTIPLE_CHOICE.format(output_type)
    metrics = config.get("metric_list") or []
    if any(isinstance(m, dict) and m.get("metric") == "acc_mutual_info" for m in metrics):
        return MUTUAL_INFO
    return None


def _gold_index(target, choices: list[str], where: str) -> int:
    """lm-eval's gold: an index (logged as a string), else a choice's text (as lm-eval maps it)."""
    if target is None:
        raise ValueError(f"{where}: no 'target': not an lm-eval samples line")
    if isinstance(target, str) and target.strip().startswith("["):
        try:
            target = json.loads(target)
        except ValueError:
            pass
    if isinstance(target, list):
        raise _TaskSkipped(f"target {target} is a list of gold indices (multi-gold): a confidence needs one gold")
    if isinstance(target, str) and re.fullmatch(r"\s*[+-]?\d+\s*", target):
        target = int(target)
    elif isinstance(target, str) and choices.count(target) == 1:
        return choices.index(target)
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(choices):
        raise _RowSkipped("target is not an index into the choices")
    return target


def _parse_row(record: dict, where: str, delimiter: str, normalize: str) -> tuple[list[float], int]:
    """``(z, gold)`` of one samples line (module docstring); raises ``_TaskSkipped``/``_RowSkipped``/ValueError."""
    if "acc_mutual_info" in (record.get("metrics") or ()) or "acc_mutual_info" in record:
        raise _TaskSkipped(MUTUAL_INFO)
    arguments, responses = record.get("arguments"), record.get("filtered_resps")
    if not isinstance(arguments, dict) or not isinstance(responses, list):
        raise ValueError(f"{where}: no 'arguments' object or 'filtered_resps' list: not an lm-eval samples line")
    requests = list(arguments.values())
    if len(requests) != len(responses) or not all(isinstance(r, dict) for r in requests):
        raise ValueError(f"{where}: {len(requests)} requests in 'arguments' but {len(responses)} 'filtered_resps'")
    if any("arg_1" not in r for r in requests):
        raise _TaskSkipped(NOT_MULTIPLE_CHOICE.format("loglikelihood_rolling (one argument per request)"))
    if any(not isinstance(r["arg_1"], str) for r in requests):
        raise _TaskSkipped(NOT_MULTIPLE_CHOICE.format("generate_until (generation arguments)"))
    if len({json.dumps(r.get("arg_0")) for r in requests}) > 1:
        raise _TaskSkipped("the choices are in the contexts (a multiple-input task such as winogrande): the samples "
                           "do not hold the gold index")
    z = []
    for i, response in enumerate(responses):
        try:
            z.append(float(response[0] if isinstance(response, list) else response))
        except (IndexError, TypeError, ValueError):
            raise ValueError(f"{where}: filtered_resps[{i}] is not a log-likelihood: {str(response)[:60]!r}") from None
    if len(z) < 2:
        raise _RowSkipped("fewer than 2 choices (output_type loglikelihood?)")
    if not all(math.isfinite(value) for value in z):
        raise _RowSkipped("a log-likelihood is NaN or infinite")
    choices = [r["arg_1"][len(delimiter):] if r["arg_1"].startswith(delimiter) else r["arg_1"] for r in requests]
    gold = _gold_index(record.get("target"), choices, where)
    if normalize == "chars":
        if not all(choices):
            raise _RowSkipped("an empty choice (normalize chars divides by its length)")
        z = [value / len(choice) for value, choice in zip(z, choices)]
    return z, gold


def _lines(path: str):
    """``(file:line, record)`` of each non-blank line; a line that is not a JSON object is an error naming it."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{where}: not a JSON line ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a samples line is a JSON object, got {type(record).__name__}")
            yield where, record


def load_task_samples(path: str | os.PathLike, task: str | None = None, *, normalize: str = "none") -> TaskSamples:
    """Read one ``samples_<task>_<date>.jsonl`` (module docstring); the task's configuration in the run's
    ``results_<date>.json``, when present, gives its output type and target delimiter."""
    V.check_choice(normalize, "normalize", NORMALIZATIONS)
    path = os.fspath(path)
    task = task or _task_of(path)
    config = _task_config(path, task)
    delimiter = config.get("target_delimiter", " ") if isinstance(config.get("target_delimiter", " "), str) else " "
    skip_reason = _config_skip_reason(config)
    rows, labels, doc_ids, skipped = [], [], [], {}
    rows_read, first_filter = 0, None
    for where, record in _lines(path):
        rows_read += 1
        if skip_reason is not None:
            continue
        first_filter = record.get("filter") if first_filter is None else first_filter
        try:
            if record.get("filter") != first_filter:
                raise _RowSkipped(f"filter {record.get('filter')!r} (the report reads filter {first_filter!r})")
            z, gold = _parse_row(record, where, delimiter, normalize)
        except _RowSkipped as skip:
            skipped.setdefault(skip.args[0], []).append(where)
            continue
        except _TaskSkipped as skip:
            skip_reason = f"{skip.args[0]} ({where})"
            continue
        rows.append(z)
        labels.append(gold)
        doc_ids.append(record.get("doc_id"))
    if skip_reason is None and not rows:
        skip_reason = "no usable row" if rows_read else "the file holds no row"
    if skip_reason is not None:
        rows, labels, doc_ids = [], [], []
    width = max((len(z) for z in rows), default=0)
    logits = torch.full((len(rows), width), -math.inf, dtype=torch.float64)
    for i, z in enumerate(rows):
        logits[i, : len(z)] = torch.tensor(z, dtype=torch.float64)
    return TaskSamples(task, path, logits, torch.tensor(labels, dtype=torch.long), doc_ids, rows_read, skipped,
                       skip_reason)


def read_samples(path: str | os.PathLike, *, normalize: str = "none") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{task: (logits [N, K] float64, labels [N] int64)}`` of every multiple-choice task in an lm-eval output
    directory (the newest samples file per task) or one samples file; skipped tasks are left out
    (:func:`load_task_samples` says why)."""
    files = find_samples_files(path)
    tasks = {task: load_task_samples(file, task, normalize=normalize) for task, file in files.items()}
    return {task: (s.logits, s.labels) for task, s in tasks.items() if s.skip_reason is None}


def padded_option_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 option logits for the metrics: ``log_softmax`` over each row's own choices, its ``-inf`` pads set to
    ``-1e4·max(1, T)`` so that ``softmax(z / T)`` gives them exactly 0 and every other entry its unpadded value."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    pad = torch.tensor(-PAD_GAP * max(1.0, float(temperature)), dtype=torch.float64)
    return torch.where(torch.isneginf(logits), pad, log_probs).float()


def _evaluate_task(samples: TaskSamples, *, n_bins: int, temperature: float, seed: int) -> EvaluationResult:
    option_logits = padded_option_logits(samples.logits, temperature)
    metrics = calibration_metrics(option_logits, samples.labels, n_bins=n_bins, temperature=temperature, seed=seed)
    predictions = predictions_from_logits(option_logits, samples.labels, temperature)
    n_choices = torch.isfinite(samples.logits).sum(dim=1).tolist()
    for row, k, doc_id in zip(predictions, n_choices, samples.doc_ids):
        row["probs"] = row["probs"][:k]
        row["doc_id"] = doc_id
    return EvaluationResult(metrics, predictions, option_logits, samples.labels)


def _concatenated(samples: list[TaskSamples]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every task's rows in one ``[ΣN, max K]`` float64 tensor padded with ``-inf``, and their labels."""
    width = max(s.logits.shape[1] for s in samples)
    pad = [torch.nn.functional.pad(s.logits, (0, width - s.logits.shape[1]), value=-math.inf) for s in samples]
    return torch.cat(pad), torch.cat([s.labels for s in samples])


def evaluate_samples(
    path: str | os.PathLike,
    *,
    n_bins: int = 10,
    normalize: str = "none",
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> LmEvalReport:
    """The calibration metrics of every multiple-choice task of an lm-eval output directory or samples file, and
    their micro-average over the rows of all evaluated tasks (a progress bar over the files)."""
    from tqdm.auto import tqdm

    n_bins = V.check_n_bins(n_bins)
    V.check_choice(normalize, "normalize", NORMALIZATIONS)
    temperature = V.check_positive_float(temperature, "temperature")
    samples, results = {}, {}
    for task, file in tqdm(find_samples_files(path).items(), desc="lm-eval samples", unit="file",
                           disable=not progress):
        samples[task] = load_task_samples(file, task, normalize=normalize)
        if samples[task].skip_reason is None:
            results[task] = _evaluate_task(samples[task], n_bins=n_bins, temperature=temperature, seed=seed)
    micro = None
    if len(results) == 1:  # one task: its rows are all the rows
        micro = next(iter(results.values())).metrics
    elif results:
        logits, labels = _concatenated([samples[task] for task in results])
        micro = calibration_metrics(padded_option_logits(logits, temperature), labels, n_bins=n_bins,
                                    temperature=temperature, seed=seed)
    return LmEvalReport(samples, results, micro, n_bins, normalize, temperature)


def _summary(report: LmEvalReport) -> dict:
    tasks = {}
    for task, s in report.samples.items():
        tasks[task] = {
            "file": s.path,
            "rows_read": s.rows_read,
            "rows_used": s.rows_used,
            "rows_skipped": s.rows_skipped,
            "skip_reason": s.skip_reason,
            "skipped_rows": {reason: {"count": len(rows), "first": rows[0]} for reason, rows in s.skipped.items()},
            "metrics": report.results[task].metrics if task in report.results else None,
        }
    micro = None
    if report.micro is not None:
        micro = {"tasks": list(report.results), "metrics": report.micro}
    return {"n_bins": report.n_bins, "normalize": report.normalize, "temperature": report.temperature,
            "tasks": tasks, "micro_average": micro}


def _markdown(summary: dict) -> str:
    from ..pipeline.report import TABLE_COLUMNS

    columns = [c for c in TABLE_COLUMNS if c != "n"]
    lines = ["# Calibration of an lm-eval run", "",
             f"{summary['n_bins']} bins, normalize {summary['normalize']}, temperature {summary['temperature']:g}", "",
             "| task | rows read | used | skipped | " + " | ".join(columns) + " | debiased ECE, 95% CI |",
             "|---" * (len(columns) + 5) + "|"]

    def row(name, read, used, skipped, metrics):
        cells = [f"{metrics[c]:.4f}" if metrics and c in metrics else "" for c in columns]
        interval = f"[{metrics['ece_ci'][0]:.4f}, {metrics['ece_ci'][1]:.4f}]" if metrics else ""
        return f"| {name} | {read} | {used} | {skipped} | " + " | ".join(cells) + f" | {interval} |"

    tasks = summary["tasks"]
    for task, t in tasks.items():
        lines.append(row(task, t["rows_read"], t["rows_used"], t["rows_skipped"], t["metrics"]))
    micro = summary["micro_average"]
    if micro is not None:
        used = [tasks[t] for t in micro["tasks"]]
        name = f"**micro-average** ({len(used)} task{'' if len(used) == 1 else 's'})"
        lines.append(row(name, sum(t["rows_read"] for t in used), sum(t["rows_used"] for t in used),
                         sum(t["rows_skipped"] for t in used), micro["metrics"]))
    notes = [f"- {task}: task skipped: {t['skip_reason']}" for task, t in tasks.items() if t["skip_reason"]]
    notes += [f"- {task}: {s['count']} rows skipped: {reason} (first: {s['first']})"
              for task, t in tasks.items() for reason, s in t["skipped_rows"].items()]
    if notes:
        lines += ["", "## Skipped", ""] + notes
    return "\n".join(lines) + "\n"


def write_report(report: LmEvalReport, out_dir: str | os.PathLike) -> str:
    """``out_dir/<task>/{metrics.json, predictions.jsonl, reliability.png}`` per evaluated task and
    ``out_dir/summary.{md,json}``; returns the Markdown summary."""
    from ..pipeline.report import reliability_data, write_reliability_plot

    out_dir = os.fspath(out_dir)
    for task, result in report.results.items():
        task_dir = os.path.join(out_dir, task)
        write_evaluation(result, task_dir)
        rel = reliability_data(result.option_logits, result.labels, report.n_bins, report.temperature,
                               result.metrics.get("smece_sigma"))
        write_reliability_plot(os.path.join(task_dir, "reliability.png"), task, rel, result.metrics)
    os.makedirs(out_dir, exist_ok=True)
    summary = _summary(report)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    markdown = _markdown(summary)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    return markdown
