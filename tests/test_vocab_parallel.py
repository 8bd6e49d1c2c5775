"""The fused loss with the lm_head weight split over the vocabulary (docs/distributed.md#vocabulary-parallel-loss):
4 gloo processes on CPU, a 2 × 2 mesh (data × tensor), one ``torch.multiprocessing.spawn`` for every check.

* Each tensor-parallel pair computes :func:`calibkern.fused_linear_calibration_loss` with V = 37 split 19 / 18 (a
  ``DTensor`` sharded on dim 0, over the pair's 1-D mesh or the tensor dimension of the 2-D mesh) or 15 / 22 (local
  shards with ``vocab_parallel_group=``), option ids on both shards, ignored rows, several chunks: plain CE with
  token and Full-ECE statistics and a bias, hard_bin with a soft-cap, em, token_hard_bin, and CE and token_hard_bin
  with label smoothing and the z-loss. Every rank equals one
  process on the whole weight — the loss and its parts, the bin / token / Full-ECE statistics, the hidden gradient,
  its own rows of the weight (and bias) gradient and the EM state — to ≤ 1e-5 (counts exactly).
* FSDP2 × TP: the tiny Llama with ``ColwiseParallel`` on the lm_head over the tensor dimension and ``fully_shard``
  over the data dimension trains three steps (CFT, and streaming RCFT with the M-step's ``em_group`` None or the
  data-parallel group; tests/sharded_training.py) and ends at the weights and EM state of one process trained on the
  whole batches (max abs difference ≤ 1e-5); with ``ColwiseParallel`` alone one step's loss and gradients (each
  rank's lm_head rows, the embedding) and CalibrationTrainer's statistics passes (the answers' option logits, the
  token statistics) equal one process's. Every run's first call passes the equivalence check on the ``DTensor``
  weight.
"""

import pytest
import torch
import torch.distributed as dist

import calibkern as ck

from helpers import assert_same_training_state, assert_trained, spawn_ranks

pytest.importorskip("transformers")

WORLD, N_BINS, VOCAB, DIM = 4, 10, 37, 16
OPTIONS = [2, 20, 36, 5]  # on both shards of either split
GROUP_SPLIT = (15, 22)  # the local shards of the vocab_parallel_group= cases (the DTensor ones split 19 / 18)
TP_MODES = ("cft", "rcft", "rcft_dp_group")  # the CE part included; streaming RCFT with em_group None / dp
CASES = {  # name: (calibration, layout, keyword arguments)
    "ce": (None, "dtensor", dict(token_stats=True, full_stats=True, bias=True)),
    "hard_bin": ("hard_bin", "dtensor_2d", dict(logit_softcap=3.0, token_stats=True)),
    "em": ("em", "group", dict(full_stats=True)),
    "token_hard_bin": ("token_hard_bin", "group", dict(token_stats=True, full_stats=True)),
    "ce_smoothed": (None, "group", dict(token_stats=True, full_stats=True, bias=True, label_smoothing=0.1,
                                        lse_square_scale=1e-3)),
    "token_hard_bin_smoothed": ("token_hard_bin", "dtensor", dict(token_stats=True, full_stats=True,
                                                                 label_smoothing=0.2, lse_square_scale=1e-2)),
}


def inputs(case):
    """The whole problem of ``case``: hidden [3, 9, D], weight [V, D], bias, labels with ignored positions and an
    answer (an option id) per row."""
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    hidden = torch.randn(3, 9, DIM, generator=gen)
    weight = torch.randn(VOCAB, DIM, generator=gen) * 0.7
    bias = torch.randn(VOCAB, generator=gen) * 0.3
    labels = torch.randint(0, VOCAB, (3, 9), generator=gen)
    labels[:, :2] = -100
    labels[0, 6] = -100
    for row in range(3):
        labels[row, 5 + row] = OPTIONS[row]
    return hidden, weight, bias, labels


def loss_arguments(case):
    calibration, _, keywords = CASES[case]
    keywords = {key: value for key, value in keywords.items() if key != "bias"}
    state = {}
    if calibration in ("hard_bin", "token_hard_bin"):
        state["bin_accuracy"] = torch.linspace(0.05, 0.95, N_BINS)
    if calibration == "em":
        state["em_state"] = ck.EMState(N_BINS)
        state["em_state"].mu = torch.linspace(0.2, 0.9, N_BINS, dtype=torch.float64)
    return dict(option_ids=OPTIONS, calibration=calibration, n_bins=N_BINS, lam=2.0, chunk_size=7, **state,
                **keywords)


def summary(out, hidden, em_state):
    """Everything compared, from one call's output and the gradients."""
    result = {"loss": out.loss.detach(), "sft_loss": out.sft_loss.detach(), "cal_loss": out.cal_loss.detach(),
              "hidden_grad": hidden.grad, "em": None if em_state is None else em_state.state_dict()}
    for name in ("bin_stats", "token_stats", "full_stats"):
        stats = getattr(out, name)
        if stats is not None:
            result[name] = (stats.counts, stats.sum_conf, stats.sum_correct, stats.n_skipped)
    return result


def one_process(case):
    hidden, weight, bias, labels = inputs(case)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    bias = bias.requires_grad_(True) if CASES[case][2].get("bias") else None
    arguments = loss_arguments(case)
    out = ck.fused_linear_calibration_loss(hidden, weight, labels, bias=bias, **arguments)
    out.loss.backward()
    return {**summary(out, hidden, arguments.get("em_state")), "weight_grad": weight.grad,
            "bias_grad": None if bias is None else bias.grad}


def vocab_parallel(case, mesh):
    """``case`` on this rank's tensor-parallel pair; the weight-gradient rows this rank holds, with their range."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, weight, bias, labels = inputs(case)
    hidden.requires_grad_(True)
    with_bias = CASES[case][2].get("bias")
    layout = CASES[case][1]
    arguments = loss_arguments(case)
    if layout == "group":
        tp_rank = mesh["tp"].get_local_rank()
        start = sum(GROUP_SPLIT[:tp_rank])
        rows = slice(start, start + GROUP_SPLIT[tp_rank])
        weight = weight[rows].clone().requires_grad_(True)
        bias = bias[rows].clone().requires_grad_(True) if with_bias else None
        out = ck.fused_linear_calibration_loss(hidden, weight, labels, bias=bias,
                                               vocab_parallel_group=mesh.get_group("tp"), **arguments)
        out.loss.backward()
        grads = weight.grad, None if bias is None else bias.grad
    else:
        target, placements = (mesh["tp"], [Shard(0)]) if layout == "dtensor" else (mesh, [Replicate(), Shard(0)])
        weight = distribute_tensor(weight, target, placements).requires_grad_(True)
        bias = distribute_tensor(bias, target, placements).requires_grad_(True) if with_bias else None
        out = ck.fused_linear_calibration_loss(hidden, weight, labels, bias=bias, **arguments)
        out.loss.backward()
        grads = weight.grad.to_local(), None if bias is None else bias.grad.to_local()
        tp_rank, chunk = mesh["tp"].get_local_rank(), -(-VOCAB // 2)
        rows = slice(tp_rank * chunk, min(VOCAB, (tp_rank + 1) * chunk))
    return {**summary(out, hidden, arguments.get("em_state")), "weight_grad": grads[0], "bias_grad": grads[1],
            "rows": rows}


def refusals(mesh):
    """The error of each refused vocabulary-parallel input (None where nothing was raised)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, bias, labels = inputs("ce")
    split = distribute_tensor(weight, mesh["tp"], [Shard(0)])
    calls = {
        "by columns": lambda: dict(weight=distribute_tensor(weight, mesh["tp"], [Shard(1)])),
        "group and DTensor": lambda: dict(weight=split, vocab_parallel_group=mesh.get_group("tp")),
        "plain bias": lambda: dict(weight=split, bias=bias),
    }
    errors = {}
    for name, arguments in calls.items():
        try:
            ck.fused_linear_calibration_loss(hidden, labels=labels, option_ids=None, calibration=None, **arguments())
            errors[name] = None
        except (TypeError, ValueError) as error:
            errors[name] = str(error)
    return errors


def tensor_parallel_llama(mesh, fsdp=True):
    """The tiny Llama's lm_head column-parallel (vocabulary rows) over ``tp``, then (``fsdp``) FSDP2 over ``dp``."""
    def shard(model):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        # whole logits from the model's own forward (generation); the fused loss reads the weight shards
        parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel(output_layouts=Replicate())})
        if fsdp:
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh["dp"])
            fully_shard(model.lm_head, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
    return shard


def tensor_parallel_step(model, tokenizer, option_ids):
    """One patched forward and backward on step 0's whole batch: the loss, the lm_head weight's gradient (this
    rank's rows under tensor parallelism) and the embedding's (reached through the hidden gradient); then the
    statistics passes CalibrationTrainer runs (the option logits of the answers, the token statistics)."""
    from sharded_training import global_batch

    batch = global_batch(tokenizer, option_ids, 0)
    out = model(**batch)
    out.loss.backward()
    lm_head = model.lm_head.weight.grad
    with torch.no_grad():
        options = model(**batch, option_logits_only=True)
        tokens = model(**batch, token_stats_only=True).token_stats
    return {"loss": out.loss.detach(), "lm_head": getattr(lm_head, "to_local", lambda: lm_head)(),
            "embedding": model.model.embed_tokens.weight.grad, "option_logits": options.option_logits,
            "option_labels": options.option_labels, "token_stats": (tokens.counts, tokens.sum_conf,
                                                                     tokens.sum_correct)}


def _worker(rank, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        results = {case: vocab_parallel(case, mesh) for case in CASES}
        results["refusals"] = refusals(mesh)
        from calibkern.hf import fused_loss_of
        from sharded_training import STEPS, end_state, fixtures, new_model, train

        tokenizer, option_ids = fixtures()
        dp_rank = mesh["dp"].get_local_rank()
        for mode in TP_MODES:
            # the first call runs the equivalence check on the DTensor weight (checked below)
            model, optimizer = new_model(tokenizer, mode.removesuffix("_dp_group"), option_ids,
                                         shard=tensor_parallel_llama(mesh))
            policy = fused_loss_of(model)
            policy.world_size = 2  # the data-parallel processes (HF scaling)
            if mode.endswith("_dp_group"):
                policy.em_group = mesh.get_group("dp")
            train(model, optimizer, tokenizer, option_ids, range(STEPS), dp_rank, 2)
            results[f"train_{mode}"] = {**end_state(model), "checked": not policy.check_pending}
        model, _ = new_model(tokenizer, "cft", option_ids, shard=tensor_parallel_llama(mesh, fsdp=False))
        results["tp_only"] = tensor_parallel_step(model, tokenizer, option_ids)
        results["tp_only_checked"] = not fused_loss_of(model).check_pending
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("vocab_parallel")
    return spawn_ranks(_worker, out_dir, WORLD)


def _assert_close(got, want, path):
    if isinstance(want, dict):
        for key in want:
            _assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, (tuple, list)):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{path}[{i}]")
    elif want is None:
        assert got is None, path
    elif want.dtype.is_floating_point:
        assert got.shape == want.shape, path
        assert (got.double() - want.double()).abs().max() <= 1e-5, f"{path}: {got} != {want}"
    else:
        assert torch.equal(got, want), f"{path}: {got} != {want}"


@pytest.mark.parametrize("case", list(CASES))
def test_vocab_parallel_loss_equals_one_process(ranks, case):
    want = one_process(case)
    if CASES[case][0] is None:
        assert want["full_stats"][0].sum() == VOCAB * int((inputs(case)[3][:, 1:] != -100).sum())
    for rank in ranks:
        got = rank[case]
        rows = got.pop("rows")
        want_rank = {**want, "weight_grad": want["weight_grad"][rows],
                     "bias_grad": None if want["bias_grad"] is None else want["bias_grad"][rows]}
        _assert_close(got, want_rank, case)


def test_refused_inputs_name_the_argument(ranks):
    for rank in ranks:
        errors = rank["refusals"]
        assert "sharded on dim 0" in errors["by columns"]
        assert "vocab_parallel_group" in errors["group and DTensor"]
        assert "bias" in errors["plain bias"]
    hidden, weight, _, labels = inputs("ce")
    with pytest.raises(ValueError, match="vocab_parallel_group needs an initialised"):
        ck.fused_linear_calibration_loss(hidden, weight, labels, option_ids=None, calibration=None,
                                         vocab_parallel_group=object())


@pytest.mark.parametrize("mode", TP_MODES)
def test_fsdp2_by_tensor_parallel_training_equals_one_process(ranks, mode):
    from sharded_training import fixtures, one_process_runs

    want = one_process_runs([mode.removesuffix("_dp_group")])[mode.removesuffix("_dp_group")]
    assert_trained(want["weights"], fixtures()[0])
    for rank in ranks:
        got = rank[f"train_{mode}"]
        assert got.pop("checked")
        assert_same_training_state(got, want)


def test_tensor_parallel_lm_head_without_fsdp_equals_one_process(ranks):
    """``parallelize_module`` alone: the patched forward computes the loss split over the vocabulary, and the
    statistics passes (option logits, token statistics) equal one process's."""
    from sharded_training import fixtures, new_model

    tokenizer, option_ids = fixtures()
    model, _ = new_model(tokenizer, "cft", option_ids)
    want = tensor_parallel_step(model, tokenizer, option_ids)
    half = len(tokenizer) // 2
    for rank, got in enumerate(ranks):
        assert got["tp_only_checked"]  # the equivalence check ran on the DTensor weight and passed
        tp_rank = rank % 2
        _assert_close(got["tp_only"], {**want, "lm_head": want["lm_head"][tp_rank * half:(tp_rank + 1) * half]},
                      f"rank {rank}")
