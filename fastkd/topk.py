"""Knowledge distillation from a sparse top-k teacher.

``topk_kd_loss`` takes the student's dense logits and, per position, the teacher's k largest
entries as ids and values (stored offline, or from ``teacher_topk``). One read of the student row,
k gathered entries and one write of the gradient: no teacher logits anywhere. The derivation of
the loss and of its (dense) gradient is in the comment block of ``fastkd/kernels/kd_topk.py``;
this file holds the PyTorch backend of the same math, the custom op and the public API.
"""

from __future__ import annotations

import torch
from torch import nn

from ._ops import select_backend

__all__ = ["topk_kd_loss", "TopKKDLoss", "teacher_topk", "TAILS"]

TAILS = ("renormalize", "bucket")
# Statistics columns of the (N, 4) row layout.
_LOSS, _DIVERGENCE, _CE, _LSE_SQUARED = 0, 1, 2, 3
# Elements per chunk of rows in the PyTorch backend (a few (chunk, V) fp32 buffers).
CHUNK_ELEMENTS = 1 << 20


# --- PyTorch backend -------------------------------------------------------------------------

def _torch_topk_rows(student, ids, values, tail_logprob, labels, weight, row_stats, grad_student,
                     *, tail, temperature, alpha, label_smoothing, z_loss, ignore_index):
    """Same contract as fastkd.kernels.kd_topk.topk_rows, in PyTorch, chunked over rows."""
    n_rows, vocab = student.shape
    k = ids.shape[1]
    if n_rows == 0:
        return
    cd = row_stats.dtype  # fp32, or fp64 for fp64 inputs
    inv_t = 1.0 / temperature
    neg_inf = float("-inf")
    w = weight.to(cd)
    chunk = max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab, k)))
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        rows = stop - start
        s = student[start:stop].to(cd)
        m = s.amax(dim=1, keepdim=True)
        m = torch.where(m == neg_inf, 0.0, m)
        centred = s - m
        e_t = torch.exp(centred * inv_t)
        z_t = e_t.sum(dim=1, keepdim=True)
        e_1 = e_t if temperature == 1.0 else torch.exp(centred)
        z_1 = e_1.sum(dim=1, keepdim=True)
        log_zt = z_t.log()

        v = values[start:stop].to(cd)
        live = v != neg_inf
        idx = ids[start:stop].long()
        in_range = (idx >= 0) & (idx < vocab)
        valid = live & in_range
        bad = (live & ~in_range).any(dim=1)
        # Entries that are not valid point at an extra column V, so they touch nothing real.
        safe_idx = torch.where(valid, idx, vocab)
        padded = torch.cat([centred, centred.new_zeros(rows, 1)], dim=1)
        log_q = padded.gather(1, safe_idx) * inv_t - log_zt
        if tail == "bucket":
            p = torch.where(valid, v.exp(), 0.0)
            d = torch.where(p == 0, 0.0, p * (v - log_q)).sum(dim=1)
            p_sum = p.sum(dim=1)
            counts = torch.zeros(rows, vocab + 1, dtype=torch.int32, device=s.device)
            counts.scatter_add_(1, safe_idx, torch.ones_like(safe_idx, dtype=torch.int32))
            outside = counts[:, :vocab] == 0
            # The complement is summed directly: Z_T - Z_K would cancel when K holds the mass.
            z_out = torch.where(outside, e_t, 0.0).sum(dim=1)
            if tail_logprob is not None:
                log_p_tail = tail_logprob[start:stop].to(cd)
                p_tail = log_p_tail.exp()
            else:
                p_tail = (1.0 - p_sum).clamp(min=0.0)
                log_p_tail = p_tail.log()
            p_tail = torch.where(outside.any(dim=1), p_tail, 0.0)
            log_q_tail = z_out.log() - log_zt.squeeze(1)
            d = d + torch.where(p_tail == 0, 0.0, p_tail * (log_p_tail - log_q_tail))
            s_p = p_sum + p_tail
            tail_ratio = torch.where(p_tail == 0, 0.0, p_tail / z_out)
        else:
            a = torch.where(valid, v * inv_t, neg_inf)
            log_p = torch.log_softmax(a, dim=1)
            p = log_p.exp()
            d = torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(dim=1)
            s_p = torch.ones_like(d)
            tail_ratio = torch.zeros_like(d)
        d = torch.where(bad, float("nan"), d)

        lse = (m + z_1.log()).squeeze(1)
        loss = (alpha * temperature * temperature) * d + z_loss * lse * lse
        ce = torch.zeros_like(d)
        poison = torch.where(bad, float("nan"), 0.0).to(cd)
        counted = torch.ones(rows, dtype=torch.bool, device=s.device)
        if labels is not None:
            y = labels[start:stop].long()
            counted = y != ignore_index
            label_ok = (y >= 0) & (y < vocab)
            safe_y = torch.where(label_ok, y, 0)[:, None]
            s_y = s.gather(1, safe_y).squeeze(1)
            ce = (1.0 - label_smoothing) * (lse - s_y) + label_smoothing * (
                lse - s.sum(dim=1) / vocab)
            ce = torch.where(label_ok, ce, float("nan"))
            loss = loss + (1.0 - alpha) * ce
            poison = poison + torch.where(label_ok, 0.0, float("nan")).to(cd)
        stats = torch.stack([loss, d, ce, lse * lse], dim=1)
        row_stats[start:stop] = torch.where(counted[:, None], stats, 0.0)

        if grad_student is None:
            continue
        coef_kl = w * (alpha * temperature)
        coef_z = w * (2.0 * z_loss) * lse
        if labels is not None:
            coef_ce = w * (1.0 - alpha)
            coef_p1 = coef_ce + coef_z
            shift = coef_ce * label_smoothing / vocab - poison
            coef_y = (coef_ce * (1.0 - label_smoothing)).expand(rows)
        else:
            coef_p1 = coef_z
            shift = -poison
            coef_y = None
        coef_e = coef_kl * (s_p / z_t.squeeze(1) - tail_ratio)
        g = torch.zeros(rows, vocab + 1, dtype=cd, device=s.device)
        g[:, :vocab] = (coef_e[:, None] * e_t + (coef_p1 / z_1.squeeze(1))[:, None] * e_1
                        - shift[:, None])
        if coef_y is not None:
            g[:, :vocab].scatter_add_(1, safe_y, -(coef_y * label_ok)[:, None])
        # The k entries' gradient, written over the dense one (a duplicated id keeps one entry).
        q = log_q.exp()
        p1 = q if temperature == 1.0 else torch.exp(padded.gather(1, safe_idx) - z_1.log())
        fix = coef_kl[..., None] * (s_p[:, None] * q - p) + coef_p1[..., None] * p1 - shift[:, None]
        if coef_y is not None:
            fix = fix - torch.where(safe_idx == y[:, None], coef_y[:, None], 0.0)
        g.scatter_(1, safe_idx, fix)
        g = g[:, :vocab]
        g[~counted] = 0.0
        grad_student[start:stop] = g


def _rows_backend(device: torch.device):
    """The top-k launcher for `device`: same choice (FASTKD_BACKEND) as the dense loss."""
    from . import _torch_backend

    if select_backend(device) is _torch_backend:
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
    """Fill row_stats (N, 4: loss, divergence, CE, lse^2) and grad_student (N, V) = w dloss/ds."""
    _rows_backend(student.device)(
        student, ids, values, tail_logprob, labels, weight, row_stats, grad_student,
        tail=tail, temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
        z_loss=z_loss, ignore_index=ignore_index,
    )


@topk_rows.register_fake
def _(student, ids, values, tail_logprob, labels, weight, row_stats, grad_student, tail,
      temperature, alpha, label_smoothing, z_loss, ignore_index):
    return None


# --- teacher_topk ----------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def teacher_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """The teacher's k most likely classes and their log-probabilities at `temperature`.

    Returns ``(ids, logprobs)``, both (..., k), largest first: ids int64, logprobs float32
    (float64 for float64 logits), the full-vocabulary log-softmax of ``teacher_logits / T``::

        logprobs, ids = torch.log_softmax(teacher_logits.float() / T, -1).topk(k, dim=-1)

    These are the values ``topk_kd_loss(..., tail="bucket", temperature=T)`` expects. The tail
    mass is ``1 - logprobs.exp().sum(-1)``, or more accurately ``log1p(-exp(logsumexp(logprobs)))``.
    Ties may be broken differently from ``torch.topk`` on the log-probabilities. Entries of a row
    with fewer than k finite logits come back as -inf, which ``topk_kd_loss`` reads as padding.

    The top k is taken on the raw logits (dividing by T > 0 keeps the order) and the normaliser
    is a logsumexp over row chunks, so no (N, V) log-softmax is ever materialised.
    """
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("teacher_logits must be a torch.Tensor, got "
                        f"{type(teacher_logits).__name__}")
    if teacher_logits.dtype not in _FLOAT_DTYPES:
        raise TypeError("teacher_logits must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64), got {teacher_logits.dtype}")
    if teacher_logits.dim() < 1:
        raise ValueError("teacher_logits must have shape (..., vocab), got a 0-d tensor")
    vocab = teacher_logits.shape[-1]
    k = _check_int("k", k)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, vocab={vocab}], got {k}")
    temperature = _check_temperature(temperature)
    out_dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    flat = teacher_logits.reshape(-1, vocab)
    top, ids = torch.topk(flat, k, dim=-1, largest=True, sorted=True)
    lse = torch.empty(flat.shape[0], dtype=out_dtype, device=flat.device)
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start:start + chunk].to(out_dtype)
        lse[start:start + chunk] = torch.logsumexp(rows / temperature, dim=-1)
    logprobs = top.to(out_dtype) / temperature - lse[:, None]
    leading = teacher_logits.shape[:-1]
    return ids.reshape(*leading, k), logprobs.reshape(*leading, k)



# --- input checks ----------------------------------------------------------------------------

def _check_topk_inputs(student_logits, ids, values, tail, tail_logprob):
    """Check the teacher's entries against the (already checked) student logits; returns k."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    vocab = student_logits.shape[-1]
    leading = tuple(student_logits.shape[:-1])
    for name, tensor in (("teacher_topk_ids", ids), ("teacher_topk_values", values)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != student_logits.device:
            raise ValueError(f"{name} must be on the logits' device {student_logits.device}, "
                             f"got {tensor.device}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"teacher_topk_ids must be an int32 or int64 tensor, got {ids.dtype}")
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError("teacher_topk_values must be a floating tensor (float16, bfloat16, "
                        f"float32 or float64), got {values.dtype}")
    if ids.dim() != len(leading) + 1 or tuple(ids.shape[:-1]) != leading:
        raise ValueError(f"teacher_topk_ids must have shape (*{leading}, k) for student logits "
                         f"of shape {tuple(student_logits.shape)}, got {tuple(ids.shape)}")
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
            raise ValueError(f"teacher_tail_logprob must have the logits' leading shape {leading},"
                             f" got {tuple(tail_logprob.shape)}")
        if tail_logprob.device != student_logits.device:
            raise ValueError("teacher_tail_logprob must be on the logits' device "
                             f"{student_logits.device}, got {tail_logprob.device}")
    return k


# --- the loss --------------------------------------------------------------------------------

def _forward_rows(student_2d, ids_2d, values_2d, tail_1d, labels_1d, weight, options, tail, *,
                  student_grad, grad_student_out=None):
    """Allocate the outputs and run the op: (row_stats (N, 4), grad_student (N, V) or None)."""
    n_rows, vocab = student_2d.shape
    stats_dtype = torch.float64 if torch.float64 in (student_2d.dtype, values_2d.dtype) else (
        torch.float32)
    row_stats = torch.empty(n_rows, 4, dtype=stats_dtype, device=student_2d.device)
    grad = None
    if student_grad:
        grad = grad_student_out if grad_student_out is not None else torch.empty_like(
            student_2d, memory_format=torch.contiguous_format)
    kwargs = dict(tail=tail, temperature=options.temperature, alpha=options.alpha,
                  label_smoothing=options.label_smoothing, z_loss=options.z_loss,
                  ignore_index=options.ignore_index)
    if grad_student_out is not None and grad_student_out is student_2d:
        # In place (eager only: refused under torch.compile): a custom op may not alias inputs.
        _rows_backend(student_2d.device)(student_2d, ids_2d, values_2d, tail_1d, labels_1d,
                                         weight, row_stats, grad, **kwargs)
    else:
        topk_rows(student_2d, ids_2d, values_2d, tail_1d, labels_1d, weight, row_stats, grad,
                  **kwargs)
    return row_stats, grad


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
    options = _core_options(student_logits, labels, temperature=temperature, alpha=alpha,
                            label_smoothing=label_smoothing, z_loss=z_loss,
                            ignore_index=ignore_index, reduction=reduction)
    k = _check_topk_inputs(student_logits, teacher_topk_ids, teacher_topk_values, tail,
                           teacher_tail_logprob)
    normalizer = _core_normalizer(normalizer, reduction, student_logits.device)
    _core_check_inplace(inplace_backward)
    if not isinstance(return_components, bool):
        raise TypeError(f"return_components must be a bool, got {type(return_components).__name__}")
    vocab = student_logits.shape[-1]
    leading = student_logits.shape[:-1]
    labels_1d = labels.reshape(-1) if labels is not None else None
    ids_2d = teacher_topk_ids.reshape(-1, k)
    values_2d = teacher_topk_values.reshape(-1, k)
    tail_1d = teacher_tail_logprob.reshape(-1) if teacher_tail_logprob is not None else None
    student_grad = torch.is_grad_enabled() and student_logits.requires_grad

    def run(student):
        student_2d = student.reshape(-1, vocab)
        stats_dtype = torch.float64 if torch.float64 in (
            student.dtype, teacher_topk_values.dtype) else torch.float32
        weight = _core_weight(labels_1d, options, leading, normalizer, student.device,
                              stats_dtype)
        out = None
        if inplace_backward and student_grad and _core_can_hold(student_2d, student):
            out = student_2d
        row_stats, grad = _forward_rows(student_2d, ids_2d, values_2d, tail_1d, labels_1d,
                                        weight, options, tail, student_grad=student_grad,
                                        grad_student_out=out)
        if out is not None:
            torch.autograd.graph.increment_version(student)
            grad = grad.detach()
        loss, components = _core_reduce(row_stats, weight, options, leading, normalizer)
        return loss, components, (grad.view(student.shape) if grad is not None else None,)

    loss, components = _core_apply(run, "fastkd.topk_kd_loss", student_logits)
    if return_components:
        return _core_components(loss, components)
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
        _core_options(None, None, temperature=temperature, alpha=alpha,
                      label_smoothing=label_smoothing, z_loss=z_loss,
                      ignore_index=ignore_index, reduction=reduction)
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
        _core_check_inplace(inplace_backward)
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


# --- the core's checks, reduction and autograd, in one place ---------------------------------

def _check_temperature(temperature) -> float:
    return _core_options(None, None, temperature=temperature).temperature


def _core_options(student_logits, labels, *, temperature=1.0, alpha=None, label_smoothing=0.0,
                  z_loss=0.0, ignore_index=-100, reduction="mean"):
    from types import SimpleNamespace

    from ._validation import check_loss_options, validate_kd_args

    if student_logits is None:
        temperature, alpha = check_loss_options(
            temperature=temperature, alpha=alpha, ignore_index=ignore_index,
            reduction=reduction, has_labels=None)
    else:
        args = validate_kd_args(student_logits, student_logits, labels, temperature=temperature,
                                alpha=alpha, ignore_index=ignore_index, reduction=reduction)
        temperature, alpha = args.temperature, args.alpha
    return SimpleNamespace(temperature=temperature, alpha=alpha, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=float(label_smoothing),
                           z_loss=float(z_loss))


def _core_normalizer(normalizer, reduction, device):
    from ._validation import check_normalizer

    return check_normalizer(normalizer, reduction, device)


def _core_check_inplace(flag):
    from ._validation import check_inplace_flag

    check_inplace_flag(flag)


def _core_can_hold(student_2d, student):
    from .functional import can_hold_its_gradient

    return can_hold_its_gradient(student_2d, student)


def _core_weight(labels_1d, options, leading, normalizer, device, dtype):
    from ._validation import KDArgs
    from .functional import row_weight

    args = KDArgs(options.temperature, options.alpha, options.ignore_index, options.reduction,
                  1, torch.Size(leading), normalizer)
    return row_weight(labels_1d, args, device, dtype)


def _core_reduce(row_stats, weight, options, leading, normalizer):
    if options.reduction == "none":
        return row_stats[:, 0].reshape(leading), row_stats[:, 1:].T.reshape(3, *leading)
    totals = row_stats.sum(dim=0)
    if not (options.reduction == "sum" and normalizer is None):
        totals = totals * weight.to(totals.dtype)
    return totals[0], totals[1:]


class _Saved(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, name, student):
        loss, components, (grad,) = run(student)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(components)
        return loss, components

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, _):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None
        factor = grad_output.reshape(*grad_output.shape, *([1] * (grad.dim() - grad_output.dim())))
        return None, None, grad * factor.to(grad.dtype)


def _core_apply(run, name, student):
    return _Saved.apply(run, name, student)


def _core_components(loss, components):
    from collections import namedtuple

    return namedtuple("KDLossComponents", "loss divergence ce lse_squared")(
        loss, components[0], components[1], components[2])
