"""The ``calibkern`` program (also ``python -m calibkern``): one subcommand per pipeline stage (docs/demo.md).

This module only parses arguments and calls :mod:`calibkern.pipeline`. A user error (a bad option, a missing or
malformed file, a template with unknown fields, an unloadable model directory) prints
``calibkern: error: <what, where>`` on stderr and exits with status 2, never a traceback; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

SUBCOMMANDS = ("demo", "align", "evaluate", "baselines", "cft", "rcft", "pipeline", "report", "info")


def _common(parser: argparse.ArgumentParser, *, model=True, data=True, out_default=None, training=False,
            inputs_required=True):
    from .hf.data import DEFAULT_TEMPLATE

    if model:
        parser.add_argument("--model", required=inputs_required, help="a local Hugging Face causal-LM directory")
    if data:
        parser.add_argument("--data", required=inputs_required,
                            help="multiple-choice rows: JSONL, CSV or a datasets directory")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE,
                        help="prompt format string with {question} and {options} (default: the paper's)")
    parser.add_argument("--n-bins", type=int, default=10, help="equal-width confidence bins (default 10)")
    parser.add_argument("--out", required=out_default is None, default=out_default, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if training:
        parser.add_argument("--epochs", type=float, default=1.0)
        parser.add_argument("--lr", type=float, default=1e-3)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
        parser.add_argument("--lora-alpha", type=float, default=16.0)
        parser.add_argument("--lora-dropout", type=float, default=0.0)
        parser.add_argument("--lora-target-modules", default="q_proj,k_proj,v_proj,o_proj",
                            help="comma-separated module names to adapt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calibkern", description="Calibration-aware fine-tuning of aligned LLMs "
                                     "(CFT / RCFT): stages, evaluation and an offline demo.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")

    demo = commands.add_parser("demo", help="the embedded default pipeline, offline, on a tiny Llama")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--seeds", default=None, metavar="S,S,...",
                      help="run the demo once per seed (instead of --seed) into OUT/seed_<s>, summarised in "
                           "OUT/summary.md")
    demo.add_argument("--n-bins", type=int, default=10)
    demo.add_argument("--quick", action="store_true", help="a few-second configuration (numbers mean nothing)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a DemoConfig field, e.g. --set rcft_epochs=12 (repeatable)")
    demo.add_argument("--no-progress", action="store_true")

    evaluate = commands.add_parser("evaluate", help="metrics.json and predictions.jsonl of a model on MCQ data")
    _common(evaluate, inputs_required=False)
    evaluate.add_argument("--temperature", type=float, default=1.0)
    evaluate.add_argument("--token-level", action="store_true",
                          help="token-level calibration of text rows ({\"text\"} or {\"prompt\", \"completion\"}, "
                               "the completion scored): token ECE, Full-ECE, accuracy, NLL, a reliability diagram")
    evaluate.add_argument("--max-length", type=int, default=None, help="--token-level: tokens kept per row")
    evaluate.add_argument("--lm-eval", metavar="PATH",
                          help="instead of --model/--data: an lm-evaluation-harness output directory or samples file "
                          "(lm_eval --log_samples), one report per task (docs/lm_eval.md)")
    evaluate.add_argument("--normalize", choices=("none", "chars"),
                          help="with --lm-eval: divide each log-likelihood by its choice's length in characters "
                          "(lm-eval's acc_norm; default none)")

    align = commands.add_parser("align", help="DPO with trl.DPOTrainer on preference pairs (JSONL with rejected)")
    _common(align, training=True)
    align.add_argument("--beta", type=float, default=0.1)

    baselines = commands.add_parser("baselines", help="temperature scaling and label-smoothing SFT")
    _common(baselines, training=True)
    baselines.add_argument("--calibration-data", required=True, help="held-out rows the temperature is fitted on")
    baselines.add_argument("--train-data", required=True, help="SFT rows for label smoothing")
    baselines.add_argument("--epsilon", type=float, default=0.1, help="label smoothing")

    cft = commands.add_parser("cft", help="calibration-aware fine-tuning (completion-only SFT + hard-bin term)")
    _common(cft, training=True)
    cft.add_argument("--lam", type=float, default=1.0)

    rcft = commands.add_parser("rcft", help="regularised CFT (full-sequence SFT + EM regulariser)")
    _common(rcft, training=True)
    rcft.add_argument("--calibration-data", required=True, help="held-out rows for the E-step")
    rcft.add_argument("--lam", type=float, default=1.0)

    pipeline = commands.add_parser("pipeline", help="every stage from a YAML configuration")
    pipeline.add_argument("--config", required=True, help="YAML file (see calibkern.pipeline.runner)")
    pipeline.add_argument("--no-progress", action="store_true")

    report = commands.add_parser("report", help="results.md and reliability diagrams from DIR/results.json")
    report.add_argument("run_dir", metavar="DIR")

    commands.add_parser("info", help="each backend: available, and how it was built or why not")
    return parser


def _parse_overrides(items: list[str], config):
    """``KEY=VALUE`` strings to typed :class:`DemoConfig` changes."""
    import dataclasses

    types = {f.name: type(getattr(config, f.name)) for f in dataclasses.fields(config)}
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        if types[key] is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {item!r}: {key} takes true or false")
            changes[key] = value.lower() in ("true", "1")
        else:
            try:
                changes[key] = types[key](value)
            except ValueError:
                raise ValueError(f"--set {item!r}: {key} takes a {types[key].__name__}") from None
    return config.replace(**changes)


def _train_options(args):
    from .pipeline.stages import LoraOptions, TrainOptions

    lora = LoraOptions(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                       target_modules=[m for m in args.lora_target_modules.split(",") if m])
    return TrainOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, lora=lora,
                        progress=not args.no_progress)


def _check_args(args) -> None:
    """What can be checked before any file or model is loaded: the template, the bin count, the output path."""
    from .hf.data import check_template

    if getattr(args, "template", None) is not None:
        try:
            check_template(args.template)
        except ValueError as error:
            raise ValueError(f"--template: {error}") from None
    if getattr(args, "n_bins", 1) < 1:
        raise ValueError(f"--n-bins must be ≥ 1, got {args.n_bins}")
    if getattr(args, "seeds", None) is not None:
        from .pipeline.seeds import parse_seeds

        parse_seeds(args.seeds)
    out = getattr(args, "out", None)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")


def _evaluate_lm_eval(args, progress: bool) -> None:
    from .integrations import lm_eval

    if args.model is not None or args.data is not None:
        raise ValueError("--lm-eval reads an lm-eval run's log-likelihoods: give it without --model and --data")
    report = lm_eval.evaluate_samples(args.lm_eval, n_bins=args.n_bins, normalize=args.normalize or "none",
                                      temperature=args.temperature, seed=args.seed, progress=progress)
    print(lm_eval.write_report(report, args.out))
    if not report.results:
        raise ValueError(f"--lm-eval {args.lm_eval}: no multiple-choice task could be evaluated; the reasons are in "
                         f"{args.out}/summary.md")
    print(f"wrote {args.out}/summary.md, summary.json and <task>/metrics.json, predictions.jsonl, reliability.png")


def _evaluate_token_level(args, progress: bool) -> None:
    from .hf import token_evaluation
    from .pipeline import io

    if args.lm_eval is not None or args.model is None or args.data is None:
        raise ValueError("--token-level needs --model and --data (text rows), without --lm-eval")
    if args.temperature != 1.0:
        raise ValueError("--temperature applies to multiple-choice evaluation, not to --token-level")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be ≥ 2, got {args.max_length}")
    rows = token_evaluation.load_text_rows(args.data)
    model, tokenizer = io.load_model(args.model)
    result = token_evaluation.evaluate_tokens(model, tokenizer, rows, n_bins=args.n_bins, max_length=args.max_length,
                                              progress=progress)
    token_evaluation.write_token_evaluation(result, args.out)
    m = result.metrics
    print(f"wrote {args.out}/token_metrics.json and token_reliability.png: token ECE {m['token_ece']:.4f} "
          f"(debiased {m['token_ece_debiased']:.4f}), Full-ECE {m['full_ece']:.4f}, accuracy "
          f"{m['token_accuracy']:.4f}, NLL {m['nll']:.4f} over {m['n_tokens']} tokens")


def _info() -> None:
    import platform

    import torch

    from . import __version__, backends

    print(f"calibkern {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(backends.format_backend_report())


def _run(args) -> None:
    if args.command == "info":
        return _info()
    from . import hf, pipeline
    from .pipeline import io, report, runner, seeds, stages

    _check_args(args)

    progress = not getattr(args, "no_progress", False)
    if not progress:  # the dataset preparation inside TRL and the trainers shows its own bars
        import datasets

        datasets.disable_progress_bars()
    if args.command == "demo":
        config = pipeline.DemoConfig.small(args.seed) if args.quick else pipeline.DemoConfig(seed=args.seed)
        config = _parse_overrides(args.set, config.replace(n_bins=args.n_bins))
        if args.seeds is not None:
            summary = seeds.run_seeds(config, seeds.parse_seeds(args.seeds), args.out, progress=progress)
            print(seeds.summary_markdown(summary))
            print(f"wrote {args.out}/summary.json, summary.md and seed_<s>/ per seed")
            return
        results = pipeline.run_demo(config, args.out, progress=progress)
        print(open(os.path.join(args.out, "results.md"), encoding="utf-8").read())
        failed = [c["claim"] for c in results["checks"] if not c["holds"]]
        print(f"wrote {args.out}/results.json, results.md and reliability_*.png"
              + (f"; claims not met: {'; '.join(failed)}" if failed else ""))
        return
    if args.command == "pipeline":
        results = runner.run_pipeline(runner.load_config(args.config), progress=progress)
        print(report.markdown(results))
        return
    if args.command == "report":
        results = pipeline.load_results(args.run_dir)
        pipeline.write_report(results, args.run_dir)
        print(report.markdown(results))
        return

    if args.command == "align":
        pairs = io.load_pairs(args.data)
        model, tokenizer = io.load_model(args.model)
        aligned = stages.align(model, tokenizer, pairs, _train_options(args), beta=args.beta, template=args.template)
        stages.save_model(aligned, tokenizer, args.out)
        print(f"wrote the aligned model to {args.out}")
        return

    if args.command == "evaluate" and args.token_level:
        return _evaluate_token_level(args, progress)
    if args.command == "evaluate" and args.lm_eval is not None:
        return _evaluate_lm_eval(args, progress)
    if args.command == "evaluate" and (args.model is None or args.data is None):
        raise ValueError("evaluate needs --model and --data, or --lm-eval PATH")
    if getattr(args, "normalize", None) is not None:
        raise ValueError("--normalize applies to --lm-eval only")
    examples = hf.load_mcq(args.data)
    extra = {name: hf.load_mcq(getattr(args, name)) for name in ("calibration_data", "train_data") if hasattr(args, name)}
    model, tokenizer = io.load_model(args.model)
    option_ids = hf.detect_option_ids(tokenizer, examples[0].n_options, args.template)
    if args.command == "evaluate":
        result = hf.evaluate(model, tokenizer, examples, option_ids, template=args.template, n_bins=args.n_bins,
                             temperature=args.temperature, progress=progress, seed=args.seed)
        hf.write_evaluation(result, args.out)
        m = result.metrics
        print(f"wrote {args.out}/metrics.json and predictions.jsonl: ECE {m['ece']:.4f} (debiased "
              f"{m['ece_debiased']:.4f}, 95 % CI [{m['ece_ci'][0]:.4f}, {m['ece_ci'][1]:.4f}]), smooth ECE "
              f"{m['smece']:.4f}, accuracy {m['accuracy']:.4f}")
    elif args.command == "baselines":
        temperature, scaled = stages.temperature_scaling(model, tokenizer, extra["calibration_data"], examples,
                                                         option_ids, n_bins=args.n_bins, template=args.template,
                                                         seed=args.seed, progress=progress)
        hf.write_evaluation(scaled, os.path.join(args.out, "temperature_scaling"))
        smoothed = stages.label_smoothing(model, tokenizer, extra["train_data"], option_ids, _train_options(args),
                                          epsilon=args.epsilon, template=args.template)
        stages.save_model(smoothed, tokenizer, os.path.join(args.out, "label_smoothing", "model"))
        hf.write_evaluation(stages.evaluate(smoothed, tokenizer, examples, option_ids, n_bins=args.n_bins,
                                            template=args.template, seed=args.seed, progress=progress),
                            os.path.join(args.out, "label_smoothing"))
        print(f"wrote {args.out}/temperature_scaling (T = {temperature:.4f}) and {args.out}/label_smoothing")
    elif args.command == "cft":
        trained = stages.cft(model, tokenizer, examples, option_ids, _train_options(args), lam=args.lam,
                             n_bins=args.n_bins, template=args.template)
        stages.save_model(trained, tokenizer, args.out)
        print(f"wrote the CFT model to {args.out}")
    elif args.command == "rcft":
        trained = stages.rcft(model, tokenizer, examples, extra["calibration_data"], option_ids, _train_options(args),
                              lam=args.lam, n_bins=args.n_bins, template=args.template)
        stages.save_model(trained, tokenizer, args.out)
        print(f"wrote the RCFT model to {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 on success, 2 on a reported error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .hf.data import MCQDataError

    try:
        _run(args)
    except (OSError, MCQDataError, ValueError) as error:  # OSError: missing, unreadable or unwritable paths
        if args.debug:
            raise
        print(f"calibkern: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
