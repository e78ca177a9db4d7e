"""Knowledge distillation from a sparse top-k teacher.

``topk_kd_loss`` takes the student's dense logits and, per position, the teacher's k largest
entries as ids and values (stored offline, or from ``teacher_topk``). One read of the student row,
k gathered entries and one write of the gradient: no teacher logits anywhere. The derivation of
the loss and of its (dense) gradient is in the comment block of ``fastkd/kernels/kd_topk.py``;
this file holds the PyTorch backend of the same math, the custom op and the public API, and
``linear_topk_kd_loss``, the same loss from hidden states on fastkd.linear's chunk loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import _ops, linear
from ._autograd import (
    SavedGradientLoss,
    make_components,
    reduce_rows,
    reduction_weight,
    refuse_double_backward,
    refuse_function_transforms,
)
from ._dense import can_hold_its_gradient, rows_view
from ._spec import (
    _FLOAT_DTYPES,
    NUM_ROW_STATS,
    LossOptions,
    LossSpec,
    check_inplace_flag,
    check_labels,
    check_logits,
    check_loss_options,
    check_normalizer,
    validate_kd_call,
)
from ._torch_backend import (
    RowState,
    _row_chunks,
    _safe,
    compute_dtype,
    gradient_coefficients,
    row_statistics,
)

__all__ = ["topk_kd_loss", "TopKKDLoss", "teacher_topk", "linear_topk_kd_loss", "TAILS"]

TAILS = ("renormalize", "bucket")


# --- PyTorch backend -------------------------------------------------------------------------

def _torch_topk_rows(student, ids, values, tail_logprob, labels, weight, row_stats, grad_student,
                     *, tail: str, options: LossOptions) -> None:
    """Same contract as fastkd.kernels.kd_topk.topk_rows, in PyTorch, chunk by chunk of rows.

    The CE, z-loss and label terms and their gradient coefficients are the dense loss's
    (fastkd._torch_backend.row_statistics / gradient_coefficients) on a row state whose
    divergence is the top-k one.
    """
    if student.dim() == 3:  # (B, L, V): batch by batch, each an (L, V) view, nothing copied
        length = student.shape[1]
        for b in range(student.shape[0]):
            flat = slice(b * length, (b + 1) * length)
            _torch_topk_rows(
                student[b], ids[flat], values[flat],
                tail_logprob[flat] if tail_logprob is not None else None,
                labels[flat] if labels is not None else None, weight, row_stats[flat],
                grad_student[flat] if grad_student is not None else None, tail=tail,
                options=options)
        return
    n_rows, vocab = student.shape
    cd = row_stats.dtype  # fp32, or fp64 for fp64 inputs
    inv_t = 1.0 / options.temperature
    neg_inf = float("-inf")
    for rows in _row_chunks(n_rows, max(vocab, ids.shape[1])):
        s = student[rows].to(cd)
        n = s.shape[0]
        m = _safe(s.amax(dim=1))
        centred = s - m[:, None]
        e_t = torch.exp(centred * inv_t)
        z_t = e_t.sum(dim=1)
        e_1 = e_t if options.temperature == 1.0 else torch.exp(centred)
        log_z_t = z_t.log()

        v = values[rows].to(cd)
        live = v != neg_inf
        idx = ids[rows].long()
        in_range = (idx >= 0) & (idx < vocab)
        valid = live & in_range
        bad = (live & ~in_range).any(dim=1)
        # Entries that are not valid read column 0 (then discarded) and write to an extra
        # column V, so they touch nothing real.
        centred_k = torch.where(valid, centred.gather(1, torch.where(valid, idx, 0)), 0.0)
        safe_idx = torch.where(valid, idx, vocab)
        log_q = centred_k * inv_t - log_z_t[:, None]
        if tail == "bucket":
            p = torch.where(valid, v.exp(), 0.0)
            d = torch.where(p == 0, 0.0, p * (v - log_q)).sum(dim=1)
            p_sum = p.sum(dim=1)
            counts = torch.zeros(n, vocab + 1, dtype=torch.int32, device=s.device)
            counts.scatter_add_(1, safe_idx, torch.ones_like(safe_idx, dtype=torch.int32))
            outside = counts[:, :vocab] == 0
            # The complement is summed directly: Z_T - Z_K would cancel when K holds the mass.
            z_out = torch.where(outside, e_t, 0.0).sum(dim=1)
            if tail_logprob is not None:
                log_p_tail = tail_logprob[rows].to(cd)
                p_tail = log_p_tail.exp()
            else:
                p_tail = (1.0 - p_sum).clamp(min=0.0)
                log_p_tail = p_tail.log()
            p_tail = torch.where(outside.any(dim=1), p_tail, 0.0)  # no tail class at all
            log_q_tail = z_out.log() - log_z_t
            d = d + torch.where(p_tail == 0, 0.0, p_tail * (log_p_tail - log_q_tail))
            s_p = p_sum + p_tail
            tail_ratio = torch.where(p_tail == 0, 0.0, p_tail / z_out)
        else:
            log_p = torch.log_softmax(torch.where(valid, v * inv_t, neg_inf), dim=1)
            p = log_p.exp()
            d = torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(dim=1)
            s_p = torch.ones_like(d)
            tail_ratio = torch.zeros_like(d)
        d = torch.where(bad, float("nan"), d)

        y = labels[rows].long() if labels is not None else None
        label_logit = torch.zeros_like(m)
        if y is not None:
            label_ok = (y >= 0) & (y < vocab)
            label_logit = torch.where(
                label_ok, centred.gather(1, torch.where(label_ok, y, 0)[:, None]).squeeze(1),
                float("nan"))
        zero = torch.zeros_like(m)
        state = RowState(m_s=m, m_t=zero, log_z_a=log_z_t, log_z_b=zero,
                         log_z_1=e_1.sum(dim=1).log(), sum_s=centred.sum(dim=1),
                         label_logit=label_logit, columns=torch.full_like(m, vocab),
                         divergence=d)
        stats, _, _ = row_statistics(state, None, labels[rows] if labels is not None else None,
                                     options)
        row_stats[rows] = stats
        if grad_student is None:
            continue

        coef = gradient_coefficients(state, labels[rows] if labels is not None else None,
                                     weight, options)
        # A row whose D is NaN (an out-of-range id, a renormalize row with no entry, a NaN
        # value): NaN everywhere, as its loss.
        poison = torch.where(d.isnan(), float("nan"), 0.0).to(cd)
        shift = coef.uniform - poison
        p_1 = e_1 / e_1.sum(dim=1, keepdim=True)
        g = torch.empty(n, vocab + 1, dtype=cd, device=s.device)
        g[:, :vocab] = ((coef.div * (s_p / z_t - tail_ratio))[:, None] * e_t
                        + coef.p1[:, None] * p_1 - shift[:, None])
        if y is not None:
            g[:, :vocab].scatter_add_(1, torch.where(label_ok, y, 0)[:, None],
                                      -(coef.label * label_ok)[:, None])
        # The k entries' gradient, written over the dense one (a duplicated id keeps one entry).
        q = log_q.exp()
        p_1k = q if options.temperature == 1.0 else torch.exp(centred_k - state.log_z_1[:, None])
        fix = (coef.div[:, None] * (s_p[:, None] * q - p) + coef.p1[:, None] * p_1k
               - shift[:, None])
        if y is not None:
            fix = fix - torch.where(safe_idx == y[:, None], coef.label[:, None], 0.0)
        g.scatter_(1, safe_idx, fix)
        g = g[:, :vocab]
        if y is not None:
            g = torch.where((y != options.ignore_index)[:, None], g, 0.0)  # g may hold NaN
        grad_student[rows] = g


def _rows_backend(device: torch.device):
    """The top-k launcher for `device`: same choice (FASTKD_BACKEND) as the dense loss."""
    if not _ops.uses_triton(device):
        return _torch_topk_rows
    from .kernels import kd_topk

    return kd_topk.topk_rows


@torch.library.custom_op("fastkd::topk_rows", mutates_args=("row_stats", "grad_student"))
def topk_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    values: torch.Tensor,
    tail_logprob: torch.Tensor | None,
    labels: torch.Tensor | None,
    weight: torch.Tensor,
    row_stats: torch.Tensor,
    grad_student: torch.Tensor | None,
    tail: str,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    z_loss: float,
    ignore_index: int,
) -> None:
    """(N, V) student logits and (N, k) teacher entries -> row_stats (N, 4) and w * dloss/ds.

    student (N, V) or (B, L, V) with N = B L. row_stats columns: loss, divergence, ce, lse^2
    (fastkd._spec.ROW_*). grad_student None: not computed; it may be the student logits
    themselves (in place, eager mode).
    """
    options = LossOptions(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                          z_loss=z_loss, ignore_index=ignore_index)
    _rows_backend(student.device)(student, ids, values, tail_logprob, labels, weight, row_stats,
                                  grad_student, tail=tail, options=options)


@topk_rows.register_fake
def _(*args):
    return None


def topk_rows_into(student_2d, ids_2d, values_2d, tail_1d, labels_1d, weight,
                   options: LossOptions, tail: str, *, student_grad: bool,
                   grad_student_out=None):
    """Allocate the outputs of topk_rows and run it: (row_stats (N, 4), grad_student or None).

    student_2d is (N, V), or (B, L, V) where flattening would copy (fastkd._dense.rows_view).
    """
    n_rows = ids_2d.shape[0]
    row_stats = student_2d.new_empty((n_rows, NUM_ROW_STATS),
                                     dtype=compute_dtype(student_2d, values_2d))
    grad_student = None
    if student_grad:
        grad_student = grad_student_out
        if grad_student is None:
            grad_student = student_2d.new_empty((n_rows, student_2d.shape[-1]))
    if n_rows > 0:
        topk_rows(student_2d, ids_2d, values_2d, tail_1d, labels_1d, weight, row_stats,
                  grad_student, tail, options.temperature, options.alpha,
                  options.label_smoothing, options.z_loss, options.ignore_index)
    return row_stats, grad_student


# --- checks ----------------------------------------------------------------------------------

def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _check_topk_inputs(leading, vocab, device, ids, values, tail, tail_logprob):
    """Check the teacher's entries against the student's leading shape, vocabulary and device;
    returns k."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    leading = tuple(leading)
    for name, tensor in (("teacher_topk_ids", ids), ("teacher_topk_values", values)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on the student's device {device}, got "
                             f"{tensor.device}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"teacher_topk_ids must be an int32 or int64 tensor, got {ids.dtype}")
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError("teacher_topk_values must be a floating tensor (float16, bfloat16, "
                        f"float32 or float64), got {values.dtype}")
    if ids.dim() != len(leading) + 1 or tuple(ids.shape[:-1]) != leading:
        raise ValueError(f"teacher_topk_ids must have shape (*{leading}, k) for the student's "
                         f"leading shape {leading}, got {tuple(ids.shape)}")
    if values.shape != ids.shape:
        raise ValueError("teacher_topk_values must have the shape of teacher_topk_ids "
                         f"{tuple(ids.shape)}, got {tuple(values.shape)}")
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk_ids must hold k in [1, vocab={vocab}] entries per "
                         f"position, got k={k}")
    if tail_logprob is not None:
        if tail != "bucket":
            raise ValueError("teacher_tail_logprob is the tail class's log-probability: it needs "
                             f"tail='bucket', got tail={tail!r}")
        if not isinstance(tail_logprob, torch.Tensor):
            raise TypeError("teacher_tail_logprob must be a torch.Tensor or None, got "
                            f"{type(tail_logprob).__name__}")
        if tail_logprob.dtype not in _FLOAT_DTYPES:
            raise TypeError("teacher_tail_logprob must be a floating tensor, got "
                            f"{tail_logprob.dtype}")
        if tuple(tail_logprob.shape) != leading:
            raise ValueError("teacher_tail_logprob must have the student's leading shape "
                             f"{leading}, got {tuple(tail_logprob.shape)}")
        if tail_logprob.device != device:
            raise ValueError("teacher_tail_logprob must be on the student's device "
                             f"{device}, got {tail_logprob.device}")
    return k


def validate_topk_call(student_logits, ids, values, labels, *, tail, tail_logprob,
                       normalizer=None, **options) -> tuple[LossSpec, int]:
    """Check one top-k loss call: (its spec, k). Errors name the argument.

    The student, labels, options and normalizer go through the dense loss's checks, with the
    student standing in for the dense teacher (whose checks then hold trivially).
    """
    spec = validate_kd_call(student_logits, student_logits, labels, normalizer=normalizer,
                            **options)
    k = _check_topk_inputs(spec.leading_shape, spec.vocab_size, student_logits.device, ids,
                           values, tail, tail_logprob)
    return spec, k


@dataclass(frozen=True)
class TopKPlan:
    spec: LossSpec
    k: int
    tail: str
    student_grad: bool
    inplace_backward: bool
    name: str = "fastkd.topk_kd_loss"


def _run_topk(plan: TopKPlan, student_logits, ids, values, tail_logprob, labels):
    spec, options = plan.spec, plan.spec.options
    student_2d = rows_view(student_logits, spec.vocab_size)
    labels_1d = labels.reshape(-1) if labels is not None else None
    weight = reduction_weight(labels_1d, options, spec.leading_shape, spec.normalizer,
                              student_logits.device, compute_dtype(student_logits, values))
    inplace = (plan.inplace_backward and plan.student_grad and student_2d.dim() == 2
               and can_hold_its_gradient(student_2d, student_logits))
    row_stats, grad_student = topk_rows_into(
        student_2d, ids.reshape(-1, plan.k), values.reshape(-1, plan.k),
        tail_logprob.reshape(-1) if tail_logprob is not None else None, labels_1d, weight,
        options, plan.tail, student_grad=plan.student_grad,
        grad_student_out=student_2d if inplace else None)
    if inplace:
        # The logits now hold the gradient: ops that saved them for backward must raise.
        torch.autograd.graph.increment_version(student_logits)
        grad_student = grad_student.detach()
    loss, components = reduce_rows(row_stats, weight, options, spec.leading_shape,
                                   spec.normalizer)
    grads = ((grad_student, student_logits.shape) if plan.student_grad else None,
             None, None, None, None)
    return loss, components, grads


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float | None = None,
    tail: str = "renormalize",
    teacher_tail_logprob: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    inplace_backward: bool = False,
    return_components: bool = False,
):
    """Fused KD loss against a sparse teacher given as its top-k entries per position.

    One read of the student row, the k entries, one write of the gradient. Per counted row::

        loss_i = alpha * T**2 * D_i + (1 - alpha) * CE_i + z_loss * logsumexp(s_i)**2

    with CE_i, the reductions, ``normalizer``, ``ignore_index`` and ``return_components``
    exactly as in :func:`fastkd.kd_loss`. D_i, in PyTorch (``s`` the student logits, ``ids``
    and ``v`` the teacher's entries; a ``-inf`` value is padding)::

        log_q = torch.log_softmax(s.double() / T, -1)
        if tail == "renormalize":        # v: teacher logits (or log-probs at T = 1), not at T
            t = torch.full_like(log_q, -inf).scatter(-1, ids, v.double())
            D = kl_div(log_q, log_softmax(t / T, -1))         # == kd_loss with that dense t
        else:                            # "bucket": v = full-vocabulary log-probs at T
            p = v.exp()
            q_tail = log_q.exp().sum(-1) - log_q.gather(-1, ids).exp().sum(-1)  # (cancels:
            #     fastkd sums the complement directly instead)
            p_tail = teacher_tail_logprob.exp() if given else (1 - p.sum(-1)).clamp(min=0)
            D = (p * (v - log_q.gather(-1, ids))).sum(-1) + p_tail * (p_tail.log() - q_tail.log())

    Args:
        student_logits: (..., V) logits of the student, any float dtype and strides.
        teacher_topk_ids: (..., k) int32/int64 class ids of the teacher's entries, 1 <= k <= V.
            A non-padding id outside [0, V) is never read; its row's loss and gradient are NaN.
            Duplicate ids within a row are the caller's error: the loss counts each entry and
            the gradient at that id takes one entry's value (unspecified which), not their sum.
        teacher_topk_values: (..., k) float values, read according to ``tail``. ``-inf`` marks
            padding (a variable k per row): it contributes nothing and its id is never read.
            They get no gradient.
        tail: "renormalize" (default): the teacher is the softmax of ``values / T`` over its k
            entries, so values are logits up to a per-row constant (raw teacher logits or
            log-probs at temperature 1; values already at T would be tempered twice).
            "bucket": the rest of the vocabulary is one extra class. Values must be the
            teacher's full-vocabulary log-probs at the loss temperature (``teacher_topk(logits,
            k, temperature=T)``), used as they are; the tail's teacher mass is
            ``max(0, 1 - sum(exp(values)))`` or ``exp(teacher_tail_logprob)``, the student's is
            the softmax mass outside the ids. When the ids cover the whole vocabulary the tail
            class does not exist.
        teacher_tail_logprob: (...) log-probability of the tail, bucket only: more accurate
            than 1 - sum(p) when the values are bf16 (about 0.4% error each).
        labels, temperature, alpha, label_smoothing, z_loss, ignore_index, reduction,
        normalizer, inplace_backward, return_components: as in :func:`fastkd.kd_loss`.

    Returns:
        The loss (fp32; fp64 for fp64 inputs), or ``fastkd.KDLossComponents`` with
        ``return_components=True``.
    """
    spec, k = validate_topk_call(
        student_logits, teacher_topk_ids, teacher_topk_values, labels, tail=tail,
        tail_logprob=teacher_tail_logprob, normalizer=normalizer, temperature=temperature,
        alpha=alpha, label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
        reduction=reduction,
    )
    check_inplace_flag(inplace_backward)
    if not isinstance(return_components, bool):
        raise TypeError(f"return_components must be a bool, got {type(return_components).__name__}")
    plan = TopKPlan(spec=spec, k=k, tail=tail,
                    student_grad=torch.is_grad_enabled() and student_logits.requires_grad,
                    inplace_backward=inplace_backward)
    refuse_function_transforms(student_logits, teacher_topk_values)
    loss, components = SavedGradientLoss.apply(_run_topk, plan, student_logits, teacher_topk_ids,
                                               teacher_topk_values, teacher_tail_logprob, labels)
    if return_components:
        return make_components(loss, components)
    return loss


class TopKKDLoss(nn.Module):
    """:func:`topk_kd_loss` as a module (same options; see there for the semantics).

    Example::

        criterion = fastkd.TopKKDLoss(temperature=2.0, alpha=0.5, tail="bucket")
        loss = criterion(student_logits, teacher_ids, teacher_logprobs, labels)
    """

    def __init__(self, temperature: float = 1.0, alpha: float | None = None,
                 tail: str = "renormalize", label_smoothing: float = 0.0, z_loss: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean",
                 inplace_backward: bool = False, return_components: bool = False):
        super().__init__()
        # Fail at construction, not at the first training step.
        check_loss_options(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                           z_loss=z_loss, ignore_index=ignore_index, reduction=reduction,
                           has_labels=None)
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
        check_inplace_flag(inplace_backward)
        self.temperature = temperature
        self.alpha = alpha
        self.tail = tail
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_backward = inplace_backward
        self.return_components = return_components

    def forward(self, student_logits, teacher_topk_ids, teacher_topk_values, labels=None,
                teacher_tail_logprob=None, normalizer=None):
        return topk_kd_loss(
            student_logits, teacher_topk_ids, teacher_topk_values, labels,
            temperature=self.temperature, alpha=self.alpha, tail=self.tail,
            teacher_tail_logprob=teacher_tail_logprob, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, ignore_index=self.ignore_index, reduction=self.reduction,
            normalizer=normalizer, inplace_backward=self.inplace_backward,
            return_components=self.return_components,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, tail={self.tail!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")


# --- fused linear ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearTopKPlan:
    """One validated linear_topk_kd_loss call: the student head's plan and the teacher's k."""

    head: linear.LinearPlan  # the student head's plan (its teacher fields are unused)
    tail: str
    k: int
    name: str = "fastkd.linear_topk_kd_loss"


def _run_linear_topk(plan: LinearTopKPlan, wants, row_scale, hidden, weight, bias, ids, values,
                     tail_logprob, labels):
    """(loss, components, grads) chunk by chunk: the student's logits of one chunk exist at a
    time, the top-k op writes their gradient over them, and the head takes its share of dH, dW,
    db (fastkd.linear's chunk machinery). row_scale, when given, multiplies each row's gradient
    (reduction="none", in backward)."""
    head = plan.head
    options, device, cdtype = head.options, hidden.device, head.compute_dtype
    n_rows, vocab, chunk = hidden.shape[0], head.vocab, head.chunk
    student = linear._Head(hidden, weight, bias, 0, head, wants)
    w = reduction_weight(labels, options, head.leading_shape, head.normalizer, device, cdtype)
    stats = torch.empty((n_rows, NUM_ROW_STATS), dtype=cdtype, device=device)
    logits = torch.empty((min(chunk, n_rows), vocab), dtype=cdtype, device=device)
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        z = student.logits(rows.start, rows.stop, logits[: rows.stop - rows.start])
        grad = z if student.wants_grad else None  # written over the chunk's logits
        topk_rows(z, ids[rows], values[rows],
                  tail_logprob[rows] if tail_logprob is not None else None,
                  labels[rows] if labels is not None else None, w, stats[rows], grad, plan.tail,
                  options.temperature, options.alpha, options.label_smoothing, options.z_loss,
                  options.ignore_index)
        if grad is not None:
            if row_scale is not None:
                grad.mul_(row_scale[rows, None].to(cdtype))
            student.backprop(grad, rows.start, rows.stop)
    loss, components = reduce_rows(stats, w, options, head.leading_shape, head.normalizer)
    return loss, components, (*student.grads(), None, None, None, None)


def _run_linear_topk_saved(plan: LinearTopKPlan, *inputs):
    return _run_linear_topk(plan, plan.head.wants[:3], None, *inputs)


class _LinearTopKRecomputed(torch.autograd.Function):
    """reduction="none": the forward computes the row losses only; backward runs the chunks
    again with grad_output as row weights (a per-row factor cannot rescale dW afterwards)."""

    @staticmethod
    def forward(ctx, plan, *inputs):
        loss, components, _ = _run_linear_topk(plan, (False,) * 3, None, *inputs)
        ctx.mark_non_differentiable(components)
        ctx.plan = plan
        ctx.save_for_backward(*inputs)
        return loss, components

    @staticmethod
    def backward(ctx, grad_output, _grad_components):
        refuse_double_backward(ctx.plan.name)
        inputs = ctx.saved_tensors
        with linear._no_autocast(inputs[0].device):
            _, _, grads = _run_linear_topk(ctx.plan, ctx.plan.head.wants[:3],
                                           grad_output.reshape(-1), *inputs)
        return (None, *(None if g is None else g[0].view(g[1]) for g in grads))


def linear_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    tail: str = "renormalize",
    teacher_tail_logprob: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    return_components: bool = False,
):
    """:func:`topk_kd_loss` straight from the student's hidden states and lm_head weight.

    The student's logits exist one chunk of rows at a time, as in
    :func:`fastkd.linear_kd_loss`, and the teacher is its top-k entries. Equal to::

        z = student_logit_scale * F.linear(student_hidden.float(), student_weight.float(),
                                           student_bias)
        if student_softcap is not None:
            z = student_softcap * torch.tanh(z / student_softcap)
        loss = fastkd.topk_kd_loss(z, teacher_topk_ids, teacher_topk_values, labels, ...)

    Args:
        student_hidden: (..., H) hidden states; student_weight (V, H), student_bias (V,) or None.
            A DTensor weight (FSDP2) is gathered once per call.
        teacher_topk_ids, teacher_topk_values, teacher_tail_logprob, tail: the teacher's entries,
            as in :func:`topk_kd_loss` (the leading shape is the hidden states').
        student_logit_scale, student_softcap, chunk_size: as in :func:`fastkd.linear_kd_loss`.
        The other options: as in :func:`topk_kd_loss`.

    Per chunk of C rows: one GEMM for the logits, the top-k op (which writes the gradient over
    them), two GEMMs for dH and dW; backward only scales the saved dH, dW, db by grad_output
    (reduction="none" runs the chunks again with it as row weights).
    """
    device = student_hidden.device if isinstance(student_hidden, torch.Tensor) else None
    cast_dtype = linear._autocast_dtype(device) if device is not None else None
    linear._check_head("student", student_hidden, student_weight, student_bias,
                       cast_dtype is not None)
    linear._check_bias("student", student_weight, student_bias, cast_dtype is not None)
    leading_shape = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    check_labels(labels, leading_shape, device)
    options = check_loss_options(temperature=temperature, alpha=alpha,
                                 label_smoothing=label_smoothing, z_loss=z_loss,
                                 ignore_index=ignore_index, reduction=reduction,
                                 has_labels=labels is not None)
    k = _check_topk_inputs(leading_shape, vocab, device, teacher_topk_ids, teacher_topk_values,
                           tail, teacher_tail_logprob)
    normalizer = check_normalizer(normalizer, reduction, device)
    scale = linear._check_scale("student_logit_scale", student_logit_scale)
    softcap = linear._check_softcap("student_softcap", student_softcap)
    linear._check_chunk_size(chunk_size)
    if not isinstance(return_components, bool):
        raise TypeError(f"return_components must be a bool, got {type(return_components).__name__}")
    n_rows = math.prod(leading_shape)
    chunk = (linear.default_chunk_size(n_rows, vocab, device) if chunk_size is None
             else min(chunk_size, max(n_rows, 1)))
    student_weight = linear._full_tensor(student_weight, student_hidden.dtype)
    student_bias = linear._full_tensor(student_bias, student_hidden.dtype)
    present = [t for t in (student_hidden, student_weight, student_bias) if t is not None]
    grad_enabled = torch.is_grad_enabled()
    wants = tuple(grad_enabled and t is not None and t.requires_grad
                  for t in (student_hidden, student_weight, student_bias))
    head = linear.LinearPlan(
        options=options, normalizer=normalizer, leading_shape=leading_shape, vocab=vocab,
        chunk=chunk, scales=(scale, 1.0), softcaps=(softcap, None), cast_dtype=cast_dtype,
        compute_dtype=(torch.float32 if cast_dtype is not None
                       else compute_dtype(*present, teacher_topk_values)),
        wants=(*wants, False, False, False),
    )
    plan = LinearTopKPlan(head=head, tail=tail, k=k)
    inputs = (student_hidden.reshape(n_rows, student_hidden.shape[-1]), student_weight,
              student_bias, teacher_topk_ids.reshape(n_rows, k),
              teacher_topk_values.reshape(n_rows, k),
              teacher_tail_logprob.reshape(n_rows) if teacher_tail_logprob is not None else None,
              labels.reshape(n_rows) if labels is not None else None)
    refuse_function_transforms(*present, teacher_topk_values)
    with linear._no_autocast(device):
        if not any(wants):
            loss, components, _ = _run_linear_topk(plan, wants, None, *inputs)
        elif reduction == "none":
            loss, components = _LinearTopKRecomputed.apply(plan, *inputs)
        else:
            loss, components = SavedGradientLoss.apply(_run_linear_topk_saved, plan, *inputs)
    if return_components:
        return make_components(loss, components)
    return loss


# --- teacher_topk ----------------------------------------------------------------------------

def teacher_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                 return_tail_logprob: bool = False):
    """The teacher's k most likely classes and their log-probabilities at `temperature`.

    Returns ``(ids, logprobs)``, both (..., k), largest first: ids int64, logprobs float32
    (float64 for float64 logits), the full-vocabulary log-softmax of ``teacher_logits / T``::

        logprobs, ids = torch.log_softmax(teacher_logits.float() / T, -1).topk(k, dim=-1)

    These are the values ``topk_kd_loss(..., tail="bucket", temperature=T)`` expects. With
    ``return_tail_logprob=True`` a third tensor (...) holds the log-probability of everything
    outside the k ids, summed over that complement (not 1 - sum(p), which cancels when the top k
    hold nearly all the mass): pass it as ``teacher_tail_logprob``. It is -inf when k = V.
    Ties may be broken differently from ``torch.topk`` on the log-probabilities. Entries of a row
    with fewer than k finite logits come back as -inf, which ``topk_kd_loss`` reads as padding.

    The top k is taken on the raw logits (dividing by T > 0 keeps the order) and the normaliser
    is a logsumexp over row chunks, so no (N, V) log-softmax is ever materialised.
    """
    check_logits("teacher_logits", teacher_logits)
    vocab = teacher_logits.shape[-1]
    k = _check_int("k", k)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, vocab={vocab}], got {k}")
    temperature = check_loss_options(temperature=temperature, has_labels=None).temperature
    if not isinstance(return_tail_logprob, bool):
        raise TypeError("return_tail_logprob must be a bool, got "
                        f"{type(return_tail_logprob).__name__}")
    out_dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    flat = teacher_logits.reshape(-1, vocab)
    top, ids = torch.topk(flat, k, dim=-1, largest=True, sorted=True)
    lse = torch.empty(flat.shape[0], dtype=out_dtype, device=flat.device)
    tail = torch.empty_like(lse) if return_tail_logprob else None
    for rows in _row_chunks(flat.shape[0], vocab):
        scaled = flat[rows].to(out_dtype) / temperature
        lse[rows] = torch.logsumexp(scaled, dim=-1)
        if tail is not None:
            tail[rows] = torch.logsumexp(scaled.scatter_(1, ids[rows], float("-inf")), dim=-1)
    leading = teacher_logits.shape[:-1]
    logprobs = (top.to(out_dtype) / temperature - lse[:, None]).reshape(*leading, k)
    ids = ids.reshape(*leading, k)
    if tail is not None:
        return ids, logprobs, (tail - lse).reshape(leading)
    return ids, logprobs
