"""Ops: validation, backend dispatch and autograd wrappers over the kernel contract (docs/backends.md).

Importing this package registers the ``torch.ops.calibkern`` custom ops (:mod:`.custom_ops`) and probes
the backends; it never imports triton (``calibkern.ops.triton`` loads it on first use).
"""

from .. import backends
from . import custom_ops  # noqa: F401  (registers torch.ops.calibkern.*)

# torch.compile cannot trace the import of a backend module, so load them all now: a compiled training
# step may be the first call.
backends.available_backends()
