"""The calibration report of an lm-evaluation-harness run (docs/lm_eval.md).

``lm_eval … --log_samples --output_path OUT`` writes ``OUT/<model>/samples_<task>_<date>.jsonl``: one JSON line
per document, with the log-likelihood ``ℓ_i = log P(choice_i | context)`` of each choice in
``filtered_resps[i][0]``, the gold in ``target`` and lm-eval's own per-row ``acc``/``acc_norm``. Per task the
option logits are ``z_i = ℓ_i`` — ``ℓ_i / len(choice_i)`` with ``normalize="chars"`` (lm-eval's ``acc_norm``) —
so the confidence is ``max_i softmax(z)_i``, and the metrics are
:func:`calibkern.hf.evaluation.calibration_metrics`, the set ``calibkern evaluate`` writes, plus lm-eval's
``acc``, ``acc_norm`` and ``brier_score`` of the raw ``ℓ`` (docs/lm_eval.md#what-is-computed).

The gold is read as lm-eval read it: the task's ``doc_to_target`` (its configuration in ``results_<date>.json``)
names a field of the logged ``doc`` (an integer value is an index, a string a choice's text), or is a template
(a rendered numeral is an index, other text a choice's text) or an index; every row's gold is then checked
against the ``acc``/``acc_norm`` lm-eval logged for it, and a difference stops the task
(docs/lm_eval.md#the-target).

Rows with fewer choices than the task's widest row are padded: ``-inf`` in :func:`read_samples`, and, for the
metrics, ``log_softmax`` of each row's own choices with the pads at ``-1e4·max(1, T)``, where ``exp`` underflows
to exactly 0 in float32 — every row's probabilities, confidence and prediction are those of its choices alone.

A malformed file, a row that disagrees with lm-eval or a task name that cannot be a folder stops that task
(``failed``, with ``file:line``); the other tasks are still reported (docs/lm_eval.md#errors-and-skips).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from dataclasses import dataclass, field, replace

import torch

from .. import _validate as V
from ..hf.evaluation import EvaluationResult, calibration_metrics, predictions_from_logits, write_evaluation
from ..pipeline.outputs import check_name

__all__ = [
    "NORMALIZATIONS",
    "TaskSamples",
    "LmEvalReport",
    "find_model_folders",
    "find_samples_files",
    "load_task_samples",
    "read_samples",
    "padded_option_logits",
    "evaluate_samples",
    "evaluate_models",
    "write_report",
    "write_reports",
    "report_problems",
]

NORMALIZATIONS = ("none", "chars")
SAMPLES_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[\d.\-]+)\.jsonl$")
PAD_GAP = 1e4  # a padded choice sits this far (times max(1, T)) below the row's top log-probability
MAX_NESTING = 64  # JSON arrays/objects inside one another in a samples line or results file (lm-eval's: ≤ 10)
REPORT_FILES = ("summary.md", "summary.json")
MAX_LISTED = 5  # failed tasks named in the error line
LM_EVAL_KEYS = ("acc", "acc_norm", "brier_score")
LOGGED_GOLD = ("brier_score", "likelihood", "f1", "mcc")  # per-row metrics lm-eval logs as [gold, …]
FUNCTION_SOURCE = re.compile(r"\s*(@|def |async def |lambda\b|<function )")  # a !function doc_to_target, dumped

MUTUAL_INFO = ("uses acc_mutual_info: its requests hold unconditional log-likelihoods after the conditional ones, "
               "not one log-likelihood per choice")
NOT_MULTIPLE_CHOICE = "output_type {}, not multiple_choice: there are no option probabilities to calibrate"
MULTI_GOLD = "the target is a list of golds (multi-gold): a confidence needs one gold"
NOT_A_CHOICE = "target is neither an index into the choices nor one choice's text"


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
    task is skipped (then ``N = 0``). ``lm_eval_rows`` holds lm-eval's per-row ``acc``, ``acc_norm`` (NaN where a
    choice is empty) and ``brier_score`` of the used rows, from the raw log-likelihoods; ``cross_checked`` counts
    the rows whose logged ``acc``/``acc_norm`` equalled them.
    """

    task: str
    path: str
    logits: torch.Tensor
    labels: torch.Tensor
    doc_ids: list = field(default_factory=list)
    rows_read: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    skip_reason: str | None = None
    lm_eval_rows: dict[str, list[float]] = field(default_factory=dict)
    cross_checked: dict[str, int] = field(default_factory=dict)

    @property
    def rows_used(self) -> int:
        return int(self.labels.numel())

    @property
    def rows_skipped(self) -> int:
        return self.rows_read - self.rows_used


@dataclass
class LmEvalReport:
    """One model's report: per task its :class:`TaskSamples` and, when evaluated, its :class:`EvaluationResult`;
    ``failed`` the tasks stopped by an error (task → message naming the file and line); ``micro`` the metrics over
    every used row of every evaluated task together (``None`` when none was); ``model`` the model folder relative
    to the lm-eval root (``"."``: the root itself)."""

    samples: dict[str, TaskSamples]
    results: dict[str, EvaluationResult]
    micro: dict | None
    n_bins: int
    normalize: str
    temperature: float
    failed: dict[str, str] = field(default_factory=dict)
    model: str = "."


# ---- names and files ----------------------------------------------------------------------------------------------

def _folder_name(name: str, what: str) -> str:
    """``name`` if it can be one folder inside the report's output directory (:func:`check_name`, and not a report
    file's name), else a ValueError saying ``what`` it is."""
    check_name(name, what)
    if name in REPORT_FILES:
        raise ValueError(f"{what}: {name!r} is the name of a report file, not a folder")
    return name


def _inside(out_dir: str, *names: str) -> str:
    """``out_dir/names…``, refused unless its real path lies inside ``out_dir``'s: no name, nor a link already
    there, leads out."""
    path = os.path.join(out_dir, *names)
    root = os.path.realpath(out_dir)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ValueError(f"{path} resolves outside the output directory {out_dir}")
    return path


def _task_of(path: str) -> str:
    name = os.path.basename(path)
    match = SAMPLES_NAME.match(name)
    if match:
        return match["task"]
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return stem[len("samples_"):] if stem.startswith("samples_") else stem


def _samples_below(root: str) -> list[str]:
    """Every ``samples_*.jsonl`` below the directory ``root``. Each real directory is read once (by device and
    inode), so a symlinked directory is followed only to a directory not seen yet and links such as ``a -> .``
    end; plain directories come before links at each level, so a folder is named by its real path where it has
    one."""
    seen, found, level = set(), [], [root]
    while level:
        deeper = []
        for directory in level:
            status = os.stat(directory)
            if (status.st_dev, status.st_ino) in seen:
                continue
            seen.add((status.st_dev, status.st_ino))
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: (e.is_symlink(), e.name))
            for entry in entries:
                if entry.is_dir():
                    deeper.append(entry.path)
                elif entry.name.startswith("samples_") and entry.name.endswith(".jsonl"):
                    found.append(entry.path)  # a broken link or a non-file fails its task when read
        level = sorted(deeper, key=lambda p: (os.path.islink(p), p))
    return sorted(found)


def find_model_folders(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """``{model folder: {task: samples file}}`` below an lm-eval output directory: the folders holding
    ``samples_<task>_<date>.jsonl`` files (relative to ``path``, ``"."`` for ``path`` itself; lm-eval writes one
    per model), and in each the newest file of each task by the date in its name. A file ``path`` is one folder
    of one task."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {".": {_task_of(path): path}}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"lm-eval output not found: {path}")
    folders: dict[str, dict[str, tuple[str, str]]] = {}
    for file in _samples_below(path):
        folder = os.path.relpath(os.path.dirname(file), path).replace(os.sep, "/")
        match = SAMPLES_NAME.match(os.path.basename(file))
        date, task = (match["date"] if match else ""), _task_of(file)
        newest = folders.setdefault(folder, {})
        if task not in newest or date >= newest[task][0]:
            newest[task] = (date, file)
    if not folders:
        raise ValueError(f"{path}: no samples_*.jsonl below it (lm_eval writes them with --log_samples)")
    return {folder: {task: tasks[task][1] for task in sorted(tasks)} for folder, tasks in sorted(folders.items())}


def find_samples_files(path: str | os.PathLike) -> dict[str, str]:
    """``{task: samples file}`` of one model: ``path`` itself if it is a file, else the newest
    ``samples_<task>_<date>.jsonl`` of each task in the one folder below ``path`` that holds them; a directory
    with several such folders (several models) is refused, naming them (:func:`evaluate_models` reads each)."""
    return _only_folder(path, find_model_folders(path))[1]


def _only_folder(path, folders: dict):
    """The one ``(folder, value)`` of a dict keyed by model folder; several are refused, naming them."""
    if len(folders) > 1:
        raise ValueError(f"{os.fspath(path)} holds the samples of {len(folders)} model folders ({', '.join(folders)}): "
                         "one report is one model; read each folder by itself, or all with evaluate_models")
    return next(iter(folders.items()))


def _json_depth_ok(value, limit: int = MAX_NESTING) -> bool:
    """Whether ``value`` nests arrays/objects at most ``limit`` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def _parse_json(text: str, where: str, what: str):
    """``json.loads(text)`` with nesting bounded by ``MAX_NESTING``; else a ValueError naming ``where`` and saying
    it is not ``what``."""
    too_deep = f"{where}: JSON nested deeper than {MAX_NESTING} levels"
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(too_deep) from None
    except ValueError as error:
        raise ValueError(f"{where}: not {what} ({error})") from None
    # a line with at most MAX_NESTING brackets cannot nest deeper: only longer ones are walked
    if text.count("[") + text.count("{") > MAX_NESTING and not _json_depth_ok(value):
        raise ValueError(too_deep)
    return value


def _results_of(path: str) -> dict:
    """The ``results_<date>.json`` that lm-eval wrote beside a samples file (``{}`` if there is none)."""
    match = SAMPLES_NAME.match(os.path.basename(path))
    if match is None:
        return {}
    results_path = os.path.join(os.path.dirname(path), f"results_{match['date']}.json")
    return _read_results(results_path) if os.path.exists(results_path) else {}


def _read_results(results_path: str) -> dict:
    """An lm-eval ``results_<date>.json``; one that cannot be read is an error naming it."""
    try:
        with open(results_path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise ValueError(f"{results_path}: not valid UTF-8") from None
    results = _parse_json(text, results_path, "an lm-eval results file")
    if not isinstance(results, dict):
        raise ValueError(f"{results_path}: an lm-eval results file is a JSON object, got {type(results).__name__}")
    return results


def _task_config(results: dict, task: str) -> dict:
    """The task's entry of ``configs`` in a results file (``{}`` if none)."""
    configs = results.get("configs")
    config = configs.get(task) if isinstance(configs, dict) else None
    return config if isinstance(config, dict) else {}


def _model_name(results: dict) -> str | None:
    name = results.get("model_name")
    config = results.get("config")
    if not isinstance(name, str) and isinstance(config, dict):
        name = config.get("model_args")
    return name if isinstance(name, str) else None


def _config_skip_reason(config: dict) -> str | None:
    output_type = config.get("output_type", "multiple_choice")
    if output_type != "multiple_choice":
        return NOT_MULTIPLE_CHOICE.format(output_type)
    metrics = config.get("metric_list") or []
    if any(isinstance(m, dict) and m.get("metric") == "acc_mutual_info" for m in metrics):
        return MUTUAL_INFO
    return None


# ---- one row --------------------------------------------------------------------------------------------------------

def _short(value) -> str:
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _template_value(target: str):
    """A rendered ``doc_to_target`` template as lm-eval reads it: a numeral is an index, ``[…]`` a list of golds
    if it parses as one, anything else a choice's text."""
    if target.isascii() and target.isdigit():
        return int(target)
    if len(target) >= 2 and target[0] == "[" and target[-1] == "]" and target.count("[") <= MAX_NESTING:
        try:
            value = ast.literal_eval(target)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return target
        return value if isinstance(value, list) else target
    return target


def _choice_index(value, choices: list[str]) -> int:
    """lm-eval's gold index of a resolved target: an integer is the index, a string the first choice with that
    text (``choices.index``), a list several golds."""
    if isinstance(value, list):
        raise _TaskSkipped(MULTI_GOLD)
    if isinstance(value, int):
        if 0 <= value < len(choices):
            return int(value)
    elif isinstance(value, str) and value in choices:
        return choices.index(value)
    raise _RowSkipped(NOT_A_CHOICE)


def _gold_index(record: dict, choices: list[str], doc_to_target, where: str) -> int:
    """The row's gold as lm-eval resolved it from the task's ``doc_to_target`` (module docstring). Without that
    configuration (or with a function there, whose return type the log does not keep) a numeral that is also a
    choice's text at another position could be either, and is an error."""
    target = record.get("target")
    if target is None:
        raise ValueError(f"{where}: no 'target': not an lm-eval samples line")
    if isinstance(target, list):
        raise _TaskSkipped(MULTI_GOLD)
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        raise ValueError(f"{where}: 'target' is a {type(target).__name__}, lm-eval logs a string")
    target, doc = str(target), record.get("doc")
    named = isinstance(doc_to_target, str) and not FUNCTION_SOURCE.match(doc_to_target)
    if named and isinstance(doc, dict) and doc_to_target in doc:  # a field: its value, typed as the data holds it
        value = doc[doc_to_target]
        if not isinstance(value, (str, int, list)):
            raise _RowSkipped(f"the target field holds a {type(value).__name__}: neither an index nor a choice's text")
        if not isinstance(value, list) and str(value) != target:
            raise ValueError(f"{where}: 'target' {_short(target)} is not the row's doc[{doc_to_target!r}] = "
                             f"{_short(str(value))}, which the task's doc_to_target names")
        return _choice_index(value, choices)
    if isinstance(doc_to_target, int) and not isinstance(doc_to_target, bool):
        if target != str(doc_to_target):
            raise ValueError(f"{where}: 'target' {_short(target)} is not the task's doc_to_target {doc_to_target}")
        return _choice_index(doc_to_target, choices)
    value = _template_value(target)
    if named and (isinstance(doc, dict) or "{{" in doc_to_target):  # a template, rendered into the logged target
        return _choice_index(value, choices)
    if isinstance(value, int) and target in choices and choices.index(target) != value:
        raise ValueError(f"{where}: the target {_short(target)} is choice {value} read as an index but choice "
                         f"{choices.index(target)} read as text, and the task's doc_to_target does not say which "
                         "lm-eval used (keep the run's results_<date>.json beside its samples file)")
    return _choice_index(value, choices)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's argmax


def _lm_eval_row(lls: list[float], choices: list[str], gold: int) -> dict[str, float]:
    """lm-eval's per-row ``acc``, ``acc_norm`` (NaN when a choice is empty) and ``brier_score`` of ``(ℓ, gold)``:
    ``argmax ℓ == gold``, ``argmax ℓ_i/len(choice_i) == gold``, ``Σ_j (softmax(ℓ)_j − 1[j = gold])²``."""
    top = max(lls)
    weights = [math.exp(ll - top) for ll in lls]
    total = sum(weights)
    brier = sum((w / total - (j == gold)) ** 2 for j, w in enumerate(weights))
    acc_norm = float(_argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold) if all(choices) else math.nan
    return {"acc": float(_argmax(lls) == gold), "acc_norm": acc_norm, "brier_score": brier}


def _cross_check(record: dict, ours: dict[str, float], choices: list[str], gold: int, where: str) -> list[str]:
    """The names of lm-eval's per-row metrics in ``record`` that equal ``ours``; a logged ``acc``/``acc_norm`` or
    logged gold index that differs is a ValueError naming the row."""
    checked = []
    for name in ("acc", "acc_norm"):
        logged = record.get(name)
        if logged is None or math.isnan(ours[name]):
            continue
        if isinstance(logged, bool) or not isinstance(logged, (int, float)) or float(logged) != ours[name]:
            raise ValueError(f"{where}: lm-eval logged {name} = {_short(logged) if isinstance(logged, str) else logged}"
                             f" for this row, but its target {_short(str(record.get('target')))} read as choice "
                             f"{gold} ({_short(choices[gold])}) gives {ours[name]:g}: calibkern would not read this "
                             "task as lm-eval did")
        checked.append(name)
    for name in LOGGED_GOLD:
        entry = record.get(name)
        if isinstance(entry, list) and entry and isinstance(entry[0], int) and entry[0] != gold:
            raise ValueError(f"{where}: lm-eval logged gold {entry[0]} in {name} for this row, but its target "
                             f"{_short(str(record.get('target')))} reads as choice {gold}")
    return checked


def _parse_row(record: dict, where: str, config: dict, normalize: str) -> tuple[list[float], int, dict, list]:
    """``(z, gold, lm-eval's row metrics, names cross-checked)`` of one samples line (module docstring); raises
    ``_TaskSkipped``/``_RowSkipped``/ValueError."""
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
    if not all(isinstance(r.get("arg_0"), str) for r in requests):
        raise ValueError(f"{where}: a request's context (arg_0) is not a string")
    if len({r["arg_0"] for r in requests}) > 1:
        raise _TaskSkipped("the choices are in the contexts (a multiple-input task such as winogrande): the samples "
                           "do not hold the gold index")
    lls = []
    for i, response in enumerate(responses):
        value = response[0] if isinstance(response, list) and response else response
        try:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError
            lls.append(float(value))
        except ValueError:
            raise ValueError(f"{where}: filtered_resps[{i}] is not a log-likelihood: {_short(value)}") from None
    if len(lls) < 2:
        raise _RowSkipped("fewer than 2 choices (output_type loglikelihood?)")
    if not all(math.isfinite(value) for value in lls):
        raise _RowSkipped("a log-likelihood is NaN or infinite")
    delimiter = config.get("target_delimiter", " ")
    delimiter = delimiter if isinstance(delimiter, str) else " "
    choices = [r["arg_1"][len(delimiter):] if r["arg_1"].startswith(delimiter) else r["arg_1"] for r in requests]
    gold = _gold_index(record, choices, config.get("doc_to_target"), where)
    ours = _lm_eval_row(lls, choices, gold)
    checked = _cross_check(record, ours, choices, gold, where)
    z = lls
    if normalize == "chars":
        if not all(choices):
            raise _RowSkipped("an empty choice (normalize chars divides by its length)")
        z = [value / len(choice) for value, choice in zip(lls, choices)]
    return z, gold, ours, checked


def _lines(path: str):
    """``(file:line, record)`` of each non-blank line; a line that is not a JSON object is an error naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a readable file")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            record = _parse_json(line, where, "a JSON line")
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a samples line is a JSON object, got {type(record).__name__}")
            yield where, record


def load_task_samples(path: str | os.PathLike, task: str | None = None, *, normalize: str = "none") -> TaskSamples:
    """Read one ``samples_<task>_<date>.jsonl`` (module docstring); the task's configuration in the run's
    ``results_<date>.json``, when present, gives its output type, target delimiter and ``doc_to_target``. A
    malformed line, or a row whose gold disagrees with lm-eval's logged metrics, is a ValueError naming it."""
    V.check_choice(normalize, "normalize", NORMALIZATIONS)
    path = os.fspath(path)
    task = task or _task_of(path)
    config = _task_config(_results_of(path), task)
    skip_reason = _config_skip_reason(config)
    rows, labels, doc_ids, skipped = [], [], [], {}
    lm_eval_rows: dict[str, list[float]] = {name: [] for name in LM_EVAL_KEYS}
    cross_checked = {"acc": 0, "acc_norm": 0}
    rows_read, first_filter = 0, None
    for where, record in _lines(path):
        rows_read += 1
        if skip_reason is not None:
            continue
        first_filter = record.get("filter") if first_filter is None else first_filter
        try:
            if record.get("filter") != first_filter:
                raise _RowSkipped(f"filter {record.get('filter')!r} (the report reads filter {first_filter!r})")
            z, gold, ours, checked = _parse_row(record, where, config, normalize)
        except _RowSkipped as skip:
            skipped.setdefault(skip.args[0], []).append(where)
            continue
        except _TaskSkipped as skip:
            skip_reason = f"{skip.args[0]} ({where})"
            continue
        doc_id = record.get("doc_id")
        if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (int, str))):
            raise ValueError(f"{where}: 'doc_id' is a {type(doc_id).__name__}, lm-eval logs an integer")
        rows.append(z)
        labels.append(gold)
        doc_ids.append(doc_id)
        for name in LM_EVAL_KEYS:
            lm_eval_rows[name].append(ours[name])
        for name in checked:
            cross_checked[name] += 1
    if skip_reason is None and not rows:
        skip_reason = "no usable row" if rows_read else "the file holds no row"
    if skip_reason is not None:
        rows, labels, doc_ids = [], [], []
        lm_eval_rows, cross_checked = {name: [] for name in LM_EVAL_KEYS}, {"acc": 0, "acc_norm": 0}
    width = max((len(z) for z in rows), default=0)
    logits = torch.full((len(rows), width), -math.inf, dtype=torch.float64)
    for i, z in enumerate(rows):
        logits[i, : len(z)] = torch.tensor(z, dtype=torch.float64)
    return TaskSamples(task, path, logits, torch.tensor(labels, dtype=torch.long), doc_ids, rows_read, skipped,
                       skip_reason, lm_eval_rows, cross_checked)


def read_samples(path: str | os.PathLike, *, normalize: str = "none") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{task: (logits [N, K] float64, labels [N] int64)}`` of every multiple-choice task of one model's lm-eval
    output (the newest samples file per task) or one samples file; skipped tasks are left out
    (:func:`load_task_samples` says why) and a malformed file is an error."""
    files = find_samples_files(path)
    tasks = {task: load_task_samples(file, task, normalize=normalize) for task, file in files.items()}
    return {task: (s.logits, s.labels) for task, s in tasks.items() if s.skip_reason is None}


# ---- metrics --------------------------------------------------------------------------------------------------------

def padded_option_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 option logits for the metrics: ``log_softmax`` over each row's own choices, its ``-inf`` pads set to
    ``-1e4·max(1, T)`` so that ``softmax(z / T)`` gives them exactly 0 and every other entry its unpadded value."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    pad = torch.tensor(-PAD_GAP * max(1.0, float(temperature)), dtype=torch.float64)
    return torch.where(torch.isneginf(logits), pad, log_probs).float()


def _lm_eval_means(samples: list[TaskSamples]) -> dict[str, float]:
    """lm-eval's ``acc``, ``acc_norm`` and ``brier_score``: the means of the per-row values over the used rows
    (``acc_norm`` left out when a row has an empty choice)."""
    means = {}
    for name in LM_EVAL_KEYS:
        values = [v for s in samples for v in s.lm_eval_rows[name]]
        if values and not any(math.isnan(v) for v in values):
            means[name] = math.fsum(values) / len(values)
    return means


def _metrics(logits: torch.Tensor, labels: torch.Tensor, samples: list[TaskSamples], *, n_bins: int,
             temperature: float, seed: int) -> tuple[torch.Tensor, dict]:
    option_logits = padded_option_logits(logits, temperature)
    metrics = calibration_metrics(option_logits, labels, n_bins=n_bins, temperature=temperature, seed=seed)
    return option_logits, {**metrics, **_lm_eval_means(samples)}


def _evaluate_task(samples: TaskSamples, *, n_bins: int, temperature: float, seed: int) -> EvaluationResult:
    option_logits, metrics = _metrics(samples.logits, samples.labels, [samples], n_bins=n_bins,
                                      temperature=temperature, seed=seed)
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


def _evaluate_files(files: dict[str, str], model: str, *, n_bins: int, normalize: str, temperature: float,
                    seed: int, bar) -> LmEvalReport:
    """One model's report from its ``{task: samples file}``; a task whose name cannot be a folder, whose file is
    malformed or disagrees with lm-eval, or whose metrics cannot be computed goes to ``failed``, and the others are
    still evaluated."""
    samples, results, failed = {}, {}, {}
    for task, file in files.items():
        try:
            _folder_name(task, f"task name (from {file})")
            samples[task] = load_task_samples(file, task, normalize=normalize)
            if samples[task].skip_reason is None:
                results[task] = _evaluate_task(samples[task], n_bins=n_bins, temperature=temperature, seed=seed)
        except (ValueError, OSError) as error:
            failed[task] = str(error)
        bar.update(1)
    micro = None
    if len(results) == 1:  # one task: its rows are all the rows
        micro = next(iter(results.values())).metrics
    elif results:
        used = [samples[task] for task in results]
        micro = _metrics(*_concatenated(used), used, n_bins=n_bins, temperature=temperature, seed=seed)[1]
    return LmEvalReport(samples, results, micro, n_bins, normalize, temperature, failed, model)


def _checked_options(n_bins, normalize, temperature) -> tuple[int, str, float]:
    V.check_choice(normalize, "normalize", NORMALIZATIONS)
    return V.check_n_bins(n_bins), normalize, V.check_positive_float(temperature, "temperature")


def evaluate_models(
    path: str | os.PathLike,
    *,
    n_bins: int = 10,
    normalize: str = "none",
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, LmEvalReport]:
    """``{model folder: report}`` of an lm-eval output directory, one report per folder holding samples files
    (:func:`find_model_folders`; a progress bar over the files). Folders nested in one another are refused,
    naming them, and so is a folder whose results files name different models."""
    from tqdm.auto import tqdm

    n_bins, normalize, temperature = _checked_options(n_bins, normalize, temperature)
    folders = find_model_folders(path)
    for outer in folders:
        nested = [inner for inner in folders if inner != outer and (outer == "." or inner.startswith(outer + "/"))]
        if nested:
            raise ValueError(f"{os.fspath(path)}: the model folders {outer!r} and {', '.join(map(repr, nested))} "
                             "lie one inside the other: point --lm-eval at one model's folder or at a folder of "
                             "model folders side by side")
    for folder, files in folders.items() if os.path.isdir(path) else ():  # one file is one run
        _check_one_model(folder, files)
    reports = {}
    with tqdm(total=sum(map(len, folders.values())), desc="lm-eval samples", unit="file",
              disable=not progress) as bar:
        for folder, files in folders.items():
            reports[folder] = _evaluate_files(files, folder, n_bins=n_bins, normalize=normalize,
                                              temperature=temperature, seed=seed, bar=bar)
    return reports


def _check_one_model(folder: str, files: dict[str, str]) -> None:
    """Refuse a folder whose ``results_<date>.json`` files name more than one model (runs of several models written
    into one folder, as ``--output_path x.json`` does)."""
    models = {}
    directory = os.path.dirname(next(iter(files.values())))
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        if not (name.startswith("results_") and name.endswith(".json")):
            continue
        try:
            model = _model_name(_read_results(os.path.join(directory, name)))
        except (ValueError, OSError):  # an unreadable results file fails its task when the task is read
            continue
        if model is not None:
            models.setdefault(model, name)
    if len(models) > 1:
        named = "; ".join(f"{model} ({file})" for model, file in models.items())
        raise ValueError(f"the folder {folder!r} holds runs of {len(models)} models: {named}: one report is one "
                         "model; give each model's run its own folder")


def evaluate_samples(path: str | os.PathLike, **options) -> LmEvalReport:
    """The report of one model's lm-eval output (a directory with one folder of samples files, or one samples
    file): the calibration metrics of every multiple-choice task and their micro-average over the rows of all
    evaluated tasks. ``options`` are those of :func:`evaluate_models`; a directory of several models is refused."""
    reports = evaluate_models(path, **options)
    return _only_folder(path, reports)[1]


# ---- the report files -----------------------------------------------------------------------------------------------

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
            "cross_checked": dict(s.cross_checked),
            "metrics": report.results[task].metrics if task in report.results else None,
        }
    micro = None
    if report.micro is not None:
        micro = {"tasks": list(report.results), "metrics": report.micro}
    return {"model": report.model, "n_bins": report.n_bins, "normalize": report.normalize,
            "temperature": report.temperature, "tasks": tasks, "failed": dict(report.failed), "micro_average": micro}


def _markdown(summary: dict) -> str:
    from ..pipeline.report import TABLE_COLUMNS

    columns = [c for c in TABLE_COLUMNS if c != "n"]
    title = "# Calibration of an lm-eval run" + ("" if summary["model"] == "." else f": {summary['model']}")
    lines = [title, "",
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
    failed = [f"- {task}: **failed**: {reason}" for task, reason in summary["failed"].items()]
    if failed:
        lines += ["", "## Failed", ""] + failed
    notes = [f"- {task}: task skipped: {t['skip_reason']}" for task, t in tasks.items() if t["skip_reason"]]
    notes += [f"- {task}: {s['count']} rows skipped: {reason} (first: {s['first']})"
              for task, t in tasks.items() for reason, s in t["skipped_rows"].items()]
    if notes:
        lines += ["", "## Skipped", ""] + notes
    lines += ["", "## Files", ""]
    for task, t in tasks.items():
        checked = [f"{n} on {c} rows" for n, c in t["cross_checked"].items() if c]
        lines.append(f"- {task}: {t['file']}" + (f" (lm-eval's {', '.join(checked)} agree)" if checked else
                                                 "" if t["skip_reason"] else " (no per-row acc logged to check)"))
    return "\n".join(lines) + "\n"


def _write_summary(out_dir: str, summary: dict, markdown: str) -> None:
    from ..pipeline.provenance import provenance

    os.makedirs(out_dir, exist_ok=True)
    with open(_inside(out_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump({**summary, "provenance": provenance()}, handle, indent=2)
    with open(_inside(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)


def write_report(report: LmEvalReport, out_dir: str | os.PathLike) -> str:
    """``out_dir/<task>/{metrics.json, predictions.jsonl, reliability.png}`` per evaluated task and
    ``out_dir/summary.{md,json}``; returns the Markdown summary. Every task name is checked to be one folder
    inside ``out_dir`` before anything is written."""
    from ..pipeline.provenance import provenance
    from ..pipeline.report import reliability_data, write_reliability_plot

    out_dir = os.fspath(out_dir)
    task_dirs = {task: _inside(out_dir, _folder_name(task, "task name")) for task in report.results}
    produced_by = provenance()
    for task, result in report.results.items():
        write_evaluation(replace(result, metrics={**result.metrics, "provenance": produced_by}),
                         task_dirs[task])
        rel = reliability_data(result.option_logits, result.labels, report.n_bins, report.temperature,
                               result.metrics.get("smece_sigma"))
        write_reliability_plot(os.path.join(task_dirs[task], "reliability.png"), task, rel, result.metrics)
    summary = _summary(report)
    markdown = _markdown(summary)
    _write_summary(out_dir, summary, markdown)
    return markdown


def write_reports(reports: dict[str, LmEvalReport], out_dir: str | os.PathLike) -> str:
    """The files of :func:`write_report`: for one model in ``out_dir``, for several in ``out_dir/<model folder>``
    each, with ``out_dir/summary.{md,json}`` holding every model's summary; returns the Markdown."""
    out_dir = os.fspath(out_dir)
    if len(reports) == 1:
        return write_report(next(iter(reports.values())), out_dir)
    model_dirs = {}
    for model in reports:
        model_dirs[model] = _inside(out_dir, *[_folder_name(part, "model folder") for part in model.split("/")])
    markdown = [write_report(report, model_dirs[model]) for model, report in reports.items()]
    summary = {"models": {model: _summary(report) for model, report in reports.items()}}
    text = "\n".join(markdown)
    _write_summary(out_dir, summary, text)
    return text


def report_problems(reports: dict[str, LmEvalReport]) -> str | None:
    """What should make the command fail, in one line (``None`` if nothing): the failed tasks (the first
    ``MAX_LISTED`` with their reasons; the summary has all), and the models of which no task could be evaluated."""
    prefix = "" if len(reports) == 1 else "{}/"
    failed = [f"{prefix.format(model)}{task}: {reason}"
              for model, r in reports.items() for task, reason in r.failed.items()]
    empty = [model for model, r in reports.items() if not r.results and not r.failed]
    problems = []
    if failed:
        more = f"; and {len(failed) - MAX_LISTED} more" if len(failed) > MAX_LISTED else ""
        problems.append(f"{len(failed)} task{'' if len(failed) == 1 else 's'} failed: "
                        + "; ".join(failed[:MAX_LISTED]) + more)
    if empty:
        where = "" if len(reports) == 1 else f" (model folder{'' if len(empty) == 1 else 's'} {', '.join(empty)})"
        problems.append(f"no multiple-choice task could be evaluated{where}")
    return "; ".join(problems) or None
