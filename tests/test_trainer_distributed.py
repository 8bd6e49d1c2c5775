"""CalibrationTrainer under ``torchrun --nproc_per_node 2`` (gloo, CPU, a tiny Llama) — docs/hf.md.

The test launches this file under torchrun; each rank trains CFT (per-bin accuracies estimated by the
trainer) and RCFT (EM refreshed at the epoch start) and saves what it logged and ended with. (Streaming
RCFT, whose step under DDP equals one step in one process: tests/test_hf_distributed.py.) Checked here:

* every rank logs the same loss and ``calib_*`` statistics, and ends with the same weights, per-bin
  accuracies and EM state;
* those statistics are global: one optimizer step covers all rows (two ranks × eight), so the first
  logged step's ECE and accuracy, the CFT bin counts and the RCFT E-step statistics equal those of the
  starting model on *all* rows, computed here in one process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainingArguments  # noqa: E402

import calibkern as ck  # noqa: E402
from calibkern.hf import CalibrationConfig, CalibrationTrainer, build_sft_dataset  # noqa: E402
from calibkern.hf.data import detect_option_ids  # noqa: E402
from calibkern.hf.evaluation import collect_option_logits  # noqa: E402
from hf_tiny import make_examples, make_model, make_tokenizer  # noqa: E402

WORLD, ROWS, PER_DEVICE = 2, 16, 8  # one optimizer step = every row once
EPOCHS = {"cft": 3, "rcft": 1}  # rcft: one refresh, by the starting model
STAT_KEYS = ("loss", "calib_ece", "calib_accuracy", "calib_mean_confidence", "calib_term")


def fixtures():
    tokenizer = make_tokenizer()
    return tokenizer, detect_option_ids(tokenizer, 4), make_examples(ROWS, seed=5)


def train_on_this_rank(out_dir: Path) -> None:
    """Runs under torchrun: trains both methods and saves this rank's logs and end state."""
    tokenizer, option_ids, examples = fixtures()
    results = {}
    for method, epochs in EPOCHS.items():
        args = TrainingArguments(
            output_dir=str(out_dir / method), per_device_train_batch_size=PER_DEVICE,
            per_device_eval_batch_size=PER_DEVICE, num_train_epochs=epochs, learning_rate=1e-2, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0,
            data_seed=0,
        )
        dataset = build_sft_dataset(tokenizer, examples, option_ids,
                                    supervise="completion" if method == "cft" else "full")
        config = CalibrationConfig(method=method, option_ids=option_ids)
        trainer = CalibrationTrainer(make_model(tokenizer), args, dataset, calibration=config)
        trainer.train()
        results[method] = {
            "logs": [{key: entry[key] for key in STAT_KEYS} for entry in trainer.state.log_history
                     if "calib_ece" in entry],
            "weights": {name: value.detach().cpu() for name, value in trainer.model.named_parameters()},
            "bin_accuracy": trainer.bin_accuracy, "bin_counts": trainer.bin_counts,
            "em_state": None if trainer.em_state is None else trainer.em_state.state_dict(),
        }
    torch.save(results, out_dir / f"rank{os.environ['RANK']}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               __file__, str(out_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def starting_model_on_all_rows():
    """Option logits of every row under the starting model, in one process."""
    tokenizer, option_ids, examples = fixtures()
    return collect_option_logits(make_model(tokenizer), tokenizer, examples, option_ids, progress=False)


@pytest.mark.parametrize("method", list(EPOCHS))
def test_every_rank_logs_and_ends_with_the_same_values(ranks, method):
    first, second = (rank[method] for rank in ranks)
    assert len(first["logs"]) == EPOCHS[method]  # one log per optimizer step
    assert first["logs"] == second["logs"]
    for name, value in first["weights"].items():
        assert torch.equal(value, second["weights"][name]), name
    for key in ("bin_accuracy", "bin_counts"):
        assert (first[key] is None and second[key] is None) or torch.equal(first[key], second[key])
    if first["em_state"] is not None:
        for name, value in first["em_state"].items():
            assert torch.equal(value, second["em_state"][name]), name
        assert int(first["em_state"]["n_msteps"]) == EPOCHS[method]  # one refresh per epoch


@pytest.mark.parametrize("method", list(EPOCHS))
def test_logged_statistics_cover_every_rank(ranks, starting_model_on_all_rows, method):
    logits, labels = starting_model_on_all_rows
    stats = ck.binned_stats(logits, labels, 10)
    first_step = ranks[0][method]["logs"][0]  # the forward pass of step 1 runs the starting model
    assert first_step["calib_ece"] == pytest.approx(float(stats.ece()), abs=1e-5)
    assert first_step["calib_accuracy"] == pytest.approx(float(stats.accuracy()), abs=1e-12)
    assert first_step["calib_mean_confidence"] == pytest.approx(float(stats.mean_confidence()), abs=1e-5)


def test_cft_bin_accuracy_is_estimated_over_every_rank(ranks, starting_model_on_all_rows):
    stats = ck.binned_stats(*starting_model_on_all_rows, 10)
    got = ranks[0]["cft"]
    assert torch.equal(got["bin_counts"].cpu(), stats.counts)
    # bins the starting model left empty take its overall accuracy (default bin_prior = 0)
    overall = stats.sum_correct.sum() / stats.counts.sum()
    expected = torch.where(stats.counts > 0, stats.sum_correct / stats.counts.clamp_min(1), overall).float()
    torch.testing.assert_close(got["bin_accuracy"].cpu(), expected, atol=1e-6, rtol=0)


def test_rcft_em_refresh_is_over_every_rank(ranks, starting_model_on_all_rows):
    state = ck.EMState(10)
    state.estep(*starting_model_on_all_rows)
    state.mstep()
    got = ranks[0]["rcft"]["em_state"]
    assert int(got["n_msteps"]) == 1
    for name in ("running", "pi", "mu", "sigma", "theta"):
        torch.testing.assert_close(got[name].cpu(), getattr(state, name), atol=1e-5, rtol=1e-5, msg=name)


if __name__ == "__main__":
    train_on_this_rank(Path(sys.argv[1]))
