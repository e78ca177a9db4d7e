"""fastkd: fused knowledge-distillation loss for Transformers (Triton on GPU, PyTorch on CPU)."""

from . import reference
from .functional import kd_loss
from .module import KDLoss
from .topk import TopKKDLoss, teacher_topk, topk_kd_loss

__version__ = "0.1.0"

__all__ = ["KDLoss", "TopKKDLoss", "kd_loss", "reference", "teacher_topk", "topk_kd_loss",
           "__version__"]
