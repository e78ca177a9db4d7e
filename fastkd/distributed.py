"""KD across processes: the data-parallel reduction recipe and a vocab-parallel (tensor-parallel)
loss. Import it as ``import fastkd.distributed``; ``import fastkd`` does not load it.

Data parallel (DDP, FSDP, gradient accumulation)
------------------------------------------------
``reduction="mean"`` averages over the tokens *of one call*. With several micro-batches or ranks
holding different numbers of non-ignored tokens, averaging those per-call means weights tokens
unevenly, so the gradient differs from the one of a single run on the whole batch. Sum instead,
and divide by the token count of the whole optimizer step, all ranks and micro-batches together::

    criterion = fastkd.KDLoss(temperature=2.0, alpha=0.5, reduction="sum")
    n_tokens = fastkd.distributed.global_token_count(micro_batch_labels)   # one all-reduce
    # DDP and FSDP average gradients over ranks: dividing by n_tokens / world_size undoes that.
    normalizer = n_tokens.clamp(min=1) / world_size
    for i, (batch, labels) in enumerate(zip(micro_batches, micro_batch_labels)):
        with model.no_sync() if i + 1 < len(micro_batches) else contextlib.nullcontext():
            criterion(model(batch), teacher(batch), labels, normalizer=normalizer).backward()

The gradient then equals that of ``reduction="mean"`` on the concatenated batch. ``normalizer``
folds the division into the fused gradient; ``(loss * world_size / n).backward()`` gives the same
gradient with one more pass over it. :func:`kd_loss` below takes ``normalizer`` too.

Vocab parallel (Megatron-style tensor parallelism)
--------------------------------------------------
:func:`kd_loss` takes each tensor-parallel rank's contiguous slice of the vocabulary (student and
teacher logits, e.g. the output of a ColumnParallelLinear with ``gather_output=False``; slices
may have different sizes) and the global labels. Each rank reduces its slice to 8 floats per row,
one all-gather exchanges those (N x 8 x world floats, never N x V), and each rank then computes
the global loss (the same value on every rank) and the gradient of its own slice, which
``loss.backward()`` delivers.

Megatron's LM head gives sequence-first logits (L, B, V_local) while its labels are (B, L): pass
``labels.transpose(0, 1)`` so labels have the logits' leading shape. Under torch.compile pass
``vocab_start_index``: without it the offset costs a host sync, which breaks the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import _torch_backend, _vocab_parallel_torch
from ._validation import check_inplace_flag, validate_kd_args
from .functional import (
    can_hold_its_gradient,
    reduce_fused_rows,
    row_weight,
    scaled_saved_grads,
    select_backend,
)

__all__ = ["global_token_count", "kd_loss"]


def global_token_count(
    labels: torch.Tensor | Sequence[torch.Tensor],
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Number of labels != ignore_index over every rank of `group`, as a 0-d int64 tensor.

    `labels` is one tensor or the labels of every micro-batch of an optimizer step. The count
    stays on the labels' device (one all-reduce, no host sync); it may be 0, so clamp it before
    dividing by it.
    """
    if isinstance(labels, torch.Tensor):
        labels = [labels]
    if len(labels) == 0:
        raise ValueError("global_token_count needs at least one labels tensor")
    count = torch.zeros((), dtype=torch.int64, device=labels[0].device)
    for micro_batch in labels:
        count += (micro_batch != ignore_index).sum()
    dist.all_reduce(count, group=group)
    return count


def _select_vocab_parallel_backend(device: torch.device):
    # Same choice as fastkd.kd_loss (FASTKD_BACKEND, then the device); the Triton module is
    # imported only when chosen, so CPU users never load it.
    if select_backend(device) is _torch_backend:
        return _vocab_parallel_torch
    from .kernels import kd_vocab_parallel

    return kd_vocab_parallel


def _shard_offset(vocab_size: int, device: torch.device, group) -> int:
    """This rank's first global vocabulary id, from every rank's slice size (one all-gather)."""
    local = torch.tensor([vocab_size], dtype=torch.int64, device=device)
    sizes = _all_gather_rows(local, group).reshape(-1)
    rank = dist.get_rank(group)
    return int(sizes[:rank].sum().item())  # the one host sync; pass vocab_start_index to avoid it


def _all_gather_rows(stats: torch.Tensor, group) -> torch.Tensor:
    """(R, *shape) stack of every rank's `stats`, in rank order."""
    world_size = dist.get_world_size(group)
    # Gathered as a concatenation along dim 0 (the form every backend accepts, also for a
    # group of one), then viewed as the stack.
    flat = stats.contiguous().reshape(-1)
    gathered = flat.new_empty(world_size * flat.numel())
    # all_gather_single replaces all_gather_into_tensor in recent PyTorch.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, flat, group=group)
    return gathered.view((world_size,) + tuple(stats.shape))


class _VocabParallelKDLoss(torch.autograd.Function):
    """Forward: shard statistics, one all-gather, then the global loss and w * dloss/d(shard).
    Backward: scale the saved shard gradients by grad_output (no communication)."""

    @staticmethod
    def forward(ctx, student_shard, teacher_shard, labels, args, vocab_start, group, backend,
                inplace_backward, student_grad, teacher_grad):
        vocab = args.vocab_size
        student_2d = student_shard.reshape(-1, vocab)
        teacher_2d = teacher_shard.reshape(-1, vocab)
        labels_1d = labels.reshape(-1) if labels is not None else None
        stats = backend.shard_stats(
            student_2d, teacher_2d, labels_1d, vocab_start=vocab_start,
            temperature=args.temperature, ignore_index=args.ignore_index,
        )
        gathered = _all_gather_rows(stats, group)
        # Labels are the same on every rank, so the weight (1 / counted rows for "mean") is too.
        weight = row_weight(labels_1d, args, student_shard.device, gathered.dtype)
        inplace = inplace_backward and student_grad and can_hold_its_gradient(student_2d,
                                                                               student_shard)
        row_losses, grad_student, grad_teacher = backend.shard_loss_and_grad(
            gathered, student_2d, teacher_2d, labels_1d, weight, vocab_start=vocab_start,
            temperature=args.temperature, alpha=args.alpha, ignore_index=args.ignore_index,
            student_grad=student_grad, teacher_grad=teacher_grad,
            grad_student_out=student_2d if inplace else None,
        )
        if inplace:
            # The logits now hold the gradient: any other op that saved them for its backward
            # must raise rather than use the overwritten values.
            torch.autograd.graph.increment_version(student_shard)
            # Saved detached: backward scales it in place, which autograd forbids on a view of
            # a tensor that requires grad.
            grad_student = grad_student.detach()
        # Saved (not stashed on ctx) so that backward's in-place scaling bumps their version and
        # a second backward through the same graph raises instead of scaling twice.
        ctx.save_for_backward(grad_student, grad_teacher)
        ctx.backend = backend
        ctx.grads_wanted = (student_grad, teacher_grad)
        ctx.logits_shapes = (student_shard.shape, teacher_shard.shape)
        return reduce_fused_rows(row_losses, weight, args)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_student, grad_teacher = scaled_saved_grads(
            ctx, grad_output, ctx.backend.scale_rows_, "fastkd.distributed.kd_loss")
        return grad_student, grad_teacher, None, None, None, None, None, None, None, None


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    vocab_start_index: int | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Vocab-parallel KD loss: :func:`fastkd.kd_loss` of the full-vocabulary logits, computed from
    each rank's slice of them.

    Every rank of `group` calls it with the same rows, labels and arguments. It returns the same
    loss on every rank, equal to ``fastkd.kd_loss`` on the logits concatenated over the
    vocabulary in rank order; ``loss.backward()`` gives each rank the gradient of its own slice.

    Args:
        student_logits: (..., V_local) this rank's slice of the student's logits, columns
            [vocab_start_index, vocab_start_index + V_local) of the global vocabulary.
        teacher_logits: (..., V_local) the same slice of the teacher's logits. If it requires
            grad (mutual distillation), it gets the KL term's gradient too.
        labels: (...) global vocabulary ids, identical on every rank, or None (then alpha == 1).
        group: the tensor-parallel process group (default: the default group). Slices are in
            the group's rank order.
        temperature, alpha, ignore_index, reduction, normalizer, inplace_backward: as in
            :func:`fastkd.kd_loss` (inplace_backward overwrites this rank's student slice).
        vocab_start_index: global id of this rank's first column. Pass it in training loops
            (Megatron: ``rank * V_local``, or the start from its vocabulary range helper). None
            derives it from every rank's V_local with one extra all-gather and one host sync.

    Communication: one all-gather of N x 8 floats per rank (fp32; fp64 for fp64 inputs on the
    PyTorch backend), nothing in backward. A label outside the global vocabulary gives its row a
    NaN loss, as in fastkd.kd_loss.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fastkd.distributed.kd_loss needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group); on one device use fastkd.kd_loss"
        )
    args = validate_kd_args(
        student_logits, teacher_logits, labels,
        temperature=temperature, alpha=alpha, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer,
    )
    check_inplace_flag(inplace_backward)
    if vocab_start_index is None:
        vocab_start_index = _shard_offset(args.vocab_size, student_logits.device, group)
    elif isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int):
        raise TypeError(
            f"vocab_start_index must be an int or None, got {type(vocab_start_index).__name__}"
        )
    elif vocab_start_index < 0:
        raise ValueError(f"vocab_start_index must be >= 0, got {vocab_start_index}")
    backend = _select_vocab_parallel_backend(student_logits.device)
    grad_enabled = torch.is_grad_enabled()
    return _VocabParallelKDLoss.apply(
        student_logits, teacher_logits, labels, args, vocab_start_index, group, backend,
        inplace_backward,
        grad_enabled and student_logits.requires_grad,
        grad_enabled and teacher_logits.requires_grad,
    )
