"""The tiny-Llama training runs the sharded tests compare with one process (tests/test_fsdp.py, test_deepspeed.py,
test_vocab_parallel.py): the same batches, calibration settings, optimizer and HF loss convention everywhere."""

import torch

ROWS, STEPS = 8, 3
CHUNK = 8  # rows of logits per chunk (CFT, RCFT): the largest-tensor check needs chunks below a rank's tokens
MODES = ("ce", "cft", "rcft")


def fixtures():
    """The tiny tokenizer and its 4 option ids."""
    from calibkern.hf import detect_option_ids
    from hf_tiny import make_tokenizer

    tokenizer = make_tokenizer()
    return tokenizer, detect_option_ids(tokenizer, 4)


def calibration(mode, option_ids):
    """``mode``'s CalibrationConfig: None (plain CE), CFT with fixed bin accuracies, or streaming RCFT."""
    from calibkern.hf import CalibrationConfig

    if mode == "ce":
        return None
    if mode == "cft":
        return CalibrationConfig(method="cft", option_ids=option_ids, lam=5.0, bin_accuracy=[0.3] * 10,
                                 chunk_size=CHUNK)
    return CalibrationConfig(method="rcft", option_ids=option_ids, lam=5.0, em={"refresh": "stream"},
                             chunk_size=CHUNK)


def global_batch(tokenizer, option_ids, step):
    """Step ``step``'s batch of ROWS rows, every token supervised, one answer per row (``answer_mask``: the
    calibration term is a mean over each rank's answers, equal to the global mean for equal counts)."""
    from hf_tiny import random_batch

    inputs = random_batch(tokenizer, option_ids, rows=ROWS, length=24, seed=100 + step)
    inputs["labels"][:, :4] = inputs["input_ids"][:, :4]
    inputs["answer_mask"] = torch.zeros_like(inputs["labels"], dtype=torch.bool)
    inputs["answer_mask"][torch.arange(ROWS), 6 + torch.arange(ROWS)] = True
    return inputs


def new_model(tokenizer, mode, option_ids, shard=None, **patch):
    """A patched tiny Llama (``shard(model)`` applied before patching, e.g. ``fully_shard``; ``patch``: more
    arguments of ``apply_fused_loss``) and its SGD (momentum 0.9)."""
    from calibkern.hf import apply_fused_loss
    from hf_tiny import make_model

    model = make_model(tokenizer)
    if shard is not None:
        shard(model)
    apply_fused_loss(model, calibration(mode, option_ids), **patch)
    return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def train(model, optimizer, tokenizer, option_ids, steps, rank=0, world=1):
    """``steps`` optimizer steps; each process takes rows ``rank::world`` of every global batch, passes the global
    supervised tokens as ``num_items_in_batch`` and multiplies the loss by ``world`` (the HF Trainer's convention;
    DDP / FSDP2 average the gradients)."""
    for step in steps:
        inputs = global_batch(tokenizer, option_ids, step)
        items = int(inputs["labels"][:, 1:].ne(-100).sum())
        local = {key: value[rank::world] for key, value in inputs.items()}
        (model(**local, num_items_in_batch=torch.tensor(items)).loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()


def end_state(model):
    """The whole weights (a ``DTensor`` as its full tensor, ZeRO-3 partitions gathered) and the EM state."""
    import contextlib

    from calibkern.hf import fused_loss_of

    partitioned = [parameter for parameter in model.parameters() if hasattr(parameter, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gather:
        weights = {key: getattr(value, "full_tensor", lambda v=value: v)().detach().clone()
                   for key, value in model.state_dict().items()}
    em_state = fused_loss_of(model).em_state
    return {"weights": weights, "em": None if em_state is None else em_state.state_dict()}


def one_process_runs(modes):
    """``{mode: end_state}`` of one process trained on the whole batches, STEPS steps."""
    torch.set_num_threads(1)
    tokenizer, option_ids = fixtures()
    results = {}
    for mode in modes:
        model, optimizer = new_model(tokenizer, mode, option_ids)
        train(model, optimizer, tokenizer, option_ids, range(STEPS))
        results[mode] = end_state(model)
    return results
