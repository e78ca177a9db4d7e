"""The dense-logits KD loss on one device or across a vocab-parallel group.

A single device is the one-shard case: it runs the one-pass fused op. A vocab-parallel group runs
the shard steps of the backend (statistics, one all-gather, the combination, for some divergences
one all-reduce of three floats per row, then the shard's gradient). Both go through the one
autograd Function of fastkd._autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops, _torch_backend
from ._autograd import (
    SavedGradientLoss,
    make_components,
    reduce_rows,
    reduction_weight,
    refuse_function_transforms,
)
from ._spec import LossSpec


@dataclass(frozen=True)
class DensePlan:
    spec: LossSpec
    student_grad: bool
    teacher_grad: bool
    inplace_backward: bool
    name: str = "fastkd.kd_loss"
    # Vocab parallel only: the process group and this rank's first global column.
    vocab_parallel: bool = False
    group: object = None
    vocab_start: int = 0


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


def rows_view(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N, V) view of (..., V) logits, or a (B, L, V) view where flattening would copy.

    Sliced batches such as ``logits[:, :-1]`` cannot be viewed as (N, V); the kernels read them
    through their three strides instead, so the N x V logits are never copied.
    """
    if _leading_dims_collapse(logits):
        return logits.view(-1, vocab)
    if logits.dim() == 3:
        return logits
    return logits.reshape(-1, vocab)


def _leading_dims_collapse(logits: torch.Tensor) -> bool:
    """Whether the leading dimensions flatten into one without a copy (view(-1, V) works):
    each one's stride spans the dimensions inside it."""
    span = None
    for size, stride in zip(reversed(logits.shape[:-1]), reversed(logits.stride()[:-1]),
                            strict=True):
        if size == 1:
            continue
        if span is not None and stride != span:
            return False
        span = stride * size
    return True


def _run_dense(plan: DensePlan, student_logits, teacher_logits, labels):
    spec, options = plan.spec, plan.spec.options
    vocab = spec.vocab_size
    if plan.vocab_parallel:
        student_2d = student_logits.reshape(-1, vocab)
        teacher_2d = teacher_logits.reshape(-1, vocab)
    else:
        student_2d = rows_view(student_logits, vocab)
        teacher_2d = rows_view(teacher_logits, vocab)
        if student_2d.dim() != teacher_2d.dim():  # one sliced, one not: both as (B, L, V)
            student_2d = student_2d.view(student_logits.shape) if student_2d.dim() == 2 \
                else student_2d
            teacher_2d = teacher_2d.view(teacher_logits.shape) if teacher_2d.dim() == 2 \
                else teacher_2d
    labels_1d = labels.reshape(-1) if labels is not None else None
    device = student_logits.device
    weight = reduction_weight(labels_1d, options, spec.leading_shape, spec.normalizer, device,
                              _ops.loss_dtype(student_logits, teacher_logits))
    inplace = (plan.inplace_backward and plan.student_grad and student_2d.dim() == 2
               and can_hold_its_gradient(student_2d, student_logits))
    grad_student_out = student_2d if inplace else None
    if plan.vocab_parallel:
        row_stats, grad_student, grad_teacher = _vocab_parallel_rows(
            plan, student_2d, teacher_2d, labels_1d, weight, grad_student_out)
    else:
        row_stats, grad_student, grad_teacher = _ops.kd_rows_into(
            student_2d, teacher_2d, labels_1d, weight, options, student_grad=plan.student_grad,
            teacher_grad=plan.teacher_grad, grad_student_out=grad_student_out)
    if inplace:
        # The logits now hold the gradient: tell autograd, so any other op that saved them for
        # its backward raises instead of silently using the overwritten values.
        torch.autograd.graph.increment_version(student_logits)
        # Saved detached: backward scales it in place, which autograd forbids on a view made
        # here (under no_grad) of a tensor that requires grad.
        grad_student = grad_student.detach()
    loss, components = reduce_rows(row_stats, weight, options, spec.leading_shape,
                                   spec.normalizer)
    grads = (
        (grad_student, student_logits.shape) if plan.student_grad else None,
        (grad_teacher, teacher_logits.shape) if plan.teacher_grad else None,
        None,
    )
    return loss, components, grads


def _vocab_parallel_backend(device: torch.device):
    if not _ops.uses_triton(device):
        return _torch_backend
    from .kernels import kd_vocab_parallel

    return kd_vocab_parallel


def _vocab_parallel_rows(plan: DensePlan, student, teacher, labels, weight, grad_student_out):
    """The shard steps with the group's collectives in between (O(N) floats each)."""
    from .distributed import all_gather_rows

    def gather_stats(stats):
        return all_gather_rows(stats, plan.group).flatten(0, 1)

    def reduce_sums(sums):
        torch.distributed.all_reduce(sums, group=plan.group)
        return sums

    grad_student = grad_teacher = None
    if plan.student_grad:
        grad_student = grad_student_out
        if grad_student is None:
            grad_student = torch.empty_like(student, memory_format=torch.contiguous_format)
    if plan.teacher_grad:
        grad_teacher = torch.empty_like(teacher, memory_format=torch.contiguous_format)
    row_stats = _torch_backend.run_shard_steps(
        _vocab_parallel_backend(student.device), student, teacher, labels, weight,
        plan.spec.options, vocab_start=plan.vocab_start, gather_stats=gather_stats,
        reduce_sums=reduce_sums, grad_student=grad_student, grad_teacher=grad_teacher)
    # The Triton shard kernels accumulate in fp32; the loss keeps the inputs' loss dtype.
    return row_stats.to(_ops.loss_dtype(student, teacher)), grad_student, grad_teacher


def dense_kd_loss(plan: DensePlan, student_logits, teacher_logits, labels,
                  return_components: bool):
    refuse_function_transforms(student_logits, teacher_logits)
    loss, components = SavedGradientLoss.apply(_run_dense, plan, student_logits,
                                               teacher_logits, labels)
    if return_components:
        return make_components(loss, components)
    return loss
