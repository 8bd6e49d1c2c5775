"""CalibrationTrainer under torchrun (2 gloo ranks, CPU): one rcft step (streaming EM) on 2 × 4 rows equals one
step on 8 rows in one process — the loss scaling under DDP and the all-reduced statistics — and both ranks log
the same global statistics and hold the same EM state.

Run as a script by ``torchrun`` (the worker), as a test by pytest (the launcher).
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from helpers import free_port  # noqa: E402



def run(out_dir: str, distributed: bool) -> dict:
    """One optimizer step of rcft with a streaming EM state; returns weights, logs and the EM state."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from transformers import TrainingArguments

    from calibkern.hf import CalibrationConfig, CalibrationTrainer, build_sft_dataset, detect_option_ids
    from hf_tiny import make_examples, make_model, make_tokenizer

    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    option_ids = detect_option_ids(tokenizer, 4)
    examples = make_examples(8)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=4 if distributed else 8, max_steps=1,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, seed=0,
        **({"ddp_backend": "gloo"} if distributed else {}),
    )
    model = make_model(tokenizer)
    config = CalibrationConfig(method="rcft", option_ids=option_ids, lam=5.0, em={"refresh": "stream"})
    trainer = CalibrationTrainer(
        model, args, build_sft_dataset(tokenizer, examples, option_ids, supervise="full"), calibration=config
    )
    trainer.train()
    return {
        "weights": {name: value.detach().clone() for name, value in model.named_parameters()},
        "logs": [entry for entry in trainer.state.log_history if "calib_ece" in entry],
        "em": trainer.em_state.state_dict(),
    }




@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    single = run(str(tmp_path / "single"), distributed=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), os.path.abspath(__file__), str(tmp_path)]
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repository, os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for rank in ranks:
        for name, value in single["weights"].items():
            torch.testing.assert_close(rank["weights"][name], value, atol=1e-6, rtol=1e-5)
    first, second = (rank["logs"] for rank in ranks)
    assert first == second and len(first) == 1  # the same global statistics on both ranks
    for key in ("calib_ece", "calib_accuracy", "calib_mean_confidence"):
        assert first[0][key] == pytest.approx(single["logs"][0][key], abs=1e-6)
    for name, value in ranks[0]["em"].items():
        assert torch.equal(ranks[1]["em"][name], value)
        torch.testing.assert_close(value, single["em"][name], atol=1e-6, rtol=1e-5)


if __name__ == "__main__":
    import torch.distributed as dist

    output = run(os.path.join(sys.argv[1], "ddp"), distributed=True)
    torch.save(output, os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pt"))
