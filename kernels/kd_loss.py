"""Fused knowledge-distillation loss: Triton kernels and their launchers.

Forward KL is derived below; the other divergences (reverse KL, JSD, TVD, skew KL) share its
statistics and are derived in kernels/divergences.py. The loss of a counted row is

    loss = a * T^2 * D + (1 - a) * CE + z * lse(s)^2,
    CE   = lse(s) - (1 - eps) s[y] - (eps / V) sum_v s_v      (label smoothing eps)

with gradients dCE/ds = p_s - (1 - eps) onehot(y) - eps / V and d(lse^2)/ds = 2 lse p_s.

Math of forward KL (one row i; s, t are the student's and teacher's logits over V classes, T the
temperature, a the mixing weight alpha, y the label, w the reduction weight of the row):

    p_s^T = softmax(s / T)      p_t^T = softmax(t / T)      p_s = softmax(s)
    KL    = sum_v p_t^T(v) * (log p_t^T(v) - log p_s^T(v))            (0 * log 0 = 0)
    CE    = logsumexp(s) - s[y]
    loss  = a * T^2 * KL + (1 - a) * CE

Write m_s = max(s), m_t = max(t), Z_a = sum exp((s - m_s) / T), Z_b = sum exp((t - m_t) / T),
Z_1 = sum exp(s - m_s). Then log p_s^T = (s - m_s) / T - log Z_a,
log p_t^T = (t - m_t) / T - log Z_b and

    KL = sum_v p_t^T(v) * ((t_v - m_t) - (s_v - m_s)) / T - log Z_b + log Z_a

which the kernel accumulates in one streaming sweep with online rescaling of Z_a, Z_b, Z_1 and of
the weighted sum W = sum exp((t - m_t) / T) * ((t - m_t) - (s - m_s)), so KL = W / (T Z_b) - log Z_b
+ log Z_a. Centring each logit on its own running maximum keeps the summands small: logits shifted
by 1e4 lose no precision. When a block raises the maxima, W moves to the new centre exactly:
W <- (W + Z_b * ((m_t_old - m_t) - (m_s_old - m_s))) * exp((m_t_old - m_t) / T).

Gradients. d log p_s^T(v) / d s_u = (delta_uv - p_s^T(u)) / T, so
    d(T^2 KL)/ds = T * (p_s^T - p_t^T),        dCE/ds = p_s - onehot(y)
    dloss/ds     = a * T * (p_s^T - p_t^T) + (1 - a) * (p_s - onehot(y))
and for mutual distillation (teacher requires grad), with d p_t^T(v) / d t_u = p_t^T(v) (delta_uv -
p_t^T(u)) / T:
    d(T^2 KL)/dt = T * p_t^T * (log p_t^T - log p_s^T - KL)
Both are multiplied by w (1, 1/counted rows for "mean", 1/batch for "batchmean") and by
grad_output. The forward launch writes w * dloss/ds while the row is hot, so backward only scales
by grad_output, and skips even that when grad_output == 1 (decided on the device).

Memory traffic per row of V elements (e = element size):
    V <= MAX_ON_CHIP_V (8192): one read of s and t, one write of the gradient: 3 V e  (the floor).
    larger V: sweep 1 reads s and t (2 V e); sweep 2 reads them again in reverse block order, so its
    first blocks are the ones sweep 1 touched last and still sit in L2, and writes the gradient:
    between 3 V e (all L2 hits) and 5 V e (none).
Without a student gradient the write disappears (2 V e). Ignored rows read nothing and only write
zeros to the gradient. Exponentials per element: 3 for on-chip rows (reused for the gradient),
3 per sweep for longer rows (2 when T == 1, where p_s = p_s^T).

Reverse KL accumulates its D online like forward KL (W weighted by the student instead of the
teacher), so it keeps the same traffic. JSD, TVD and the skew divergences need the row sums
A = sum q df/dq and B = sum p df/dp after the final normalisers are known and before the first
gradient store: on-chip rows still read once, but longer rows take three sweeps (statistics, the
sums, the gradient): between 3 V e and 7 V e of traffic, 2 log and 2-3 exp more per element.
Label smoothing adds the row sum of the centred student logits to the first sweep; the z-loss
reuses the CE softmax. The (N, 4) row statistics (loss, D, CE, lse^2) cost 16 bytes per row.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _torch_backend
from .._spec import LossOptions
from .divergences import FORWARD_KL, REVERSE_KL, divergence_terms, online_row_sums

# Rows up to this many classes are held in registers: read once, no second sweep. Compiled for
# sm_90a, 8192 classes over 16 warps (16 values per thread and operand) take 84-111 registers and
# no spill stack in every flag combination; 16384 classes spill (up to 384 bytes of stack) as soon
# as the teacher also needs a gradient, and 32768 always (see `fastkd-bench --static`).
MAX_ON_CHIP_V = 8192
# Block of the two-sweep loop for longer rows: 4096 elements over 8 warps gives 16 elements per
# thread per operand, 16-byte vector loads for bf16/fp32, and enough bytes in flight per SM.
LOOP_BLOCK_V = 4096
LOOP_NUM_WARPS = 8
# Backward scaling is a pure stream: 4096-wide blocks over 4 warps (32 elements per thread).
SCALE_BLOCK_V = 4096
SCALE_NUM_WARPS = 4

# Statistics slot of the long-row sweep: 8 contiguous elements of one thread (one 16-byte load
# in bf16, two in fp32), reduced in registers; the running maxima rescale once per slot.
SLOT = tl.constexpr(8)
# Integer temperatures up to this one get the CE softmax's exponentials as powers of the
# T-softmax's ones (exp(d) = exp(d / T)^T): one exp2 fewer per element and sweep.
MAX_POWER_TEMPERATURE = 4

# Kernels work in base 2 (exp2/log2 are the native SFU ops); these convert from and to base e.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _safe_max(m):
    # Online softmax rescales by exp(m_old - m_new); with every entry seen so far at -inf that is
    # exp(-inf + inf) = NaN. Shifting by 0 instead gives exp(-inf) = 0, the right contribution.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS: tl.constexpr):
    """(label as int64, whether the row counts); without labels every row counts."""
    if HAS_LABELS:
        label = tl.load(labels_ptr + row * labels_stride).to(tl.int64)
        counted = label != ignore_index
    else:
        label = tl.full((), -1, tl.int64)
        counted = tl.full((), 1, tl.int1)
    return label, counted


@triton.jit
def _power(x, T_POWER: tl.constexpr):
    """x ** T for the integer temperatures 2, 3, 4: exp(d)^T = exp(T d) costs no exp2."""
    if T_POWER == 2:
        return x * x
    elif T_POWER == 3:
        return x * x * x
    else:
        x_2 = x * x
        return x_2 * x_2


@triton.jit
def _slot_update(
    s, t, mask, max_s, max_t, z_a, z_b, z_1, w_sum, sum_s, count, k_t,
    DIVERGENCE: tl.constexpr, T_POWER: tl.constexpr, SMOOTHING: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Fold one [SLOTS, SLOT] tile into the per-slot running statistics ([SLOTS] each).

    Each slot is one thread's contiguous SLOT elements, so the reductions over axis 1 stay in
    registers: no shuffle or barrier inside the loop. A slot whose maximum rises moves its sums
    to the new centre (the rescale is one exp2 per slot, 1/SLOT per element).
    """
    max_s_new = tl.maximum(max_s, tl.max(s, axis=1))
    max_t_new = tl.maximum(max_t, tl.max(t, axis=1))
    m_s = _safe_max(max_s_new)
    m_t = _safe_max(max_t_new)
    # From the raw old maxima: a slot that has seen only -inf rescales by exp2(-inf) = 0.
    rescale_a = tl.exp2((max_s - m_s) * k_t)
    rescale_t = tl.exp2((max_t - m_t) * k_t)
    d_s = s - m_s[:, None]
    d_t = t - m_t[:, None]
    e_a = tl.exp2(d_s * k_t)
    e_b = tl.exp2(d_t * k_t)
    drift = (_safe_max(max_t) - m_t) - (_safe_max(max_s) - m_s)
    if DIVERGENCE == FORWARD_KL:
        w_sum = (w_sum + z_b * drift) * rescale_t
        w_sum += tl.sum(tl.where(e_b == 0.0, 0.0, e_b * (d_t - d_s)), axis=1)
    elif DIVERGENCE == REVERSE_KL:
        w_sum = (w_sum - z_a * drift) * rescale_a
        w_sum += tl.sum(tl.where(e_a == 0.0, 0.0, e_a * (d_s - d_t)), axis=1)
    if T_POWER == 0:
        z_1 = z_1 * tl.exp2((max_s - m_s) * LOG2E) + tl.sum(tl.exp2(d_s * LOG2E), axis=1)
    elif T_POWER > 1:
        z_1 = z_1 * _power(rescale_a, T_POWER) + tl.sum(_power(e_a, T_POWER), axis=1)
    z_a = z_a * rescale_a + tl.sum(e_a, axis=1)
    z_b = z_b * rescale_t + tl.sum(e_b, axis=1)
    if SMOOTHING:
        sum_s = sum_s + count * (_safe_max(max_s) - m_s)
        if MASKED:
            sum_s += tl.sum(tl.where(mask, d_s, 0.0), axis=1)
            count += tl.sum(mask.to(tl.float32), axis=1)
        else:
            sum_s += tl.sum(d_s, axis=1)
            count += s.shape[1]
    return max_s_new, max_t_new, z_a, z_b, z_1, w_sum, sum_s, count


@triton.jit
def _combine_partials(
    max_s, max_t, z_a, z_b, z_1, w_sum, sum_s, count, k_t,
    DIVERGENCE: tl.constexpr, T_POWER: tl.constexpr,
):
    """The row's statistics from partial ones over disjoint parts of the row (vectors).

    The same move as the vocab-parallel combination (fastkd._torch_backend.combine_stats): each
    part's sums go from its own maxima to the row's, and every difference involved subtracts two
    values of one tensor, so a common 1e4 offset of the logits costs no precision. Returns the
    raw maxima and Z_a, Z_b, Z_1, W, sum(s - m_s) relative to the safe ones.
    """
    row_max_s = tl.max(max_s, axis=0)
    row_max_t = tl.max(max_t, axis=0)
    m_s = _safe_max(row_max_s)
    m_t = _safe_max(row_max_t)
    scale_a = tl.exp2((max_s - m_s) * k_t)
    scale_b = tl.exp2((max_t - m_t) * k_t)
    shift_s = _safe_max(max_s) - m_s
    shift_t = _safe_max(max_t) - m_t
    if DIVERGENCE == FORWARD_KL:
        moved = scale_b * (w_sum + (shift_t - shift_s) * z_b)
        w_row = tl.sum(tl.where(scale_b * z_b == 0.0, 0.0, moved), axis=0)
    elif DIVERGENCE == REVERSE_KL:
        moved = scale_a * (w_sum + (shift_s - shift_t) * z_a)
        w_row = tl.sum(tl.where(scale_a * z_a == 0.0, 0.0, moved), axis=0)
    else:
        w_row = tl.zeros((), tl.float32)
    if T_POWER == 0:
        z_1_row = tl.sum(tl.exp2((max_s - m_s) * LOG2E) * z_1, axis=0)
    elif T_POWER == 1:
        z_1_row = tl.sum(scale_a * z_a, axis=0)
    else:
        z_1_row = tl.sum(_power(scale_a, T_POWER) * z_1, axis=0)
    z_a_row = tl.sum(scale_a * z_a, axis=0)
    z_b_row = tl.sum(scale_b * z_b, axis=0)
    sum_s_row = tl.sum(sum_s + count * shift_s, axis=0)
    return row_max_s, row_max_t, z_a_row, z_b_row, z_1_row, w_row, sum_s_row


@triton.jit
def _row_stats_sweep(
    s_row, student_col_stride, t_row, teacher_col_stride, V, k_t,
    DIVERGENCE: tl.constexpr, T_POWER: tl.constexpr, SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One streaming sweep over a row (or a vocabulary shard of it): the online statistics.

    Returns the raw maxima max_s, max_t (-inf while every logit seen is -inf), Z_a, Z_b, Z_1
    relative to their safe versions, W centred on them (forward KL: weighted by the teacher;
    reverse KL: by the student; 0 otherwise) and the centred logit sum sum(s - m_s) (label
    smoothing only). Statistics run per slot of SLOT elements and combine once at the end; full
    blocks load without a mask, the tail block with one.
    """
    SLOTS: tl.constexpr = BLOCK_V // SLOT
    tile = tl.arange(0, SLOTS)[:, None] * SLOT + tl.arange(0, SLOT)[None, :]
    neg_inf = float("-inf")
    max_s = tl.full((SLOTS,), neg_inf, tl.float32)
    max_t = tl.full((SLOTS,), neg_inf, tl.float32)
    z_a = tl.zeros((SLOTS,), tl.float32)
    z_b = tl.zeros((SLOTS,), tl.float32)
    z_1 = tl.zeros((SLOTS,), tl.float32)
    w_sum = tl.zeros((SLOTS,), tl.float32)
    sum_s = tl.zeros((SLOTS,), tl.float32)
    count = tl.zeros((SLOTS,), tl.float32)
    full_end = (V // BLOCK_V) * BLOCK_V
    for start in range(0, full_end, BLOCK_V):
        offs = start + tile
        s = tl.load(s_row + offs * student_col_stride).to(tl.float32)
        t = tl.load(t_row + offs * teacher_col_stride).to(tl.float32)
        max_s, max_t, z_a, z_b, z_1, w_sum, sum_s, count = _slot_update(
            s, t, offs < V, max_s, max_t, z_a, z_b, z_1, w_sum, sum_s, count, k_t,
            DIVERGENCE, T_POWER, SMOOTHING, False,
        )
    if full_end < V:
        offs = full_end + tile
        mask = offs < V
        s = tl.load(s_row + offs * student_col_stride, mask=mask, other=neg_inf).to(tl.float32)
        t = tl.load(t_row + offs * teacher_col_stride, mask=mask, other=neg_inf).to(tl.float32)
        max_s, max_t, z_a, z_b, z_1, w_sum, sum_s, count = _slot_update(
            s, t, mask, max_s, max_t, z_a, z_b, z_1, w_sum, sum_s, count, k_t,
            DIVERGENCE, T_POWER, SMOOTHING, True,
        )
    return _combine_partials(max_s, max_t, z_a, z_b, z_1, w_sum, sum_s, count, k_t,
                             DIVERGENCE, T_POWER)


@triton.jit
def _log_probs(s, t, m_s, m_t, log2_za, log2_zb, k_t):
    """(log p, log q, p, q) of a block at T from the row's final statistics."""
    log2_q = (s - m_s) * k_t - log2_za
    log2_p = (t - m_t) * k_t - log2_zb
    return log2_p * LN2, log2_q * LN2, tl.exp2(log2_p), tl.exp2(log2_q)


@triton.jit
def _divergence_sums_sweep(
    s_row, student_col_stride, t_row, teacher_col_stride, V,
    m_s, m_t, log2_za, log2_zb, k_t, lam, log_lam, log_1m_lam,
    DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """(D, A, B) of a row (or shard) from its final statistics: the extra sweep of long rows."""
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    d_sum = tl.zeros((), tl.float32)
    a_sum = tl.zeros((), tl.float32)
    b_sum = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        s = tl.load(s_row + offs * student_col_stride, mask=mask, other=neg_inf).to(tl.float32)
        t = tl.load(t_row + offs * teacher_col_stride, mask=mask, other=neg_inf).to(tl.float32)
        log_p, log_q, p, q = _log_probs(s, t, m_s, m_t, log2_za, log2_zb, k_t)
        f, a, b = divergence_terms(log_p, log_q, p, q, lam, log_lam, log_1m_lam, DIVERGENCE)
        d_sum += tl.sum(f, axis=0)
        a_sum += tl.sum(a, axis=0)
        b_sum += tl.sum(b, axis=0)
    return d_sum, a_sum, b_sum


@triton.jit
def _block_grads(
    s, t, p, q, p_1, a, b, cols, label, m_s, m_t, log2_za, log2_zb, divergence, a_sum, b_sum,
    inv_t, coef_div, coef_p1, coef_label, coef_uniform,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, ONEHOT: tl.constexpr,
    SMOOTHING: tl.constexpr, TEACHER_GRAD: tl.constexpr,
):
    """w * dloss/ds and w * dloss/dt of one block from the row's final statistics.

    coef_div = w a T, coef_p1 = w ((1 - a) + 2 z lse), coef_label = w (1 - a)(1 - eps),
    coef_uniform = w (1 - a) eps / V; a and b are the divergence terms of the block (unused for
    forward KL, whose gradient is the plain q - p). ONEHOT subtracts coef_label at the label's
    column here; without it the caller stores that one element itself.
    """
    if DIVERGENCE == FORWARD_KL:
        grad_s = coef_div * (q - p) + coef_p1 * p_1
    else:
        grad_s = coef_div * (a - tl.where(q == 0.0, 0.0, q * a_sum)) + coef_p1 * p_1
    if HAS_LABELS:
        if ONEHOT:
            grad_s -= tl.where(cols == label, coef_label, 0.0)
        if SMOOTHING:
            grad_s -= coef_uniform
    if TEACHER_GRAD:
        if DIVERGENCE == FORWARD_KL:
            log_ratio = ((t - m_t) - (s - m_s)) * inv_t - LN2 * (log2_zb - log2_za)
            grad_t = tl.where(p == 0.0, 0.0, coef_div * p * (log_ratio - divergence))
        else:
            grad_t = coef_div * (b - tl.where(p == 0.0, 0.0, p * b_sum))
    else:
        grad_t = grad_s
    return grad_s, grad_t


@triton.jit
def _store_grads(
    gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, offs, mask, grad_s, grad_t,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, MASKED: tl.constexpr,
):
    """Store a block's gradients in their buffers' dtypes (unmasked for full blocks)."""
    if STUDENT_GRAD:
        if MASKED:
            tl.store(gs_row + offs * grad_s_col_stride, grad_s.to(gs_row.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(gs_row + offs * grad_s_col_stride, grad_s.to(gs_row.dtype.element_ty))
    if TEACHER_GRAD:
        if MASKED:
            tl.store(gt_row + offs * grad_t_col_stride, grad_t.to(gt_row.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(gt_row + offs * grad_t_col_stride, grad_t.to(gt_row.dtype.element_ty))


@triton.jit
def _grad_values(
    s, t, offs, label, m_s, m_t, log2_za, log2_zb, log2_z1, divergence, a_sum, b_sum, inv_t,
    k_t, lam, log_lam, log_1m_lam, coef_div, coef_p1, coef_label, coef_uniform,
    DIVERGENCE: tl.constexpr, T_POWER: tl.constexpr, HAS_LABELS: tl.constexpr,
    ONEHOT: tl.constexpr, SMOOTHING: tl.constexpr, TEACHER_GRAD: tl.constexpr,
):
    """Gradients of a block (or one element) of logits from the row's statistics. For
    T_POWER >= 2 coef_p1 already carries the CE softmax's scale (see _grad_sweep)."""
    if DIVERGENCE == FORWARD_KL:
        q = tl.exp2((s - m_s) * k_t - log2_za)
        p = tl.exp2((t - m_t) * k_t - log2_zb)
        a = q
        b = p
    else:
        log_p, log_q, p, q = _log_probs(s, t, m_s, m_t, log2_za, log2_zb, k_t)
        _, a, b = divergence_terms(log_p, log_q, p, q, lam, log_lam, log_1m_lam, DIVERGENCE)
    if T_POWER == 1:
        p_1 = q
    elif T_POWER == 0:
        p_1 = tl.exp2((s - m_s) * LOG2E - log2_z1)
    else:
        p_1 = _power(q, T_POWER)
    return _block_grads(
        s, t, p, q, p_1, a, b, offs, label, m_s, m_t, log2_za, log2_zb, divergence, a_sum,
        b_sum, inv_t, coef_div, coef_p1, coef_label, coef_uniform,
        DIVERGENCE, HAS_LABELS, ONEHOT, SMOOTHING, TEACHER_GRAD,
    )


@triton.jit
def _grad_block(
    s_row, student_col_stride, t_row, teacher_col_stride,
    gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, offs, mask, label,
    m_s, m_t, log2_za, log2_zb, log2_z1, divergence, a_sum, b_sum, inv_t, k_t,
    lam, log_lam, log_1m_lam, coef_div, coef_p1, coef_label, coef_uniform,
    DIVERGENCE: tl.constexpr, T_POWER: tl.constexpr, HAS_LABELS: tl.constexpr,
    SMOOTHING: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Load one block, compute its gradients (without the one-hot term), store them."""
    neg_inf = float("-inf")
    if MASKED:
        s = tl.load(s_row + offs * student_col_stride, mask=mask, other=neg_inf).to(tl.float32)
        t = tl.load(t_row + offs * teacher_col_stride, mask=mask, other=neg_inf).to(tl.float32)
    else:
        s = tl.load(s_row + offs * student_col_stride).to(tl.float32)
        t = tl.load(t_row + offs * teacher_col_stride).to(tl.float32)
    grad_s, grad_t = _grad_values(
        s, t, offs, label, m_s, m_t, log2_za, log2_zb, log2_z1, divergence, a_sum, b_sum, inv_t,
        k_t, lam, log_lam, log_1m_lam, coef_div, coef_p1, coef_label, coef_uniform,
        DIVERGENCE, T_POWER, HAS_LABELS, False, SMOOTHING, TEACHER_GRAD,
    )
    _store_grads(gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, offs, mask, grad_s,
                 grad_t, STUDENT_GRAD, TEACHER_GRAD, MASKED)


@triton.jit
def _grad_sweep(
    s_row, student_col_stride, t_row, teacher_col_stride,
    gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V, label,
    m_s, m_t, log2_za, log2_zb, log2_z1, divergence, a_sum, b_sum, inv_t,
    lam, log_lam, log_1m_lam, coef_div, coef_p1, coef_label, coef_uniform,
    DIVERGENCE: tl.constexpr, T_POWER: tl.constexpr, HAS_LABELS: tl.constexpr,
    SMOOTHING: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Last sweep over a row (or shard): gradients from the final statistics, stored.

    Last block first (the masked tail, then the full blocks unmasked, backwards): those bytes
    were read most recently by the previous sweep and are the likeliest to still be in L2.
    """
    cols = tl.arange(0, BLOCK_V)
    k_t = inv_t * LOG2E
    if T_POWER >= 2:
        # p_s = exp(d) / Z_1 = (q Z_a)^T / Z_1 = q^T (Z_a^T / Z_1): the row constant goes into
        # the coefficient, so a block spends no exp2 and no multiply on it.
        coef_p1 = coef_p1 * tl.exp2(T_POWER * log2_za - log2_z1)
    FIX_LABEL: tl.constexpr = HAS_LABELS and STUDENT_GRAD
    if FIX_LABEL:
        # The one-hot term: instead of a compare and select per element, the label's element is
        # stored once more, with it, after the sweep. Its logits are read first: the sweep may
        # write the gradient over them (in place).
        label_in_range = (label >= 0) & (label < V)
        s_label = tl.load(s_row + label * student_col_stride, mask=label_in_range,
                          other=0.0).to(tl.float32)
        t_label = tl.load(t_row + label * teacher_col_stride, mask=label_in_range,
                          other=0.0).to(tl.float32)
    full_blocks = V // BLOCK_V
    if full_blocks * BLOCK_V < V:
        offs = full_blocks * BLOCK_V + cols
        _grad_block(
            s_row, student_col_stride, t_row, teacher_col_stride,
            gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, offs, offs < V, label,
            m_s, m_t, log2_za, log2_zb, log2_z1, divergence, a_sum, b_sum, inv_t,
            k_t, lam, log_lam, log_1m_lam, coef_div, coef_p1, coef_label, coef_uniform,
            DIVERGENCE, T_POWER, HAS_LABELS, SMOOTHING, STUDENT_GRAD, TEACHER_GRAD, True,
        )
    for k in range(0, full_blocks):
        offs = (full_blocks - 1 - k) * BLOCK_V + cols
        _grad_block(
            s_row, student_col_stride, t_row, teacher_col_stride,
            gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, offs, offs < V, label,
            m_s, m_t, log2_za, log2_zb, log2_z1, divergence, a_sum, b_sum, inv_t,
            k_t, lam, log_lam, log_1m_lam, coef_div, coef_p1, coef_label, coef_uniform,
            DIVERGENCE, T_POWER, HAS_LABELS, SMOOTHING, STUDENT_GRAD, TEACHER_GRAD, False,
        )
    if FIX_LABEL:
        grad_label, _ = _grad_values(
            s_label, t_label, label, label, m_s, m_t, log2_za, log2_zb, log2_z1, divergence,
            a_sum, b_sum, inv_t, k_t, lam, log_lam, log_1m_lam, coef_div, coef_p1, coef_label,
            coef_uniform, DIVERGENCE, T_POWER, HAS_LABELS, True, SMOOTHING, False,
        )
        # Orders this store after the sweep's store of the same element by another thread.
        tl.debug_barrier()
        tl.store(gs_row + label * grad_s_col_stride, grad_label.to(gs_row.dtype.element_ty),
                 mask=label_in_range)


@triton.jit
def _store_zero_grads(
    gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """An ignored row's gradients: zeros, written without reading its logits."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        if STUDENT_GRAD:
            tl.store(gs_row + offs * grad_s_col_stride,
                     tl.zeros((BLOCK_V,), gs_row.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            tl.store(gt_row + offs * grad_t_col_stride,
                     tl.zeros((BLOCK_V,), gt_row.dtype.element_ty), mask=mask)


@triton.jit
def _store_row_stats(stats_row, row_loss, divergence, ce, lse):
    """The (N, 4) row statistics' columns: loss, D, CE, lse^2 (fastkd._spec.ROW_*)."""
    tl.store(stats_row, row_loss)
    tl.store(stats_row + 1, divergence)
    tl.store(stats_row + 2, ce)
    tl.store(stats_row + 3, lse * lse)


@triton.jit
def _label_logit(s_row, student_col_stride, label, V, HAS_LABELS: tl.constexpr):
    """(s[label], label in [0, V)). Out-of-range labels never touch memory; their NaN makes the
    caller's bug visible."""
    s_label = tl.full((), float("nan"), tl.float32)
    in_range = tl.full((), 1, tl.int1)  # without labels nothing is out of range
    if HAS_LABELS:
        in_range = (label >= 0) & (label < V)
        s_label = tl.load(s_row + label * student_col_stride, mask=in_range,
                          other=float("nan")).to(tl.float32)
    return s_label, in_range


@triton.jit
def _row_loss_terms(
    s_row, student_col_stride, label, V, m_s, log2_z1, sum_s, divergence, temperature, alpha,
    label_smoothing, z_loss, HAS_LABELS: tl.constexpr, SMOOTHING: tl.constexpr,
):
    """(loss, CE, lse, label in range) of a counted row from its statistics and D."""
    s_label, in_range = _label_logit(s_row, student_col_stride, label, V, HAS_LABELS)
    row_loss, ce, lse, _, _, _, _ = _row_loss_and_coefficients(
        s_label, in_range, V, m_s, log2_z1, sum_s, divergence, 1.0, temperature, alpha,
        label_smoothing, z_loss, HAS_LABELS, SMOOTHING,
    )
    return row_loss, ce, lse, in_range


@triton.jit
def _row_loss_and_coefficients(
    s_label, in_range, V, m_s, log2_z1, sum_s, divergence, weight, temperature, alpha,
    label_smoothing, z_loss, HAS_LABELS: tl.constexpr, SMOOTHING: tl.constexpr,
):
    """The row's (loss, CE, lse) and the coefficients of its stored gradient (_block_grads):
    coef_div = w a T, coef_p1 = w ((1 - a) + 2 z lse), coef_label = w (1 - a)(1 - eps),
    coef_uniform = w (1 - a) eps / V."""
    lse = m_s + LN2 * log2_z1
    row_loss = alpha * temperature * temperature * divergence + z_loss * lse * lse
    ce = tl.zeros((), tl.float32)
    coef_div = weight * alpha * temperature
    coef_p1 = weight * 2.0 * z_loss * lse
    coef_label = tl.zeros((), tl.float32)
    coef_uniform = tl.zeros((), tl.float32)
    if HAS_LABELS:
        ce = LN2 * log2_z1 - (1.0 - label_smoothing) * (s_label - m_s)
        if SMOOTHING:
            ce -= label_smoothing * sum_s / V
        row_loss += (1.0 - alpha) * ce
        coef_ce = weight * (1.0 - alpha)
        # A label outside the vocabulary makes the whole row's gradient NaN, as its loss.
        coef_p1 += tl.where(in_range, coef_ce, float("nan"))
        coef_label = coef_ce * (1.0 - label_smoothing)
        coef_uniform = coef_ce * label_smoothing / V
    return row_loss, ce, lse, coef_div, coef_p1, coef_label, coef_uniform


@triton.jit
def _kd_loss_fwd_kernel(
    # Logits as (B, L, V) with any strides and dtype (N = B L rows; 2-D inputs are B = 1): a
    # sliced batch such as logits[:, :-1] is read in place, never copied to (N, V) first.
    student_ptr, student_batch_stride, student_row_stride, student_col_stride,
    teacher_ptr, teacher_batch_stride, teacher_row_stride, teacher_col_stride,
    rows_per_batch,  # L
    labels_ptr, labels_stride,  # (N,) integer class ids; unused without HAS_LABELS
    weight_ptr,  # () reduction weight w: 1, 1/batch or 1/(counted rows)
    row_stats_ptr, row_stats_stride,  # (N, 4) fp32 out: loss, D, CE, lse^2; 0 for ignored rows
    grad_s_ptr, grad_s_row_stride, grad_s_col_stride,  # (N, V) out; may alias the student
    grad_t_ptr, grad_t_row_stride, grad_t_col_stride,  # (N, V) out
    V,  # vocabulary size, >= 1
    # Runtime scalars: changing them does not recompile. lam is beta (JSD) or the skew.
    temperature, alpha, lam, label_smoothing, z_loss, ignore_index,
    DIVERGENCE: tl.constexpr,  # index into fastkd._spec.DIVERGENCES
    HAS_LABELS: tl.constexpr,
    # 1: T == 1, the CE softmax is the divergence's student one; 2-4: integer T, the CE
    # exponentials are powers of the T ones; 0: any other T (one more exp2 per element).
    T_POWER: tl.constexpr,
    SMOOTHING: tl.constexpr,  # label_smoothing > 0: one more row sum
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    ON_CHIP: tl.constexpr,  # V <= BLOCK_V: keep the row in registers, read it once
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: N * V can exceed 2^31
    batch = row // rows_per_batch
    position = row - batch * rows_per_batch
    s_row = student_ptr + batch * student_batch_stride + position * student_row_stride
    t_row = teacher_ptr + batch * teacher_batch_stride + position * teacher_row_stride
    gs_row = grad_s_ptr + row * grad_s_row_stride
    gt_row = grad_t_ptr + row * grad_t_row_stride
    stats_row = row_stats_ptr + row * row_stats_stride
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    inv_t = 1.0 / temperature
    k_t = inv_t * LOG2E
    # Only JSD and the skew divergences read these; lam lies strictly inside (0, 1) there.
    log_lam = tl.log(tl.maximum(lam, 1e-30))
    log_1m_lam = tl.log(tl.maximum(1.0 - lam, 1e-30))
    ONLINE: tl.constexpr = (DIVERGENCE == FORWARD_KL) or (DIVERGENCE == REVERSE_KL)

    label, counted = _row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if counted:
        weight = tl.load(weight_ptr).to(tl.float32)
        a_sum = tl.zeros((), tl.float32)
        b_sum = tl.zeros((), tl.float32)
        if ON_CHIP:
            mask = cols < V
            s = tl.load(s_row + cols * student_col_stride, mask=mask, other=neg_inf).to(
                tl.float32)
            t = tl.load(t_row + cols * teacher_col_stride, mask=mask, other=neg_inf).to(
                tl.float32)
            m_s = _safe_max(tl.max(s, axis=0))
            m_t = _safe_max(tl.max(t, axis=0))
            # The exponentials stay in registers and become the probabilities of the gradient:
            # 3 exp2 per element for forward KL (2 when T == 1).
            e_a = tl.exp2((s - m_s) * k_t)
            e_b = tl.exp2((t - m_t) * k_t)
            z_a = tl.sum(e_a, axis=0)
            z_b = tl.sum(e_b, axis=0)
            if T_POWER == 1:
                e_1 = e_a
            elif T_POWER == 0:
                e_1 = tl.exp2((s - m_s) * LOG2E)
            else:
                e_1 = _power(e_a, T_POWER)
            z_1 = tl.sum(e_1, axis=0)
            sum_s = tl.zeros((), tl.float32)
            if SMOOTHING:
                sum_s = tl.sum(tl.where(mask, s - m_s, 0.0), axis=0)
            log2_za = tl.log2(z_a)
            log2_zb = tl.log2(z_b)
            q = e_a * (1.0 / z_a)
            p = e_b * (1.0 / z_b)
            if DIVERGENCE == FORWARD_KL:
                w_sum = tl.sum(tl.where(e_b == 0.0, 0.0, e_b * ((t - m_t) - (s - m_s))), axis=0)
                divergence = (w_sum / z_b) * inv_t + LN2 * (log2_za - log2_zb)
                a = q
                b = p
            else:
                log_p = ((t - m_t) * k_t - log2_zb) * LN2
                log_q = ((s - m_s) * k_t - log2_za) * LN2
                f, a, b = divergence_terms(log_p, log_q, p, q, lam, log_lam, log_1m_lam,
                                           DIVERGENCE)
                divergence = tl.sum(f, axis=0)
                a_sum = tl.sum(a, axis=0)
                b_sum = tl.sum(b, axis=0)
        else:
            # Sweep 1: online max / sum-exp of the three softmaxes and of W, block by block.
            max_s, max_t, z_a, z_b, z_1, w_sum, sum_s = _row_stats_sweep(
                s_row, student_col_stride, t_row, teacher_col_stride, V, k_t,
                DIVERGENCE, T_POWER, SMOOTHING, BLOCK_V,
            )
            m_s = _safe_max(max_s)
            m_t = _safe_max(max_t)
            log2_za = tl.log2(z_a)
            log2_zb = tl.log2(z_b)
            if DIVERGENCE == FORWARD_KL:
                divergence = (w_sum / z_b) * inv_t + LN2 * (log2_za - log2_zb)
            elif DIVERGENCE == REVERSE_KL:
                divergence = (w_sum / z_a) * inv_t + LN2 * (log2_zb - log2_za)
            else:
                # Sweep 2 (JSD, TVD, skew): the divergence and its gradient row sums.
                divergence, a_sum, b_sum = _divergence_sums_sweep(
                    s_row, student_col_stride, t_row, teacher_col_stride, V,
                    m_s, m_t, log2_za, log2_zb, k_t, lam, log_lam, log_1m_lam,
                    DIVERGENCE, BLOCK_V,
                )
        if ONLINE:
            a_sum, b_sum = online_row_sums(divergence, DIVERGENCE)
        log2_z1 = tl.log2(z_1)
        s_label, in_range = _label_logit(s_row, student_col_stride, label, V, HAS_LABELS)
        row_loss, ce, lse, coef_div, coef_p1, coef_label, coef_uniform = \
            _row_loss_and_coefficients(
                s_label, in_range, V, m_s, log2_z1, sum_s, divergence, weight, temperature,
                alpha, label_smoothing, z_loss, HAS_LABELS, SMOOTHING,
            )
        _store_row_stats(stats_row, row_loss, divergence, ce, lse)

        if STUDENT_GRAD or TEACHER_GRAD:
            if ON_CHIP:
                grad_s, grad_t = _block_grads(
                    s, t, p, q, e_1 * (1.0 / z_1), a, b, cols, label, m_s, m_t, log2_za,
                    log2_zb, divergence, a_sum, b_sum, inv_t, coef_div, coef_p1, coef_label,
                    coef_uniform, DIVERGENCE, HAS_LABELS, True, SMOOTHING, TEACHER_GRAD,
                )
                _store_grads(gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, cols, mask,
                             grad_s, grad_t, STUDENT_GRAD, TEACHER_GRAD, True)
            else:
                _grad_sweep(
                    s_row, student_col_stride, t_row, teacher_col_stride,
                    gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V, label,
                    m_s, m_t, log2_za, log2_zb, log2_z1, divergence, a_sum, b_sum, inv_t,
                    lam, log_lam, log_1m_lam, coef_div, coef_p1, coef_label, coef_uniform,
                    DIVERGENCE, T_POWER, HAS_LABELS, SMOOTHING, STUDENT_GRAD, TEACHER_GRAD,
                    BLOCK_V,
                )
    else:
        # Ignored row: no loss, zero gradient, and its logits are never read.
        _store_row_stats(stats_row, 0.0, 0.0, 0.0, 0.0)
        _store_zero_grads(gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V,
                          STUDENT_GRAD, TEACHER_GRAD, BLOCK_V)


@triton.jit
def _scale_rows_kernel(
    grad_ptr, grad_row_stride, grad_col_stride,  # (N, V) gradient, scaled in place
    grad_output_ptr, grad_output_stride,  # (N,) per-row factor, or a scalar with stride 0
    V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(grad_output_ptr + row * grad_output_stride).to(tl.float32)
    # The usual loss.backward() passes 1: then the gradient is already final and the row is not
    # touched. The test runs on the device, so the host never waits for grad_output.
    if factor != 1.0:
        g_row = grad_ptr + row * grad_row_stride
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            g = tl.load(g_row + offs * grad_col_stride, mask=mask).to(tl.float32)
            tl.store(g_row + offs * grad_col_stride,
                     (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mean_weight_kernel(
    labels_ptr, labels_stride,  # (N,) integer class ids
    n_rows, ignore_index,
    weight_ptr,  # () out: 1 / max(counted rows, 1)
    BLOCK: tl.constexpr,
):
    counts = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        labels = tl.load(labels_ptr + rows.to(tl.int64) * labels_stride, mask=rows < n_rows,
                         other=ignore_index)
        counts += (labels != ignore_index).to(tl.int32)
    counted = tl.sum(counts, axis=0)
    tl.store(weight_ptr, 1.0 / tl.maximum(counted, 1).to(tl.float32))


@triton.jit
def _sum_row_stats_kernel(
    stats_ptr, stats_row_stride,  # (N, COLUMNS) row statistics, unit column stride
    n_rows,
    weight_ptr,  # () reduction weight; read with APPLY_WEIGHT only
    out_ptr,  # (COLUMNS,) out: the column sums
    COLUMNS: tl.constexpr, APPLY_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    columns = tl.arange(0, COLUMNS)
    acc = tl.zeros((BLOCK, COLUMNS), out_ptr.dtype.element_ty)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        tile = tl.load(stats_ptr + rows.to(tl.int64)[:, None] * stats_row_stride
                       + columns[None, :], mask=(rows < n_rows)[:, None], other=0.0)
        acc += tile.to(out_ptr.dtype.element_ty)
    totals = tl.sum(acc, axis=0)
    if APPLY_WEIGHT:
        totals = totals * tl.load(weight_ptr).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + columns, totals)


# The reduction kernels run as one program: a loop over 1024-row tiles keeps them one launch
# each whatever N is (N is at most a few 100k tokens: tens of microseconds).
REDUCE_BLOCK = 1024


def mean_weight(labels: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(count of labels != ignore_index, 1) as a 0-d tensor, in one launch."""
    weight = torch.empty((), dtype=torch.float32, device=labels.device)
    _mean_weight_kernel[(1,)](labels, labels.stride(0) if labels.dim() else 0, labels.numel(),
                              int(ignore_index), weight, BLOCK=REDUCE_BLOCK, num_warps=4)
    return weight if dtype == torch.float32 else weight.to(dtype)


def sum_row_stats(row_stats: torch.Tensor, weight: torch.Tensor,
                  apply_weight: bool) -> torch.Tensor:
    """Column sums of the (N, 4) row statistics, times weight when apply_weight; one launch."""
    totals = torch.empty((row_stats.shape[1],), dtype=row_stats.dtype, device=row_stats.device)
    stats = row_stats if row_stats.stride(1) == 1 else row_stats.contiguous()
    _sum_row_stats_kernel[(1,)](stats, stats.stride(0), stats.shape[0], weight, totals,
                                COLUMNS=stats.shape[1], APPLY_WEIGHT=apply_weight,
                                BLOCK=REDUCE_BLOCK // 4, num_warps=4)
    return totals


def forward_config(vocab_size: int) -> dict:
    """Block size and warps the forward kernel uses for rows of `vocab_size` classes."""
    if vocab_size <= MAX_ON_CHIP_V:
        block = max(triton.next_power_of_2(vocab_size), 128)
        # 16 values per thread and operand: enough loads in flight per thread, no spills.
        num_warps = min(max(block // 512, 1), 16)
        return {"ON_CHIP": True, "BLOCK_V": block, "num_warps": num_warps}
    return {"ON_CHIP": False, "BLOCK_V": LOOP_BLOCK_V, "num_warps": LOOP_NUM_WARPS}


def temperature_power(temperature: float) -> int:
    """T_POWER of the kernels: T itself for integer T in [1, MAX_POWER_TEMPERATURE], else 0."""
    if temperature == int(temperature) and 1 <= temperature <= MAX_POWER_TEMPERATURE:
        return int(temperature)
    return 0


def kernel_flags(options: LossOptions, *, has_labels: bool) -> dict:
    """The compile-time flags of the forward kernel for these options."""
    return {
        "DIVERGENCE": options.divergence_id,
        "HAS_LABELS": has_labels,
        "T_POWER": temperature_power(options.temperature),
        "SMOOTHING": has_labels and options.label_smoothing > 0.0,
    }


def _batched_strides(logits: torch.Tensor):
    """(batch, row, column) strides of (N, V) or (B, L, V) logits."""
    if logits.dim() == 3:
        return logits.stride(0), logits.stride(1), logits.stride(2)
    return 0, logits.stride(0), logits.stride(1)


LONG_ROW_STRATEGIES = ("auto", "loop", "two_launch", "split")
# Columns per slice of the split-row strategies: the on-chip row size, so that a slice stays in
# registers in `split` (and the slices of `two_launch` run the same number of blocks).
SPLIT_SLICE_V = MAX_ON_CHIP_V
# What `auto` selects per vocabulary for long rows, from a GPU run of benchmarks/gpu_check.sh
# (benchmarks/results/); without a measured table it keeps the two-sweep loop.
AUTO_LONG_ROWS: dict = {}


def long_row_strategy(device: torch.device, vocab: int) -> str:
    """The strategy for rows longer than MAX_ON_CHIP_V, from FASTKD_LONG_ROWS.

    loop: the two-sweep kernel. two_launch: a statistics launch over (row, slice), the
    combination, a gradient launch over (row, slice); runs everywhere. split: one cooperative
    persistent launch that keeps each slice on chip (CUDA only). auto: the measured selection.
    """
    choice = os.environ.get("FASTKD_LONG_ROWS", "auto").strip().lower() or "auto"
    if choice not in LONG_ROW_STRATEGIES:
        raise ValueError(f"FASTKD_LONG_ROWS must be one of {LONG_ROW_STRATEGIES}, got {choice!r}")
    if choice == "auto":
        choice = AUTO_LONG_ROWS.get(vocab, "loop")
    if choice == "split" and device.type != "cuda":
        raise RuntimeError(
            "FASTKD_LONG_ROWS=split needs CUDA tensors: its slices wait for each other, which "
            "Triton's interpreter (one program after another) cannot run; use two_launch"
        )
    return choice


def _two_launch_rows(student, teacher, labels, weight, row_stats, grad_student, grad_teacher,
                     options: LossOptions) -> None:
    """Long rows as SPLIT_SLICE_V-column slices: the vocab-parallel shard steps on one device,
    the slices standing in for the shards (the same kernels and the same combination)."""
    from . import kd_vocab_parallel

    if student.dim() == 3:
        _torch_backend.per_batch(_two_launch_rows, student, teacher, labels, weight, row_stats,
                                 grad_student, grad_teacher, options)
        return
    row_stats.copy_(_torch_backend.run_shard_steps(
        kd_vocab_parallel, student, teacher, labels, weight, options, vocab_start=0,
        gather_stats=lambda stats: stats, reduce_sums=lambda sums: sums,
        grad_student=grad_student, grad_teacher=grad_teacher, slice_cols=SPLIT_SLICE_V))


def kd_rows(student_logits, teacher_logits, labels, weight, row_stats, grad_student,
            grad_teacher, options: LossOptions) -> None:
    """Launch the fused forward on (N, V) or (B, L, V) logits, filling the caller's outputs.

    Gradients are (N, V). Arguments are assumed validated by fastkd._spec; see
    fastkd._ops.kd_rows for the contract.
    """
    vocab = student_logits.shape[-1]
    n_rows = row_stats.shape[0]
    if vocab > MAX_ON_CHIP_V:
        strategy = long_row_strategy(student_logits.device, vocab)
        if strategy == "two_launch":
            _two_launch_rows(student_logits, teacher_logits, labels, weight, row_stats,
                             grad_student, grad_teacher, options)
            return
        if strategy == "split":
            from .kd_split import split_rows

            split_rows(student_logits, teacher_logits, labels, weight, row_stats, grad_student,
                       grad_teacher, options)
            return
    rows_per_batch = student_logits.shape[1] if student_logits.dim() == 3 else n_rows
    if n_rows == 0:
        return
    # Pointers that a constexpr flag leaves unused still need a tensor to point at.
    gs = grad_student if grad_student is not None else row_stats
    gt = grad_teacher if grad_teacher is not None else row_stats
    lab = labels if labels is not None else row_stats
    config = forward_config(vocab)
    _kd_loss_fwd_kernel[(n_rows,)](
        student_logits, *_batched_strides(student_logits),
        teacher_logits, *_batched_strides(teacher_logits),
        rows_per_batch,
        lab, lab.stride(0) if labels is not None else 0,
        weight,
        row_stats, row_stats.stride(0),
        gs, gs.stride(0), gs.stride(1),
        gt, gt.stride(0), gt.stride(1),
        vocab,
        float(options.temperature), float(options.alpha), float(options.divergence_parameter),
        float(options.label_smoothing), float(options.z_loss), int(options.ignore_index),
        **kernel_flags(options, has_labels=labels is not None),
        STUDENT_GRAD=grad_student is not None,
        TEACHER_GRAD=grad_teacher is not None,
        ON_CHIP=config["ON_CHIP"],
        BLOCK_V=config["BLOCK_V"],
        num_warps=config["num_warps"],
    )


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad (N, V) *= grad_output, in place; grad_output is a scalar or has N elements."""
    n_rows, vocab = grad.shape
    if n_rows == 0:
        return grad
    factor = grad_output.reshape(-1)
    factor_stride = 0 if grad_output.dim() == 0 else factor.stride(0)
    _scale_rows_kernel[(n_rows,)](
        grad, grad.stride(0), grad.stride(1),
        factor, factor_stride,
        vocab,
        BLOCK_V=SCALE_BLOCK_V,
        num_warps=SCALE_NUM_WARPS,
    )
    return grad
