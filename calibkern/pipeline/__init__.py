"""The embedded default pipeline (docs/demo.md): generated data, tiny Llama, stages, report; names imported
when first used (calibkern._lazy)."""

from .._lazy import lazy_exports

EXPORTS = {
    "DEMO_TEMPLATE": ".config", "DemoConfig": ".config", "build_world": ".demo", "run_demo": ".demo",
    "load_results": ".report", "write_report": ".report", "LoraOptions": ".stages", "TrainOptions": ".stages",
}
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)

__all__ = ["DEMO_TEMPLATE", "DemoConfig", "LoraOptions", "TrainOptions", "build_world", "load_results", "run_demo",
           "write_report"]
