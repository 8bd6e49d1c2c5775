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
