"""PyTorch backend of every dense KD loss: shard statistics -> combination -> gradient.

A single device is the one-shard case of the vocab-parallel loss, so both run the same four
steps. Row i's vocabulary is split into shards r (one shard on a single device):

1. ``shard_stats``: each shard reduces its columns to NUM_STATS floats per row (layout below):
   maxima, the three softmax normalisers, the online divergence sum W, the centred logit sum
   (label smoothing) and the label's logit.
2. ``combine_stats``: every shard's statistics, stacked as (R, N, NUM_STATS), become the row's
   global maxima, log-normalisers and, for forward and reverse KL, the divergence.
3. ``shard_divergence_sums`` (JSD, TVD and the skew divergences only): with the final normalisers
   known, each shard sums the divergence and the two gradient row sums A, B over its columns;
   the sums add across shards.
4. ``row_statistics`` then ``shard_grads``: the per-row loss terms, then the shard's gradients.

The math of every divergence, its gradient and the combination is derived in the comment block
of kernels/kd_loss.py and kernels/divergences.py; the Triton kernels compute the same quantities.
Work is chunked over rows (CHUNK_ELEMENTS elements at a time), so no temporary grows with N.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._spec import (
    FORWARD_KL,
    JSD,
    NUM_ROW_STATS,
    ONLINE_DIVERGENCES,
    REVERSE_KL,
    ROW_CE,
    ROW_DIVERGENCE,
    ROW_LOSS,
    ROW_LSE_SQUARED,
    SKEW_KL,
    SKEW_REVERSE_KL,
    TVD,
    LossOptions,
)

# About this many elements per chunk of rows: a handful of fp32 temporaries of 1M elements sit in
# a server CPU's L3, and a chunk is large enough that a call is a few hundred aten ops, not
# thousands (smaller chunks were up to 8x slower on a busy 2-core machine, where every small op
# waits at OpenMP's barrier for a preempted thread).
CHUNK_ELEMENTS = 1 << 20

# Columns of the (N, NUM_STATS) statistics one shard contributes per row. The maxima are raw
# (-inf for a fully masked shard); the sums are relative to the shard's safe maxima (0 for -inf).
STAT_MAX_S = 0  # max of the student logits over the shard
STAT_MAX_T = 1  # max of the teacher logits over the shard
STAT_Z_A = 2  # sum exp((s - m_s) / T)
STAT_Z_1 = 3  # sum exp(s - m_s)
STAT_Z_B = 4  # sum exp((t - m_t) / T)
STAT_W = 5  # forward KL: sum exp((t - m_t)/T) ((t - m_t) - (s - m_s)); reverse KL: s <-> t
STAT_SUM_S = 6  # sum (s - m_s): the label-smoothing term, centred so 1e4 shifts cost nothing
STAT_COLUMNS = 7  # the shard's number of columns, to move STAT_SUM_S to the global maximum
STAT_LABEL_LOGIT = 8  # s[label] - m_s if the label falls in this shard, else 0
STAT_LABEL_HIT = 9  # 1 if the label falls in this shard, else 0
NUM_STATS = 10


class RowState(NamedTuple):
    """A row's global statistics after the combination, each (N,)."""

    m_s: torch.Tensor  # safe global maxima of the student and teacher logits
    m_t: torch.Tensor
    log_z_a: torch.Tensor  # log sum exp((s - m_s) / T)
    log_z_b: torch.Tensor  # log sum exp((t - m_t) / T)
    log_z_1: torch.Tensor  # log sum exp(s - m_s)
    sum_s: torch.Tensor  # sum (s - m_s)
    label_logit: torch.Tensor  # s[label] - m_s; NaN when no shard holds the label
    columns: torch.Tensor  # the global vocabulary size V (the shards' columns summed)
    divergence: torch.Tensor | None  # D of forward / reverse KL (online); None otherwise


def _safe(m: torch.Tensor) -> torch.Tensor:
    # A fully masked row or shard has max -inf; shifting by it gives -inf - -inf = NaN, shifting
    # by 0 gives exp(-inf) = 0, its true contribution.
    return torch.where(m == float("-inf"), 0.0, m)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Losses accumulate in fp32; float64 inputs (gradcheck) get float64 throughout."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_chunks(n_rows: int, vocab: int):
    chunk = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, chunk):
        yield slice(start, min(start + chunk, n_rows))


def _where_nonzero(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight * value with 0 * anything = 0 (a vanishing probability times an infinite sum)."""
    return torch.where(weight == 0, 0.0, weight * value)


def _log_mix(log_x, log_y, weight_x: float):
    """log(w e^log_x + (1 - w) e^log_y) in log space; exactly log_x where the two are equal, so
    every divergence is exactly 0 at equal logits."""
    mixed = torch.logaddexp(log_x + math.log(weight_x), log_y + math.log(1.0 - weight_x))
    return torch.where(log_x == log_y, log_x, mixed)


def divergence_terms(log_p, log_q, options: LossOptions):
    """Elementwise (f, a, b) of the divergence: D = sum f, and with A = sum a, B = sum b

        dD/ds = (a - q A) / T          dD/dt = (b - p B) / T

    where a = q df/dq and b = p df/dp (kernels/divergences.py derives each). p and q are the
    teacher's and student's probabilities at T; 0 * log 0 = 0 throughout.
    """
    divergence = options.divergence_id
    p, q = log_p.exp(), log_q.exp()
    if divergence == FORWARD_KL:
        f = _where_nonzero(p, log_p - log_q)
        return f, -p, _where_nonzero(p, log_p - log_q + 1.0)
    if divergence == REVERSE_KL:
        f = _where_nonzero(q, log_q - log_p)
        return f, _where_nonzero(q, log_q - log_p + 1.0), -q
    lam = options.divergence_parameter
    if divergence == JSD:
        # log M in log space: p and q may both underflow where log p and log q are finite.
        log_m = _log_mix(log_p, log_q, lam)
        term_p = _where_nonzero(p, log_p - log_m)
        term_q = _where_nonzero(q, log_q - log_m)
        return lam * term_p + (1.0 - lam) * term_q, (1.0 - lam) * term_q, lam * term_p
    if divergence == TVD:
        sign = torch.sign(p - q)
        return 0.5 * (p - q).abs(), -0.5 * q * sign, 0.5 * p * sign
    if divergence == SKEW_KL:
        # KL(p || r), r = lam p + (1 - lam) q
        log_r = _log_mix(log_p, log_q, lam)
        f = _where_nonzero(p, log_p - log_r)
        a = -(1.0 - lam) * _where_nonzero(p, (log_q - log_r).exp())
        b = _where_nonzero(p, log_p - log_r + 1.0 - lam * (log_p - log_r).exp())
        return f, a, b
    if divergence == SKEW_REVERSE_KL:
        # KL(q || r), r = lam q + (1 - lam) p
        log_r = _log_mix(log_q, log_p, lam)
        f = _where_nonzero(q, log_q - log_r)
        a = _where_nonzero(q, log_q - log_r + 1.0 - lam * (log_q - log_r).exp())
        b = -(1.0 - lam) * _where_nonzero(q, (log_p - log_r).exp())
        return f, a, b
    raise AssertionError(divergence)


def shard_stats(student, teacher, labels, *, vocab_start: int, options: LossOptions):
    """(N, NUM_STATS) statistics of a (N, V_local) shard; see the layout above.

    Ignored rows get statistics too (they are never used), so this needs no row selection.
    """
    n_rows, vocab = student.shape
    dtype = compute_dtype(student, teacher)
    stats = torch.zeros((n_rows, NUM_STATS), dtype=dtype, device=student.device)
    T = options.temperature
    divergence = options.divergence_id
    for rows in _row_chunks(n_rows, vocab):
        s = student[rows].to(dtype)
        t = teacher[rows].to(dtype)
        max_s, max_t = s.amax(dim=-1), t.amax(dim=-1)
        s_c = s - _safe(max_s)[:, None]
        t_c = t - _safe(max_t)[:, None]
        e_a = torch.exp(s_c / T)
        e_b = torch.exp(t_c / T)
        out = stats[rows]
        out[:, STAT_MAX_S] = max_s
        out[:, STAT_MAX_T] = max_t
        out[:, STAT_Z_A] = e_a.sum(dim=-1)
        out[:, STAT_Z_1] = out[:, STAT_Z_A] if T == 1.0 else torch.exp(s_c).sum(dim=-1)
        out[:, STAT_Z_B] = e_b.sum(dim=-1)
        # 0 * log 0 = 0: an entry without mass contributes nothing, even against a masked one.
        if divergence == FORWARD_KL:
            out[:, STAT_W] = _where_nonzero(e_b, t_c - s_c).sum(dim=-1)
        elif divergence == REVERSE_KL:
            out[:, STAT_W] = _where_nonzero(e_a, s_c - t_c).sum(dim=-1)
        out[:, STAT_SUM_S] = s_c.sum(dim=-1)
        out[:, STAT_COLUMNS] = vocab
        if labels is not None:
            local = labels[rows].long() - vocab_start
            hit = (local >= 0) & (local < vocab)
            logit = s_c.gather(1, torch.where(hit, local, 0)[:, None]).squeeze(1)
            out[:, STAT_LABEL_LOGIT] = torch.where(hit, logit, 0.0)
            out[:, STAT_LABEL_HIT] = hit.to(dtype)
    return stats


def combine_stats(gathered: torch.Tensor, options: LossOptions) -> RowState:
    """The rows' global statistics from every shard's (R, N, NUM_STATS) statistics.

    Each shard's sums move from its own maxima to the global ones. Every difference involved
    (mt^r - Mt, ...) subtracts two values of the same tensor, so a common 1e4 offset of the
    logits cancels before any rounding.
    """
    T = options.temperature
    max_s, max_t = gathered[..., STAT_MAX_S], gathered[..., STAT_MAX_T]
    m_s = _safe(max_s.amax(dim=0))
    m_t = _safe(max_t.amax(dim=0))
    # Raw shard maxima: a fully masked shard rescales by exp(-inf) = 0.
    scale_a = torch.exp((max_s - m_s) / T)
    scale_1 = torch.exp(max_s - m_s)
    scale_b = torch.exp((max_t - m_t) / T)
    z_a_shard, z_b_shard = gathered[..., STAT_Z_A], gathered[..., STAT_Z_B]
    z_a = (scale_a * z_a_shard).sum(dim=0)
    z_1 = (scale_1 * gathered[..., STAT_Z_1]).sum(dim=0)
    z_b = (scale_b * z_b_shard).sum(dim=0)
    shift_s = _safe(max_s) - m_s  # <= 0: from the shard's centre to the row's
    shift_t = _safe(max_t) - m_t
    sum_s = (gathered[..., STAT_SUM_S] + gathered[..., STAT_COLUMNS] * shift_s).sum(dim=0)
    log_z_a, log_z_b, log_z_1 = z_a.log(), z_b.log(), z_1.log()
    divergence = None
    if options.divergence_id == FORWARD_KL:
        # W^r moves to the global centre by its drift term. A shard whose teacher mass vanishes
        # contributes 0, even if its W is inf (masked student).
        moved = scale_b * (gathered[..., STAT_W] + (shift_t - shift_s) * z_b_shard)
        w = torch.where(scale_b * z_b_shard == 0, 0.0, moved).sum(dim=0)
        divergence = w / (z_b * T) + log_z_a - log_z_b
    elif options.divergence_id == REVERSE_KL:
        moved = scale_a * (gathered[..., STAT_W] + (shift_s - shift_t) * z_a_shard)
        w = torch.where(scale_a * z_a_shard == 0, 0.0, moved).sum(dim=0)
        divergence = w / (z_a * T) + log_z_b - log_z_a
    columns = gathered[..., STAT_COLUMNS].sum(dim=0)
    hits = gathered[..., STAT_LABEL_HIT].sum(dim=0)
    label_logit = (gathered[..., STAT_LABEL_LOGIT] + shift_s).mul(
        gathered[..., STAT_LABEL_HIT]).sum(dim=0)
    label_logit = torch.where(hits > 0, label_logit, float("nan"))
    return RowState(m_s, m_t, log_z_a, log_z_b, log_z_1, sum_s, label_logit, columns,
                    divergence)


def _log_probs(state: RowState, rows, s, t, options: LossOptions):
    T = options.temperature
    log_q = (s - state.m_s[rows, None]) / T - state.log_z_a[rows, None]
    log_p = (t - state.m_t[rows, None]) / T - state.log_z_b[rows, None]
    return log_p, log_q


def shard_divergence_sums(state: RowState, student, teacher, options: LossOptions):
    """(N, 3) sums of (f, a, b) over the shard's columns, for divergences that are not online."""
    n_rows, vocab = student.shape
    dtype = state.m_s.dtype
    sums = torch.zeros((n_rows, 3), dtype=dtype, device=student.device)
    for rows in _row_chunks(n_rows, vocab):
        log_p, log_q = _log_probs(state, rows, student[rows].to(dtype), teacher[rows].to(dtype),
                                  options)
        for column, term in enumerate(divergence_terms(log_p, log_q, options)):
            sums[rows, column] = term.sum(dim=-1)
    return sums


def row_statistics(state: RowState, sums, labels, options: LossOptions):
    """(row_stats (N, NUM_ROW_STATS), A (N,), B (N,)) from the combined state.

    `sums` are the cross-shard sums of shard_divergence_sums (None for online divergences).
    """
    T, alpha = options.temperature, options.alpha
    divergence = options.divergence_id
    if divergence in ONLINE_DIVERGENCES:
        kl = state.divergence
        # Forward KL: a = -p sums to -1; b = p (log p - log q + 1) sums to D + 1. Reverse KL
        # swaps the roles.
        one = torch.ones_like(kl)
        a_sum, b_sum = (-one, kl + 1.0) if divergence == FORWARD_KL else (kl + 1.0, -one)
    else:
        kl, a_sum, b_sum = sums.unbind(dim=1)
    lse = state.m_s + state.log_z_1
    stats = torch.empty((kl.shape[0], NUM_ROW_STATS), dtype=kl.dtype, device=kl.device)
    stats[:, ROW_DIVERGENCE] = kl
    stats[:, ROW_LSE_SQUARED] = lse * lse
    loss = alpha * T * T * kl + options.z_loss * lse * lse
    if labels is not None:
        eps = options.label_smoothing
        ce = state.log_z_1 - (1.0 - eps) * state.label_logit
        if eps > 0.0:
            ce = ce - eps * state.sum_s / state.columns
        stats[:, ROW_CE] = ce
        loss = loss + (1.0 - alpha) * ce
        stats[:, ROW_LOSS] = loss
        counted = labels.long() != options.ignore_index
        # Not 0 * stats: an ignored row's statistics may be NaN or inf.
        stats.masked_fill_(~counted[:, None], 0.0)
    else:
        stats[:, ROW_CE] = 0.0
        stats[:, ROW_LOSS] = loss
    return stats, a_sum, b_sum


class GradientCoefficients(NamedTuple):
    """Per-row factors of the stored gradient, each (N,) (see kernels/kd_loss.py):

    w dloss/ds = div (a - q A) + p1 p_s - label onehot(y) - uniform,   w dloss/dt = div (b - p B)
    """

    div: torch.Tensor  # w alpha T
    p1: torch.Tensor  # w ((1 - alpha) + 2 z lse); NaN for a label outside the vocabulary
    label: torch.Tensor  # w (1 - alpha)(1 - eps)
    uniform: torch.Tensor  # w (1 - alpha) eps / V


def gradient_coefficients(state: RowState, labels, weight, options: LossOptions):
    T, alpha, eps = options.temperature, options.alpha, options.label_smoothing
    weight = weight.to(state.m_s.dtype)
    lse = state.m_s + state.log_z_1
    div = (weight * (alpha * T)).expand_as(lse)
    p1 = weight * options.z_loss * 2.0 * lse
    zero = torch.zeros_like(lse)
    if labels is None:
        return GradientCoefficients(div, p1, zero, zero)
    coef_ce = weight * (1.0 - alpha)
    # A label outside the global vocabulary (no shard holds it) makes the row's gradient NaN, as
    # its loss.
    p1 = p1 + torch.where(state.label_logit.isnan(), float("nan"), coef_ce)
    return GradientCoefficients(div, p1, (coef_ce * (1.0 - eps)).expand_as(lse),
                                coef_ce * eps / state.columns)


def shard_grads(state: RowState, a_sum, b_sum, student, teacher, labels, weight,
                options: LossOptions, *, vocab_start: int, grad_student=None,
                grad_teacher=None) -> None:
    """w * dloss/d(shard) written into grad_student / grad_teacher (either may be None).

    grad_student may be the student shard itself (in place): each chunk is read before its
    gradient is written.
    """
    n_rows, vocab = student.shape
    dtype = state.m_s.dtype
    coef = gradient_coefficients(state, labels, weight, options)
    counted = None if labels is None else labels.long() != options.ignore_index
    for rows in _row_chunks(n_rows, vocab):
        s = student[rows].to(dtype)
        t = teacher[rows].to(dtype)
        log_p, log_q = _log_probs(state, rows, s, t, options)
        f_a_b = None
        if options.divergence_id != FORWARD_KL:
            f_a_b = divergence_terms(log_p, log_q, options)
        if grad_student is not None:
            q = log_q.exp()
            if f_a_b is None:
                g_div = q - log_p.exp()
            else:
                g_div = f_a_b[1] - _where_nonzero(q, a_sum[rows, None])
            p_1 = (s - state.m_s[rows, None] - state.log_z_1[rows, None]).exp()
            g = coef.div[rows, None] * g_div + coef.p1[rows, None] * p_1
            if labels is not None:
                g = g - coef.uniform[rows, None]
                local = labels[rows].long() - vocab_start
                hit = (local >= 0) & (local < vocab)
                g.scatter_add_(1, torch.where(hit, local, 0)[:, None],
                               (-coef.label[rows] * hit.to(dtype))[:, None])
                g = torch.where(counted[rows, None], g, 0.0)  # not 0 * g: g may hold NaN
            grad_student[rows] = g
        if grad_teacher is not None:
            p = log_p.exp()
            if f_a_b is None:
                b = _where_nonzero(p, log_p - log_q + 1.0)
            else:
                b = f_a_b[2]
            g = coef.div[rows, None] * (b - _where_nonzero(p, b_sum[rows, None]))
            if counted is not None:
                g = torch.where(counted[rows, None], g, 0.0)
            grad_teacher[rows] = g


def run_shard_steps(backend, student, teacher, labels, weight, options: LossOptions, *,
                    vocab_start: int, gather_stats, reduce_sums, grad_student=None,
                    grad_teacher=None, **backend_options):
    """Steps 1-4 above for one shard, with the exchanges supplied by the caller.

    `backend` is this module or fastkd.kernels.kd_vocab_parallel; its statistics may come as
    (N, NUM_STATS) or as (G, N, NUM_STATS) slabs of G slices. gather_stats((P, N, NUM_STATS))
    returns every part of the row (all shards' slabs: an all-gather across a vocab-parallel
    group, or nothing to add on one device); reduce_sums((N, 3)) adds the divergence sums across
    shards. Returns the (N, NUM_ROW_STATS) row statistics and fills the gradients.
    """
    stats = backend.shard_stats(student, teacher, labels, vocab_start=vocab_start,
                                options=options, **backend_options)
    state = combine_stats(gather_stats(stats if stats.dim() == 3 else stats[None]), options)
    sums = None
    if options.divergence_id not in ONLINE_DIVERGENCES:
        sums = backend.shard_divergence_sums(state, student, teacher, options,
                                             **backend_options)
        sums = reduce_sums(sums.sum(dim=0) if sums.dim() == 3 else sums)
    row_stats, a_sum, b_sum = row_statistics(state, sums, labels, options)
    if grad_student is not None or grad_teacher is not None:
        backend.shard_grads(state, a_sum, b_sum, student, teacher, labels, weight, options,
                            vocab_start=vocab_start, grad_student=grad_student,
                            grad_teacher=grad_teacher, **backend_options)
    return row_stats


def _centre_(buffer: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """buffer <- logits - rowmax(logits) (0 for a fully masked row), in the buffer's precision;
    returns the raw row maxima."""
    buffer.copy_(logits)
    row_max = buffer.amax(dim=-1, keepdim=True)
    buffer.sub_(_safe(row_max))
    return row_max


def _exp_sum_(out: torch.Tensor, centred: torch.Tensor, scale: float) -> torch.Tensor:
    """out <- exp(centred * scale); returns the row sums (the softmax normaliser)."""
    torch.mul(centred, scale, out=out)
    out.exp_()
    return out.sum(dim=-1, keepdim=True)


def _forward_kl_rows(student, teacher, labels, weight, row_stats, grad_student, grad_teacher,
                     options: LossOptions) -> None:
    """kd_rows for forward KL on one device: the same quantities as the shard steps with one
    shard, computed in a few preallocated chunk buffers that the gradient reuses (3 exp per
    element instead of 6, no fresh N x V allocations: on CPU those page-fault on every call)."""
    n_rows, vocab = student.shape
    dtype = compute_dtype(student, teacher)
    T, alpha, eps = options.temperature, options.alpha, options.label_smoothing
    inv_t = 1.0 / T
    weight = weight.to(dtype)
    chunk = max(1, min(n_rows, CHUNK_ELEMENTS // vocab))
    centred_s, centred_t, e_a, e_b, scratch = (
        torch.empty((chunk, vocab), dtype=dtype, device=student.device) for _ in range(5)
    )
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        size = rows.stop - rows.start
        d_s, d_t, ea, eb, work = (b[:size] for b in (centred_s, centred_t, e_a, e_b, scratch))
        m_s = _safe(_centre_(d_s, student[rows]))
        _centre_(d_t, teacher[rows])
        z_a = _exp_sum_(ea, d_s, inv_t)
        z_b = _exp_sum_(eb, d_t, inv_t)
        log_z_ratio = z_a.log() - z_b.log()
        # KL = sum e_b (d_t - d_s) / (T Z_b) + log Z_a - log Z_b; 0 log 0 = 0 where e_b = 0.
        torch.sub(d_t, d_s, out=work).mul_(eb).masked_fill_(eb == 0, 0.0)
        kl = work.sum(dim=-1, keepdim=True).div_(z_b).mul_(inv_t)
        kl.add_(log_z_ratio)
        if T == 1.0:
            e_1, z_1 = ea, z_a  # the divergence's student softmax is the CE one
        else:
            e_1 = work
            z_1 = _exp_sum_(e_1, d_s, 1.0)
        log_z_1 = z_1.log()
        lse = (m_s + log_z_1).squeeze(1)
        loss = alpha * T * T * kl.squeeze(1) + options.z_loss * lse * lse
        stats = row_stats[rows]
        stats[:, ROW_DIVERGENCE] = kl.squeeze(1)
        stats[:, ROW_LSE_SQUARED] = lse * lse
        counted = in_range = None
        if labels is not None:
            y = labels[rows].long()
            counted = y != options.ignore_index
            in_range = (y >= 0) & (y < vocab)
            safe_y = torch.where(in_range, y, 0)[:, None]
            # A label outside the vocabulary reads nothing and makes its row NaN.
            label_logit = torch.where(in_range, d_s.gather(1, safe_y).squeeze(1), float("nan"))
            ce = log_z_1.squeeze(1) - (1.0 - eps) * label_logit
            if eps > 0.0:
                ce = ce - eps * d_s.sum(dim=-1) / vocab
            stats[:, ROW_CE] = ce
            stats[:, ROW_LOSS] = loss + (1.0 - alpha) * ce
            stats.masked_fill_(~counted[:, None], 0.0)
        else:
            stats[:, ROW_CE] = 0.0
            stats[:, ROW_LOSS] = loss
        coef_div = weight * (alpha * T)
        if grad_teacher is not None:
            # d(T^2 KL)/dt = T p (log p - log q - KL), 0 where p = 0.
            g_t = torch.sub(d_t, d_s).mul_(inv_t).sub_(kl).add_(log_z_ratio)
            g_t.mul_(eb).div_(z_b).mul_(coef_div)
            g_t.masked_fill_(eb == 0, 0.0)
            if counted is not None:
                g_t[~counted] = 0.0
            grad_teacher[rows] = g_t
        if grad_student is not None:
            coef_p1 = weight * 2.0 * options.z_loss * lse[:, None]
            if labels is not None:
                coef_p1 = coef_p1 + weight * (1.0 - alpha)
            if T == 1.0:
                # e_1 is e_a: take the CE softmax before e_a becomes the gradient.
                work.copy_(ea)
                e_1 = work
            # a T (q - p) + ((1 - a) + 2 z lse) p_s - (1 - a)((1 - eps) onehot + eps / V)
            g_s = ea.div_(z_a).sub_(eb.div_(z_b)).mul_(coef_div)
            g_s.add_(e_1.div_(z_1).mul_(coef_p1))
            if labels is not None:
                coef_ce = weight * (1.0 - alpha)
                if eps > 0.0:
                    g_s.sub_(coef_ce * eps / vocab)
                onehot = (-(1.0 - eps) * coef_ce * in_range.to(dtype))[:, None]
                g_s.scatter_add_(1, safe_y, onehot.expand(size, 1))
                g_s[~in_range] = float("nan")
                g_s[~counted] = 0.0  # not 0 * g: g may hold NaN
            grad_student[rows] = g_s


def per_batch(rows_fn, student, teacher, labels, weight, row_stats, grad_student, grad_teacher,
              options: LossOptions) -> None:
    """Run a 2-D rows function (the kd_rows contract) on (B, L, V) logits one batch at a time:
    each (L, V) slice is a view, so sliced batches are not copied to (N, V)."""
    rows = student.shape[1]
    for b in range(student.shape[0]):
        flat = slice(b * rows, (b + 1) * rows)
        rows_fn(student[b], teacher[b], labels[flat] if labels is not None else None, weight,
                row_stats[flat], grad_student[flat] if grad_student is not None else None,
                grad_teacher[flat] if grad_teacher is not None else None, options)


def kd_rows(student, teacher, labels, weight, row_stats, grad_student, grad_teacher,
            options: LossOptions) -> None:
    """The single-device loss: every step above with one shard, chunk by chunk.

    Fills row_stats (N, NUM_ROW_STATS) and the gradients (N, V) that are not None, in place.
    (B, L, V) logits go batch by batch, each an (L, V) view: nothing is copied to (N, V).
    """
    if student.dim() == 3:
        per_batch(kd_rows, student, teacher, labels, weight, row_stats, grad_student,
                  grad_teacher, options)
        return
    if options.divergence_id == FORWARD_KL:
        _forward_kl_rows(student, teacher, labels, weight, row_stats, grad_student, grad_teacher,
                         options)
        return
    n_rows, vocab = student.shape
    for rows in _row_chunks(n_rows, vocab):
        s, t = student[rows], teacher[rows]
        y = labels[rows] if labels is not None else None
        stats = shard_stats(s, t, y, vocab_start=0, options=options)
        state = combine_stats(stats[None], options)
        sums = None
        if options.divergence_id not in ONLINE_DIVERGENCES:
            sums = shard_divergence_sums(state, s, t, options)
        stats_out, a_sum, b_sum = row_statistics(state, sums, y, options)
        row_stats[rows] = stats_out
        shard_grads(state, a_sum, b_sum, s, t, y, weight, options, vocab_start=0,
                    grad_student=grad_student[rows] if grad_student is not None else None,
                    grad_teacher=grad_teacher[rows] if grad_teacher is not None else None)


def mean_weight(labels: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(count of labels != ignore_index, 1), a 0-d `dtype` tensor (fastkd._ops)."""
    return (labels != ignore_index).sum().clamp(min=1).to(dtype).reciprocal()


def sum_row_stats(row_stats: torch.Tensor, weight: torch.Tensor,
                  apply_weight: bool) -> torch.Tensor:
    """Column sums of the row statistics, times weight when apply_weight (fastkd._ops)."""
    totals = row_stats.sum(dim=0)
    return totals * weight.to(totals.dtype) if apply_weight else totals


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad (N, V) *= grad_output, in place; grad_output is a scalar or has N elements."""
    factor = grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)
    return grad.mul_(factor.to(grad.dtype))
