"""``apply_fused_loss`` under FSDP2 (docs/distributed.md): 2 gloo ranks on CPU under ``torchrun``.

A tiny Llama with ``fully_shard`` on every decoder layer, on the lm_head and on the root trains three SGD
(momentum) steps on rank-split batches — plain CE, CFT and RCFT with a streaming E-step — the HF convention
(``num_items_in_batch`` = the global supervised tokens, the loss times the world size). It ends with the weights
of one process trained on the whole batches (float32, max abs difference ≤ 1e-5) and the same EM state; with
chunks of 8 rows no op on either rank returns a tensor half the size of the full logits; and a run saved
after two steps with ``torch.distributed.checkpoint`` (model, optimizer, EM state) and resumed into a fresh
sharded model equals the uninterrupted run.

Run as a script by ``torchrun`` (the worker), as a test by pytest (the launcher).
"""

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from helpers import LargestTensor, assert_same_training_state, assert_trained, torchrun_ranks  # noqa: E402
from sharded_training import (  # noqa: E402
    MODES, ROWS, STEPS, end_state, fixtures, new_model, one_process_runs, train)

WORLD, SAVED_AT = 2, 2


def fully_shard_llama(model):
    """``fully_shard`` on each decoder layer, on the lm_head and on the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)
    fully_shard(model)


def worker(out_dir):
    """Runs under torchrun: every mode sharded, the largest tensor, then the resumed RCFT run."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from calibkern.hf import fused_loss_of

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tokenizer, option_ids = fixtures()
    results = {}
    for mode in MODES:
        model, optimizer = new_model(tokenizer, mode, option_ids, shard=fully_shard_llama)
        with LargestTensor() as largest:
            train(model, optimizer, tokenizer, option_ids, range(STEPS), rank, world)
        results[mode] = {**end_state(model), "largest": largest.largest}

    model, optimizer = new_model(tokenizer, "rcft", option_ids, shard=fully_shard_llama)
    train(model, optimizer, tokenizer, option_ids, range(SAVED_AT), rank, world)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    checkpoint = os.path.join(out_dir, "checkpoint")
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    em_saved = fused_loss_of(model).em_state.state_dict()
    del model, optimizer
    model, optimizer = new_model(tokenizer, "rcft", option_ids, shard=fully_shard_llama)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    fused_loss_of(model).em_state.load_state_dict(em_saved)
    train(model, optimizer, tokenizer, option_ids, range(SAVED_AT, STEPS), rank, world)
    results["resumed"] = end_state(model)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun_ranks(__file__, tmp_path_factory.mktemp("fsdp"), WORLD)


@pytest.fixture(scope="module")
def one_process():
    return one_process_runs(MODES)


@pytest.mark.parametrize("mode", MODES)
def test_fully_sharded_training_equals_one_process(ranks, one_process, mode):
    assert_trained(one_process[mode]["weights"], fixtures()[0])
    for rank in ranks:
        assert_same_training_state(rank[mode], one_process[mode])


@pytest.mark.parametrize("mode", ["cft", "rcft"])
def test_no_rank_holds_a_tokens_by_vocabulary_tensor(ranks, mode):
    """With chunks of CHUNK rows no op returns half of a rank's [tokens, V] logits: the largest tensor is the
    root unit's all-gathered parameters (embedding [V, D] and norm), a chunk of logits [8, V]. (Plain CE keeps the
    default chunk of at least 512 rows, all of this test's tokens: see docs/distributed.md#what-was-tested.)"""
    tokenizer, _ = fixtures()
    tokens_per_rank = ROWS // WORLD * 24
    for rank in ranks:
        assert rank[mode]["largest"] < tokens_per_rank * len(tokenizer) / 2


def test_resumed_sharded_run_equals_the_uninterrupted_one(ranks):
    for rank in ranks:
        assert_same_training_state(rank["resumed"], ranks[0]["rcft"])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    worker(sys.argv[1])
