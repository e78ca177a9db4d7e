"""Argument checking shared by every entry point (reference, torch backend, Triton backend).

Everything here runs on the host and looks only at metadata (shapes, dtypes, devices and Python
scalars), never at tensor values, so it adds no host<->device synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "batchmean", "none")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class KDArgs:
    """Validated, normalised arguments of one kd_loss call."""

    temperature: float
    alpha: float
    ignore_index: int
    reduction: str
    vocab_size: int
    leading_shape: torch.Size
    # Divides the summed loss (reduction="sum" only): a positive float, a 1-element tensor or None.
    normalizer: float | torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return math.prod(self.leading_shape)


def _check_number(name: str, value) -> float:
    # bool is an int subclass; a tensor would force a device->host copy to branch on it.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    # Comparisons rather than math.isfinite: under torch.compile the value may be a symbolic
    # float, which supports comparisons (as guards) but not math.isfinite.
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def resolve_alpha(alpha, has_labels: bool) -> float:
    """alpha=None means pure distillation (1.0) without labels and an even mix (0.5) with them."""
    if alpha is None:
        return 0.5 if has_labels else 1.0
    alpha = _check_number("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def check_loss_options(*, temperature, alpha, ignore_index, reduction, has_labels):
    """Check the scalar options of the loss; returns (temperature, alpha) as floats.

    has_labels=None checks alpha's range only (a module does not know yet if labels will come).
    """
    temperature = _check_number("temperature", temperature)
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    alpha = resolve_alpha(alpha, bool(has_labels))
    if has_labels is False and alpha != 1.0:
        raise ValueError(
            f"alpha={alpha} mixes in hard-label cross-entropy, which needs labels; "
            "pass labels or use alpha=1.0 (pure distillation)"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # Labels are at most int64, so a wider value could never match one (and no kernel can take it).
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return temperature, alpha


def check_inplace_flag(inplace_backward) -> None:
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward and torch.compiler.is_compiling():
        raise ValueError(
            "inplace_backward=True cannot be traced by torch.compile (the gradient would alias "
            "the logits behind the compiler's back); use inplace_backward=False when compiling"
        )


def check_normalizer(normalizer, reduction: str, device: torch.device):
    """Check the divisor of a summed loss; returns it as a float, a 0-d tensor, or None."""
    if normalizer is None:
        return None
    if reduction != "sum":
        raise ValueError(
            f"normalizer divides the summed loss: use it with reduction='sum', got {reduction!r}"
        )
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
            raise TypeError(
                "normalizer must be a positive number or a 1-element real tensor, got a "
                f"{normalizer.dtype} tensor of shape {tuple(normalizer.shape)}"
            )
        if normalizer.device != device:
            raise ValueError(
                f"normalizer must be on the logits' device {device}, got {normalizer.device}"
            )
        return normalizer.reshape(())
    normalizer = _check_number("normalizer", normalizer)
    if normalizer <= 0.0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return normalizer


def validate_kd_args(
    student_logits,
    teacher_logits,
    labels,
    *,
    temperature,
    alpha,
    ignore_index,
    reduction,
    normalizer=None,
) -> KDArgs:
    """Check one kd_loss call and return its normalised arguments.

    Raises TypeError for wrong kinds of arguments and ValueError for wrong values, each naming the
    argument and what was expected.
    """
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
        if logits.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                f"got {logits.dtype}"
            )
        if logits.dim() < 1:
            raise ValueError(f"{name} must have shape (..., vocab), got a 0-d tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )
    vocab_size = student_logits.shape[-1]
    if vocab_size == 0:
        raise ValueError("student_logits has an empty vocabulary (last dimension is 0)")
    leading_shape = student_logits.shape[:-1]

    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
        if labels.shape != leading_shape:
            raise ValueError(
                f"labels must have the logits' leading shape {tuple(leading_shape)}, "
                f"got {tuple(labels.shape)}"
            )
        if labels.device != student_logits.device:
            raise ValueError(
                f"labels must be on the logits' device {student_logits.device}, got {labels.device}"
            )

    temperature, alpha = check_loss_options(
        temperature=temperature, alpha=alpha, ignore_index=ignore_index, reduction=reduction,
        has_labels=labels is not None,
    )
    return KDArgs(
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        vocab_size=vocab_size,
        leading_shape=leading_shape,
        normalizer=check_normalizer(normalizer, reduction, student_logits.device),
    )
