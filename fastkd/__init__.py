"""fastkd: fused knowledge-distillation loss for Transformers (Triton on GPU, PyTorch on CPU)."""

from . import reference
from .functional import kd_loss
from .linear import LinearKDLoss, linear_kd_loss
from .module import KDLoss

__version__ = "0.1.0"

__all__ = ["KDLoss", "LinearKDLoss", "kd_loss", "linear_kd_loss", "reference", "__version__"]
