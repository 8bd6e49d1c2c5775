"""The hard-bin calibration term (docs/math.md#cft-term): targets, gradients, official_compat."""

import math

import pytest
import torch

import calibkern as ck
from calibkern.ops import custom_ops
from calibkern.reference import bin_index, non_max_targets, softmax_parts

from helpers import random_labels, random_logits

ACC = torch.tensor([0.05, 0.15, 0.3, 0.35, 0.45, 0.5, 0.62, 0.7, 0.85, 0.93])


def _eager_loss(logits, labels, bin_accuracy, ignore_index=-100):
    """docs/math.md#cft-term written out with a sort, as the paper states it (targets detached)."""
    p = logits.double().softmax(1)
    conf, pred = p.max(1)
    k = p.shape[1]
    a = bin_accuracy.double()[bin_index(conf, bin_accuracy.shape[0])]
    losses = []
    for i in range(p.shape[0]):
        if labels[i] == ignore_index:
            continue
        rest = torch.cat([p[i, :pred[i]], p[i, pred[i] + 1:]])
        q = torch.sort(rest, descending=True).values
        if a[i] >= 1:
            t = torch.zeros_like(q)
        else:
            gamma = math.log(k - 1) / (q[0] * (1 - a[i]))
            u = torch.tanh(gamma * q)
            t = (1 - a[i]) * (1 + u) / ((k - 1) + u.sum())
        losses.append(((conf[i] - a[i]) ** 2 + ((q - t.detach()) ** 2).sum()))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_matches_the_sorted_formulation(k):
    logits, labels = random_logits(64, k, scale=2.0, seed=k), random_labels(64, k, ignore_frac=0.2, seed=k)
    ours = ck.calibration_loss(logits, labels, ACC)
    assert ours.item() == pytest.approx(_eager_loss(logits, labels, ACC).item(), rel=1e-5, abs=1e-7)


def test_targets_sum_to_one_minus_a_and_keep_the_order():
    logits = random_logits(200, 6, scale=3.0, seed=2)
    p, _, pred = softmax_parts(logits.double())
    a = torch.rand(200, dtype=torch.float64)
    tau = non_max_targets(p, pred, a)
    mask = torch.nn.functional.one_hot(pred, 6).bool()
    torch.testing.assert_close(tau.masked_fill(mask, 0).sum(1), 1 - a)
    torch.testing.assert_close(tau[mask], a)
    q = p.masked_fill(mask, -1)
    order_q = torch.argsort(q, dim=1, stable=True)
    t_sorted = tau.masked_fill(mask, -1).gather(1, order_q)
    assert (t_sorted[:, 2:] >= t_sorted[:, 1:-1] - 1e-12).all()  # non-decreasing where q is


def test_guards_keep_targets_finite():
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.97, 0.01, 0.01, 0.01]], dtype=torch.float64)
    pred = torch.tensor([0, 0, 0])
    for a_value in (0.0, 0.5, 1.0 - 1e-15, 1.0):
        tau = non_max_targets(p, pred, torch.full((3,), a_value, dtype=torch.float64))
        assert torch.isfinite(tau).all()
    assert non_max_targets(p, pred, torch.ones(3, dtype=torch.float64))[:, 1:].abs().max() == 0


def test_extreme_logits_give_finite_loss_and_grad():
    logits = torch.tensor([[1e4, -1e4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-1e4, -1e4, -1e4, 1e4]],
                          requires_grad=True)
    loss = ck.calibration_loss(logits, torch.tensor([0, 1, 2]), ACC)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("k", [2, 4, 5])
def test_gradcheck_through_targets_float64(k):
    """The full derivative (targets not detached) is what autograd of the forward value gives."""
    logits = random_logits(9, k, scale=1.5, dtype=torch.float64, seed=k).requires_grad_(True)
    labels = random_labels(9, k, ignore_frac=0.2, seed=k)
    assert torch.autograd.gradcheck(
        lambda z: ck.calibration_loss(z, labels, ACC, detach_targets=False, backend="torch"), (logits,))


def test_gradcheck_default_two_options_float64():
    """With K = 2 the non-max target is 1 − a, constant in z, so the detached gradient is exact."""
    logits = random_logits(12, 2, scale=1.5, dtype=torch.float64, seed=3).requires_grad_(True)
    labels = random_labels(12, 2, ignore_frac=0.2, seed=3)
    assert torch.autograd.gradcheck(lambda z: ck.calibration_loss(z, labels, ACC, backend="torch"), (logits,))
    assert torch.autograd.gradcheck(lambda z: ck.calibration_loss(z, labels, ACC, reduction="none", backend="torch"),
                                    (logits,))


@pytest.mark.parametrize("k", [3, 4, 6])
def test_gradcheck_of_the_kernel_formula_with_frozen_targets(k):
    """The per-row gradient formula ``p ⊙ (g − ⟨g, p⟩)`` against finite differences, τ frozen at the start."""
    from calibkern.reference import loss_to_fixed_targets

    logits = random_logits(8, k, scale=1.5, dtype=torch.float64, seed=k).requires_grad_(True)
    p0, conf0, pred0 = softmax_parts(logits.detach())
    tau = non_max_targets(p0, pred0, ACC.double()[bin_index(conf0, 10)])
    keep = random_labels(8, k, ignore_frac=0.3, seed=k) != -100

    def loss_with_formula_gradient(z):
        """The loss's value, with the formula's gradient (as a kernel returns it) as its gradient."""
        loss, grad = loss_to_fixed_targets(z.detach().softmax(1), tau, keep)
        return loss + (grad * (z - z.detach())).sum(1)

    assert torch.autograd.gradcheck(loss_with_formula_gradient, (logits,))


def test_kernel_gradient_equals_autograd_of_the_plain_formula():
    logits = random_logits(50, 5, dtype=torch.float64, seed=4).requires_grad_(True)
    labels = random_labels(50, 5, ignore_frac=0.1, seed=4)
    ck.calibration_loss(logits, labels, ACC).backward()
    kernel_grad = logits.grad.clone()
    logits.grad = None
    p, conf, pred = softmax_parts(logits)
    a = ACC.double()[bin_index(conf, 10)]
    tau = non_max_targets(p.detach(), pred, a)
    keep = labels != -100
    (((p - tau) ** 2).sum(1)[keep].mean()).backward()
    torch.testing.assert_close(kernel_grad, logits.grad)


def test_reductions_and_ignored_rows():
    logits, labels = random_logits(30, 4, seed=5), random_labels(30, 4, ignore_frac=0.3, seed=5)
    rows = ck.calibration_loss(logits, labels, ACC, reduction="none")
    keep = labels != -100
    assert (rows[~keep] == 0).all()
    assert ck.calibration_loss(logits, labels, ACC, reduction="sum").item() == pytest.approx(rows.sum().item())
    assert ck.calibration_loss(logits, labels, ACC).item() == pytest.approx(rows[keep].mean().item())
    all_ignored = torch.full((30,), -100)
    z = logits.clone().requires_grad_(True)
    loss = ck.calibration_loss(z, all_ignored, ACC)
    loss.backward()
    assert loss.item() == 0.0 and (z.grad == 0).all()


def test_gradient_through_targets_differs_from_detached():
    logits = random_logits(20, 4, dtype=torch.float64, seed=6).requires_grad_(True)
    labels = random_labels(20, 4, seed=6)
    ck.calibration_loss(logits, labels, ACC).backward()
    detached = logits.grad.clone()
    logits.grad = None
    through = ck.calibration_loss(logits, labels, ACC, detach_targets=False)
    through.backward()
    assert through.item() == pytest.approx(ck.calibration_loss(logits, labels, ACC).item())
    assert not torch.allclose(detached, logits.grad)


class TestOfficialCompat:
    def setup_method(self):
        self.logits = random_logits(300, 4, scale=2.5, dtype=torch.float64, seed=7)
        self.labels = random_labels(300, 4, seed=7)
        self.counts = torch.full((10,), 40.0)

    def test_per_bin_sum_over_n0_without_the_top_bin(self):
        rows = ck.calibration_loss(self.logits, self.labels, ACC, detach_targets=False, reduction="none")
        bins = bin_index(softmax_parts(self.logits)[1], 10)
        expected = sum(rows[bins == k].sum() / self.counts[k] for k in range(9))
        ours = ck.calibration_loss(self.logits, self.labels, ACC, bin_counts=self.counts, official_compat=True)
        assert ours.dtype == torch.float64
        assert ours.item() == pytest.approx(expected.item(), rel=1e-12)
        assert (bins == 9).any()  # the data has top-bin samples, and they are left out

    def test_top_bin_samples_do_not_move_the_loss(self):
        bins = bin_index(softmax_parts(self.logits)[1], 10)
        top = bins == 9
        full = ck.calibration_loss(self.logits, self.labels, ACC, bin_counts=self.counts, official_compat=True)
        rest = ck.calibration_loss(self.logits[~top], self.labels[~top], ACC, bin_counts=self.counts,
                                   official_compat=True)
        assert full.item() == pytest.approx(rest.item(), rel=1e-12)

    def test_gradient_flows_through_targets(self):
        z = self.logits.clone().requires_grad_(True)
        ck.calibration_loss(z, self.labels, ACC, bin_counts=self.counts, official_compat=True).backward()
        official = z.grad.clone()
        z.grad = None
        ck.calibration_loss(z, self.labels, ACC, bin_counts=self.counts, official_compat=True,
                            detach_targets=True).backward()
        assert not torch.allclose(official, z.grad)

    def test_empty_reference_bin_reproduces_the_published_division_by_zero(self):
        counts = self.counts.clone()
        counts[3] = 0
        out = ck.calibration_loss(self.logits, self.labels, ACC, bin_counts=counts, official_compat=True)
        assert not torch.isfinite(out)

    def test_needs_bin_counts_and_the_reference_backend(self):
        with pytest.raises(ValueError, match="bin_counts"):
            ck.calibration_loss(self.logits, self.labels, ACC, official_compat=True)
        with pytest.raises(ValueError, match="bin_counts"):
            ck.calibration_loss(self.logits, self.labels, ACC, bin_counts=self.counts)


@pytest.mark.parametrize("backend", ck.available_backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eager_form", ["cpp node", "python"])
def test_gradient_for_every_reduction_and_upstream_factor(backend, reduction, eager_form, monkeypatch):
    """The kernel's saved gradient, handed back as it is when ∂L/∂loss is exactly 1 and scaled otherwise,
    equals the reference's autograd gradient; a retained graph run twice accumulates twice. Both eager
    forms: the C++ autograd node and the Python autograd.Function (what runs without the extension)."""
    if eager_form == "python":
        monkeypatch.setattr(custom_ops.hard_bin_loss, "eager", custom_ops.hard_bin_loss.function.apply)
    elif custom_ops._C is None:
        pytest.skip("calibkern._C is not built")
    logits = random_logits(47, 4, seed=6)
    labels = random_labels(47, 4, ignore_frac=0.2, seed=6)
    want = {}
    for factor in (1.0, 2.5):
        z = logits.double().requires_grad_(True)
        loss = ck.calibration_loss(z, labels, ACC, reduction=reduction, backend="torch")
        (loss if reduction != "none" else loss.sum()).mul(factor).backward()
        want[factor] = z.grad.float()
    z = logits.clone().requires_grad_(True)
    loss = ck.calibration_loss(z, labels, ACC, reduction=reduction, backend=backend)
    out = loss if reduction != "none" else loss.sum()
    out.backward(retain_graph=True)
    torch.testing.assert_close(z.grad, want[1.0], rtol=1e-4, atol=1e-6)
    out.backward(retain_graph=True)
    torch.testing.assert_close(z.grad, 2 * want[1.0], rtol=1e-4, atol=1e-6)
    z.grad = None
    (2.5 * out).backward()
    torch.testing.assert_close(z.grad, want[2.5], rtol=1e-4, atol=1e-6)
