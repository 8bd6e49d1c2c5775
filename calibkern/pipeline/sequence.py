"""The stage sequence after alignment that ``calibkern pipeline`` and ``calibkern demo`` share, its timing, and
the report dict both write: the aligned model evaluated, temperature scaling, label smoothing, CFT, then RCFT
and its λ = 0 ablation (docs/demo.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..hf.data import MCQExample
from . import stages
from .provenance import provenance
from .report import demo_checks, reliability_data


class Clock:
    """Wall-clock seconds per named step."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self._start
        self._start = now


@dataclass
class StagePlan:
    """What the stages after alignment train on, with which settings, and what they are evaluated on."""

    tokenizer: Any
    option_ids: Sequence[int]
    template: str
    n_bins: int
    seed: int
    progress: bool
    test: Sequence[MCQExample]
    calibration: Sequence[MCQExample]
    label_smoothing_rows: Sequence[MCQExample]
    cft_rows: Sequence[MCQExample]
    rcft_rows: Sequence[MCQExample]
    label_smoothing: stages.TrainOptions
    epsilon: float
    cft: stages.TrainOptions
    cft_lam: float
    bin_prior: float
    rcft: stages.TrainOptions
    rcft_lam: float
    refresh_steps: int | None

    def evaluate(self, model):
        return stages.evaluate(model, self.tokenizer, self.test, self.option_ids, n_bins=self.n_bins,
                               template=self.template, seed=self.seed, progress=self.progress)


def run_after_alignment(plan: StagePlan, aligned, results: dict, clock: Clock) -> dict:
    """Evaluate ``aligned`` as ``"dpo"`` and run every later stage into ``results`` (name → evaluation)."""
    results["dpo"] = plan.evaluate(aligned)
    clock.lap("dpo")
    _, results["temperature_scaling"] = stages.temperature_scaling(
        aligned, plan.tokenizer, plan.calibration, plan.test, plan.option_ids, n_bins=plan.n_bins,
        template=plan.template, seed=plan.seed, progress=plan.progress)
    clock.lap("temperature_scaling")
    results["label_smoothing"] = plan.evaluate(stages.label_smoothing(
        aligned, plan.tokenizer, plan.label_smoothing_rows, plan.option_ids, plan.label_smoothing,
        epsilon=plan.epsilon, template=plan.template))
    clock.lap("label_smoothing")
    results["cft"] = plan.evaluate(stages.cft(aligned, plan.tokenizer, plan.cft_rows, plan.option_ids, plan.cft,
                                              lam=plan.cft_lam, n_bins=plan.n_bins, template=plan.template,
                                              bin_prior=plan.bin_prior))
    clock.lap("cft")
    for name, lam in (("rcft", plan.rcft_lam), ("rcft_no_reg", 0.0)):
        results[name] = plan.evaluate(stages.rcft(aligned, plan.tokenizer, plan.rcft_rows, plan.calibration,
                                                  plan.option_ids, plan.rcft, lam=lam, n_bins=plan.n_bins,
                                                  template=plan.template, refresh_steps=plan.refresh_steps))
        clock.lap(name)
    return results


def report(config: dict, clock: Clock, results: dict, n_bins: int, seed: int) -> dict:
    """The results dict written as results.json: configuration, provenance (versions, commit, backend, threads,
    seed, CPU), timings, metrics per stage, reliability data, and the paper's claims checked when the base model
    was evaluated."""
    metrics = {name: r.metrics for name, r in results.items()}
    return {
        "config": config,
        "provenance": provenance(seed),
        "timings": {**clock.timings, "total": sum(clock.timings.values())},
        "stages": metrics,
        "reliability": {name: reliability_data(r.option_logits, r.labels, n_bins, r.metrics.get("temperature", 1.0),
                                               r.metrics.get("smece_sigma"))
                        for name, r in results.items()},
        "checks": demo_checks(metrics) if "base" in metrics else [],
    }
