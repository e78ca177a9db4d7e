"""The loss options, the divergence enum, and the argument checks every entry point shares.

Everything here runs on the host and looks only at metadata (shapes, dtypes, devices and Python
scalars), never at tensor values, so it adds no host<->device synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "batchmean", "none")

# The divergence family. The kernels take the index of the name as a compile-time constant.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
FORWARD_KL, REVERSE_KL, JSD, TVD, SKEW_KL, SKEW_REVERSE_KL = range(len(DIVERGENCES))
# Divergences whose value and gradient row sum (sum_v q_v df/dq_v) accumulate online next to the
# softmax normalisers: one sweep over a long row for the statistics, one for the gradient. The
# others need the final normalisers first, so long rows take one more sweep.
ONLINE_DIVERGENCES = (FORWARD_KL, REVERSE_KL)

# Columns of the (N, 4) row statistics every fused op writes next to the gradient.
ROW_LOSS, ROW_DIVERGENCE, ROW_CE, ROW_LSE_SQUARED = range(4)
NUM_ROW_STATS = 4

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# T^2 multiplies every divergence; above this bound T^2 * D would overflow fp32 for ordinary D,
# and no distillation recipe uses temperatures anywhere near it.
MAX_TEMPERATURE = 1e6


@dataclass(frozen=True)
class LossOptions:
    """The validated scalar options of a KD loss (every entry point takes the same ones)."""

    temperature: float = 1.0
    alpha: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"

    @property
    def divergence_id(self) -> int:
        """The divergence the kernels compute, as an index into DIVERGENCES.

        JSD at beta = 0 is forward KL and at beta = 1 reverse KL exactly (JSD_beta itself tends
        to 0 there), as TRL and Liger define it.
        """
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            return FORWARD_KL if self.beta == 0.0 else REVERSE_KL
        return DIVERGENCES.index(self.divergence)

    @property
    def divergence_parameter(self) -> float:
        """beta for JSD, the skew for the skew divergences, unused (0) otherwise."""
        divergence = self.divergence_id
        if divergence == JSD:
            return self.beta
        if divergence in (SKEW_KL, SKEW_REVERSE_KL):
            return self.skew
        return 0.0


@dataclass(frozen=True)
class LossSpec:
    """One validated loss call: its options and the shape facts of its inputs."""

    options: LossOptions
    vocab_size: int
    leading_shape: torch.Size
    has_labels: bool
    # Divides the summed loss (reduction="sum" only): a positive float, a 0-d tensor or None.
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


def check_loss_options(
    *,
    temperature=1.0,
    alpha=None,
    divergence="forward_kl",
    beta=0.5,
    skew=0.1,
    label_smoothing=0.0,
    z_loss=0.0,
    ignore_index=-100,
    reduction="mean",
    has_labels,
) -> LossOptions:
    """Check the scalar options of a loss and return them normalised.

    has_labels=None checks what it can without knowing whether labels will come (a module at
    construction); then alpha=None stays None-resolved as if labels were given.
    """
    temperature = _check_number("temperature", temperature)
    if not 0.0 < temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must lie in (0, {MAX_TEMPERATURE:g}], got {temperature}")
    alpha = resolve_alpha(alpha, has_labels is not False)
    if has_labels is False and alpha != 1.0:
        raise ValueError(
            f"alpha={alpha} mixes in hard-label cross-entropy, which needs labels; "
            "pass labels or use alpha=1.0 (pure distillation)"
        )
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    beta = _check_number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    skew = _check_number("skew", skew)
    if not 0.0 < skew < 1.0:
        raise ValueError(f"skew must lie in (0, 1), got {skew}")
    label_smoothing = _check_number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if has_labels is False and label_smoothing > 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing} smooths the hard-label cross-entropy, which "
            "needs labels; pass labels or use label_smoothing=0.0"
        )
    z_loss = _check_number("z_loss", z_loss)
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # Labels are at most int64, so a wider value could never match one (and no kernel can take it).
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return LossOptions(
        temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
        label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
        reduction=reduction,
    )


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


def check_labels(labels, leading_shape: torch.Size, device: torch.device) -> None:
    """labels: None, or an integer tensor of class ids with the rows' leading shape."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(leading_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")


def check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {logits.dtype}"
        )
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape (..., vocab), got a 0-d tensor")


def validate_kd_call(student_logits, teacher_logits, labels, *, normalizer=None,
                     **options) -> LossSpec:
    """Check one call of a dense KD loss and return its spec.

    `options` are the keyword options of check_loss_options. Raises TypeError for wrong kinds
    of arguments and ValueError for wrong values, each naming the argument and what was expected.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
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
    check_labels(labels, leading_shape, student_logits.device)
    loss_options = check_loss_options(has_labels=labels is not None, **options)
    return LossSpec(
        options=loss_options,
        vocab_size=vocab_size,
        leading_shape=leading_shape,
        has_labels=labels is not None,
        normalizer=check_normalizer(normalizer, loss_options.reduction, student_logits.device),
    )
