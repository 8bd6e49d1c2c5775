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
import time

from .. import hf
from . import stages
from .io import load_model, load_pairs
from .report import demo_checks, reliability_data, write_report

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
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name):
        nonlocal start
        now = time.perf_counter()
        timings[name] = now - start
        start = now

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
    lap("load")

    def evaluate(m):
        return stages.evaluate(m, tokenizer, splits["test"], option_ids, n_bins=n_bins, template=template, seed=seed,
                               progress=progress)

    results = {}
    if pairs:
        results["base"] = evaluate(model)
        lap("evaluate_base")
        dpo_options, dpo_settings = _options(config, "dpo", lora, seed, progress)
        aligned = stages.align(model, tokenizer, pairs, dpo_options, beta=float(dpo_settings["beta"]),
                               template=template)
    else:
        aligned = model
    results["dpo"] = evaluate(aligned)
    lap("dpo")
    _, results["temperature_scaling"] = stages.temperature_scaling(
        aligned, tokenizer, splits["calibration"], splits["test"], option_ids, n_bins=n_bins, template=template,
        seed=seed, progress=progress)
    lap("temperature_scaling")
    ls_options, ls_settings = _options(config, "label_smoothing", lora, seed, progress)
    results["label_smoothing"] = evaluate(stages.label_smoothing(
        aligned, tokenizer, splits["train"], option_ids, ls_options, epsilon=float(ls_settings["epsilon"]),
        template=template))
    lap("label_smoothing")
    cft_options, cft_settings = _options(config, "cft", lora, seed, progress)
    results["cft"] = evaluate(stages.cft(aligned, tokenizer, splits["train"], option_ids, cft_options,
                                         lam=float(cft_settings["lam"]), n_bins=n_bins, template=template,
                                         bin_prior=float(cft_settings["bin_prior"])))
    lap("cft")
    rcft_options, rcft_settings = _options(config, "rcft", lora, seed, progress)
    for name, lam in (("rcft", float(rcft_settings["lam"])), ("rcft_no_reg", 0.0)):
        results[name] = evaluate(stages.rcft(aligned, tokenizer, splits["train"] + new, splits["calibration"],
                                             option_ids, rcft_options, lam=lam, n_bins=n_bins, template=template,
                                             refresh_steps=_optional_int(rcft_settings["refresh_steps"])))
        lap(name)

    metrics = {name: r.metrics for name, r in results.items()}
    report = {
        "config": config,
        "timings": {**timings, "total": sum(timings.values())},
        "stages": metrics,
        "reliability": {name: reliability_data(r.option_logits, r.labels, n_bins, r.metrics.get("temperature", 1.0))
                        for name, r in results.items()},
        "checks": demo_checks(metrics) if "base" in metrics else [],
    }
    write_report(report, out)
    return report
