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
from ._spec import ONLINE_DIVERGENCES, LossSpec


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


def _run_dense(plan: DensePlan, student_logits, teacher_logits, labels):
    spec, options = plan.spec, plan.spec.options
    vocab = spec.vocab_size
    student_2d = student_logits.reshape(-1, vocab)
    teacher_2d = teacher_logits.reshape(-1, vocab)
    labels_1d = labels.reshape(-1) if labels is not None else None
    device = student_logits.device
    weight = reduction_weight(labels_1d, options, spec.leading_shape, spec.normalizer, device,
                              _ops.loss_dtype(student_logits, teacher_logits))
    inplace = (plan.inplace_backward and plan.student_grad
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

    options = plan.spec.options
    backend = _vocab_parallel_backend(student.device)
    stats = backend.shard_stats(student, teacher, labels, vocab_start=plan.vocab_start,
                                options=options)
    state = _torch_backend.combine_stats(all_gather_rows(stats, plan.group), options)
    sums = None
    if options.divergence_id not in ONLINE_DIVERGENCES:
        sums = backend.shard_divergence_sums(state, student, teacher, options)
        torch.distributed.all_reduce(sums, group=plan.group)
    row_stats, a_sum, b_sum = _torch_backend.row_statistics(state, sums, labels, options)
    grad_student = grad_teacher = None
    if plan.student_grad:
        grad_student = grad_student_out
        if grad_student is None:
            grad_student = torch.empty_like(student, memory_format=torch.contiguous_format)
    if plan.teacher_grad:
        grad_teacher = torch.empty_like(teacher, memory_format=torch.contiguous_format)
    if grad_student is not None or grad_teacher is not None:
        backend.shard_grads(state, a_sum, b_sum, student, teacher, labels, weight, options,
                            vocab_start=plan.vocab_start, grad_student=grad_student,
                            grad_teacher=grad_teacher)
    return row_stats, grad_student, grad_teacher


def dense_kd_loss(plan: DensePlan, student_logits, teacher_logits, labels,
                  return_components: bool):
    refuse_function_transforms(student_logits, teacher_logits)
    loss, components = SavedGradientLoss.apply(_run_dense, plan, student_logits,
                                               teacher_logits, labels)
    if return_components:
        return make_components(loss, components)
    return loss
