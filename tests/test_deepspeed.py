"""``apply_fused_loss`` under DeepSpeed ZeRO-3 (docs/distributed.md#deepspeed-zero-3): 2 gloo ranks on CPU under
``torchrun``.

* A ZeRO-3 ``deepspeed.initialize`` engine on the tiny Llama (every parameter partitioned over the two ranks, SGD
  with momentum), patched through ``engine.module``, trains three steps on rank-split batches — plain CE, CFT and
  RCFT with a streaming E-step — with the HF convention (``num_items_in_batch`` = the global supervised tokens, the
  loss times the world size); the batches, settings and one-process runs are tests/sharded_training.py's.
* ``transformers.Trainer(args=TrainingArguments(deepspeed=<ZeRO-3 config>))`` on a patched model (streaming RCFT,
  two micro-batches per step, gradient clipping on) against the same Trainer in one process, whose micro-batches
  are the union of the ranks' ones.

Each ends with the weights of one process (float32, max abs difference ≤ 1e-5) and the same EM state.
Run as a script by ``torchrun`` (the worker), as a test by pytest (the launcher).
"""

import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("deepspeed") is None:  # imported by the ranks only, never into the test session
    pytest.skip("deepspeed is not installed", allow_module_level=True)

from helpers import assert_same_training_state, assert_trained, torchrun_ranks  # noqa: E402
from sharded_training import (  # noqa: E402
    MODES, STEPS, calibration, end_state, fixtures, global_batch, one_process_runs)

WORLD = 2
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
# the Trainer's config: "auto" values filled from TrainingArguments, as a user's zero3.json would say
ZERO3_AUTO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
TRAINER_ROWS, TRAINER_ACCUMULATION = 16, 2  # two optimizer steps of 2 micro-batches × 4 rows (one process)


def new_engine(tokenizer, mode, option_ids):
    """A ZeRO-3 engine on the tiny Llama, patched after ``deepspeed.initialize`` as a user of ``engine.module``
    would."""
    import deepspeed

    from calibkern.hf import apply_fused_loss
    from hf_tiny import make_model

    model = make_model(tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ZERO3)
    apply_fused_loss(engine.module, calibration(mode, option_ids))
    return engine


def train_engine(engine, tokenizer, option_ids, rank, world):
    for step in range(STEPS):
        inputs = global_batch(tokenizer, option_ids, step)
        items = int(inputs["labels"][:, 1:].ne(-100).sum())
        local = {key: value[rank::world] for key, value in inputs.items()}
        engine.backward(engine(**local, num_items_in_batch=torch.tensor(items)).loss * world)
        engine.step()


def trainer_run(out_dir, world):
    """A plain ``transformers.Trainer`` on a patched tiny Llama, streaming RCFT; with ``world`` = 2 under the
    ZeRO-3 config (each rank 2 rows per micro-batch), else one process (4 rows per micro-batch)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from calibkern.hf import apply_fused_loss
    from hf_tiny import make_model

    tokenizer, option_ids = fixtures()
    batches = [global_batch(tokenizer, option_ids, step) for step in range(TRAINER_ROWS // 8)]
    dataset = Dataset.from_dict({key: torch.cat([b[key] for b in batches]).tolist() for key in batches[0]})
    dataset = dataset.with_format("torch")
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=4 // world, gradient_accumulation_steps=2,
        num_train_epochs=1, learning_rate=0.5, lr_scheduler_type="constant", optim="sgd", max_grad_norm=1.0,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
        **({"deepspeed": ZERO3_AUTO, "ddp_backend": "gloo"} if world > 1 else {}))
    model = apply_fused_loss(make_model(tokenizer), calibration("rcft", option_ids),
                             gradient_accumulation_steps=args.gradient_accumulation_steps)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return {**end_state(trainer.model), "deepspeed": trainer.is_deepspeed_enabled,
            "lm_head_local": trainer.model.lm_head.weight.numel()}


def worker(out_dir):
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tokenizer, option_ids = fixtures()
    results = {}
    for mode in MODES:
        engine = new_engine(tokenizer, mode, option_ids)
        lm_head_local = engine.module.lm_head.weight.numel()  # 0: the weight is partitioned
        train_engine(engine, tokenizer, option_ids, rank, world)
        results[mode] = {**end_state(engine.module), "lm_head_local": lm_head_local}
    results["trainer"] = trainer_run(os.path.join(out_dir, "trainer"), world)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun_ranks(__file__, tmp_path_factory.mktemp("deepspeed"), WORLD)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    results = one_process_runs(MODES)
    results["trainer"] = trainer_run(tmp_path_factory.mktemp("trainer"), 1)
    return results


@pytest.mark.parametrize("mode", MODES)
def test_zero3_engine_training_equals_one_process(ranks, one_process, mode):
    assert_trained(one_process[mode]["weights"], fixtures()[0])
    for rank in ranks:
        assert rank[mode]["lm_head_local"] == 0  # partitioned: no rank holds the lm_head outside a gather
        assert_same_training_state(rank[mode], one_process[mode])


def test_hf_trainer_with_a_zero3_config_equals_one_process(ranks, one_process):
    assert_trained(one_process["trainer"]["weights"], fixtures()[0])
    assert not one_process["trainer"]["deepspeed"]
    for rank in ranks:
        assert rank["trainer"]["deepspeed"] and rank["trainer"]["lm_head_local"] == 0
        assert_same_training_state(rank["trainer"], one_process["trainer"])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    worker(sys.argv[1])
