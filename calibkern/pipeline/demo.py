"""``calibkern demo``: the embedded default pipeline, offline on a CPU in minutes (docs/demo.md).

World → tokenizer trained locally → tiny Llama → base model (pretrained on the answer stream) → DPO
(``trl.DPOTrainer``) → evaluate → temperature scaling, label smoothing → CFT → RCFT and its λ = 0 ablation →
report. Every stage is evaluated on the same test split: ``test_per_fact`` rows per fact whose answers follow
the fact's distribution in exact proportion, so a prediction's measured accuracy is its expected accuracy (up to
1/``test_per_fact`` rounding) and the ECE carries almost no label-sampling noise.

Data per stage (see :class:`~calibkern.pipeline.config.DemoConfig`): DPO pairs and CFT / label-smoothing rows
cover the known facts only (calibration within what the model knows); RCFT trains for accuracy on the first
``rcft_known_per_fact`` CFT rows of each known fact *plus* a few rows per new fact — knowledge the model
lacks, learned from few samples over many epochs, which drives it past what its data supports; its EM regulariser is fed by a held-out calibration split
(``calibration_per_fact`` rows per fact, E-step every ``rcft_refresh_steps`` steps), the same split temperature
scaling is fitted on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..hf.data import MCQExample, answer_continuation, detect_option_ids, format_prompt
from ..hf.alignment import PreferencePair
from . import stages, synthetic
from .config import DemoConfig
from .io import training_record
from .model import tiny_llama
from .pretrain import pretrain
from .report import write_report
from .sequence import Clock, StagePlan, report, run_after_alignment
from .tokenizer import train_tokenizer


@dataclass
class World:
    """The generated facts and every split, as :class:`MCQExample` lists (``pairs``: DPO preferences)."""

    facts: list
    pairs: list
    cft: list
    rcft_known: list
    new: list
    calibration: list
    test: list


def _examples(rows: list[dict], split: str) -> list[MCQExample]:
    return [MCQExample(r["question"], tuple(r["choices"]), r["answer"], source=f"{split}:fact {r['fact']}")
            for r in rows]


def build_world(config: DemoConfig) -> World:
    """All splits, each drawn afresh from the facts' answer distributions with the config's seed."""
    facts = synthetic.make_facts(config.n_known, config.n_new, config.seed)
    rng = np.random.default_rng(config.seed + 1)
    known = [i for i, f in enumerate(facts) if f.known]
    new = [i for i, f in enumerate(facts) if not f.known]
    every = known + new
    pair_rows = synthetic.preference_pairs(facts, known, config.dpo_pairs, rng)
    pairs = [PreferencePair(e, chosen=r["answer"], rejected=r["rejected"])
             for e, r in zip(_examples(pair_rows, "dpo"), pair_rows)]
    if not 1 <= config.rcft_known_per_fact <= config.cft_per_fact:
        raise ValueError(f"rcft_known_per_fact must be in [1, cft_per_fact={config.cft_per_fact}], "
                         f"got {config.rcft_known_per_fact}")
    cft_rows = synthetic.sample_rows(facts, known, config.cft_per_fact, rng)
    # sample_rows groups the rows by fact: RCFT's known rows are the first rcft_known_per_fact of each fact's
    rcft_rows = [r for i, r in enumerate(cft_rows) if i % config.cft_per_fact < config.rcft_known_per_fact]
    return World(
        facts=facts,
        pairs=pairs,
        cft=_examples(cft_rows, "cft"),
        rcft_known=_examples(rcft_rows, "cft"),
        new=_examples(synthetic.sample_rows(facts, new, config.new_per_fact, rng), "new"),
        calibration=_examples(synthetic.sample_rows(facts, every, config.calibration_per_fact, rng), "calibration"),
        test=_examples(synthetic.quantised_rows(facts, every, config.test_per_fact), "test"),
    )


def tokenizer_corpus(world: World, template: str) -> list[str]:
    """Every fact's prompt followed by each possible answer."""
    texts = []
    for fact in world.facts:
        prompt = format_prompt(MCQExample(fact.question, fact.choices, 0), template)
        texts.extend(prompt + answer_continuation(j) for j in range(synthetic.N_OPTIONS))
    return texts


def run_demo(config: DemoConfig, out_dir: str | os.PathLike, *, progress: bool = True, save_models: bool = True) -> dict:
    """Run the whole demo, write the report into ``out_dir``, and return the results dict."""
    torch.manual_seed(config.seed)
    clock = Clock()
    world = build_world(config)
    template, n_bins, seed = config.template, config.n_bins, config.seed
    tokenizer = train_tokenizer(tokenizer_corpus(world, template), config.vocab_size)
    option_ids = detect_option_ids(tokenizer, synthetic.N_OPTIONS, template)
    clock.lap("world_and_tokenizer")

    base = tiny_llama(tokenizer, hidden_size=config.hidden_size, n_layers=config.n_layers, seed=seed)
    pretrain(base, tokenizer, world.facts, option_ids, template=template, steps=config.base_steps,
             batch_size=config.base_batch_size, lr=config.base_lr, seed=seed, progress=progress)
    clock.lap("pretrain_base")

    def options(epochs, lr, batch_size=config.batch_size):
        return stages.TrainOptions(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)

    plan = StagePlan(tokenizer, option_ids, template, n_bins, seed, progress, test=world.test,
                     calibration=world.calibration, label_smoothing_rows=world.cft,
                     cft_rows=world.cft + world.new if config.cft_includes_new else world.cft,
                     rcft_rows=world.rcft_known + world.new,
                     label_smoothing=options(config.cft_epochs, config.cft_lr), epsilon=config.label_smoothing,
                     cft=options(config.cft_epochs, config.cft_lr), cft_lam=config.cft_lam, bin_prior=0.0,
                     rcft=options(config.rcft_epochs, config.rcft_lr), rcft_lam=config.rcft_lam,
                     refresh_steps=config.rcft_refresh_steps)
    results = {"base": plan.evaluate(base)}
    clock.lap("evaluate_base")
    dpo = stages.align(base, tokenizer, world.pairs, options(1.0, config.dpo_lr, config.dpo_batch_size),
                       beta=config.dpo_beta, template=template)
    run_after_alignment(plan, dpo, results, clock)

    out_dir = os.fspath(out_dir)
    results = report(config.to_dict(), clock, results, n_bins, seed)
    if save_models:
        for name, model in (("base", base), ("dpo", dpo)):
            record = training_record(name, template, option_ids, results["provenance"])
            stages.save_model(model, tokenizer, os.path.join(out_dir, "models", name), record)
        write_splits(world, os.path.join(out_dir, "data"))
    write_report(results, out_dir)
    return results


def write_splits(world: World, directory: str) -> None:
    """The generated splits as JSONL files (``question``, ``choices``, ``answer``; pairs add ``rejected``)."""
    import json

    os.makedirs(directory, exist_ok=True)
    splits = {"cft": world.cft, "new": world.new, "calibration": world.calibration, "test": world.test}
    for name, examples in splits.items():
        with open(os.path.join(directory, f"{name}.jsonl"), "w", encoding="utf-8") as handle:
            for e in examples:
                handle.write(json.dumps({"question": e.question, "choices": list(e.choices), "answer": e.answer}) + "\n")
    with open(os.path.join(directory, "pairs.jsonl"), "w", encoding="utf-8") as handle:
        for p in world.pairs:
            handle.write(json.dumps({"question": p.example.question, "choices": list(p.example.choices),
                                     "answer": p.chosen, "rejected": p.rejected}) + "\n")
