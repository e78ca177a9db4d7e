"""nn.Module wrapper of fastkd.kd_loss."""

from __future__ import annotations

import torch
from torch import nn

from ._validation import check_inplace_flag, check_loss_options
from .functional import kd_loss

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """Knowledge-distillation loss as a module; see :func:`fastkd.kd_loss` for the semantics.

    Example::

        criterion = fastkd.KDLoss(temperature=2.0, alpha=0.5)
        loss = criterion(student_logits, teacher_logits, labels)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        inplace_backward: bool = False,
    ):
        super().__init__()
        # Fail at construction, not at the first training step.
        check_loss_options(temperature=temperature, alpha=alpha, ignore_index=ignore_index,
                           reduction=reduction, has_labels=None)
        check_inplace_flag(inplace_backward)
        self.temperature = temperature
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_backward = inplace_backward

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
        """normalizer: with reduction="sum", the divisor of this step's sum (see kd_loss)."""
        return kd_loss(
            student_logits, teacher_logits, labels,
            temperature=self.temperature, alpha=self.alpha, ignore_index=self.ignore_index,
            reduction=self.reduction, normalizer=normalizer,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"inplace_backward={self.inplace_backward}")
