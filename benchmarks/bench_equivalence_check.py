"""What the first-call equivalence check costs (docs/hf.md#the-equivalence-check).

The check (:func:`calibkern.hf.modeling.check_logit_parity`) runs once, at the first call with labels: the
model's own forward and calibkern's decoder pass on one 16-token slice, and the slice's full ``[16, V]`` logits.
Timed against what it is paid once for:

* the tiny zoo (tests/hf_tiny.py, every architecture): the check against one training step of the patched model
  (forward with labels, backward) on a 4 × 64 batch;
* a 1B-shaped Llama (Llama-3.2-1B's shape: D = 2048, 16 layers, 32 / 8 heads, MLP 8192, V = 128256, tied
  embeddings, fp32, random weights): the check against one no-grad forward with labels of the patched model on a
  1 × 128 batch (a training step costs about three forwards; its gradients would not fit beside the other
  processes on this machine).

Median of ``--repeats`` (benchmarks/timing.py). ``python benchmarks/bench_equivalence_check.py [--skip-1b]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import median_times  # noqa: E402

from calibkern.hf import apply_fused_loss, detect_option_ids  # noqa: E402
from calibkern.hf.modeling import check_logit_parity  # noqa: E402


def sft_batch(vocab: int, rows: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def zoo_rows(repeats: int) -> list[dict]:
    from hf_tiny import ZOO, make_tokenizer, make_zoo_model

    tokenizer = make_tokenizer()
    detect_option_ids(tokenizer, 4)
    rows = []
    for name in ZOO:
        model = apply_fused_loss(make_zoo_model(name, tokenizer), check=False).train()
        batch = sft_batch(len(tokenizer), 4, 64)

        def step():
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()

        times = median_times({"check": lambda: check_logit_parity(model, batch), "step": step}, repeats=repeats)
        rows.append({"model": name, "check_s": times["check"]["median_s"], "baseline_s": times["step"]["median_s"]})
    return rows


def one_b_row(repeats: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = apply_fused_loss(LlamaForCausalLM(config), check=False).eval()
    built = time.perf_counter() - start
    batch = sft_batch(config.vocab_size, 1, 128)

    def forward():
        with torch.no_grad():
            model(**batch)

    times = median_times({"check": lambda: check_logit_parity(model, batch), "forward": forward}, repeats=repeats,
                         warmup=1)
    return {"model": "llama-1b-shape", "check_s": times["check"]["median_s"],
            "baseline_s": times["forward"]["median_s"], "build_s": built}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = zoo_rows(args.repeats)
    if not args.skip_1b:
        rows.append(one_b_row(max(1, args.repeats // 2)))
    for row in rows:
        print(f"{row['model']:>15}  check {row['check_s'] * 1e3:9.1f} ms  "
              f"{'forward 1x128' if row['model'].endswith('1b-shape') else 'step 4x64':>13} "
              f"{row['baseline_s'] * 1e3:9.1f} ms  ratio {row['check_s'] / row['baseline_s']:.2f}")


if __name__ == "__main__":
    main()
