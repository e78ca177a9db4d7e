"""Triton kernels of fastkd, installed as ``fastkd.kernels``.

One module per kernel family; each holds its ``@triton.jit`` kernels and the launchers that
allocate outputs and launch them.
"""

from . import kd_loss

__all__ = ["kd_loss"]
