"""The fused linear loss with the lm_head weight split over the vocabulary (tensor parallelism; docs/distributed.md).

Rank ``r`` of a process group holds the rows ``[s_r, s_r + V_r)`` of ``W`` (and of ``b``); every rank holds the
same hidden rows and targets (global vocabulary ids). Per chunk of rows each rank computes its local logits
``z^r = h W_rᵀ + b_r`` (``[rows, V_r]``) and, with two all-reduces (the maximum, then both sums: ``3 · rows``
numbers),

    m = max_r max_j z^r_j,   S = Σ_r Σ_j exp(z^r_j − m),   z_y = Σ_r [y ∈ r] z^r_{y − s_r},
    loss = m + log S − z_y,   G^r = exp(z^r − m) / S − e_{y − s_r}   (the columns of rank r of ``softmax − e_y``),

(with label smoothing and the z-loss, :func:`cross_entropy_`: one more sum in the second all-reduce),

so no rank holds a ``[rows, V]`` tensor. The gradient of each shard is ``G^rᵀ h`` (local); the hidden gradient
``Σ_r G^r W_r`` is all-reduced once per call in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of a vocabulary split over ``group``: the global ids ``[start, start + size)``
    (``start`` and the global ``vocab_size`` as 0-dim int64 tensors on the weight's device)."""

    group: object
    start: torch.Tensor
    size: int
    vocab_size: torch.Tensor

    def local(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(column, owned)``: the local column of each global id (clamped into ``[0, size)``) and whether
        this rank holds it."""
        column = ids - self.start
        owned = (column >= 0) & (column < self.size)
        return column.clamp(0, self.size - 1), owned

    def all_reduce_(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """``tensor`` reduced in place over the group (``op`` default: sum)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return tensor


def shard_of_group(weight: torch.Tensor, group) -> VocabShard:
    """The shard of a local ``weight [V_r, D]`` on ``group``: the ranks' row counts all-gathered (one
    collective of P integers, on the device, no host read), ``start`` = the rows of the lower ranks."""
    size = torch.tensor(weight.shape[0], dtype=torch.long, device=weight.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = torch.stack(sizes)
    rank = dist.get_rank(group)
    return VocabShard(group, sizes[:rank].sum(), weight.shape[0], sizes.sum())


def shard_of_dtensor(weight) -> tuple[torch.Tensor, VocabShard]:
    """``(local rows, shard)`` of a ``DTensor`` weight sharded on dim 0 over one mesh dimension (replicated
    over any other); refuses any other placement."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(weight.placements)
    sharded = [dim for dim, placement in enumerate(placements) if placement == Shard(0)]
    if len(sharded) != 1 or any(p != Replicate() for dim, p in enumerate(placements) if dim != sharded[0]):
        raise ValueError(f"a DTensor weight must be sharded on dim 0 (the vocabulary) over one mesh dimension and "
                         f"replicated over the others, got placements {placements}")
    mesh = weight.device_mesh
    local = weight.to_local()
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    device = local.device
    return local, VocabShard(mesh.get_group(sharded[0]), torch.tensor(offset[0], device=device), local.shape[0],
                             torch.tensor(weight.shape[0], device=device))


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, shard: VocabShard,
                   label_smoothing: float = 0.0, lse_square_scale: float = 0.0):
    """Overwrite this rank's float32 chunk ``logits [rows, V_r]`` with its columns of the cross-entropy's gradient
    over the whole vocabulary (0 on ignored rows); returns ``(loss per row, label gradient G_y)``, both the same
    on every rank (module docstring). With label smoothing ε and the z-loss λ (docs/math.md#the-fused-linear-loss)
    the loss is ``lse − (1 − ε) z_y − (ε/V) Σ_j z_j + λ lse²`` and the gradient ``(1 + 2λ lse) p − (1 − ε) e_y −
    ε/V``, ``Σ_j (z_j − m)/V`` entering the one all-reduce of the sums."""
    supervised = targets != ignore_index
    column, owned = shard.local(torch.where(supervised, targets, 0))
    owned &= supervised
    row_max = shard.all_reduce_(logits.amax(1), dist.ReduceOp.MAX)
    logits.sub_(row_max[:, None])
    parts = [torch.where(owned, logits.gather(1, column[:, None]).squeeze(1), 0.0)]  # z_y − m
    if label_smoothing:
        parts.append((logits / shard.vocab_size).sum(1))  # Σ_j (z_j − m)/V: no overflow at huge logits
    logits.exp_()
    sums = shard.all_reduce_(torch.stack([logits.sum(1), *parts]))  # [S, z_y − m, (Σ_j (z_j − m)/V)]
    log_sum = sums[0].log()
    loss = log_sum - (1.0 - label_smoothing) * sums[1]
    grad_scale = sums[0].reciprocal()
    if label_smoothing:
        loss = loss - label_smoothing * sums[2]
    if lse_square_scale:
        lse = row_max + log_sum
        loss = loss + lse_square_scale * lse * lse
        grad_scale = grad_scale * (1.0 + 2.0 * lse_square_scale * lse)
    logits.mul_(torch.where(supervised, grad_scale, 0.0)[:, None])  # σ p, and 0 on ignored rows
    shift = label_smoothing / shard.vocab_size if label_smoothing else 0.0  # ε/V
    if label_smoothing:
        logits.sub_(torch.where(supervised, shift, 0.0)[:, None])
    logits.scatter_add_(1, column[:, None], -(1.0 - label_smoothing) * owned[:, None].to(logits.dtype))
    label_grad = sums[1].exp() * grad_scale - (1.0 - label_smoothing) - shift
    return torch.where(supervised, loss, 0.0), label_grad


def first_max(x: torch.Tensor, shard: VocabShard, local_first_max) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of this rank's columns ``x`` (a chunk's logits), ``(max_j x_j, the lowest global j attaining it)``
    over the whole vocabulary from each rank's ``local_first_max(x)``: the maximum all-reduced, then the lowest
    index among the ranks attaining it."""
    value, index = local_first_max(x)
    best = shard.all_reduce_(value.clone(), dist.ReduceOp.MAX)
    index = torch.where(value == best, index + shard.start, torch.iinfo(torch.long).max)
    return best, shard.all_reduce_(index, dist.ReduceOp.MIN)


def option_weight(weight: torch.Tensor, option_ids: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """``W[option_ids]`` (``[K, D]``): on a shard the rows it holds, zero rows for the others."""
    if shard is None:
        return weight.index_select(0, option_ids)
    column, owned = shard.local(option_ids)
    return weight.index_select(0, column) * owned[:, None].to(weight.dtype)


def option_bias(bias: torch.Tensor, option_ids: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    if shard is None:
        return bias.index_select(0, option_ids)
    column, owned = shard.local(option_ids)
    return bias.index_select(0, column) * owned.to(bias.dtype)
