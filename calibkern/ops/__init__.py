"""Ops: validation, backend dispatch and autograd wrappers over the kernel contract (docs/backends.md).

Importing this package never imports triton; ``calibkern.ops.triton`` is loaded on first use.
"""
