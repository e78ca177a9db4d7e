"""Output buffers shared by every backend's launcher (Triton and PyTorch, fused and sharded)."""

from __future__ import annotations

import torch


def loss_dtype(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.dtype:
    """Losses are accumulated in fp32; float64 inputs (gradcheck) get float64 throughout."""
    if torch.float64 in (student_logits.dtype, teacher_logits.dtype):
        return torch.float64
    return torch.float32


def allocate_outputs(student_logits, teacher_logits, *, student_grad: bool, teacher_grad: bool,
                     grad_student_out: torch.Tensor | None = None):
    """(row_losses (N,), grad_student (N, V) or None, grad_teacher (N, V) or None).

    Gradients have their logits' dtype. grad_student_out, when given, is used as the student
    gradient (for inplace_backward it is the student logits themselves).
    """
    n_rows, vocab = student_logits.shape
    device = student_logits.device
    row_losses = torch.empty(n_rows, dtype=loss_dtype(student_logits, teacher_logits),
                             device=device)
    grad_student = grad_teacher = None
    if student_grad:
        grad_student = grad_student_out
        if grad_student is None:
            grad_student = torch.empty((n_rows, vocab), dtype=student_logits.dtype,
                                       device=device)
    if teacher_grad:
        grad_teacher = torch.empty((n_rows, vocab), dtype=teacher_logits.dtype, device=device)
    return row_losses, grad_student, grad_teacher
