"""calibkern.nn: the Liger-style fused linear cross-entropy (label smoothing, z-loss, soft-cap, reductions) equals
``F.cross_entropy(input @ W.T, ..., label_smoothing=...)`` plus the z-loss formula, in loss and gradients, on
every backend; the kernels' label smoothing and z-loss against the float64 formula."""

import pytest
import torch
import torch.nn.functional as F

import calibkern as ck
from calibkern import backends
from calibkern.ops import custom_ops

BACKENDS = [name for name in ("torch", "cpp", "triton") if backends.is_available(name)]
IGNORE = -100


def _expected_rows(z, targets, smoothing, z_scale, ignore_index=IGNORE):
    """float64 per-row loss: F.cross_entropy with label_smoothing plus λ·lse²; ignored rows 0."""
    z = z.double()
    keep = targets != ignore_index
    ce = F.cross_entropy(z, targets, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none")
    lse = torch.logsumexp(z, dim=1)
    return torch.where(keep, ce + z_scale * lse * lse, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, vocab", [(1, 2), (47, 33), (123, 300)])
@pytest.mark.parametrize("smoothing, z_scale", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.25, 0.5)])
def test_kernel_loss_and_gradient(backend, n, vocab, smoothing, z_scale):
    generator = torch.Generator().manual_seed(n * vocab)
    z = torch.randn(n, vocab, generator=generator) * 4 + 30 * (torch.rand(n, 1, generator=generator) - 0.5)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    targets[::5] = IGNORE
    z64 = z.double().requires_grad_()
    expected = _expected_rows(z64, targets, smoothing, z_scale)
    expected.sum().backward()
    grad = z.clone()
    loss = custom_ops.cross_entropy_(grad, targets, IGNORE, backend, smoothing, z_scale)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), z64.grad, rtol=1e-5, atol=1e-6)


def _problem(n=47, dim=16, vocab=37, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=generator, dtype=dtype) * 0.5
    bias = torch.randn(vocab, generator=generator, dtype=dtype)
    target = torch.randint(0, vocab, (n,), generator=generator)
    target[::6] = IGNORE
    return x, weight, bias, target


def _eager(x, weight, bias, target, smoothing, z_scale, reduction, softcap=None):
    """float64 ``F.cross_entropy(x @ Wᵀ + b, …, label_smoothing=ε)`` plus ``λ · lse²`` over the same rows."""
    z = x.double() @ weight.double().t() + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = _expected_rows(z, target, smoothing, z_scale)
    keep = (target != IGNORE).sum().clamp_min(1)
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / keep}[reduction]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing, z_scale, softcap", [(0.0, 0.0, None), (0.1, 1e-4, None), (0.2, 0.01, 5.0)])
def test_module_equals_cross_entropy_and_z_loss(backend, reduction, smoothing, z_scale, softcap):
    x, weight, bias, target = _problem(seed=len(reduction))
    loss_fn = ck.nn.FusedLinearCrossEntropyLoss(lse_square_scale=z_scale, label_smoothing=smoothing,
                                                reduction=reduction, softcap=softcap, backend=backend, chunk_size=16)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    loss = loss_fn(leaves[1], leaves[0], target, leaves[2])  # Liger's argument order
    reference = [t.double().requires_grad_() for t in (x, weight, bias)]
    expected = _eager(*reference[:1], reference[1], reference[2], target, smoothing, z_scale, reduction, softcap)
    upstream = torch.linspace(-1, 2, target.shape[0], dtype=torch.float64) if reduction == "none" else None
    (loss.double() * upstream).sum().backward() if upstream is not None else loss.backward()
    (expected * upstream).sum().backward() if upstream is not None else expected.backward()
    assert loss.shape == expected.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, reference):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [(True, False, False), (True, False, True), (False, True, False)],
                         ids=["input-only", "input-and-bias", "weight-only"])
def test_reduction_none_computes_the_gradients_asked_for(backend, trainable):
    """Per-row losses with per-row upstream weights and part of (input, weight, bias) frozen — a frozen lm_head
    takes the path that keeps ``g W`` from forward — equal the eager float64 gradients; the frozen get none."""
    x, weight, bias, target = _problem(n=123, seed=5)
    leaves = [t.clone().requires_grad_(need) for t, need in zip((x, weight, bias), trainable)]
    loss = ck.nn.fused_linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], label_smoothing=0.1,
                                            reduction="none", backend=backend, chunk_size=32)
    reference = [t.double().requires_grad_(need) for t, need in zip((x, weight, bias), trainable)]
    expected = _eager(*reference, target, 0.1, 0.0, "none")
    upstream = torch.linspace(-1, 2, target.shape[0], dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for got, want in zip(leaves, reference):
        assert (got.grad is None) == (want.grad is None)
        if want.grad is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_functional_form_calibration_and_statistics():
    x, weight, bias, target = _problem(vocab=40, seed=3)
    target[target >= 0] = target[target >= 0] % 4 + 10  # answers among the option ids 10..13
    plain = ck.nn.fused_linear_cross_entropy(x, weight, target, bias)
    torch.testing.assert_close(plain.double(), _eager(x, weight, bias, target, 0.0, 0.0, "mean"), rtol=1e-5, atol=1e-5)
    loss_fn = ck.nn.FusedLinearCrossEntropyLoss(calibration="hard_bin", option_ids=[10, 11, 12, 13],
                                                bin_accuracy=torch.linspace(0.05, 0.95, 10), lam=0.5,
                                                token_stats=True)
    loss = loss_fn(weight, x, target, bias)
    out = loss_fn.output
    torch.testing.assert_close(loss, out.sft_loss + 0.5 * out.cal_loss)
    torch.testing.assert_close(out.sft_loss, plain)
    assert int(out.token_stats.total()) == int((target != IGNORE).sum()) == int(out.bin_stats.total())
    assert ck.nn.FusedLinearCrossEntropyLoss(calibration="none")(weight, x, target, bias) == pytest.approx(float(plain))
    smoothed = ck.nn.FusedLinearCrossEntropyLoss(label_smoothing=0.2, lse_square_scale=1e-3, token_stats=True)
    torch.testing.assert_close(smoothed(weight, x, target, bias).double(),
                               _eager(x, weight, bias, target, 0.2, 1e-3, "mean"), rtol=1e-5, atol=1e-5)
    assert torch.equal(smoothed.output.token_stats.counts, out.token_stats.counts)  # statistics of softmax(z)
    torch.testing.assert_close(smoothed.output.token_stats.sum_conf, out.token_stats.sum_conf, rtol=1e-6, atol=1e-6)


def test_bad_options_raise_naming_them():
    x, weight, bias, target = _problem()
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        ck.nn.FusedLinearCrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="lse_square_scale must be"):
        ck.nn.fused_linear_cross_entropy(x, weight, target, lse_square_scale=-1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ck.nn.fused_linear_cross_entropy(x, weight, target, reduction="batchmean")
    bad = target.clone()
    bad[0] = 37
    with pytest.raises(ValueError, match="target must lie in"):
        ck.nn.fused_linear_cross_entropy(x, weight, bad, reduction="none")
    for reduction in ("none", "mean"):  # one set of checks for every reduction
        with pytest.raises(ValueError, match=r"bias must have shape \(37,\)"):
            ck.nn.fused_linear_cross_entropy(x, weight, target, bias[:-1], reduction=reduction)
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            ck.nn.fused_linear_cross_entropy(x, weight, target, reduction=reduction, chunk_size=0)
