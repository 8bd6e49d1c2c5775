"""The ``calibkern`` program (also ``python -m calibkern``): one subcommand per pipeline stage (docs/demo.md).

This module only parses arguments and calls :mod:`calibkern.pipeline`. A user error (a bad option, a missing or
malformed file, a template with unknown fields, an unloadable model directory, an ``--out`` that would replace
something) prints ``calibkern: error: <what, where>`` on stderr and exits with status 2, never a traceback;
``--debug`` shows the traceback instead. Building the parser imports neither torch nor transformers, so
``--help`` is instant and ``info``, ``report`` and ``evaluate --lm-eval`` run without the ``hf`` extra; the
other commands say which extra to install. Every output folder is written through
:class:`calibkern.pipeline.outputs.StagedOutput` (refused over earlier results without ``--overwrite``, never over
an input; locked; renamed into place whole, with a completion marker).
"""

from __future__ import annotations

import argparse
import os
import sys

SUBCOMMANDS = ("demo", "align", "evaluate", "baselines", "cft", "rcft", "pipeline", "report", "info")
HF_EXTRA = "pip install 'calibkern[hf]'"
TEMPLATE_HELP = ("prompt format string with {question} and {options}; \\n and \\t are read as a newline and a tab "
                 "(default: the template the model was trained with, recorded by calibkern beside it, else the "
                 "paper's: '### Question: {question}\\n\\nOptions:\\n{options}\\n\\nAnswer with only a single "
                 "letter.\\n### Answer:')")
NO_PROGRESS_HELP = "no progress bars, and none of transformers' or TRL's log lines and warnings"


def _outputs(parser: argparse.ArgumentParser, out_help: str, default: str | None = None) -> None:
    if default is None:
        parser.add_argument("--out", required=True, help=out_help)
    else:
        parser.add_argument("--out", default=default, help=out_help + " (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out that already holds files (a model, earlier results); an --out that "
                             "is or contains an input is refused even so")


def _seed(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {what} (default: %(default)s)")


def _n_bins(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-bins", type=int, default=10, help="equal-width confidence bins (default: %(default)s)")


def _common(parser: argparse.ArgumentParser, *, data_help: str, out_help: str, n_bins=True, training=False,
            inputs_required=True) -> None:
    parser.add_argument("--model", required=inputs_required,
                        help="a local Hugging Face causal-LM directory (config.json, weights, tokenizer files)")
    parser.add_argument("--data", required=inputs_required, help=data_help)
    parser.add_argument("--template", default=None, help=TEMPLATE_HELP)
    if n_bins:
        _n_bins(parser)
    _outputs(parser, out_help)
    _seed(parser, "the data order, initialisation and interval resamples" if training else "the interval resamples")
    parser.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    if training:
        parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data, fractions allowed "
                            "(default: %(default)s)")
        parser.add_argument("--lr", type=float, default=1e-3, help="learning rate, constant (default: %(default)s)")
        parser.add_argument("--batch-size", type=int, default=32, help="rows per step (default: %(default)s)")
        parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0: full fine-tuning (default: "
                            "%(default)s)")
        parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
        parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
        parser.add_argument("--lora-target-modules", default="q_proj,k_proj,v_proj,o_proj",
                            help="comma-separated module names to adapt (default: %(default)s)")


MCQ_DATA = "multiple-choice rows: JSONL, CSV or a datasets directory (docs/demo.md)"
MODEL_OUT = "folder the trained model is written to, with the template it was trained with"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calibkern", description="Calibration-aware fine-tuning of aligned LLMs "
                                     "(CFT / RCFT): stages, evaluation and an offline demo.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")

    demo = commands.add_parser("demo", help="the embedded default pipeline, offline, on a tiny Llama")
    _outputs(demo, "output folder: results.json, results.md, reliability_*.png, models/, data/", "runs/demo")
    _seed(demo, "the generated world, the data and the training")
    demo.add_argument("--seeds", default=None, metavar="S,S,...",
                      help="run the demo once per seed (instead of --seed) into OUT/seed_<s>, summarised in "
                           "OUT/summary.md")
    _n_bins(demo)
    demo.add_argument("--quick", action="store_true", help="a few-second configuration (numbers mean nothing)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a DemoConfig field, e.g. --set rcft_epochs=12 (repeatable)")
    demo.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)

    evaluate = commands.add_parser("evaluate", help="metrics.json and predictions.jsonl of a model on MCQ data")
    _common(evaluate, data_help=MCQ_DATA + " (--token-level: text rows)", inputs_required=False,
            out_help="output folder: metrics.json, predictions.jsonl")
    evaluate.add_argument("--temperature", type=float, default=1.0,
                          help="divide the option logits by T before the softmax (default: %(default)s)")
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
    _common(align, data_help="preference pairs: JSONL rows question, choices, answer (the chosen option) and "
            "optionally rejected (index or letter; without it the answer is paired with every other option)",
            out_help=MODEL_OUT, n_bins=False, training=True)
    align.add_argument("--beta", type=float, default=0.1, help="DPO's β: strength of the pull towards the "
                       "starting model (default: %(default)s)")

    baselines = commands.add_parser("baselines", help="temperature scaling and label-smoothing SFT")
    _common(baselines, data_help=MCQ_DATA + ": the test rows both baselines are evaluated on",
            out_help="output folder: temperature_scaling/ and label_smoothing/ (with its model)", training=True)
    baselines.add_argument("--calibration-data", required=True, help="held-out rows the temperature is fitted on")
    baselines.add_argument("--train-data", required=True, help="SFT rows for label smoothing")
    baselines.add_argument("--epsilon", type=float, default=0.1, help="label smoothing (default: %(default)s)")

    cft = commands.add_parser("cft", help="calibration-aware fine-tuning (completion-only SFT + hard-bin term)")
    _common(cft, data_help=MCQ_DATA, out_help=MODEL_OUT, training=True)
    cft.add_argument("--lam", type=float, default=1.0, help="weight λ of the hard-bin calibration term "
                     "(default: %(default)s, as in the demo)")

    rcft = commands.add_parser("rcft", help="regularised CFT (full-sequence SFT + EM regulariser)")
    _common(rcft, data_help=MCQ_DATA, out_help=MODEL_OUT, training=True)
    rcft.add_argument("--calibration-data", required=True, help="held-out rows for the E-step")
    rcft.add_argument("--lam", type=float, default=0.3, help="weight λ of the EM regulariser (default: "
                      "%(default)s, as in the demo; λ = 1 collapsed the demo's confidence, docs/demo.md)")

    pipeline = commands.add_parser("pipeline", help="every stage from a YAML configuration")
    pipeline.add_argument("--config", required=True, help="YAML file (see calibkern.pipeline.runner); its out: is "
                          "the output folder")
    pipeline.add_argument("--overwrite", action="store_true", help="replace an out: folder that already holds files")
    pipeline.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)

    report = commands.add_parser("report", help="results.md and reliability diagrams from DIR/results.json")
    report.add_argument("run_dir", metavar="DIR", help="a folder written by calibkern demo or calibkern pipeline")
    report.add_argument("--out", default=None, help="write the report there instead of rewriting DIR's "
                        "results.md and PNGs")
    report.add_argument("--overwrite", action="store_true", help="replace an --out that already holds files")

    commands.add_parser("info", help="each backend: available, and how it was built or why not")
    return parser


def _note(message: str) -> None:
    print(f"calibkern: {message}", file=sys.stderr)


def _require(command: str, modules: tuple[str, ...]) -> None:
    """Import ``modules`` now, so that a missing one is an error naming the extra to install."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            extra = f"the plot extra (pip install 'calibkern[plot]') or {HF_EXTRA}" if module == "matplotlib" else \
                f"the hf extra: {HF_EXTRA}"
            raise ValueError(f"calibkern {command} needs {module}, which is not installed ({error}); install "
                             f"{extra}") from None


def _needed_modules(args) -> tuple[str, ...]:
    """What each command imports beyond torch (the hf extra's packages)."""
    if args.command == "info":
        return ()
    if args.command == "report" or getattr(args, "lm_eval", None) is not None:
        return ("matplotlib",)
    if args.command == "evaluate":
        return ("transformers", "matplotlib") if args.token_level else ("transformers",)
    return ("transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "matplotlib")


def environment_problems() -> list[str]:
    """Environment variables calibkern reads whose values mean nothing to it."""
    from .backends import BACKENDS

    problems = []
    backend = os.environ.get("CALIBKERN_BACKEND")
    if backend and backend not in (*BACKENDS, "auto"):
        problems.append(f"CALIBKERN_BACKEND={backend!r} is not a backend (one of {', '.join(BACKENDS)}, auto)")
    jit = os.environ.get("CALIBKERN_JIT")
    if jit not in (None, "0", "1"):
        problems.append(f"CALIBKERN_JIT={jit!r} is neither 0 (no build at first use) nor 1 (build at first use)")
    return problems


def read_escapes(template: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a template typed in a shell, as a newline, a tab and a backslash."""
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    out, i = [], 0
    while i < len(template):
        if template[i] == "\\" and i + 1 < len(template) and template[i + 1] in escapes:
            out.append(escapes[template[i + 1]])
            i += 2
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


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
    """What can be checked before any file or model is loaded: the environment, the template, the bin count, the
    seeds, and which extra the command needs."""
    _require(args.command, _needed_modules(args))
    from . import _validate

    problems = environment_problems()
    if problems:
        raise ValueError("; ".join(problems))
    if getattr(args, "template", None) is not None:
        from .hf.data import check_template

        args.template = read_escapes(args.template)
        try:
            check_template(args.template)
        except ValueError as error:
            raise ValueError(f"--template: {error}") from None
    if getattr(args, "n_bins", None) is not None:
        _validate.check_n_bins(args.n_bins, "--n-bins")
    if getattr(args, "seeds", None) is not None:
        from .pipeline.seeds import parse_seeds

        parse_seeds(args.seeds)


def _quiet() -> None:
    """``--no-progress``: no bars from datasets, transformers or the Hub, and none of their log lines or warnings."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        for module in ("transformers", "trl", "peft", "accelerate", "datasets", "torch"):
            warnings.filterwarnings("ignore", category=category, module=module)


def _model_template(args) -> str:
    """The template a command with ``--model`` uses: ``--template`` if given (warned when the model records another),
    else the template recorded beside the model (said on stderr), else the paper's."""
    from .hf.data import DEFAULT_TEMPLATE
    from .pipeline import io

    record = io.read_training_record(args.model)
    where = os.path.join(args.model, io.TRAINING_RECORD)
    if record is None:
        return DEFAULT_TEMPLATE if args.template is None else args.template
    if args.template is None:
        _note(f"using the template {args.model} was trained with ({where}): {record['template']!r}")
        return record["template"]
    if args.template != record["template"]:
        _note(f"warning: --template {args.template!r} differs from the template {args.model} was trained with "
              f"({record['template']!r}, {where}); the numbers will not be that run's")
    return args.template


def _option_ids(args, tokenizer, n_options: int, template: str) -> list[int]:
    """The tokenizer's option ids, warned about when the model's training record names other ones."""
    from .hf.data import detect_option_ids
    from .pipeline import io

    option_ids = detect_option_ids(tokenizer, n_options, template)
    record = io.read_training_record(args.model)
    if record is not None and record["option_ids"][:n_options] != option_ids:
        _note(f"warning: the option tokens {option_ids} differ from those {args.model} was trained with "
              f"({record['option_ids']}, {io.TRAINING_RECORD})")
    return option_ids


def _evaluate_lm_eval(args, progress: bool, staged) -> None:
    from .integrations import lm_eval

    if args.model is not None or args.data is not None:
        raise ValueError("--lm-eval reads an lm-eval run's log-likelihoods: give it without --model and --data")
    reports = lm_eval.evaluate_models(args.lm_eval, n_bins=args.n_bins, normalize=args.normalize or "none",
                                      temperature=args.temperature, seed=args.seed, progress=progress)
    print(lm_eval.write_reports(reports, staged.path))
    staged.commit("evaluate --lm-eval")
    problems = lm_eval.report_problems(reports)
    if problems:
        raise ValueError(f"--lm-eval {args.lm_eval}: {problems}; the reasons are in {args.out}/summary.md")
    print(f"wrote {args.out}/summary.md, summary.json and <task>/metrics.json, predictions.jsonl, reliability.png")


def _evaluate_token_level(args, progress: bool, staged) -> None:
    from .hf import token_evaluation
    from .pipeline import io
    from .pipeline.provenance import provenance

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
    result.metrics["provenance"] = provenance(args.seed)
    token_evaluation.write_token_evaluation(result, staged.path)
    staged.commit("evaluate --token-level")
    m = result.metrics
    print(f"wrote {args.out}/token_metrics.json and token_reliability.png: token ECE {number(m['token_ece'])} "
          f"(debiased {number(m['token_ece_debiased'])}), Full-ECE {number(m['full_ece'])}, accuracy "
          f"{number(m['token_accuracy'])}, NLL {number(m['nll'])} over {m['n_tokens']} tokens")


def number(value: float) -> str:
    """Four decimals, or three significant digits in scientific notation for values that would show as 0.0000."""
    return f"{value:.2e}" if value != 0 and abs(value) < 5e-4 else f"{value:.4f}"


def _info() -> None:
    import platform

    import torch

    from . import __version__, backends

    print(f"calibkern {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(backends.format_backend_report())
    problems = environment_problems()
    if problems:
        raise ValueError("; ".join(problems))


def _demo(args, progress: bool) -> None:
    from . import pipeline
    from .pipeline import outputs, seeds
    from .pipeline.provenance import provenance

    config = pipeline.DemoConfig.small(args.seed) if args.quick else pipeline.DemoConfig(seed=args.seed)
    config = _parse_overrides(args.set, config.replace(n_bins=args.n_bins))
    with outputs.StagedOutput(args.out, overwrite=args.overwrite) as staged:
        if args.seeds is not None:
            summary = seeds.run_seeds(config, seeds.parse_seeds(args.seeds), staged.path, progress=progress)
            staged.commit("demo", {"provenance": provenance()})
            print(seeds.summary_markdown(summary))
            print(f"wrote {args.out}/summary.json, summary.md and seed_<s>/ per seed")
            return
        results = pipeline.run_demo(config, staged.path, progress=progress)
        staged.commit("demo", {"provenance": results["provenance"]})
    with open(os.path.join(args.out, "results.md"), encoding="utf-8") as handle:
        print(handle.read())
    failed = [c["claim"] for c in results["checks"] if not c["holds"]]
    print(f"wrote {args.out}/results.json, results.md and reliability_*.png"
          + (f"; claims not met: {'; '.join(failed)}" if failed else ""))


def _pipeline(args, progress: bool) -> None:
    from .pipeline import outputs, report, runner

    config = runner.load_config(args.config)
    out = runner.output_folder(config)
    inputs = [config["model"], args.config, *config["data"].values()]
    with outputs.StagedOutput(out, overwrite=args.overwrite, inputs=inputs, option="out:") as staged:
        results = runner.run_pipeline(config, out=staged.path, progress=progress)
        staged.commit("pipeline", {"provenance": results["provenance"]})
    print(report.markdown(results))


def _report(args) -> None:
    from .pipeline import outputs, report

    results = report.load_results(args.run_dir)
    outputs.check_complete(args.run_dir)
    if args.out is None:
        with outputs.FolderLock(args.run_dir, "DIR"):
            report.write_derived(results, args.run_dir)
    else:
        with outputs.StagedOutput(args.out, overwrite=args.overwrite, inputs=[args.run_dir]) as staged:
            report.write_report(results, staged.path)
            staged.commit("report", {"provenance": results.get("provenance")})
    print(report.markdown(results))


def _write_evaluation(result, directory: str, seed: int) -> None:
    from . import hf
    from .pipeline.provenance import provenance

    result.metrics["provenance"] = provenance(seed)
    hf.write_evaluation(result, directory)


def _model_command(args, progress: bool, staged) -> None:
    """evaluate, align, baselines, cft, rcft: a model and data in, a model or metrics out."""
    from . import hf
    from .pipeline import io, stages
    from .pipeline.provenance import provenance

    template = _model_template(args)
    if args.command == "align":
        pairs = io.load_pairs(args.data)
        model, tokenizer = io.load_model(args.model)
        option_ids = _option_ids(args, tokenizer, pairs[0].example.n_options, template)
        aligned = stages.align(model, tokenizer, pairs, _train_options(args), beta=args.beta, template=template)
        stages.save_model(aligned, tokenizer, staged.path,
                          io.training_record("align", template, option_ids, provenance(args.seed)))
        staged.commit("align")
        print(f"wrote the aligned model to {args.out}")
        return
    examples = hf.load_mcq(args.data)
    extra = {name: hf.load_mcq(getattr(args, name)) for name in ("calibration_data", "train_data") if hasattr(args, name)}
    model, tokenizer = io.load_model(args.model)
    option_ids = _option_ids(args, tokenizer, examples[0].n_options, template)
    if args.command == "evaluate":
        result = stages.evaluate(model, tokenizer, examples, option_ids, template=template, n_bins=args.n_bins,
                                 temperature=args.temperature, progress=progress, seed=args.seed)
        _write_evaluation(result, staged.path, args.seed)
        staged.commit("evaluate")
        m = result.metrics
        print(f"wrote {args.out}/metrics.json and predictions.jsonl: ECE {number(m['ece'])} (debiased "
              f"{number(m['ece_debiased'])}, 95 % CI [{number(m['ece_ci'][0])}, {number(m['ece_ci'][1])}]), smooth "
              f"ECE {number(m['smece'])}, accuracy {number(m['accuracy'])}")
        return
    record = io.training_record(args.command, template, option_ids, provenance(args.seed))
    if args.command == "baselines":
        temperature, scaled = stages.temperature_scaling(model, tokenizer, extra["calibration_data"], examples,
                                                         option_ids, n_bins=args.n_bins, template=template,
                                                         seed=args.seed, progress=progress)
        _write_evaluation(scaled, os.path.join(staged.path, "temperature_scaling"), args.seed)
        smoothed = stages.label_smoothing(model, tokenizer, extra["train_data"], option_ids, _train_options(args),
                                          epsilon=args.epsilon, template=template)
        stages.save_model(smoothed, tokenizer, os.path.join(staged.path, "label_smoothing", "model"),
                          {**record, "stage": "label_smoothing"})
        _write_evaluation(stages.evaluate(smoothed, tokenizer, examples, option_ids, n_bins=args.n_bins,
                                          template=template, seed=args.seed, progress=progress),
                          os.path.join(staged.path, "label_smoothing"), args.seed)
        staged.commit("baselines")
        print(f"wrote {args.out}/temperature_scaling (T = {temperature:.4f}) and {args.out}/label_smoothing")
        return
    if args.command == "cft":
        trained = stages.cft(model, tokenizer, examples, option_ids, _train_options(args), lam=args.lam,
                             n_bins=args.n_bins, template=template)
    else:
        trained = stages.rcft(model, tokenizer, examples, extra["calibration_data"], option_ids, _train_options(args),
                              lam=args.lam, n_bins=args.n_bins, template=template)
    stages.save_model(trained, tokenizer, staged.path, record)
    staged.commit(args.command)
    print(f"wrote the {args.command.upper()} model to {args.out}")


def _inputs(args) -> list[str]:
    """The paths a command reads: its ``--out`` may neither be nor contain them."""
    names = ("model", "data", "calibration_data", "train_data", "lm_eval")
    return [getattr(args, name) for name in names if getattr(args, name, None) is not None]


def _run(args) -> None:
    if args.command == "info":
        return _info()
    _check_args(args)
    progress = not getattr(args, "no_progress", False)
    if not progress and "transformers" in _needed_modules(args):
        _quiet()
    if args.command == "demo":
        return _demo(args, progress)
    if args.command == "pipeline":
        return _pipeline(args, progress)
    if args.command == "report":
        return _report(args)
    if args.command == "evaluate" and not args.token_level and args.lm_eval is None and (
            args.model is None or args.data is None):
        raise ValueError("evaluate needs --model and --data, or --lm-eval PATH")
    if getattr(args, "normalize", None) is not None and args.lm_eval is None:
        raise ValueError("--normalize applies to --lm-eval only")
    from .pipeline.outputs import StagedOutput

    with StagedOutput(args.out, overwrite=args.overwrite, inputs=_inputs(args)) as staged:
        if args.command == "evaluate" and args.token_level:
            return _evaluate_token_level(args, progress, staged)
        if args.command == "evaluate" and args.lm_eval is not None:
            return _evaluate_lm_eval(args, progress, staged)
        return _model_command(args, progress, staged)


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
