"""One CFT training step on a Llama: calibkern's trainer loss against the published reference code's step.

Both steps train the same ``LlamaForCausalLM`` (built from a config, fp32, fused AdamW — the Hugging Face
``Trainer``'s default optimizer) on the same batch of
completion-only labels (every position -100 except the answer letter at the end), and both include
``zero_grad``, the loss, ``backward`` and ``optimizer.step``:

* ``calibkern``: ``CalibrationTrainer.compute_loss`` (method ``cft``) — one pass of the decoder, then the
  fused linear calibration loss on the final hidden states; only the supervised rows are multiplied by the
  lm_head, so the ``[B, T, V]`` logits never exist.
* ``reference style``: as the published ``CustomCalibrationTrainer.compute_loss`` — ``model(**inputs)`` for
  the full logits and the option logits at the answer position, a second ``model(**inputs)`` for the SFT
  loss (its ``SFTTrainer.compute_loss``), the per-bin Python-loop term of benchmarks/reference_style.py,
  ``(1 − α) L_SFT + α 1e-3 L_cal`` with α = 0.5, backward through both graphs.

Time: median step time, the two steps alternated in one process (benchmarks/timing.py). Memory: each
candidate in a fresh process with glibc's allocator cache off (``timing.UNCACHED_MALLOC``); after the model,
optimizer and batch exist and one warm-up step has created the AdamW state, ``VmHWM`` is reset and the
measured steps run; the row compares the peak RSS *above* the RSS at that point (what a step adds:
activations, logits, gradients). Absolute peaks are in the notes.

The price of calibration (:func:`telemetry_rows`, docs/math.md#token-level-calibration): on the same batch with
every position supervised (SFT labels, the answer letter last), ``CalibrationTrainer.compute_loss`` with cft
and token telemetry on (``token_stats=True``, the default) against the plain fused-CE SFT step of the same
model (:func:`calibkern.hf.apply_fused_loss` without calibration: its own forward with ``labels``), and cft
without telemetry; each step includes ``zero_grad``, backward and the AdamW step, alternated in one process.
"""

from __future__ import annotations

import tempfile

import torch

import timing
from reference_style import reference_style_calibration_loss

SOURCE = "trainer"
FULL = dict(vocab=32000, hidden=256, layers=4, seq=256, batch=4)
QUICK = dict(vocab=32000, hidden=256, layers=2, seq=64, batch=2)
N_BINS = 10
ALPHA, CAL_SCALE = 0.5, 1e-3
OPTION_IDS = (32, 33, 34, 35)  # any four vocabulary ids serve as the option letters A-D


def build(vocab: int, hidden: int, layers: int, seq: int, batch: int, seed: int = 0):
    """``(model, optimizer, inputs, bin_accuracy, bin_counts)``: a random-init Llama and one batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(len(OPTION_IDS) + 40, vocab, (batch, seq), generator=generator)
    answers = torch.tensor(OPTION_IDS)[torch.randint(len(OPTION_IDS), (batch,), generator=generator)]
    input_ids[:, -1] = answers
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = answers
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    bin_accuracy = torch.linspace(0.3, 0.9, N_BINS)
    bin_counts = torch.full((N_BINS,), 100.0, dtype=torch.float64)
    return model, optimizer, inputs, bin_accuracy, bin_counts


def calibkern_loss_fn(model, bin_accuracy, workdir: str, **options):
    """The loss of ``CalibrationTrainer`` (cft, per-bin accuracies given, ``options`` for its
    CalibrationConfig) as ``loss(inputs)``."""
    from transformers import TrainingArguments

    from calibkern.hf import CalibrationConfig, CalibrationTrainer

    args = TrainingArguments(output_dir=workdir, report_to=[], use_cpu=True, save_strategy="no")
    config = CalibrationConfig(method="cft", option_ids=OPTION_IDS, n_bins=N_BINS, bin_accuracy=bin_accuracy.tolist(),
                               **options)
    trainer = CalibrationTrainer(model=model, args=args, calibration=config)
    return lambda inputs: trainer.compute_loss(model, inputs)


def reference_style_loss_fn(model, bin_accuracy, bin_counts):
    """The published step's loss: full logits twice (two forward passes), per-bin Python-loop term."""
    option_ids = list(OPTION_IDS)

    def loss(inputs):
        logits = model(**inputs).logits
        option_logits = logits[:, -2, option_ids]
        sft_loss = model(**inputs).loss
        cal_loss = reference_style_calibration_loss(option_logits, bin_accuracy, bin_counts, N_BINS)
        return (1 - ALPHA) * sft_loss + ALPHA * cal_loss * CAL_SCALE

    return loss


def make_step(candidate: str, sizes: dict, workdir: str):
    model, optimizer, inputs, bin_accuracy, bin_counts = build(**sizes)
    if candidate == "calibkern":
        loss_fn = calibkern_loss_fn(model, bin_accuracy, workdir)
    else:
        loss_fn = reference_style_loss_fn(model, bin_accuracy, bin_counts)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(inputs).backward()
        optimizer.step()

    return step


def step_memory(candidate: str, sizes: dict, steps: int) -> dict:
    """Run in a fresh process: peak RSS of ``steps`` training steps above the RSS after a warm-up step."""
    with tempfile.TemporaryDirectory() as workdir:
        step = make_step(candidate, sizes, workdir)
        step()
        start = timing.current_rss_mib()
        if not timing.reset_peak_rss():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs) here; the peak would include set-up")
        for _ in range(steps):
            step()
        peak = timing.peak_rss_mib()
    return {"start_rss_mib": start, "peak_rss_mib": peak, "step_peak_mib": peak - start}


def rows(quick: bool = False) -> list[dict]:
    return calibration_rows(quick) + telemetry_rows(quick)


def calibration_rows(quick: bool = False) -> list[dict]:
    """calibkern's CFT step against the reference-style step: time and the peak memory a step adds."""
    sizes = QUICK if quick else FULL
    name = ("CFT training step, Llama V={vocab} D={hidden} {layers} layers, seq {seq}, batch {batch}"
            .format(**sizes))
    labels = {"calibkern": "calibkern CalibrationTrainer (one decoder pass, fused loss)",
              "reference": "reference-style step (2 forwards, full logits, per-bin loop)"}
    with tempfile.TemporaryDirectory() as workdir:
        steps = {candidate: make_step(candidate, sizes, workdir) for candidate in labels}
        times = timing.median_times(steps, repeats=2 if quick else 5, warmup=1)
    common = dict(source=SOURCE, name=name, candidate=labels["calibkern"], baseline=labels["reference"])
    time_row = timing.ratio_row(**common, quantity="time per step", unit="s",
                                candidate_value=times["calibkern"]["median_s"],
                                baseline_value=times["reference"]["median_s"], goal="≥ 3× faster", min_gain=3.0,
                                samples={c: t["samples_s"] for c, t in times.items()})
    try:
        memory = {candidate: timing.in_subprocess("bench_trainer", "step_memory", env=timing.UNCACHED_MALLOC,
                                                  candidate=candidate, sizes=sizes, steps=1 if quick else 2)
                  for candidate in labels}
    except RuntimeError as error:
        return [time_row, timing.skipped_row(**common, reason=str(error), goal="lower peak memory")]
    absolute = "; ".join(f"{c}: peak RSS {m['peak_rss_mib']:.0f} MiB, {m['start_rss_mib']:.0f} MiB after warm-up"
                         for c, m in memory.items())
    return [time_row,
            timing.ratio_row(**common, quantity="peak RSS added by a step", unit="MiB",
                             candidate_value=memory["calibkern"]["step_peak_mib"],
                             baseline_value=memory["reference"]["step_peak_mib"],
                             goal="lower peak memory", min_gain=1.0, notes=absolute)]


TELEMETRY_STEPS = {"cft + token telemetry": {"token_stats": True}, "cft": {"token_stats": False}}


def _telemetry_step(candidate: str, sizes: dict, workdir: str):
    """A training step of ``candidate`` (a TELEMETRY_STEPS key, or "sft") on SFT labels (every position)."""
    from calibkern.hf import apply_fused_loss

    model, optimizer, inputs, bin_accuracy, _ = build(**sizes)
    inputs["labels"] = inputs["input_ids"].clone()
    if candidate == "sft":
        apply_fused_loss(model)
        loss_fn = lambda batch: model(**batch).loss  # noqa: E731
    else:
        loss_fn = calibkern_loss_fn(model, bin_accuracy, workdir, **TELEMETRY_STEPS[candidate])

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(inputs).backward()
        optimizer.step()

    return step


def telemetry_rows(quick: bool = False) -> list[dict]:
    """A CFT step with token telemetry, and without, against the plain fused-CE SFT step (module docstring)."""
    sizes = QUICK if quick else FULL
    name = ("training step, SFT labels, Llama V={vocab} D={hidden} {layers} layers, seq {seq}, batch {batch}"
            .format(**sizes))
    with tempfile.TemporaryDirectory() as workdir:
        steps = {c: _telemetry_step(c, sizes, workdir) for c in ("sft", *TELEMETRY_STEPS)}
        times = timing.median_times(steps, repeats=3 if quick else 9, warmup=1)
    sft = times["sft"]["median_s"]
    return [timing.ratio_row(source=SOURCE, name=name, candidate=f"CalibrationTrainer, {c}",
                             baseline="plain fused-CE SFT step (apply_fused_loss)", quantity="time per step",
                             unit="s", candidate_value=times[c]["median_s"], baseline_value=sft,
                             goal="time ≤ 1.05×" if c == "cft + token telemetry" else "",
                             min_gain=1 / 1.05 if c == "cft + token telemetry" else None)
            for c in TELEMETRY_STEPS]
