"""The demo's generated multiple-choice world: facts whose answers carry real uncertainty.

Each fact is a question with four choices and a true answer distribution ``p_f`` drawn from a
Dirichlet whose concentration varies per fact (log-uniform), so facts range from near-certain to
near-uniform and a model that learns ``p_f`` is calibrated at intermediate confidence.

Two kinds of facts:

* *known* facts: the pretraining stream draws their answers from ``p_f``;
* *new* facts: the pretraining stream carries the question with an answer drawn uniformly, so the
  base model has no knowledge of them; only RCFT's knowledge split (a few samples each) teaches them.

Every split is a list of rows ``{"question", "choices", "answer", "fact"}`` (``answer`` an index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LETTERS = "ABCD"
N_OPTIONS = 4
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_OBJECTS = [
    "apples", "rivers", "lanterns", "copper", "violins", "owls", "tea", "maps", "salt", "bells",
    "amber", "kites", "moss", "ink", "pearls", "ropes", "figs", "glass", "wool", "drums",
]
_VERBS = ["trade", "collect", "guard", "fear", "paint", "carry", "hide", "praise"]


@dataclass(frozen=True)
class Fact:
    """One question, its choices, and the true distribution of its answer."""

    question: str
    choices: tuple[str, ...]
    answer_probs: np.ndarray  # float64 [4], sums to 1
    known: bool


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct pronounceable names of three syllables."""
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(3)).capitalize())
    # A set's iteration order follows the per-process string hash (PYTHONHASHSEED): sort before the seeded
    # shuffle, or the same seed would give different worlds in different processes.
    order = sorted(names)
    return [order[i] for i in rng.permutation(len(order))]


def make_facts(n_known: int, n_new: int, seed: int, concentration_range=(0.25, 4.0)) -> list[Fact]:
    """``n_known`` known then ``n_new`` new facts; ``p_f ~ Dirichlet(α·1)``, log α uniform in the range."""
    rng = np.random.default_rng(seed)
    lo, hi = np.log(concentration_range[0]), np.log(concentration_range[1])
    facts = []
    for i, name in enumerate(_names(rng, n_known + n_new)):
        alpha = float(np.exp(rng.uniform(lo, hi)))
        probs = rng.dirichlet(np.full(N_OPTIONS, alpha))
        choices = tuple(str(c) for c in rng.choice(_OBJECTS, N_OPTIONS, replace=False))
        question = f"What do the {name} {rng.choice(_VERBS)}?"
        facts.append(Fact(question, choices, probs, known=i < n_known))
    return facts


def _row(facts: list[Fact], f: int, answer: int) -> dict:
    return {"question": facts[f].question, "choices": list(facts[f].choices), "answer": int(answer),
            "fact": f}


def sample_rows(facts: list[Fact], fact_ids, per_fact: int, rng: np.random.Generator,
                uniform_for_new: bool = False) -> list[dict]:
    """``per_fact`` rows per fact with answers drawn from ``p_f`` (uniform for new facts if asked)."""
    rows = []
    for f in fact_ids:
        probs = facts[f].answer_probs
        if uniform_for_new and not facts[f].known:
            probs = np.full(N_OPTIONS, 1.0 / N_OPTIONS)
        for a in rng.choice(N_OPTIONS, size=per_fact, p=probs):
            rows.append(_row(facts, f, a))
    return rows


def quantised_rows(facts: list[Fact], fact_ids, per_fact: int) -> list[dict]:
    """``per_fact`` rows per fact whose answers follow ``p_f`` in exact proportion (largest remainder).

    The test set: its empirical accuracy for a prediction equals ``p_f[pred]`` up to 1/per_fact
    rounding, so the measured ECE carries (almost) no label-sampling noise.
    """
    rows = []
    for f in fact_ids:
        raw = facts[f].answer_probs * per_fact
        counts = np.floor(raw).astype(int)
        for j in np.argsort(-(raw - counts), kind="stable")[: per_fact - counts.sum()]:
            counts[j] += 1
        for a, c in enumerate(counts):
            rows.extend(_row(facts, f, a) for _ in range(c))
    return rows


def preference_pairs(facts: list[Fact], fact_ids, n_pairs: int, rng: np.random.Generator) -> list[dict]:
    """DPO pairs: two distinct sampled answers to a fact; the annotator prefers the truly likelier one."""
    pairs = []
    fact_ids = list(fact_ids)
    while len(pairs) < n_pairs:
        f = fact_ids[rng.integers(len(fact_ids))]
        probs = facts[f].answer_probs
        a, b = rng.choice(N_OPTIONS, size=2, p=probs)
        if a == b:
            continue
        chosen, rejected = (a, b) if probs[a] >= probs[b] else (b, a)
        pairs.append({**_row(facts, f, chosen), "rejected": int(rejected)})
    return pairs
