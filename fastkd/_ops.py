"""The fused losses as out-variant torch.library custom ops.

The Python wrapper allocates the outputs and the op fills them (``mutates_args``), so the same op
serves a fresh gradient buffer, a caller's chunk buffer, or the logits themselves (in place,
eager mode only); the fake implementations have nothing to allocate and return None. The ops
are opaque to torch.compile, so a traced training step needs no graph break.

Each op picks its backend (Triton or PyTorch) when it runs, from the tensors' device and
FASTKD_BACKEND, so the traced graph does not depend on it.
"""

from __future__ import annotations

import os

import torch

from . import _torch_backend
from ._spec import NUM_ROW_STATS, LossOptions

__all__ = ["BACKENDS", "kd_rows", "kd_rows_into", "mean_weight", "scale_rows_", "select_backend",
           "sum_row_stats"]

BACKENDS = ("auto", "triton", "torch")


def uses_triton(device: torch.device) -> bool:
    """Whether FASTKD_BACKEND (auto | triton | torch) runs the Triton kernels on `device`.

    auto runs Triton on CUDA tensors and PyTorch elsewhere. triton on CPU tensors needs
    TRITON_INTERPRET=1, which runs the real kernels in Triton's interpreter.
    """
    choice = os.environ.get("FASTKD_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"FASTKD_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true"):
        raise RuntimeError(
            f"FASTKD_BACKEND=triton got {device.type} tensors: the Triton kernels need CUDA "
            "tensors, or TRITON_INTERPRET=1 to run them in Triton's interpreter"
        )
    return True


def select_backend(device: torch.device):
    """The module that runs the dense loss on `device`: fastkd.kernels.kd_loss or the PyTorch
    backend (fastkd._torch_backend)."""
    if not uses_triton(device):
        return _torch_backend
    from .kernels import kd_loss as triton_backend

    return triton_backend


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Losses accumulate in fp32; float64 inputs (gradcheck) get float64 throughout."""
    return _torch_backend.compute_dtype(*tensors)


@torch.library.custom_op("fastkd::kd_rows",
                         mutates_args=("row_stats", "grad_student", "grad_teacher"))
def kd_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    weight: torch.Tensor,
    row_stats: torch.Tensor,
    grad_student: torch.Tensor | None,
    grad_teacher: torch.Tensor | None,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    skew: float,
    label_smoothing: float,
    z_loss: float,
    ignore_index: int,
) -> None:
    """(N, V) or (B, L, V) logits -> row_stats (N, 4) and w * dloss/dlogits (N, V), written
    into the outputs.

    row_stats columns: loss, divergence, ce, lse^2 (fastkd._spec.ROW_*). A gradient output that
    is None is not computed. grad_student may be student_logits itself (in place).
    """
    options = LossOptions(
        temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
        label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
    )
    select_backend(student_logits.device).kd_rows(
        student_logits, teacher_logits, labels, weight, row_stats, grad_student, grad_teacher,
        options,
    )


@kd_rows.register_fake
def _(*args):
    return None


def kd_rows_into(student_2d, teacher_2d, labels_1d, weight, options: LossOptions, *,
                 student_grad: bool, teacher_grad: bool, grad_student_out=None):
    """Allocate the outputs of kd_rows and run it: (row_stats, grad_student, grad_teacher).

    Gradients have their logits' dtype (or are grad_student_out, when given); a gradient not
    asked for is None.
    """
    vocab = student_2d.shape[-1]
    n_rows = student_2d.numel() // vocab if vocab else 0
    row_stats = student_2d.new_empty((n_rows, NUM_ROW_STATS),
                                     dtype=loss_dtype(student_2d, teacher_2d))
    grad_student = grad_teacher = None
    if student_grad:
        grad_student = grad_student_out
        if grad_student is None:
            grad_student = student_2d.new_empty((n_rows, vocab))
    if teacher_grad:
        grad_teacher = teacher_2d.new_empty((n_rows, vocab))
    if n_rows > 0:
        kd_rows(student_2d, teacher_2d, labels_1d, weight, row_stats, grad_student, grad_teacher,
                options.divergence, options.temperature, options.alpha, options.beta,
                options.skew, options.label_smoothing, options.z_loss, options.ignore_index)
    return row_stats, grad_student, grad_teacher


@torch.library.custom_op("fastkd::mean_weight", mutates_args=())
def mean_weight(labels: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(number of labels != ignore_index, 1) as a 0-d `dtype` tensor, in one launch.

    (All rows ignored: weight 1 over a zero sum, so the "mean" loss is 0 rather than 0/0.)
    """
    return select_backend(labels.device).mean_weight(labels, ignore_index, dtype)


@mean_weight.register_fake
def _(labels, ignore_index, dtype):
    return labels.new_empty((), dtype=dtype)


@torch.library.custom_op("fastkd::sum_row_stats", mutates_args=())
def sum_row_stats(row_stats: torch.Tensor, weight: torch.Tensor,
                  apply_weight: bool) -> torch.Tensor:
    """The (NUM_ROW_STATS,) column sums of (N, NUM_ROW_STATS) row statistics, times the 0-d
    weight when apply_weight, in one launch and a fixed order (deterministic)."""
    return select_backend(row_stats.device).sum_row_stats(row_stats, weight, apply_weight)


@sum_row_stats.register_fake
def _(row_stats, weight, apply_weight):
    return row_stats.new_empty((row_stats.shape[1],))


@torch.library.custom_op("fastkd::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (N, V) *= grad_output (a scalar or N values), in place."""
    select_backend(grad.device).scale_rows_(grad, grad_output)


@scale_rows_.register_fake
def _(grad, grad_output):
    return None
