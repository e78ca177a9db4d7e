"""The fused loss as torch.library custom ops: opaque to torch.compile, so tracing a training step
that calls fastkd.kd_loss needs no graph break, and the same ops serve eager mode.

Both ops pick their backend (Triton or PyTorch) when they run, from the tensors' device and
FASTKD_BACKEND, so the traced graph does not depend on it.
"""

from __future__ import annotations

import os

import torch

from . import _torch_backend

__all__ = ["kd_forward", "scale_rows_", "select_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")


def select_backend(device: torch.device):
    """The launcher module for `device`, chosen by FASTKD_BACKEND (auto | triton | torch).

    auto runs Triton on CUDA tensors and PyTorch elsewhere. triton on CPU tensors needs
    TRITON_INTERPRET=1, which runs the real kernels in Triton's interpreter.
    """
    choice = os.environ.get("FASTKD_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"FASTKD_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return _torch_backend
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true"):
        raise RuntimeError(
            f"FASTKD_BACKEND=triton got {device.type} tensors: the Triton kernels need CUDA "
            "tensors, or TRITON_INTERPRET=1 to run them in Triton's interpreter"
        )
    from .kernels import kd_loss as triton_backend

    return triton_backend


@torch.library.custom_op("fastkd::kd_forward", mutates_args=())
def kd_forward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    row_weight: torch.Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, V) logits -> (row losses (N,), w * dloss/ds (N, V), w * dloss/dt (N, V)).

    A gradient that was not asked for comes back as an empty tensor: custom ops cannot return
    None.
    """
    backend = select_backend(student_logits.device)
    row_losses, grad_student, grad_teacher = backend.kd_forward(
        student_logits, teacher_logits, labels, row_weight,
        temperature=temperature, alpha=alpha, ignore_index=ignore_index,
        student_grad=student_grad, teacher_grad=teacher_grad,
    )
    if grad_student is None:
        grad_student = student_logits.new_empty(0)
    if grad_teacher is None:
        grad_teacher = teacher_logits.new_empty(0)
    return row_losses, grad_student, grad_teacher


@kd_forward.register_fake
def _(student_logits, teacher_logits, labels, row_weight, temperature, alpha, ignore_index,
      student_grad, teacher_grad):
    n_rows, vocab = student_logits.shape
    loss_dtype = torch.float64 if torch.float64 in (
        student_logits.dtype, teacher_logits.dtype) else torch.float32
    row_losses = student_logits.new_empty(n_rows, dtype=loss_dtype)
    grad_student = student_logits.new_empty((n_rows, vocab) if student_grad else 0)
    grad_teacher = teacher_logits.new_empty((n_rows, vocab) if teacher_grad else 0)
    return row_losses, grad_student, grad_teacher


@torch.library.custom_op("fastkd::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (N, V) *= grad_output (a scalar or N values), in place."""
    select_backend(grad.device).scale_rows_(grad, grad_output)


@scale_rows_.register_fake
def _(grad, grad_output):
    return None
