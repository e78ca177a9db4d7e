"""Public functional API of the dense KD loss."""

from __future__ import annotations

import torch

from ._autograd import KDLossComponents
from ._dense import DensePlan, dense_kd_loss
from ._ops import select_backend
from ._spec import check_inplace_flag, validate_kd_call

__all__ = ["kd_loss", "select_backend"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    inplace_backward: bool = False,
    return_components: bool = False,
) -> torch.Tensor | KDLossComponents:
    """Fused knowledge-distillation loss: temperature KL to the teacher plus hard-label CE.

    Computes, in one pass over the logits and without N x V temporaries, the value and gradients
    of this PyTorch (``fastkd.reference.kd_loss`` is it, with 0 * log 0 = 0 for masked logits)::

        T = temperature
        log_p_student = F.log_softmax(student_logits / T, dim=-1)
        p_teacher = F.softmax(teacher_logits / T, dim=-1)
        kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1)
        ce = F.cross_entropy(student_logits.flatten(0, -2), labels.flatten(),
                             ignore_index=ignore_index, reduction="none").view(kl.shape)
        kept = labels != ignore_index
        row_loss = torch.where(kept, alpha * T**2 * kl + (1 - alpha) * ce, 0.0)
        loss = row_loss.sum() / kept.sum().clamp(min=1)  # reduction="mean"

    Args:
        student_logits: (..., V) float16/bfloat16/float32/float64 logits of the student.
        teacher_logits: (..., V) logits of the teacher; its dtype may differ from the student's.
            If it requires grad (mutual distillation), it gets the KL term's gradient too.
        labels: (...) integer class ids, or None for pure distillation (then alpha must be 1).
        temperature: T > 0, applied to both distributions of the KL term; CE uses T = 1.
        alpha: weight of the KL term; None means 1.0 without labels and 0.5 with them.
        ignore_index: rows whose label equals it contribute 0 loss and 0 gradient.
        reduction: "mean" (over counted rows; 0.0, not NaN, when every row is ignored),
            "sum", "batchmean" (sum / student_logits.size(0), like nn.KLDivLoss) or "none"
            (per-row losses in the leading shape, fp32).
        normalizer: with reduction="sum", divide the sum by it: a positive number or a 1-element
            device tensor such as the global count of non-ignored tokens of an optimizer step
            (see fastkd.distributed.global_token_count). Folding the divisor into the fused
            gradient keeps ``loss.backward()`` on the fast path that skips rescaling the N x V
            gradient, which ``(loss / n).backward()`` would need.
        inplace_backward: write the student gradient into ``student_logits``' storage, saving an
            N x V buffer. The logits are overwritten by the forward: do not read them afterwards.

    Returns:
        The loss in float32 (float64 when either logits tensor is float64). A label outside
        [0, V) that is not ignore_index makes its row's loss NaN; NaN logits give a NaN loss.
    """
    spec = validate_kd_call(
        student_logits, teacher_logits, labels, normalizer=normalizer,
        temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
        label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
        reduction=reduction,
    )
    check_inplace_flag(inplace_backward)
    grad_enabled = torch.is_grad_enabled()
    plan = DensePlan(
        spec=spec,
        student_grad=grad_enabled and student_logits.requires_grad,
        teacher_grad=grad_enabled and teacher_logits.requires_grad,
        inplace_backward=inplace_backward,
    )
    return dense_kd_loss(plan, student_logits, teacher_logits, labels, return_components)
