"""Every causal-LM class of the installed Transformers through calibkern: the model's own loss, or a refusal.

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the script builds a tiny random model from the
class's default config with small widths (the attributes in ``TINY`` that the config has), runs one training-mode
call with labels through its own forward and through :func:`calibkern.hf.apply_fused_loss` (the equivalence check
on), and prints one line: ``OK`` (the two losses agree within 1e-4 relative), ``REFUSED`` (calibkern raised,
with its message), ``DIFFERENT`` (a silent difference: the one outcome that must never appear) or ``SKIP`` (the
generic tiny config does not build, or the model's own forward fails on it, or it ran past 60 s). Not part of
the test suite (it takes about ten minutes on two cores); docs/hf.md#what-calibkern-supports-and-what-it-refuses
records its last run.

    python tests/model_sweep.py [model_type ...]
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import signal
import sys
import warnings

import torch

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=256, n_embd=32, n_layer=2, n_head=4, d_model=32, n_positions=256,
            num_layers=2, num_heads=4, ffn_dim=64, d_ff=64, decoder_layers=2, decoder_attention_heads=4,
            decoder_ffn_dim=64, num_experts=4, num_local_experts=4, moe_intermediate_size=16, n_routed_experts=4,
            num_experts_per_tok=2, moe_topk=2, n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=8,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, rotary_dim=8, moe_num_experts=4)
DROPOUTS = ("hidden_dropout", "attention_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
            "hidden_dropout_prob", "attention_probs_dropout_prob")
SECONDS = 60


class _Timeout(Exception):
    pass


def _set(config, values: dict) -> None:
    for key, value in values.items():
        if config is not None and hasattr(config, key):
            with contextlib.suppress(Exception):
                setattr(config, key, value)


def _tiny_model(model_type: str, class_name: str, tokenizer):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])()
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    for part in (config, getattr(config, "text_config", None)):
        _set(part, TINY)
        if part is not None:
            for key, value in ids.items():
                with contextlib.suppress(Exception):
                    setattr(part, key, value)
        _set(part, dict.fromkeys(DROPOUTS, 0.0))
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        return getattr(transformers, class_name)(config)


def sweep_one(model_type: str, class_name: str, tokenizer, batch) -> str:
    """One line: the outcome for ``model_type`` (module docstring)."""
    from calibkern.hf import apply_fused_loss

    try:
        model = _tiny_model(model_type, class_name, tokenizer)
    except Exception as error:  # noqa: BLE001 — a config the generic settings do not fit
        return f"SKIP build {type(error).__name__}: {str(error)[:80]}"
    model.train()
    twin = copy.deepcopy(model)
    try:
        theirs = twin(**batch).loss
    except Exception as error:  # noqa: BLE001
        return f"SKIP own forward {type(error).__name__}: {str(error)[:80]}"
    if theirs is None:
        return "SKIP no loss of its own"
    try:
        ours = apply_fused_loss(model)(**batch).loss
    except (TypeError, ValueError) as error:
        return f"REFUSED {' '.join(str(error).split())[:160]}"
    same = abs(float(ours) - float(theirs)) <= 1e-4 * max(1.0, abs(float(theirs)))
    return f"{'OK' if same else 'DIFFERENT'} calibkern {float(ours):.6f}, the model {float(theirs):.6f}"


def main(model_types: list[str]) -> int:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from calibkern.hf import detect_option_ids
    from hf_tiny import make_tokenizer, random_batch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    tokenizer = make_tokenizer()
    batch = random_batch(tokenizer, detect_option_ids(tokenizer, n_options=4))

    def timeout(*_):
        raise _Timeout

    signal.signal(signal.SIGALRM, timeout)
    counts: dict[str, int] = {}
    for model_type in model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        class_name = class_name[0] if isinstance(class_name, (list, tuple)) else class_name
        signal.alarm(SECONDS)
        try:
            line = sweep_one(model_type, class_name, tokenizer, batch)
        except _Timeout:
            line = f"SKIP past {SECONDS} s"
        finally:
            signal.alarm(0)
        outcome = line.split()[0]
        counts[outcome] = counts.get(outcome, 0) + 1
        print(f"{model_type:28s} {class_name:40s} {line}", flush=True)
    print(f"transformers {transformers.__version__}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 1 if counts.get("DIFFERENT") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
