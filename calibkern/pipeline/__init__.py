"""The embedded default pipeline (docs/demo.md): generated data, tiny Llama, stages, report."""

from .config import DEMO_TEMPLATE, DemoConfig
from .demo import build_world, run_demo
from .report import load_results, write_report
from .stages import LoraOptions, TrainOptions

__all__ = ["DEMO_TEMPLATE", "DemoConfig", "LoraOptions", "TrainOptions", "build_world", "load_results", "run_demo",
           "write_report"]
