"""Ops: validation, backend dispatch and autograd wrappers over the kernel contract (docs/backends.md).

Importing this package registers the ``torch.ops.calibkern`` custom ops (:mod:`.custom_ops`) and never
imports triton; ``calibkern.ops.triton`` is loaded on first use.
"""

from . import custom_ops  # noqa: F401  (registers torch.ops.calibkern.*)
