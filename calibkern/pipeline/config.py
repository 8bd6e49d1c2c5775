"""The demo's configuration: world, model, and every stage's training budget."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEMO_TEMPLATE = "{question}\n{options}\nAnswer:"


@dataclass
class DemoConfig:
    """Sizes and budgets of ``calibkern demo`` (defaults: the full demo; :meth:`small`: the test run).

    World (``calibkern.pipeline.synthetic``): ``n_known`` facts the pretraining stream teaches, ``n_new`` facts
    it carries without answer information. Splits, all drawn fresh from each fact's answer distribution:
    ``dpo_pairs`` preference pairs (known facts), ``cft_per_fact`` SFT rows per known fact (CFT, label
    smoothing; the first ``rcft_known_per_fact`` of them are the known half of RCFT's data),
    ``new_per_fact`` rows per new fact (RCFT's added
    knowledge), ``calibration_per_fact`` held-out rows per fact (temperature fit, RCFT's E-step), and
    ``test_per_fact`` test rows per fact whose answers follow the distribution in exact proportion.
    """

    seed: int = 0
    n_known: int = 240
    n_new: int = 80
    template: str = DEMO_TEMPLATE
    n_bins: int = 10
    # model and tokenizer
    vocab_size: int = 1024
    hidden_size: int = 64
    n_layers: int = 2
    # base model: cross-entropy against the pretraining stream's answer distribution
    base_steps: int = 1000
    base_batch_size: int = 64
    base_lr: float = 5e-3
    # DPO (trl.DPOTrainer)
    dpo_pairs: int = 2400
    dpo_batch_size: int = 16
    dpo_lr: float = 1e-3
    dpo_beta: float = 0.1
    # splits
    cft_per_fact: int = 16
    rcft_known_per_fact: int = 8
    new_per_fact: int = 4
    calibration_per_fact: int = 4
    test_per_fact: int = 20
    # CFT / label smoothing / RCFT
    batch_size: int = 32
    cft_epochs: float = 2.0
    cft_lr: float = 3e-4
    cft_lam: float = 1.0
    cft_includes_new: bool = False
    label_smoothing: float = 0.1
    rcft_epochs: float = 6.0
    rcft_lr: float = 1e-3
    rcft_lam: float = 0.3
    rcft_refresh_steps: int = 10

    @classmethod
    def small(cls, seed: int = 0) -> "DemoConfig":
        """A few-second configuration for tests: every stage runs, numbers mean nothing."""
        return cls(seed=seed, n_known=24, n_new=8, vocab_size=400, base_steps=20, base_batch_size=16,
                   dpo_pairs=64, cft_per_fact=2, rcft_known_per_fact=2, new_per_fact=2, calibration_per_fact=2,
                   test_per_fact=4, batch_size=16, cft_epochs=1.0, rcft_epochs=2.0)

    def replace(self, **changes) -> "DemoConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown demo option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
