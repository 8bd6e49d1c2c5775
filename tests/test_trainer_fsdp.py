"""``CalibrationTrainer``'s loss path under FSDP2 (docs/distributed.md#calibrationtrainer-under-fsdp2): 2 gloo
ranks on CPU under ``torchrun``.

Accelerate shards with FSDP only on accelerators: on CPU ``TrainingArguments(fsdp=..., fsdp_config={"fsdp_version":
2})`` trains under DDP instead (checked here, so the docs change when it stops). The trainer's loss path is therefore
driven by a hand-written loop: a tiny Llama with ``fully_shard`` on each decoder layer, on the lm_head and on the
root, ``CalibrationTrainer.compute_loss`` on each rank's rows (``num_items_in_batch`` = the global supervised tokens),
SGD with momentum, the trainer's M-step at each optimizer step. Checked against one process on the whole batches
(float32, max abs difference ≤ 1e-5): CFT with the per-bin accuracies estimated by the trainer's statistics pass and
RCFT with streaming EM end with the same weights, per-bin statistics, EM state and logged statistics; the logit
parity check and the statistics passes run through the root's forward, where the sharded lm_head is gathered; no op
returns a tensor half a rank's ``[tokens, V]`` logits; a run saved after two steps (``torch.distributed.checkpoint``
plus ``trainer.calibration_state()``) and resumed into a fresh sharded model and trainer equals the uninterrupted run.

Run as a script by ``torchrun`` (the worker), as a test by pytest (the launcher).
"""

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from helpers import LargestTensor, assert_same_training_state, assert_trained, torchrun_ranks  # noqa: E402

WORLD, ROWS, STEPS, SAVED_AT, CHUNK = 2, 8, 3, 2, 8
METHODS = ("cft", "rcft")
LOG_KEYS = ("calib_ece", "calib_accuracy", "calib_mean_confidence", "calib_term", "token_ece", "token_accuracy",
            "token_confidence")


def fixtures():
    from calibkern.hf import build_sft_dataset, detect_option_ids
    from hf_tiny import make_examples, make_tokenizer

    tokenizer = make_tokenizer()
    option_ids = detect_option_ids(tokenizer, 4)
    return tokenizer, option_ids, build_sft_dataset(tokenizer, make_examples(ROWS * STEPS, seed=3), option_ids,
                                                    supervise="full")


def new_trainer(out_dir, method, sharded):
    """A CalibrationTrainer on a fresh tiny Llama (sharded after the trainer patched it) and its optimizer."""
    from transformers import TrainingArguments

    from calibkern.hf import CalibrationConfig, CalibrationTrainer
    from hf_tiny import make_model

    tokenizer, option_ids, dataset = fixtures()
    config = CalibrationConfig(method=method, option_ids=option_ids, lam=5.0, chunk_size=CHUNK,
                               **({"em": {"refresh": "stream"}} if method == "rcft" else {}))
    args = TrainingArguments(output_dir=str(out_dir), per_device_eval_batch_size=ROWS, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no", **({"ddp_backend": "gloo"} if sharded else {}))
    model = make_model(tokenizer)
    trainer = CalibrationTrainer(model, args, dataset, calibration=config)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)
        fully_shard(model)
    return trainer, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def train(trainer, optimizer, steps, rank=0, world=1):
    """``steps`` optimizer steps of the trainer's loss; step s takes rows ``[s·ROWS, (s+1)·ROWS)``, this process
    rows ``rank::world`` of them. Returns the logged statistics of the last step."""
    dataset = trainer.train_dataset
    for step in steps:
        batch = trainer.data_collator([dataset[i] for i in range(step * ROWS, (step + 1) * ROWS)])
        items = batch["labels"][:, 1:].ne(-100).sum()
        local = trainer._prepare_inputs({key: value[rank::world] for key, value in batch.items()})
        trainer.compute_loss(trainer.model, local, num_items_in_batch=items).backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.loss_policy.end_optimizer_step()  # the trainer's callback at each optimizer step
        logs = trainer.loss_policy.window.read()
    return logs


def end_state(trainer, logs):
    weights = {key: getattr(value, "full_tensor", lambda v=value: v)().detach().clone()
               for key, value in trainer.model.state_dict().items()}
    state = trainer.calibration_state()
    return {"weights": weights, "logs": logs, "bin_accuracy": state["bin_accuracy"], "em": state["em_state"]}


def accelerate_shards_on_cpu(out_dir) -> bool:
    """Whether the HF Trainer's own FSDP2 (``fsdp_config={"fsdp_version": 2}``) shards on this CPU."""
    from transformers import Trainer, TrainingArguments

    from hf_tiny import make_model

    tokenizer = fixtures()[0]
    args = TrainingArguments(output_dir=str(out_dir), use_cpu=True, report_to=[], ddp_backend="gloo",
                             fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    return Trainer(make_model(tokenizer), args).is_fsdp_enabled


def worker(out_dir):
    """Runs under torchrun: both methods sharded (the largest tensor recorded), then the resumed RCFT run."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.set_num_threads(1)
    results = {"accelerate_shards": accelerate_shards_on_cpu(os.path.join(out_dir, "hf"))}
    rank, world = dist.get_rank(), dist.get_world_size()
    for method in METHODS:
        trainer, optimizer = new_trainer(os.path.join(out_dir, method), method, sharded=True)
        trainer._check_logit_parity()  # through the root's forward: the sharded lm_head is gathered
        trainer._prepare_statistics()  # cft: A_k from the option-logits pass over every rank's rows
        with LargestTensor() as largest:
            logs = train(trainer, optimizer, range(STEPS), rank, world)
        results[method] = {**end_state(trainer, logs), "largest": largest.largest}

    trainer, optimizer = new_trainer(os.path.join(out_dir, "saved"), "rcft", sharded=True)
    train(trainer, optimizer, range(SAVED_AT), rank, world)
    model_state, optimizer_state = get_state_dict(trainer.model, optimizer)
    checkpoint = os.path.join(out_dir, "checkpoint")
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    saved = trainer.calibration_state()
    del trainer, optimizer
    trainer, optimizer = new_trainer(os.path.join(out_dir, "resumed"), "rcft", sharded=True)
    model_state, optimizer_state = get_state_dict(trainer.model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(trainer.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer.load_calibration_state(saved)
    results["resumed"] = end_state(trainer, train(trainer, optimizer, range(SAVED_AT, STEPS), rank, world))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun_ranks(__file__, tmp_path_factory.mktemp("trainer_fsdp"), WORLD)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    torch.set_num_threads(1)
    out_dir = tmp_path_factory.mktemp("trainer_one")
    results = {}
    for method in METHODS:
        trainer, optimizer = new_trainer(out_dir / method, method, sharded=False)
        results[method] = end_state(trainer, train(trainer, optimizer, range(STEPS)))
    return results


def assert_same_state(ours, theirs):
    """The weights and EM state, the per-bin accuracies and the logged statistics."""
    assert_same_training_state(ours, theirs)
    assert (ours["bin_accuracy"] is None) == (theirs["bin_accuracy"] is None)
    if theirs["bin_accuracy"] is not None:
        torch.testing.assert_close(ours["bin_accuracy"].cpu(), theirs["bin_accuracy"].cpu(), rtol=0, atol=1e-6)
    for key in LOG_KEYS:
        assert ours["logs"][key] == pytest.approx(theirs["logs"][key], abs=1e-6), key


def test_accelerate_does_not_shard_on_cpu(ranks):
    """The reason for the hand-written loop: on CPU the HF Trainer's FSDP2 falls back to DDP."""
    assert not any(rank["accelerate_shards"] for rank in ranks)


@pytest.mark.parametrize("method", METHODS)
def test_sharded_trainer_steps_equal_one_process(ranks, one_process, method):
    assert_trained(one_process[method]["weights"], fixtures()[0])
    for rank in ranks:
        assert_same_state(rank[method], one_process[method])


@pytest.mark.parametrize("method", METHODS)
def test_no_rank_holds_a_tokens_by_vocabulary_tensor(ranks, method):
    tokenizer, _, dataset = fixtures()
    tokens_per_rank = ROWS // WORLD * min(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
    for rank in ranks:
        assert rank[method]["largest"] < tokens_per_rank * len(tokenizer) / 2


def test_resumed_sharded_trainer_equals_the_uninterrupted_run(ranks):
    for rank in ranks:
        assert_same_state(rank["resumed"], ranks[0]["rcft"])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    worker(sys.argv[1])
