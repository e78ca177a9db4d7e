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
    """Fused knowledge-distillation loss: a divergence to the teacher plus hard-label CE.

    Computes, in one pass over the logits and without N x V temporaries, the value and gradients
    of this PyTorch (``fastkd.reference.kd_loss`` is it, with 0 * log 0 = 0 for masked logits)::

        T = temperature
        log_q = F.log_softmax(student_logits / T, dim=-1)   # student
        log_p = F.log_softmax(teacher_logits / T, dim=-1)   # teacher
        kl = lambda log_a, log_b: (log_a.exp() * (log_a - log_b)).sum(-1)
        mix = lambda log_a, log_b, w: torch.logaddexp(log_a + math.log(w), log_b + math.log(1 - w))
        d = {"forward_kl": kl(log_p, log_q), "reverse_kl": kl(log_q, log_p),
             "jsd": beta * kl(log_p, mix(log_p, log_q, beta))
                    + (1 - beta) * kl(log_q, mix(log_p, log_q, beta)),
             "tvd": 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1),
             "skew_kl": kl(log_p, mix(log_p, log_q, skew)),
             "skew_reverse_kl": kl(log_q, mix(log_q, log_p, skew))}[divergence]
        ce = F.cross_entropy(student_logits.flatten(0, -2), labels.flatten(), reduction="none",
                             ignore_index=ignore_index, label_smoothing=label_smoothing)
        lse = torch.logsumexp(student_logits, dim=-1)
        kept = labels != ignore_index
        row_loss = torch.where(kept, alpha * T**2 * d + (1 - alpha) * ce.view(d.shape)
                               + z_loss * lse**2, 0.0)
        loss = row_loss.sum() / kept.sum().clamp(min=1)  # reduction="mean"

    JSD at beta = 0 is forward KL and at beta = 1 reverse KL, exactly (JSD_beta itself tends to
    0 there, so the value jumps at the endpoints). T^2 multiplies every divergence.

    Args:
        student_logits: (..., V) float16/bfloat16/float32/float64 logits of the student. Views
            such as ``logits[:, :-1]`` are read through their strides, not copied.
        teacher_logits: (..., V) logits of the teacher; its dtype may differ from the student's.
            If it requires grad (mutual distillation), it gets the divergence's gradient too.
        labels: (...) integer class ids, or None for pure distillation (then alpha must be 1).
        temperature: T in (0, 1e6], applied to both distributions of the divergence; CE uses
            T = 1.
        alpha: weight of the divergence term; None means 1.0 without labels and 0.5 with them.
        divergence: one of fastkd.DIVERGENCES (see above).
        beta: JSD's mixture weight of the teacher, in [0, 1].
        skew: the skew divergences' weight lambda, in (0, 1).
        label_smoothing: epsilon in [0, 1] of the CE term, as in F.cross_entropy.
        z_loss: weight (>= 0) of lse(student_logits)^2, independent of alpha.
        ignore_index: rows whose label equals it contribute 0 loss and 0 gradient.
        reduction: "mean" (over counted rows; 0.0, not NaN, when every row is ignored),
            "sum", "batchmean" (sum / student_logits.size(0), like nn.KLDivLoss) or "none"
            (per-row losses in the leading shape).
        normalizer: with reduction="sum", divide the sum by it: a positive number or a 1-element
            device tensor such as the global count of non-ignored tokens of an optimizer step
            (see fastkd.distributed.global_token_count). Folding the divisor into the fused
            gradient keeps ``loss.backward()`` on the fast path that skips rescaling the N x V
            gradient, which ``(loss / n).backward()`` would need.
        inplace_backward: write the student gradient into ``student_logits``' storage, saving an
            N x V buffer. The logits are overwritten by the forward: do not read them afterwards.
        return_components: return fastkd.KDLossComponents(loss, divergence, ce, lse_squared),
            the last three detached and reduced like the loss, from the same pass.

    Returns:
        The loss in float32 (float64 when either logits tensor is float64), or its components.
        A label outside [0, V) that is not ignore_index makes its row's loss NaN; NaN logits
        give a NaN loss.
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
