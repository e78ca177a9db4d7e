"""nn.Module wrapper of fastkd.kd_loss."""

from __future__ import annotations

import torch
from torch import nn

from ._spec import check_inplace_flag, check_loss_options
from .functional import kd_loss

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """Knowledge-distillation loss as a module; see :func:`fastkd.kd_loss` for the semantics.

    Example::

        criterion = fastkd.KDLoss(temperature=2.0, alpha=0.5, divergence="jsd", beta=0.5)
        loss = criterion(student_logits, teacher_logits, labels)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        inplace_backward: bool = False,
        *,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        skew: float = 0.1,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        return_components: bool = False,
    ):
        super().__init__()
        self.options = dict(
            temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
            label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
            reduction=reduction,
        )
        # Fail at construction, not at the first training step.
        check_loss_options(has_labels=None, **self.options)
        check_inplace_flag(inplace_backward)
        self.inplace_backward = inplace_backward
        self.return_components = return_components

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None):
        """normalizer: with reduction="sum", the divisor of this step's sum (see kd_loss)."""
        return kd_loss(
            student_logits, teacher_logits, labels, normalizer=normalizer,
            inplace_backward=self.inplace_backward, return_components=self.return_components,
            **self.options,
        )

    def extra_repr(self) -> str:
        options = ", ".join(f"{name}={value!r}" for name, value in self.options.items())
        return f"{options}, inplace_backward={self.inplace_backward}"
