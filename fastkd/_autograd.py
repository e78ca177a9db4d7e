"""The one autograd Function behind every fastkd loss, and the reductions it shares.

Every fused loss computes its gradient in the forward, while the data is hot, already multiplied
by the reduction weight w. The Function saves those gradients; backward only multiplies them by
grad_output, which the scale op skips on the device when grad_output == 1. A loss plugs in as a
`run(plan, *inputs) -> (loss, components, grads)` function of its own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ops
from ._spec import NUM_ROW_STATS, ROW_LOSS, LossOptions


class KDLossComponents(NamedTuple):
    """A loss and its three terms, each under the loss's reduction.

    ``loss == alpha * T**2 * divergence + (1 - alpha) * ce + z_loss * lse_squared``. Only
    ``loss`` is differentiable; the others are detached, for logging. ``ce`` includes the label
    smoothing; ``lse_squared`` is the z-loss term before its weight.
    """

    loss: torch.Tensor
    divergence: torch.Tensor
    ce: torch.Tensor
    lse_squared: torch.Tensor


def make_components(loss: torch.Tensor, components: torch.Tensor) -> KDLossComponents:
    divergence, ce, lse_squared = components.unbind(0)
    return KDLossComponents(loss, divergence, ce, lse_squared)


def batchmean_divisor(leading_shape: torch.Size) -> int:
    """'batchmean' divides by input.size(0), as nn.KLDivLoss does (1 for a single row).

    An empty batch divides by 1, so its loss is 0 like "mean" over no counted rows, not 0/0.
    """
    return max(leading_shape[0], 1) if len(leading_shape) > 0 else 1


def reduction_weight(labels: torch.Tensor | None, options: LossOptions, leading_shape,
                     normalizer, device, dtype) -> torch.Tensor:
    """The weight w of each counted row under the reduction, a 0-d device tensor.

    The kernels fold it into the gradient they write, so it must exist before they run. It is
    never read on the host.
    """
    reduction = options.reduction
    if reduction == "mean":
        if labels is not None:
            return _ops.mean_weight(labels, options.ignore_index, dtype)
        rows = 1
        for size in leading_shape:
            rows *= size
        return torch.full((), 1.0 / max(rows, 1), dtype=dtype, device=device)
    if reduction == "batchmean":
        return torch.full((), 1.0 / batchmean_divisor(leading_shape), dtype=dtype,
                          device=device)
    if isinstance(normalizer, torch.Tensor):
        return normalizer.to(dtype).reciprocal()
    if normalizer is not None:
        return torch.full((), 1.0 / normalizer, dtype=dtype, device=device)
    return torch.ones((), dtype=dtype, device=device)


def reduce_rows(row_stats: torch.Tensor, weight: torch.Tensor, options: LossOptions,
                leading_shape, normalizer):
    """(loss, components) from (N, NUM_ROW_STATS) row statistics.

    components is (3,) [divergence, ce, lse_squared] under the same reduction as the loss, or
    (3, *leading_shape) for "none".
    """
    if options.reduction == "none":
        loss = row_stats[:, ROW_LOSS].reshape(leading_shape)
        components = row_stats[:, ROW_LOSS + 1:].t().reshape((NUM_ROW_STATS - 1,)
                                                           + tuple(leading_shape))
        return loss, components
    apply_weight = not (options.reduction == "sum" and normalizer is None)
    totals = _ops.sum_row_stats(row_stats, weight, apply_weight)
    return totals[ROW_LOSS], totals[ROW_LOSS + 1:]


def refuse_function_transforms(*tensors) -> None:
    """A clear error for torch.func.grad / vmap, which a saved-gradient loss cannot serve."""
    if torch.compiler.is_compiling():
        return
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(
                tensor):
            raise RuntimeError(
                "fastkd losses compute their gradient in the forward and do not support "
                "torch.func transforms (grad, vjp, vmap); use torch.autograd (loss.backward() "
                "or torch.autograd.grad)"
            )


def refuse_double_backward(name: str) -> None:
    """Raise in a fused loss's backward under create_graph=True: the gradient it returns is not
    itself differentiable, so a silent answer would be wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} does not support double backward (create_graph=True): its gradient is "
            "computed in the forward and is not itself differentiable"
        )


class SavedGradientLoss(torch.autograd.Function):
    """Loss and w * dloss/dinput from one forward; backward scales them by grad_output.

    Call ``refuse_function_transforms(*inputs)`` before ``apply``.

    `run(plan, *inputs)` returns (loss, components, grads): grads holds, per input, None or a
    pair (gradient as a 2-D tensor, the input's shape). The 2-D gradients are saved and scaled
    in place in backward, so autograd's saved-tensor version check turns a second backward
    through the same graph into an error instead of a gradient scaled twice. With reduction
    "none" grad_output has one value per row, which scales the gradients' rows.
    """

    @staticmethod
    def forward(ctx, run, plan, *inputs):
        loss, components, grads = run(plan, *inputs)
        ctx.mark_non_differentiable(components)
        # The components are detached: no zero-filled gradient for them in backward.
        ctx.set_materialize_grads(False)
        saved = [pair[0] for pair in grads if pair is not None]
        ctx.save_for_backward(*saved)
        ctx.shapes = [None if pair is None else pair[1] for pair in grads]
        ctx.name = getattr(plan, "name", "fastkd")
        return loss, components

    @staticmethod
    def backward(ctx, grad_output, _grad_components):
        refuse_double_backward(ctx.name)
        if grad_output is None:  # only the detached components were used downstream
            return (None,) * (2 + len(ctx.shapes))
        try:
            saved = iter(ctx.saved_tensors)
        except RuntimeError as error:  # the version check: this backward already ran once
            raise RuntimeError(
                f"{ctx.name} computes its gradient once per forward, so its backward can run "
                "only once; recompute the loss instead of backpropagating through it twice"
            ) from error
        results = [None, None]
        for shape in ctx.shapes:
            if shape is None:
                results.append(None)
                continue
            grad = next(saved)
            _ops.scale_rows_(grad, grad_output)
            results.append(grad.view(shape))
        return tuple(results)
