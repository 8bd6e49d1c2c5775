"""Token-level study on a `calibkern demo` run's world (docs/demo.md, "Token-level calibration study").

``python benchmarks/token_study.py OUT`` with OUT a demo output directory (its ``models/base``, ``models/dpo``
and ``data/``): from the DPO model, SFT (``CalibrationTrainer`` with ``method="token_cft", lam=0``) and token_cft
(``lam=1``) on the CFT rows with full-sequence labels and the demo's CFT options; every model evaluated at
token level on the test rows, all tokens and the answer token only. Writes ``OUT/token_study.json``.
"""

import json
import os
import sys
import tempfile

from calibkern import hf
from calibkern.hf.data import answer_continuation, detect_option_ids, format_prompt, load_mcq
from calibkern.hf.token_evaluation import evaluate_tokens
from calibkern.pipeline import DemoConfig, io, stages


def main(root: str) -> dict:
    config = DemoConfig()
    template = config.template
    base, tokenizer = io.load_model(os.path.join(root, "models", "base"))
    dpo, _ = io.load_model(os.path.join(root, "models", "dpo"))
    test = load_mcq(os.path.join(root, "data", "test.jsonl"))
    train = load_mcq(os.path.join(root, "data", "cft.jsonl"))
    option_ids = detect_option_ids(tokenizer, 4, template)
    text_rows = [{"text": format_prompt(e, template) + answer_continuation(e.answer)} for e in test]
    answer_rows = [{"prompt": format_prompt(e, template), "completion": answer_continuation(e.answer)} for e in test]
    dataset = hf.build_sft_dataset(tokenizer, train, option_ids, template=template, supervise="full")
    options = stages.TrainOptions(epochs=config.cft_epochs, lr=config.cft_lr, batch_size=config.batch_size,
                                  seed=config.seed, progress=False)

    def trained(lam):
        calibration = hf.CalibrationConfig(method="token_cft", lam=lam, check_logits=False)
        with tempfile.TemporaryDirectory() as scratch:
            trainer = stages._calibration_trainer(dpo, tokenizer, dataset, calibration, options, scratch)
            trainer.train()
        return stages._finished(trainer.model), trainer.bin_accuracy.tolist()

    models = {"base": base, "dpo": dpo}
    models["sft"], _ = trained(0.0)
    models["token_cft"], bin_accuracy = trained(1.0)
    out = {"bin_accuracy": bin_accuracy}
    for name, model in models.items():
        out[name] = {"all_tokens": evaluate_tokens(model, tokenizer, text_rows, batch_size=64, progress=False).metrics,
                     "answer_token": evaluate_tokens(model, tokenizer, answer_rows, batch_size=64,
                                                     progress=False).metrics}
        print(name, json.dumps(out[name]), flush=True)
    with open(os.path.join(root, "token_study.json"), "w", encoding="utf-8") as handle:
        json.dump(out, handle, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
