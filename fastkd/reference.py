"""Plain-PyTorch reference of the knowledge-distillation loss.

This is the textbook block that fastkd replaces, made exact for fastkd's masking and reduction
rules. Gradients come from autograd. It is what the tests and the benchmarks compare against, and
what users can call to check fastkd on their own data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import validate_kd_args

__all__ = ["kd_loss", "batchmean_divisor", "reduce_rows"]


def batchmean_divisor(leading_shape: torch.Size) -> int:
    """'batchmean' divides by input.size(0), as nn.KLDivLoss does (1 for a single row).

    An empty batch divides by 1, so its loss is 0 like "mean" over no counted rows, not 0/0.
    """
    return max(leading_shape[0], 1) if len(leading_shape) > 0 else 1


def reduce_rows(row_losses, counted, leading_shape, reduction, normalizer=None):
    """Apply a reduction to per-row losses (ignored rows already hold 0)."""
    if reduction == "none":
        return row_losses.reshape(leading_shape)
    total = row_losses.sum()
    if reduction == "sum":
        return total if normalizer is None else total / normalizer
    if reduction == "batchmean":
        return total / batchmean_divisor(leading_shape)
    # "mean": over counted rows; all rows ignored gives 0 (not NaN as F.cross_entropy would).
    return total / counted.sum().clamp(min=1)


def kd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature=1.0,
    alpha=None,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    inplace_backward=False,
):
    """Reference KD loss; same signature and semantics as :func:`fastkd.kd_loss`.

    Computes in float32 (float64 for float64 inputs); ``inplace_backward`` is accepted for signature
    parity and ignored.
    """
    args = validate_kd_args(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
    )
    T, alpha = args.temperature, args.alpha
    compute_dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    s = student_logits.to(compute_dtype).reshape(-1, args.vocab_size)
    t = teacher_logits.to(compute_dtype).reshape(-1, args.vocab_size)

    log_p_student = F.log_softmax(s / T, dim=-1)
    log_p_teacher = F.log_softmax(t / T, dim=-1)
    p_teacher = log_p_teacher.exp()
    # 0 * log 0 = 0: masked (-inf) teacher entries contribute nothing. Selecting the log-ratio
    # (not the product) keeps the unselected branch finite, so autograd gets no 0 * inf = NaN.
    log_ratio = torch.where(p_teacher == 0, 0.0, log_p_teacher - log_p_student)
    kl = (p_teacher * log_ratio).sum(dim=-1)
    row_losses = alpha * T * T * kl

    if labels is None:
        counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        y = labels.reshape(-1).long()
        counted = y != ignore_index
        in_range = (y >= 0) & (y < args.vocab_size)
        safe_y = torch.where(in_range, y, 0)
        ce = -F.log_softmax(s, dim=-1).gather(1, safe_y[:, None]).squeeze(1)
        # A label outside the vocabulary is a caller bug: make it loud (NaN), never read it.
        ce = torch.where(in_range, ce, float("nan"))
        row_losses = row_losses + (1.0 - alpha) * ce
        row_losses = torch.where(counted, row_losses, 0.0)

    return reduce_rows(row_losses, counted, args.leading_shape, args.reduction, args.normalizer)
