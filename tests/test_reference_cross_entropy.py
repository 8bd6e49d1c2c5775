"""The reference in-place cross-entropy pass against F.cross_entropy and its autograd gradient."""

import torch
import torch.nn.functional as F

from calibkern.reference import cross_entropy_

from helpers import random_labels, random_logits


def test_matches_torch_cross_entropy():
    z, y = random_logits(37, 11, seed=1), random_labels(37, 11, ignore_frac=0.2, seed=1)
    z_ref = z.clone().requires_grad_(True)
    expected = F.cross_entropy(z_ref, y, reduction="none", ignore_index=-100)
    expected.sum().backward()
    grad = z.clone()
    loss = cross_entropy_(grad, y, -100)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, z_ref.grad)


def test_huge_equal_logits_stay_exact():
    z = torch.full((2, 4), -1.7e38)
    loss = cross_entropy_(z, torch.tensor([0, 3]), -100)
    torch.testing.assert_close(loss, torch.full((2,), float(torch.log(torch.tensor(4.0)))))
    torch.testing.assert_close(z.sum(dim=1), torch.zeros(2))
    assert z[0, 0].item() == -0.75
