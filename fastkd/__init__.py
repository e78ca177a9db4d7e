"""fastkd: fused knowledge-distillation losses for Transformers (Triton on GPU, PyTorch on CPU)."""

from . import reference
from ._autograd import KDLossComponents
from ._labels import shift_labels
from ._spec import DIVERGENCES
from .functional import kd_loss
from .linear import LinearKDLoss, linear_kd_loss
from .module import KDLoss
from .topk import TopKKDLoss, linear_topk_kd_loss, teacher_topk, topk_kd_loss

__version__ = "0.2.0"

__all__ = ["DIVERGENCES", "KDLoss", "KDLossComponents", "LinearKDLoss", "TopKKDLoss", "kd_loss",
           "linear_kd_loss", "linear_topk_kd_loss", "reference", "shift_labels", "teacher_topk",
           "topk_kd_loss", "__version__"]
