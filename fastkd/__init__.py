"""fastkd: fused knowledge-distillation losses for Transformers (Triton on GPU, PyTorch on CPU)."""

from . import reference
from ._autograd import KDLossComponents
from ._spec import DIVERGENCES
from .functional import kd_loss
from .module import KDLoss

__version__ = "0.2.0"

__all__ = ["DIVERGENCES", "KDLoss", "KDLossComponents", "kd_loss", "reference", "__version__"]
