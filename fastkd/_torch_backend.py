"""PyTorch backend: the fused kernel's math and hand-written gradient, chunked over rows.

Used for CPU tensors (and on request through FASTKD_BACKEND=torch). It mirrors the launcher
interface of fastkd.kernels.kd_loss, so the autograd Function does not care which one runs.
The derivation of every formula is in the comment block of kernels/kd_loss.py.
"""

from __future__ import annotations

import torch

# Rows are processed in chunks of about this many elements, so the fp32 temporaries (a handful of
# chunk-sized tensors, 4 MiB each) stay in cache and never grow with N.
CHUNK_ELEMENTS = 1 << 20


def kd_forward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    row_weight: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int,
    student_grad: bool,
    teacher_grad: bool,
    grad_student_out: torch.Tensor | None = None,
):
    """Same contract as fastkd.kernels.kd_loss.kd_forward, for any device PyTorch supports."""
    n_rows, vocab = student_logits.shape
    device = student_logits.device
    compute_dtype = torch.float64 if torch.float64 in (
        student_logits.dtype, teacher_logits.dtype
    ) else torch.float32
    row_losses = torch.empty(n_rows, dtype=compute_dtype, device=device)
    grad_s = grad_t = None
    if student_grad:
        grad_s = grad_student_out
        if grad_s is None:
            grad_s = torch.empty((n_rows, vocab), dtype=student_logits.dtype, device=device)
    if teacher_grad:
        grad_t = torch.empty((n_rows, vocab), dtype=teacher_logits.dtype, device=device)

    T = temperature
    weight = row_weight.to(compute_dtype)
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        s = student_logits[rows].to(compute_dtype)
        t = teacher_logits[rows].to(compute_dtype)
        log_p_st = torch.log_softmax(s / T, dim=-1)
        log_p_tt = torch.log_softmax(t / T, dim=-1)
        p_tt = log_p_tt.exp()
        log_ratio = torch.where(p_tt == 0, 0.0, log_p_tt - log_p_st)  # 0 * log 0 = 0
        kl = (p_tt * log_ratio).sum(dim=-1)
        loss = alpha * T * T * kl
        if labels is None:
            counted = None
        else:
            y = labels[rows].long()
            counted = y != ignore_index
            in_range = (y >= 0) & (y < vocab)
            safe_y = torch.where(in_range, y, 0)[:, None]
            log_p_s1 = log_p_st if T == 1.0 else torch.log_softmax(s, dim=-1)
            ce = torch.where(in_range, -log_p_s1.gather(1, safe_y).squeeze(1), float("nan"))
            loss = torch.where(counted, loss + (1.0 - alpha) * ce, 0.0)
        row_losses[rows] = loss

        coef_kl = weight * (alpha * T)
        if student_grad:
            g = coef_kl * (log_p_st.exp() - p_tt)
            if labels is not None:
                p_s1 = log_p_s1.exp()
                p_s1.scatter_add_(1, safe_y, -in_range[:, None].to(compute_dtype))
                g += weight * (1.0 - alpha) * p_s1
                g = torch.where(counted[:, None], g, 0.0)  # not 0 * g: g may hold NaN
            grad_s[rows] = g
        if teacher_grad:
            g = torch.where(p_tt == 0, 0.0, coef_kl * p_tt * (log_ratio - kl[:, None]))
            if counted is not None:
                g = torch.where(counted[:, None], g, 0.0)
            grad_t[rows] = g
    return row_losses, grad_s, grad_t


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad (N, V) *= grad_output, in place; grad_output is a scalar or has N elements."""
    factor = grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)
    return grad.mul_(factor.to(grad.dtype))
