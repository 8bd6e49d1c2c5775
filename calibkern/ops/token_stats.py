"""Token-level calibration read from the fused loss's chunk gradient (docs/math.md#token-level-calibration).

The prediction ``ŷ`` is the first arg-max of the chunk's logits ``z``, taken (:meth:`TokenStatistics.predict`)
before the cross-entropy kernel overwrites them with ``G = p − e_y`` (``p = softmax(z)`` per row, float32): the
tie rule ``1[argmax z = y]`` (lowest index) on logits, as documented — two logits a few ulps apart can round to
the same probability. Then the softmax needs no second pass:

    correct = (ŷ = y),   c = max(G_y + 1, v) if correct else v,   v = max_j G_j,

``v`` the best probability other than the label's (``G_y ≤ 0``), which is ``p_ŷ`` when ``ŷ ≠ y`` and at most ``p_y``
when ``ŷ = y``. ``p_y`` read back as ``(p_y − 1) + 1`` is within ``2⁻²⁵`` of the kernel's float32 ``p_y``; it is
kept on its side of ``v``, and is ``v`` where the label's logit ties the maximum.

Every statistic is binned with ``b(c) = min(floor(c·M), M − 1)`` (calibkern.reference.bin_index) and summed
with ``scatter_add_`` into ``[M]`` device tensors: no host synchronisation, additive over chunks and ranks.

* token statistics: per bin ``n_k``, ``Σ c_t``, ``Σ correct_t`` over the supervised positions;
* Full-ECE statistics (arXiv 2406.11345): every ``p_tv`` binned, ``n_k``, ``Σ p_tv``, ``Σ 1[v = y_t]``.
  Only the ``M + 1`` largest entries of a row can leave bin 0 (``M + 1`` probabilities of at least ``1/M``
  would sum past 1), so those are binned one by one (``topk``) with the label's ``p_y``, and the rest of the
  row goes to bin 0 as a count ``V − 1 − #top`` and a mass ``Σ_j G_j − G_y − Σ top`` (float32 row sum);
* the token calibration term ``L = Σ_t (c_t − A_{b(c_t)})²`` (bins detached) with
  ``∂L/∂z_t = 2 (c_t − A_b) c_t (e_ŷ − p_t)``, folded into the chunk in place:
  ``G ← s·G + λ·2(c − A)c (e_ŷ − G − e_y)`` with ``s`` the cross-entropy's weight.

With label smoothing ε and the z-loss λ the kernel writes ``G' = σ p − (1 − ε) e_y − δ`` instead, with
``δ = ε/V`` and ``σ = 1 + 2λ lse``; since ``Σ_j p_j = 1``, ``σ = 1 + Σ_j G'_j`` (a row sum, read only when λ > 0).
So ``p_j = (G'_j + δ)/σ`` off the label and ``p_y = (G'_y + 1 − ε + δ)/σ``; ``v = max_{j≠y} G'_j`` is taken with the
label's column set to −∞ for the one ``amax`` (``G'_y`` may exceed the others) and put back, and the term folds in
as ``G' ← (s − κ/σ) G' − (κ/σ)(1 − ε) e_y − κδ/σ + κ e_ŷ`` with ``κ = λ_cal·2(c − A)c`` — for ε = λ = 0 the
formulas above.

Rows whose logits hold NaN or ±inf (an all-NaN ``G`` row) are left out of the bins and counted in
``n_skipped``; their cross-entropy and calibration term are NaN.

Split over the vocabulary (calibkern.ops.vocab_parallel: each rank holds the columns ``[s, s + V_r)`` of ``G``),
``G_y`` comes from the cross-entropy (the same on every rank); ``max_j z_j``, its lowest index and ``z_y`` are
all-reduced before the kernel, ``v = max_j G_j`` (and ``σ``'s row sum) after, so ``c``, ``correct`` and the token
statistics and term are the same on every rank; the fold touches the columns ``y`` and ``ŷ`` where they live. Each
rank bins the Full-ECE entries of its own columns (the label's on the rank that holds it) and those sums are
all-reduced once, in :meth:`TokenStatistics.outputs`.
"""

from __future__ import annotations

import torch
from torch import distributed as dist

from ..reference import bin_index
from .vocab_parallel import VocabShard, first_max

MAX_BLOCK = 512  # columns per block of the two-level arg-max (a vectorised amax, then one block's columns)


def _first_max(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, ``(max_j G_j, the lowest j attaining it)``: block maxima (one vectorised ``amax`` pass), the
    first block holding the maximum, then the first arg-max of that block's columns (``[rows, block]`` work;
    past the last column the window repeats it, after its own first place)."""
    rows, vocab = grad.shape
    block = min(MAX_BLOCK, vocab)
    n_blocks = vocab // block
    maxima = grad[:, :n_blocks * block].view(rows, n_blocks, block).amax(2)
    if n_blocks * block < vocab:
        maxima = torch.cat([maxima, grad[:, n_blocks * block:].amax(1, keepdim=True)], 1)
    value, first_block = maxima.max(1)
    start = first_block * block
    columns = (start[:, None] + torch.arange(block, device=grad.device)).clamp_(max=vocab - 1)
    return value, start + grad.gather(1, columns).argmax(1)


def _add(stats, bins: torch.Tensor, kept: torch.Tensor, values: torch.Tensor, correct: torch.Tensor) -> None:
    counts, sum_conf, sum_correct, _ = stats
    counts.scatter_add_(0, bins, kept.long())
    sum_conf.scatter_add_(0, bins, torch.where(kept, values.double(), 0.0))
    sum_correct.scatter_add_(0, bins, correct.double())


class TokenStatistics:
    """Accumulators for one fused-loss call: ``update_`` per chunk, ``outputs`` at the end.

    ``token``/``full`` switch the two telemetries; ``bin_accuracy`` (``[M]`` float32) switches the token
    calibration term on, with weights ``lam`` (the term) and ``sft_weight`` (the cross-entropy).
    ``ce_options``: the cross-entropy's ``(label_smoothing, lse_square_scale)``, whose gradient the chunks hold.
    """

    def __init__(self, n_bins: int, device, *, token: bool, full: bool, bin_accuracy=None, lam: float = 1.0,
                 sft_weight: float = 1.0, ce_options: tuple[float, float] = (0.0, 0.0)):
        self.n_bins, self.token, self.full = n_bins, token, full
        self.bin_accuracy, self.lam, self.sft_weight = bin_accuracy, lam, sft_weight
        self.label_smoothing, self.lse_square_scale = ce_options
        self.token_stats = self._zeros(device)
        self.full_stats = self._zeros(device)
        self.cal_sum = torch.zeros((), dtype=torch.float32, device=device)

    def _zeros(self, device):
        return (torch.zeros(self.n_bins, dtype=torch.int64, device=device),
                torch.zeros(self.n_bins, dtype=torch.float64, device=device),
                torch.zeros(self.n_bins, dtype=torch.float64, device=device),
                torch.zeros((), dtype=torch.int64, device=device))

    @property
    def term(self) -> bool:
        return self.bin_accuracy is not None

    @staticmethod
    def predict(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                shard: VocabShard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ŷ, z_y = max z)`` per row of a chunk's logits ``z`` (``[rows, V]``, on a ``shard`` this rank's
        columns): the lowest global index attaining ``max z``, and whether the label's logit attains it too. Call it
        before the cross-entropy kernel overwrites ``z``."""
        label = torch.where(targets != ignore_index, targets, 0)
        if shard is None:
            top, predicted = _first_max(logits)
            label_logit = logits.gather(1, label[:, None]).squeeze(1)
        else:
            top, predicted = first_max(logits, shard, _first_max)
            column, owned = shard.local(label)
            label_logit = torch.where(owned, logits.gather(1, column[:, None]).squeeze(1), -torch.inf)
            label_logit = shard.all_reduce_(label_logit, dist.ReduceOp.MAX)
        return predicted, label_logit == top

    def update_(self, grad: torch.Tensor, targets: torch.Tensor, ignore_index: int, fold: bool,
                prediction: tuple[torch.Tensor, torch.Tensor], shard: VocabShard | None = None,
                label_grad: torch.Tensor | None = None) -> None:
        """Read one chunk's ``G = p − e_y`` (``[rows, V]`` float32; on a vocabulary ``shard``, this rank's
        columns and the rows' ``label_grad`` ``G_y``) with the rows' ``prediction`` (:meth:`predict`); with
        ``fold``, add the calibration term's gradient into it in place (before any soft-cap slope)."""
        predicted, label_at_max = prediction
        supervised = targets != ignore_index
        label = torch.where(supervised, targets, 0)
        correct = predicted == label
        if shard is None:
            column, owned = label, torch.ones_like(supervised)
            predicted_column, predicted_owned = predicted, owned
            label_grad = grad.gather(1, label[:, None]).squeeze(1)
        else:
            column, owned = shard.local(label)
            predicted_column, predicted_owned = shard.local(predicted)
        shift, scale, row_sum = self._affine(grad, shard)
        # other = max_{j≠y} p_j: p_ŷ when ŷ ≠ y, at most p_y when ŷ = y; p_y read back from G_y is kept on its side
        # of it, and equals it where z_y ties the max
        other = (self._max_off_label(grad, column, owned, shard) + shift) / scale
        read_back = (label_grad + (1.0 - self.label_smoothing + shift)) / scale
        label_prob = torch.where(correct, torch.maximum(read_back, other),
                                 torch.where(label_at_max, other, torch.minimum(read_back, other)))
        conf = torch.where(correct, label_prob, other)
        finite = torch.isfinite(conf)
        kept = supervised & finite
        bins = bin_index(conf, self.n_bins)
        if self.token:
            _add(self.token_stats, bins, kept, conf, correct & kept)
            self.token_stats[3].add_((supervised & ~finite).sum())
        if self.full:
            self._update_full(grad, torch.where(owned, column, -1), label_grad, label_prob, kept,
                              supervised & ~finite & owned, shift, scale, row_sum)
        if self.term:
            miss = conf - self.bin_accuracy[bins]
            self.cal_sum += torch.where(supervised, miss * miss, 0.0).sum()
            if fold:  # G ← s G + κ (e_ŷ − p), p = (G + (1 − ε) e_y + δ)/σ
                coef = torch.where(supervised, (2.0 * self.lam) * miss * conf, 0.0)
                grad.mul_((self.sft_weight - coef / scale)[:, None])
                if self.label_smoothing:
                    grad.sub_((coef * shift / scale)[:, None])
                grad.scatter_add_(1, column[:, None],
                                  torch.where(owned, -coef * (1.0 - self.label_smoothing) / scale, 0.0)[:, None])
                grad.scatter_add_(1, predicted_column[:, None], torch.where(predicted_owned, coef, 0.0)[:, None])

    def _affine(self, grad: torch.Tensor, shard: VocabShard | None):
        """``(δ, σ, local row sums or None)`` of the module docstring: ``p_j = (G_j + δ)/σ`` off the label."""
        vocab = grad.shape[1] if shard is None else shard.vocab_size
        shift = self.label_smoothing / vocab if self.label_smoothing else 0.0
        row_sum = grad.sum(1) if self.full or self.lse_square_scale else None
        if not self.lse_square_scale:
            return shift, 1.0, row_sum
        total = row_sum if shard is None else shard.all_reduce_(row_sum.clone())
        return shift, 1.0 + total, row_sum

    def _max_off_label(self, grad, column, owned, shard) -> torch.Tensor:
        """``max_{j≠y} G_j`` per row (all ranks' columns): the plain ``G_y = p_y − 1 ≤ 0`` never exceeds it, so one
        ``amax``; with label smoothing or the z-loss the label's column is masked for it and restored."""
        if self.label_smoothing or self.lse_square_scale:
            at_label = grad.gather(1, column[:, None])
            grad.scatter_(1, column[:, None], torch.where(owned[:, None], -torch.inf, at_label))
            other = grad.amax(1)
            grad.scatter_(1, column[:, None], at_label)
        else:
            other = grad.amax(1)
        return other if shard is None else shard.all_reduce_(other, dist.ReduceOp.MAX)

    def _update_full(self, grad, column, label_grad, label_prob, kept, skipped, shift, scale, row_sum) -> None:
        """Bin every entry of the rows ``kept`` of ``grad``: the label's ``label_prob`` where ``column`` ≥ 0
        holds it (rows of ``kept`` whose label lives on another rank skip it), the rest as ``(G + shift)/scale``."""
        vocab = grad.shape[1]
        top, top_index = grad.topk(min(self.n_bins + 1, vocab), dim=1, sorted=False)
        top = (top + shift) / (scale if isinstance(scale, float) else scale[:, None])
        has_label = column >= 0
        other = (top_index != column[:, None]) & kept[:, None]
        top_other = torch.where(other, top, 0.0)
        _add(self.full_stats, bin_index(top, self.n_bins).reshape(-1), other.reshape(-1), top.reshape(-1),
             torch.zeros_like(top, dtype=torch.bool).reshape(-1))
        with_label = kept & has_label
        _add(self.full_stats, bin_index(label_prob, self.n_bins), with_label, label_prob, with_label)
        off_label = vocab - has_label.long()
        rest_count = torch.where(kept, off_label - other.sum(1), 0).sum()
        own_label = torch.where(has_label, label_grad, 0.0).double()
        off_label_mass = (row_sum.double() - own_label + off_label * shift) / scale
        rest_mass = (off_label_mass - top_other.sum(1).double()).clamp_min(0.0)
        counts, sum_conf, _, n_skipped = self.full_stats
        counts[0] += rest_count
        sum_conf[0] += torch.where(kept, rest_mass, 0.0).sum()
        n_skipped.add_(skipped.sum())

    def outputs(self, shard: VocabShard | None = None) -> tuple[torch.Tensor, ...]:
        """``(cal_sum, *token statistics, *full statistics)``: each statistic is (counts, Σ conf, Σ correct,
        n_skipped). On a vocabulary ``shard`` the Full-ECE sums of the ranks' columns are all-reduced first."""
        if shard is not None and self.full:
            for total in self.full_stats:
                shard.all_reduce_(total)
        return (self.cal_sum, *self.token_stats, *self.full_stats)
