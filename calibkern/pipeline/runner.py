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
TOP_LEVEL = {"model", "out", "template", "n_bins", "seed", "data", "lora", *STAGE_DEFAULTS}
DATA_KEYS = {"pairs", "train", "new", "calibration", "test"}


def load_config(path: str | os.PathLike) -> dict:
    """The YAML pipeline configuration, checked for unknown and missing keys (errors name the file)."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            config = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: malformed YAML ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = set(config) - TOP_LEVEL
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    data = config.get("data") or {}
    missing = [k for k in ("model",) if k not in config] + [f"data.{k}" for k in ("train", "calibration", "test")
                                                          if k not in data]
    if "dpo" not in config or config["dpo"] is not None:
        missing += [] if "pairs" in data else ["data.pairs"]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    if set(data) - DATA_KEYS:
        raise ValueError(f"{path}: unknown data key(s) {', '.join(sorted(set(data) - DATA_KEYS))}")
    if config.get("template") is not None:
        try:
            hf.check_template(config["template"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: template: {error}") from None
    out = config.get("out")
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{path}: out {out}: exists and is not a directory")
    return config


def _options(config: dict, stage: str, lora: stages.LoraOptions, seed: int, progress: bool):
    settings = {**STAGE_DEFAULTS[stage], **(config.get(stage) or {})}
    options = stages.TrainOptions(epochs=float(settings.pop("epochs")), lr=float(settings.pop("lr")),
                                  batch_size=int(settings.pop("batch_size")), seed=seed, lora=lora, progress=progress)
    return options, settings


def _optional_int(value):
    return None if value is None else int(value)


def run_pipeline(config: dict, *, progress: bool = True) -> dict:
    """Every stage of :mod:`calibkern.pipeline.stages` on the configured model and data; writes the report."""
    clock = Clock()
    data = config["data"]
    template = config.get("template") or hf.DEFAULT_TEMPLATE
    n_bins, seed = int(config.get("n_bins", 10)), int(config.get("seed", 0))
    out = config.get("out") or "runs/pipeline"
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
    results = report(config, clock, results, n_bins)
    write_report(results, out)
    return results
