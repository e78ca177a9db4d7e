"""Public functional API and the autograd Function behind it."""

from __future__ import annotations

import torch

from . import _ops
from ._buffers import loss_dtype
from ._ops import select_backend
from ._validation import KDArgs, check_inplace_flag, validate_kd_args
from .reference import batchmean_divisor

__all__ = ["kd_loss", "select_backend"]


def row_weight(labels, args: KDArgs, device, dtype) -> torch.Tensor:
    """The reduction's weight of each counted row, as a 0-d device tensor (never read on host)."""
    if args.reduction == "mean":
        if labels is not None:
            counted = (labels != args.ignore_index).sum()
            # All rows ignored: weight 1 over a zero sum, so the loss is 0 rather than 0/0.
            return counted.clamp(min=1).to(dtype).reciprocal()
        return torch.full((), 1.0 / max(args.num_rows, 1), dtype=dtype, device=device)
    if args.reduction == "batchmean":
        return torch.full((), 1.0 / batchmean_divisor(args.leading_shape), dtype=dtype,
                          device=device)
    if isinstance(args.normalizer, torch.Tensor):
        return args.normalizer.to(dtype).reciprocal()
    if args.normalizer is not None:
        return torch.full((), 1.0 / args.normalizer, dtype=dtype, device=device)
    return torch.ones((), dtype=dtype, device=device)


def can_hold_its_gradient(student_2d: torch.Tensor, student_logits: torch.Tensor) -> bool:
    """Whether the gradient may be written over the logits (inplace_backward).

    Only if the 2-D view shares the logits' storage (reshape did not copy) and no two elements
    share memory (an expanded row, stride 0, cannot hold one gradient per row). Otherwise the
    gradient goes to a buffer of its own, as without inplace_backward.
    """
    if student_2d.untyped_storage().data_ptr() != student_logits.untyped_storage().data_ptr():
        return False
    dims = sorted((stride, size) for stride, size in zip(student_2d.stride(), student_2d.shape,
                                                          strict=True) if size > 1)
    inner_extent = 1
    for stride, size in dims:
        if stride < inner_extent:
            return False
        inner_extent = stride * size
    return True


def reduce_fused_rows(row_losses: torch.Tensor, weight: torch.Tensor, args: KDArgs):
    """The loss value from per-row losses; `weight` is the one the kernel folded into the grads."""
    if args.reduction == "none":
        return row_losses.reshape(args.leading_shape)
    total = row_losses.sum()
    if args.reduction == "sum" and args.normalizer is None:
        return total
    return total * weight.to(total.dtype)


def scaled_saved_grads(ctx, grad_output, scale_rows_, op_name: str):
    """Backward of a fused loss: the saved w * dloss/dlogits, scaled in place by grad_output.

    Expects ctx.grads_wanted and ctx.logits_shapes next to the two saved gradients.
    """
    try:
        saved = ctx.saved_tensors
    except RuntimeError as error:  # the version check: this backward already ran once
        raise RuntimeError(
            f"{op_name} computes its gradient once per forward, so its backward can run only "
            "once; recompute the loss instead of backpropagating through it twice"
        ) from error
    results = []
    for grad, wanted, shape in zip(saved, ctx.grads_wanted, ctx.logits_shapes, strict=True):
        if wanted:
            scale_rows_(grad, grad_output)
            results.append(grad.view(shape))
        else:
            results.append(None)
    return results


class _FusedKDLoss(torch.autograd.Function):
    """Loss and w * dloss/dlogits come from one forward launch; backward scales by grad_output.

    The gradients are saved for backward and scaled there in place, so autograd's saved-tensor
    version check turns a second backward through the same graph into an error instead of a
    gradient scaled twice.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, args, inplace_backward,
                student_grad, teacher_grad):
        vocab = args.vocab_size
        student_2d = student_logits.reshape(-1, vocab)
        teacher_2d = teacher_logits.reshape(-1, vocab)
        labels_1d = labels.reshape(-1) if labels is not None else None
        weight = row_weight(labels_1d, args, student_logits.device,
                            loss_dtype(student_logits, teacher_logits))
        kernel_args = dict(
            temperature=args.temperature, alpha=args.alpha, ignore_index=args.ignore_index,
            student_grad=student_grad, teacher_grad=teacher_grad,
        )
        if inplace_backward and student_grad and can_hold_its_gradient(student_2d, student_logits):
            # Eager only (kd_loss refuses it under torch.compile): a custom op cannot alias its
            # input, so this calls the launcher directly.
            row_losses, grad_student, grad_teacher = select_backend(
                student_logits.device
            ).kd_forward(student_2d, teacher_2d, labels_1d, weight,
                         grad_student_out=student_2d, **kernel_args)
            # The logits now hold the gradient: tell autograd, so any other op that saved them
            # for its backward raises instead of silently using the overwritten values.
            torch.autograd.graph.increment_version(student_logits)
            # Saved detached: backward scales it in place, which autograd forbids on a view
            # made here (under no_grad) of a tensor that requires grad.
            grad_student = grad_student.detach()
        else:
            row_losses, grad_student, grad_teacher = _ops.kd_forward(
                student_2d, teacher_2d, labels_1d, weight, **kernel_args
            )
        # Saved (not stashed on ctx) so that backward's in-place scaling bumps their version and
        # a second backward through the same graph raises instead of scaling twice.
        ctx.save_for_backward(grad_student, grad_teacher)
        ctx.grads_wanted = (student_grad, teacher_grad)
        ctx.logits_shapes = (student_logits.shape, teacher_logits.shape)
        return reduce_fused_rows(row_losses, weight, args)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_student, grad_teacher = scaled_saved_grads(ctx, grad_output, _ops.scale_rows_,
                                                        "fastkd.kd_loss")
        return grad_student, grad_teacher, None, None, None, None, None


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
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
    args = validate_kd_args(
        student_logits, teacher_logits, labels,
        temperature=temperature, alpha=alpha, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer,
    )
    check_inplace_flag(inplace_backward)
    grad_enabled = torch.is_grad_enabled()
    student_grad = grad_enabled and student_logits.requires_grad
    teacher_grad = grad_enabled and teacher_logits.requires_grad
    return _FusedKDLoss.apply(
        student_logits, teacher_logits, labels, args, inplace_backward,
        student_grad, teacher_grad,
    )
