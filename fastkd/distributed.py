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
may have different sizes) and the global labels. Each rank reduces its slice to 10 floats per row,
one all-gather exchanges those (N x 10 x world floats, never N x V), and each rank then computes
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

from ._autograd import KDLossComponents
from ._dense import DensePlan, dense_kd_loss
from ._spec import check_inplace_flag, validate_kd_call

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


def _shard_offset(vocab_size: int, device: torch.device, group) -> int:
    """This rank's first global vocabulary id, from every rank's slice size (one all-gather)."""
    local = torch.tensor([vocab_size], dtype=torch.int64, device=device)
    sizes = all_gather_rows(local, group).reshape(-1)
    rank = dist.get_rank(group)
    return int(sizes[:rank].sum().item())  # the one host sync; pass vocab_start_index to avoid it


def all_gather_rows(stats: torch.Tensor, group) -> torch.Tensor:
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


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    vocab_start_index: int | None = None,
    inplace_backward: bool = False,
    return_components: bool = False,
) -> torch.Tensor | KDLossComponents:
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
        temperature, alpha, divergence, beta, skew, label_smoothing, z_loss, ignore_index,
            reduction, normalizer, inplace_backward, return_components: as in
            :func:`fastkd.kd_loss` (inplace_backward overwrites this rank's student slice).
        vocab_start_index: global id of this rank's first column. Pass it in training loops
            (Megatron: ``rank * V_local``, or the start from its vocabulary range helper). None
            derives it from every rank's V_local with one extra all-gather and one host sync.

    Communication: one all-gather of N x 10 floats per rank (fp32; fp64 for fp64 inputs on the
    PyTorch backend); JSD, TVD and the skew divergences add one all-reduce of N x 3 floats (the
    divergence and its two gradient row sums, known only once the global normalisers are).
    Nothing in backward. A label outside the global vocabulary gives its row a
    NaN loss, as in fastkd.kd_loss.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fastkd.distributed.kd_loss needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group); on one device use fastkd.kd_loss"
        )
    spec = validate_kd_call(
        student_logits, teacher_logits, labels, normalizer=normalizer,
        temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
        label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
        reduction=reduction,
    )
    check_inplace_flag(inplace_backward)
    if vocab_start_index is None:
        vocab_start_index = _shard_offset(spec.vocab_size, student_logits.device, group)
    elif isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int):
        raise TypeError(
            f"vocab_start_index must be an int or None, got {type(vocab_start_index).__name__}"
        )
    elif vocab_start_index < 0:
        raise ValueError(f"vocab_start_index must be >= 0, got {vocab_start_index}")
    grad_enabled = torch.is_grad_enabled()
    plan = DensePlan(
        spec=spec,
        student_grad=grad_enabled and student_logits.requires_grad,
        teacher_grad=grad_enabled and teacher_logits.requires_grad,
        inplace_backward=inplace_backward,
        name="fastkd.distributed.kd_loss",
        vocab_parallel=True,
        group=group,
        vocab_start=vocab_start_index,
    )
    return dense_kd_loss(plan, student_logits, teacher_logits, labels, return_components)
