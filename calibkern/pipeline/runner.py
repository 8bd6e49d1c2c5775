"""``calibkern pipeline --config FILE.yaml``: every stage on a user's model and data, one report.

YAML keys (paths relative to the working directory)::

    model: path/to/hf-model          # any local Hugging Face causal LM directory
    out: runs/pipeline
    template: "..."                  # optional, default: the paper's prompt
    n_bins: 10
    seed: 0
    data:
      pairs: pairs.jsonl             # DPO preference pairs (see calibkern.pipeline.io.load_pairs)
      train: train.jsonl             # CFT / label smoothing / RCFT rows
      new: new.jsonl                 # optional: rows that add knowledge, RCFT only
      calibration: calibration.jsonl # held out: temperature fit, RCFT's E-step
      test: test.jsonl
    lora: {r: 0, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}
    dpo: {epochs: 1, lr: 1.0e-3, batch_size: 16, beta: 0.1}
    cft: {epochs: 2, lr: 1.0e-3, batch_size: 32, lam: 1.0, bin_prior: 0.0}
    label_smoothing: {epochs: 2, lr: 1.0e-3, batch_size: 32, epsilon: 0.1}
    rcft: {epochs: 10, lr: 1.0e-3, batch_size: 32, lam: 1.0, refresh_steps: null}  # null: E-step per epoch only

Set ``dpo: null`` to skip alignment (the model is already aligned): the ``dpo`` row is then the model as given.
"""

from __future__ import annotations

import os

from .. import hf
from . import stages
from .io import load_model, load_pairs
from .report import write_report
from .sequence import Clock, StagePlan, report, run_after_alignment

STAGE_DEFAULTS = {
    "dpo": {"epochs": 1.0, "lr": 1e-3, "batch_size": 16, "beta": 0.1},
    "cft": {"epochs": 2.0, "lr": 1e-3, "batch_size": 32, "lam": 1.0, "bin_prior": 0.0},
    "label_smoothing": {"epochs": 2.0, "lr": 1e-3, "batch_size": 32, "epsilon": 0.1},
    "rcft": {"epochs": 10.0, "lr": 1e-3, "batch_size": 32, "lam": 1.0, "refresh_steps": None},
}
DATA_KEYS = {"pairs", "train", "new", "calibration", "test"}
LORA_FIELDS = {"r": int, "alpha": float, "dropout": float, "target_modules": list}
TOP_LEVEL = {"model": str, "out": str, "template": str, "n_bins": int, "seed": int, "data": dict, "lora": dict,
             **{stage: dict for stage in STAGE_DEFAULTS}}
_KINDS = {str: "a string", int: "an integer", float: "a number", dict: "a mapping", list: "a list"}


def _check_type(value, kind, where: str, *, nullable: bool = False):
    """``value`` if it is of ``kind`` (an int counts as a number; a bool as neither), else a ``ValueError``."""
    if value is None and nullable:
        return value
    ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, kind)) and not (
        isinstance(value, bool) and kind in (int, float))
    if not ok:
        raise ValueError(f"{where} must be {_KINDS[kind]}{' or null' if nullable else ''}, got "
                         f"{type(value).__name__} {value!r}"[:300])
    return value


def _check_mapping(mapping: dict, fields: dict, path: str, prefix: str = "", nullable=("refresh_steps",)) -> None:
    """Every key of ``mapping`` (the field ``prefix`` of the file ``path``) known to ``fields`` (name → type), and
    of that type (or null for ``nullable``)."""
    unknown = set(map(str, mapping)) - set(fields)
    if unknown:
        raise ValueError(f"{path}: unknown {prefix + ' ' if prefix else ''}key(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(fields)})")
    for key, value in mapping.items():
        _check_type(value, fields[key], f"{path}: {prefix + '.' if prefix else ''}{key}", nullable=key in nullable)


def check_config(config, path: str) -> dict:
    """The configuration's keys and the type of every field (errors name the file and the field)."""
    from .. import _validate

    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    _check_mapping(config, TOP_LEVEL, path, nullable=set(TOP_LEVEL) - {"model", "data"})
    data = config.get("data")
    if data is None or config.get("model") is None:
        raise ValueError(f"{path}: missing key(s) {', '.join(k for k in ('model', 'data') if config.get(k) is None)}")
    _check_mapping(data, dict.fromkeys(DATA_KEYS, str), path, "data")
    missing = [f"data.{k}" for k in ("train", "calibration", "test") if k not in data]
    if config.get("dpo", {}) is not None and "pairs" not in data:
        missing.append("data.pairs")
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    _check_mapping(config.get("lora") or {}, LORA_FIELDS, path, "lora")
    for module in (config.get("lora") or {}).get("target_modules", []):
        _check_type(module, str, f"{path}: lora.target_modules[]")
    for stage, defaults in STAGE_DEFAULTS.items():
        fields = {key: int if key in ("batch_size", "refresh_steps") else float for key in defaults}
        _check_mapping(config.get(stage) or {}, fields, path, stage)
    if config.get("n_bins") is not None:
        _validate.check_n_bins(config["n_bins"], f"{path}: n_bins")
    return config


def load_config(path: str | os.PathLike) -> dict:
    """The YAML pipeline configuration, checked key by key and field by field (errors name the file)."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            config = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: malformed YAML ({error})") from None
        except RecursionError:
            raise ValueError(f"{path}: YAML nested too deeply") from None
    check_config(config, path)
    if config.get("template") is not None:
        try:
            hf.check_template(config["template"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: template: {error}") from None
    return config


def _options(config: dict, stage: str, lora: stages.LoraOptions, seed: int, progress: bool):
    settings = {**STAGE_DEFAULTS[stage], **(config.get(stage) or {})}
    options = stages.TrainOptions(epochs=float(settings.pop("epochs")), lr=float(settings.pop("lr")),
                                  batch_size=int(settings.pop("batch_size")), seed=seed, lora=lora, progress=progress)
    return options, settings


def _optional_int(value):
    return None if value is None else int(value)


def output_folder(config: dict) -> str:
    return config.get("out") or "runs/pipeline"


def run_pipeline(config: dict, *, out: str | None = None, progress: bool = True) -> dict:
    """Every stage of :mod:`calibkern.pipeline.stages` on the configured model and data; writes the report into
    ``out`` (default: the configuration's ``out``)."""
    clock = Clock()
    data = config["data"]
    template = config.get("template") or hf.DEFAULT_TEMPLATE
    n_bins, seed = config.get("n_bins") or 10, config.get("seed") or 0
    out = out or output_folder(config)
    lora = stages.LoraOptions(**(config.get("lora") or {}))
    splits = {k: hf.load_mcq(data[k]) for k in ("train", "calibration", "test")}
    new = hf.load_mcq(data["new"]) if data.get("new") else []
    pairs = load_pairs(data["pairs"]) if config.get("dpo", {}) is not None else []
    model, tokenizer = load_model(config["model"])
    option_ids = hf.detect_option_ids(tokenizer, splits["test"][0].n_options, template)
    clock.lap("load")

    ls_options, ls_settings = _options(config, "label_smoothing", lora, seed, progress)
    cft_options, cft_settings = _options(config, "cft", lora, seed, progress)
    rcft_options, rcft_settings = _options(config, "rcft", lora, seed, progress)
    plan = StagePlan(tokenizer, option_ids, template, n_bins, seed, progress, test=splits["test"],
                     calibration=splits["calibration"], label_smoothing_rows=splits["train"],
                     cft_rows=splits["train"], rcft_rows=splits["train"] + new, label_smoothing=ls_options,
                     epsilon=float(ls_settings["epsilon"]), cft=cft_options, cft_lam=float(cft_settings["lam"]),
                     bin_prior=float(cft_settings["bin_prior"]), rcft=rcft_options,
                     rcft_lam=float(rcft_settings["lam"]), refresh_steps=_optional_int(rcft_settings["refresh_steps"]))
    results = {}
    if pairs:
        results["base"] = plan.evaluate(model)
        clock.lap("evaluate_base")
        dpo_options, dpo_settings = _options(config, "dpo", lora, seed, progress)
        aligned = stages.align(model, tokenizer, pairs, dpo_options, beta=float(dpo_settings["beta"]),
                               template=template)
    else:
        aligned = model
    run_after_alignment(plan, aligned, results, clock)
    results = report(config, clock, results, n_bins, seed)
    write_report(results, out)
    return results
