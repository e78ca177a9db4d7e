"""fastkd: fused knowledge-distillation loss for Transformers (Triton on GPU, PyTorch on CPU)."""

from . import reference
from ._labels import shift_labels
from .functional import kd_loss
from .module import KDLoss

__version__ = "0.1.0"

__all__ = ["KDLoss", "kd_loss", "reference", "shift_labels", "__version__"]
