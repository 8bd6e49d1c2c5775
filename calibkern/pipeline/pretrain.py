"""The demo's base model: a causal LM pretrained on a stream that draws each fact's answer afresh.

Training minimises the expected loss over that stream: cross-entropy on the prompt tokens plus, at the answer
position, the cross-entropy against the fact's answer distribution ``p_f`` (uniform for new facts),

    L = (Σ_prompt −log q(x_t) + Σ_j −p_f[j] log q(option_j)) / (prompt tokens + answers),

which is the mean of the sampled-answer loss with the sampling noise integrated out. A model that minimises it
predicts ``p_f`` and is calibrated — the pre-trained starting point of docs/demo.md.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..hf.data import MCQCollator, MCQExample, encode_prompt
from .synthetic import N_OPTIONS, Fact


def answer_targets(facts: list[Fact]) -> torch.Tensor:
    """``[F, K]`` float32: the stream's answer distribution per fact (uniform for new facts)."""
    rows = [f.answer_probs if f.known else np.full(N_OPTIONS, 1.0 / N_OPTIONS) for f in facts]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def pretrain(model, tokenizer, facts: list[Fact], option_ids, *, template: str, steps: int, batch_size: int,
             lr: float, seed: int, warmup: int = 100, progress: bool = True):
    """Train ``model`` in place for ``steps`` AdamW steps (linear warm-up, then linear decay to 0)."""
    prompts = [encode_prompt(tokenizer, MCQExample(f.question, f.choices, 0), template) for f in facts]
    targets = answer_targets(facts)
    collate = MCQCollator(tokenizer.pad_token_id)
    option_ids = torch.tensor(list(option_ids), dtype=torch.long)
    generator = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps))
    model.train()
    for _ in tqdm(range(steps), desc="pretrain base", unit="step", disable=not progress):
        chosen = generator.integers(len(facts), size=batch_size)
        batch = collate([{"input_ids": prompts[i], "attention_mask": [1] * len(prompts[i]),
                          "labels": prompts[i]} for i in chosen])
        log_probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        targets_next = batch["labels"][:, 1:]
        supervised = targets_next.ne(-100)
        token_nll = -log_probs[:, :-1].gather(2, targets_next.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        last = batch["attention_mask"].sum(1) - 1
        answer_log_probs = log_probs[torch.arange(len(chosen)), last][:, option_ids]
        answer_nll = -(targets[chosen] * answer_log_probs).sum()
        loss = ((token_nll * supervised).sum() + answer_nll) / (supervised.sum() + len(chosen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model
