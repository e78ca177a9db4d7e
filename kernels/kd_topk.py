"""Knowledge distillation from a sparse top-k teacher: Triton kernel and launcher.

Math (one row; s the student's V logits, T the temperature, a = alpha, w the reduction weight,
K the row's teacher entries j = 1..k with ids id_j and values v_j; an entry with v_j = -inf is
padding and takes no part in anything below):

    q = softmax(s / T),  log q_u = (s_u - m) / T - log Z_T,  m = max(s),  Z_T = sum_u e_u,
    e_u = exp((s_u - m) / T).

Teacher, tail="renormalize": p_j = softmax_j(v_j / T) over the k entries. Then
    D = sum_j p_j (log p_j - log q_{id_j})        (0 * log 0 = 0)
which is the dense forward KL with a teacher that is -inf outside the ids. With c_p = max_j v_j/T,
E_j = exp(v_j / T - c_p), Z_p = sum_j E_j and W_p = sum_j E_j (v_j / T - c_p - log q_{id_j}):
    D = W_p / Z_p - log Z_p,
accumulated over chunks of entries with the online rescaling of the dense kernel (on a new maximum
c', W_p <- (W_p + Z_p (c_p - c')) exp(c_p - c')).

Teacher, tail="bucket": the values are full-vocabulary log-probabilities at T, used as they are:
p_j = exp(v_j). The rest of the vocabulary is one extra class with teacher mass
p_tail = exp(teacher_tail_logprob) when given, else max(0, 1 - sum_j p_j), and student mass
    q_tail = sum_{u not in K} q_u = Z_out / Z_T,     Z_out = sum_u e_u [u not in K].
Z_out is summed directly over the complement (a sum of positives, relative error ~ 1e-7), never
as Z_T - sum_j e_{id_j}: that difference cancels to <= 0 when K holds almost all the mass. The
complement comes from a dense membership mask, built on chip from the k ids with tl.histogram
(one per block of the row). When K covers the whole vocabulary the tail class does not exist
and p_tail = 0. Then
    D = sum_j p_j (v_j - log q_{id_j}) + p_tail (log p_tail - log q_tail).

Gradient (p and p_tail do not depend on s). d log q_v / d s_u = (delta_uv - q_u) / T, and
d log q_tail / d s_u = ([u not in K] q_u / q_tail - q_u) / T. With S_p = sum_j p_j + p_tail
(1 for renormalize; 1 for bucket when the tail is 1 - sum_j p_j and not clamped):
    dD/ds_u = (S_p q_u - p_u) / T                          u in K (p_u the entry's p_j)
    dD/ds_u = (q_u / T) (S_p - p_tail / q_tail)
            = (e_u / T) (S_p / Z_T - p_tail / Z_out)       u not in K
so the dense part is one coefficient times e_u, and only the k entries differ from it.

Hard-label terms at T = 1 (y the label, eps the label smoothing, lse = logsumexp(s), p = softmax(s),
z the z-loss weight):
    CE   = (1 - eps) (lse - s_y) + eps (lse - sum_u s_u / V)
    loss = a T^2 D + (1 - a) CE + z lse^2
    dloss/ds_u = a T dD/ds_u + (1 - a) (p_u - (1 - eps) [u = y] - eps / V) + 2 z lse p_u
The row statistics written are (loss, D, CE, lse^2); ignored rows hold zeros. Without labels
CE = 0 and every row counts.

The kernel stores w * dloss/ds densely (the tail formula everywhere), then, after a barrier, the
k entries' values over it: the same program owns the whole row, so the fix-up stores land after
the dense ones and no second dense pass is needed. Duplicate ids: the loss counts each entry
(in bucket mode the membership mask counts the id once for q_tail); the gradient at a duplicated
id is the value of one of its entries (which one is unspecified), not their sum.

Invalid entries: a non-padding id outside [0, V) is never read; it makes the row's D NaN. A
renormalize row whose entries are all padding has no teacher (D = 0/0, NaN, as kd_loss with an
all -inf teacher); in bucket mode such a row puts all the teacher's mass in the tail (D = 0). A
row whose D is NaN gets a NaN gradient; an out-of-range label makes CE and the gradient NaN.

Memory traffic per row of V elements (e = element size of the logits), k entries of an id of
b_i bytes and a value of b_v bytes:
    V <= MAX_ON_CHIP_V: one read of s and one write of the gradient: 2 V e + k (b_i + b_v), plus
    k gathered reads of s (cache hits: the row was just read);
    larger V: a second read of s in reverse block order (L2 hits first), 2 to 3 V e + k (b_i + b_v).
Without a gradient the write disappears. Ignored rows read nothing and write zeros.
Exponentials per element and sweep: 2 (the T-softmax's and the CE softmax's), 1 when T == 1 or
T is an integer up to kd_loss.MAX_POWER_TEMPERATURE (the CE ones are then powers of the T ones).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._spec import LossOptions
from .kd_loss import (
    LN2,
    LOG2E,
    _batched_strides,
    _label_logit,
    _power,
    _row_label,
    _row_loss_and_coefficients,
    _safe_max,
    _store_row_stats,
    _store_zero_grads,
    forward_config,
    temperature_power,
)

__all__ = ["minimal_bytes", "topk_config", "topk_rows"]

# Entries per chunk: the k loops (statistics, fix-ups, membership) take the entries in chunks of
# at most this many, so k is not limited by registers.
MAX_BLOCK_K = 1024


@triton.jit
def _entries(ids_row, ids_col_stride, values_row, values_col_stride, koffs, kmask, V):
    """(values fp32, ids int64, valid, invalid) of one chunk of entries.

    valid: not padding and id in [0, V). invalid: not padding and id out of range.
    """
    v = tl.load(values_row + koffs * values_col_stride, mask=kmask,
                other=float("-inf")).to(tl.float32)
    live = kmask & (v != float("-inf"))
    ids = tl.load(ids_row + koffs * ids_col_stride, mask=live, other=0).to(tl.int64)
    in_range = (ids >= 0) & (ids < V)
    return v, ids, live & in_range, live & (~in_range)


@triton.jit
def _member_counts(ids_row, ids_col_stride, values_row, values_col_stride, K, V, start,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """How many valid entries of the row fall on each column of the block at `start`."""
    kcols = tl.arange(0, BLOCK_K)
    counts = tl.zeros((BLOCK_V,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        koffs = k0 + kcols
        _, ids, valid, _ = _entries(ids_row, ids_col_stride, values_row, values_col_stride,
                                    koffs, koffs < K, V)
        rel = ids - start
        inside = valid & (rel >= 0) & (rel < BLOCK_V)
        counts += tl.histogram(tl.where(inside, rel, 0).to(tl.int32), BLOCK_V, mask=inside)
    return counts


@triton.jit
def _ce_exponentials(s, m, e_t, T_POWER: tl.constexpr):
    """exp(s - m), the CE softmax's exponentials: the T ones at T = 1, their T-th power for
    integer T up to kd_loss.MAX_POWER_TEMPERATURE (exp(d) = exp(d / T)^T, no exp2), else exp2."""
    if T_POWER == 1:
        return e_t
    elif T_POWER == 0:
        return tl.exp2((s - m) * LOG2E)
    else:
        return _power(e_t, T_POWER)


@triton.jit
def _entry_grads(s_row, student_col_stride, ids_row, ids_col_stride, values_row,
                 values_col_stride, koffs, K, V, label, m, k_t, inv_t, log2_zt, log2_z1, c_p,
                 log2_zp, s_p, coef_kl, coef_p1, coef_y, shift,
                 BUCKET: tl.constexpr, T_POWER: tl.constexpr):
    """w * dloss/ds at one chunk of entries: (gradient, ids, valid)."""
    v, ids, valid, invalid = _entries(ids_row, ids_col_stride, values_row, values_col_stride,
                                      koffs, koffs < K, V)
    s_k = tl.load(s_row + ids * student_col_stride, mask=valid, other=0.0).to(tl.float32)
    q = tl.exp2((s_k - m) * k_t - log2_zt)
    if T_POWER == 1:
        p1 = q
    else:
        p1 = tl.exp2((s_k - m) * LOG2E - log2_z1)
    if BUCKET:
        p = tl.exp2(v * LOG2E)
    else:
        p = tl.exp2((v * inv_t - c_p) * LOG2E - log2_zp)
    g = coef_kl * (s_p * q - p) + coef_p1 * p1 - shift
    g -= tl.where(ids == label, coef_y, 0.0)
    return g, ids, valid


@triton.jit
def _kd_topk_kernel(
    # Student logits as (B, L, V) with any strides and dtype (N = B L rows; 2-D inputs are
    # B = 1): a sliced batch such as logits[:, :-1] is read in place, never copied first.
    student_ptr, student_batch_stride, student_row_stride, student_col_stride,
    rows_per_batch,  # L
    ids_ptr, ids_row_stride, ids_col_stride,  # (N, k) int32/int64 teacher ids
    values_ptr, values_row_stride, values_col_stride,  # (N, k) teacher values, any float dtype
    tail_ptr, tail_stride,  # (N,) teacher tail log-probs; unused without HAS_TAIL
    labels_ptr, labels_stride,  # (N,) class ids; unused without HAS_LABELS
    weight_ptr,  # () reduction weight w
    stats_ptr, stats_row_stride,  # (N, 4) out: loss, D, CE, lse^2 (contiguous columns)
    grad_ptr, grad_row_stride, grad_col_stride,  # (N, V) out: w * dloss/ds
    V, K,
    temperature, alpha, label_smoothing, z_loss, ignore_index,
    BUCKET: tl.constexpr,  # tail="bucket" (else "renormalize")
    HAS_TAIL: tl.constexpr,  # bucket with a stored tail log-prob per row
    HAS_LABELS: tl.constexpr,
    # 1: T == 1, the CE softmax is the KD one; 2-4: integer T, the CE exponentials are powers
    # of the T ones; 0: any other T (one more exp2 per element).
    T_POWER: tl.constexpr,
    SMOOTHING: tl.constexpr,  # label_smoothing > 0: the centred logit sum is needed
    STUDENT_GRAD: tl.constexpr,
    ON_CHIP: tl.constexpr,  # V <= BLOCK_V: the row stays in registers, read once
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr,  # K <= BLOCK_K: the entries fit in one chunk
):
    row = tl.program_id(0).to(tl.int64)  # int64: N * V can exceed 2^31
    batch = row // rows_per_batch
    s_row = student_ptr + batch * student_batch_stride + (
        row - batch * rows_per_batch) * student_row_stride
    ids_row = ids_ptr + row * ids_row_stride
    values_row = values_ptr + row * values_row_stride
    g_row = grad_ptr + row * grad_row_stride
    st_row = stats_ptr + row * stats_row_stride
    cols = tl.arange(0, BLOCK_V)
    kcols = tl.arange(0, BLOCK_K)
    neg_inf = float("-inf")
    inv_t = 1.0 / temperature
    k_t = inv_t * LOG2E

    label, counted = _row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)
    if counted:
        # Sweep over the student row: max, Z_T, Z_1, sum of logits, Z_out (bucket).
        if ON_CHIP:
            mask = cols < V
            s = tl.load(s_row + cols * student_col_stride, mask=mask, other=neg_inf).to(tl.float32)
            max_s = tl.max(s, axis=0)
            m = _safe_max(max_s)
            e_t = tl.exp2((s - m) * k_t)
            z_t = tl.sum(e_t, axis=0)
            e_1 = _ce_exponentials(s, m, e_t, T_POWER)
            z_1 = tl.sum(e_1, axis=0)
            sum_s = tl.sum(tl.where(mask, s - m, 0.0), axis=0)
            if BUCKET:
                counts = _member_counts(ids_row, ids_col_stride, values_row, values_col_stride,
                                        K, V, 0, BLOCK_V, BLOCK_K)
                outside = mask & (counts == 0)
                z_out = tl.sum(tl.where(outside, e_t, 0.0), axis=0)
                n_out = tl.sum(outside.to(tl.int32), axis=0)
        else:
            max_s = tl.full((), neg_inf, tl.float32)
            z_t = tl.zeros((), tl.float32)
            z_1 = tl.zeros((), tl.float32)
            z_out = tl.zeros((), tl.float32)
            n_out = tl.zeros((), tl.int32)
            sum_s = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                s = tl.load(s_row + offs * student_col_stride, mask=mask,
                            other=neg_inf).to(tl.float32)
                max_new = tl.maximum(max_s, tl.max(s, axis=0))
                m_new = _safe_max(max_new)
                # From a raw -inf maximum the rescale is exp2(-inf) = 0 (the sums are 0 then).
                rescale_t = tl.exp2((max_s - m_new) * k_t)
                e_t = tl.exp2((s - m_new) * k_t)
                z_t = z_t * rescale_t + tl.sum(e_t, axis=0)
                if T_POWER == 0:
                    z_1 = z_1 * tl.exp2((max_s - m_new) * LOG2E) + tl.sum(
                        tl.exp2((s - m_new) * LOG2E), axis=0)
                elif T_POWER > 1:
                    z_1 = z_1 * _power(rescale_t, T_POWER) + tl.sum(_power(e_t, T_POWER),
                                                                    axis=0)
                if SMOOTHING:
                    # `start` elements were centred on the previous maximum.
                    sum_s += start * (_safe_max(max_s) - m_new) + tl.sum(
                        tl.where(mask, s - m_new, 0.0), axis=0)
                if BUCKET:
                    counts = _member_counts(ids_row, ids_col_stride, values_row,
                                            values_col_stride, K, V, start, BLOCK_V, BLOCK_K)
                    outside = mask & (counts == 0)
                    z_out = z_out * rescale_t + tl.sum(tl.where(outside, e_t, 0.0), axis=0)
                    n_out += tl.sum(outside.to(tl.int32), axis=0)
                max_s = max_new
            if T_POWER == 1:
                z_1 = z_t
            m = _safe_max(max_s)
        log2_zt = tl.log2(z_t)
        log2_z1 = tl.log2(z_1)
        ln_zt = LN2 * log2_zt

        # Entries: teacher statistics and the student's log q at the ids (gathered reads).
        n_bad = tl.zeros((), tl.int32)
        if BUCKET:
            p_sum = tl.zeros((), tl.float32)
            d_k = tl.zeros((), tl.float32)
        else:
            c_p = tl.full((), neg_inf, tl.float32)
            z_p = tl.zeros((), tl.float32)
            w_p = tl.zeros((), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            koffs = k0 + kcols
            v, ids, valid, invalid = _entries(ids_row, ids_col_stride, values_row,
                                              values_col_stride, koffs, koffs < K, V)
            n_bad += tl.sum(invalid.to(tl.int32), axis=0)
            s_k = tl.load(s_row + ids * student_col_stride, mask=valid, other=0.0).to(tl.float32)
            log_q = (s_k - m) * inv_t - ln_zt
            if BUCKET:
                p = tl.where(valid, tl.exp2(v * LOG2E), 0.0)
                p_sum += tl.sum(p, axis=0)
                d_k += tl.sum(tl.where(p == 0.0, 0.0, p * (v - log_q)), axis=0)
            else:
                a = tl.where(valid, v * inv_t, neg_inf)
                c_new = tl.maximum(c_p, tl.max(a, axis=0))
                c_safe = _safe_max(c_new)
                c_old = _safe_max(c_p)
                rescale = tl.exp2((c_p - c_safe) * LOG2E)
                e_p = tl.exp2((a - c_safe) * LOG2E)
                w_p = (w_p + z_p * (c_old - c_safe)) * rescale
                w_p += tl.sum(tl.where(e_p == 0.0, 0.0, e_p * ((a - c_safe) - log_q)), axis=0)
                z_p = z_p * rescale + tl.sum(e_p, axis=0)
                c_p = c_new
        if BUCKET:
            if HAS_TAIL:
                log_p_tail = tl.load(tail_ptr + row * tail_stride).to(tl.float32)
                p_tail = tl.exp2(log_p_tail * LOG2E)
            else:
                p_tail = tl.maximum(1.0 - p_sum, 0.0)
                log_p_tail = tl.log2(p_tail) * LN2
            # No vocabulary entry outside K: the tail class does not exist.
            p_tail = tl.where(n_out == 0, 0.0, p_tail)
            log_q_tail = LN2 * (tl.log2(z_out) - log2_zt)
            d = d_k + tl.where(p_tail == 0.0, 0.0, p_tail * (log_p_tail - log_q_tail))
            s_p = p_sum + p_tail
            log2_zp = tl.zeros((), tl.float32)
            c_p = tl.zeros((), tl.float32)
        else:
            log2_zp = tl.log2(z_p)
            d = w_p / z_p - LN2 * log2_zp
            c_p = _safe_max(c_p)
            s_p = tl.full((), 1.0, tl.float32)
            p_tail = tl.zeros((), tl.float32)
            z_out = tl.full((), 1.0, tl.float32)
        d = tl.where(n_bad > 0, float("nan"), d)
        # Poison: NaN added to every gradient of a row whose D is NaN (an out-of-range id, a
        # renormalize row with no entry, a NaN value), as its loss.
        poison = tl.where(d != d, float("nan"), 0.0)

        s_label, label_ok = _label_logit(s_row, student_col_stride, label, V, HAS_LABELS)
        # coef_p1 is NaN for a label outside the vocabulary: the whole row's gradient is NaN.
        row_loss, ce, lse, coef_kl, coef_p1, coef_y, coef_uniform = _row_loss_and_coefficients(
            s_label, label_ok, V, m, log2_z1, sum_s, d, tl.load(weight_ptr).to(tl.float32),
            temperature, alpha, label_smoothing, z_loss, HAS_LABELS, SMOOTHING,
        )
        _store_row_stats(st_row, row_loss, d, ce, lse)

        if STUDENT_GRAD:
            shift = coef_uniform - poison
            # Outside K: coef_kl * e_u * (S_p / Z_T - p_tail / Z_out) (the tail term only where
            # the teacher put mass there, so an empty tail does not divide 0 by 0).
            tail_ratio = tl.where(p_tail == 0.0, 0.0, p_tail / z_out)
            coef_e = coef_kl * (s_p / z_t - tail_ratio)
            inv_z1 = 1.0 / z_1
            if SINGLE_K:
                # The entries' gradients are gathered before the dense store, which may overwrite
                # the logits (in place).
                g_k, ids_k, valid_k = _entry_grads(
                    s_row, student_col_stride, ids_row, ids_col_stride, values_row,
                    values_col_stride, kcols, K, V, label, m, k_t, inv_t, log2_zt, log2_z1,
                    c_p, log2_zp, s_p, coef_kl, coef_p1, coef_y, shift, BUCKET, T_POWER)
                # In place, another thread's dense store may hit a logit gathered here: every
                # gather completes first.
                tl.debug_barrier()
            if ON_CHIP:
                g = coef_e * e_t + (coef_p1 * inv_z1) * e_1 - shift
                g -= tl.where(cols == label, coef_y, 0.0)
                tl.store(g_row + cols * grad_col_stride, g.to(grad_ptr.dtype.element_ty),
                         mask=mask)
            else:
                num_blocks = tl.cdiv(V, BLOCK_V)
                for b in range(0, num_blocks):
                    # Last block first: those bytes were read last and are likeliest in L2.
                    offs = (num_blocks - 1 - b) * BLOCK_V + cols
                    mask = offs < V
                    s = tl.load(s_row + offs * student_col_stride, mask=mask,
                                other=neg_inf).to(tl.float32)
                    e_t = tl.exp2((s - m) * k_t)
                    e_1 = _ce_exponentials(s, m, e_t, T_POWER)
                    g = coef_e * e_t + (coef_p1 * inv_z1) * e_1 - shift
                    g -= tl.where(offs == label, coef_y, 0.0)
                    tl.store(g_row + offs * grad_col_stride, g.to(grad_ptr.dtype.element_ty),
                             mask=mask)
            # Every dense store of the row is done before any entry's store overwrites one.
            tl.debug_barrier()
            if SINGLE_K:
                tl.store(g_row + ids_k * grad_col_stride, g_k.to(grad_ptr.dtype.element_ty),
                         mask=valid_k)
            else:
                for k0 in range(0, K, BLOCK_K):
                    g_k, ids_k, valid_k = _entry_grads(
                        s_row, student_col_stride, ids_row, ids_col_stride, values_row,
                        values_col_stride, k0 + kcols, K, V, label, m, k_t, inv_t, log2_zt,
                        log2_z1, c_p, log2_zp, s_p, coef_kl, coef_p1, coef_y, shift,
                        BUCKET, T_POWER)
                    tl.store(g_row + ids_k * grad_col_stride,
                             g_k.to(grad_ptr.dtype.element_ty), mask=valid_k)
    else:
        # Ignored row: zero statistics and gradient; nothing of the row is read.
        for c in tl.static_range(4):
            tl.store(st_row + c, tl.zeros((), stats_ptr.dtype.element_ty))
        _store_zero_grads(g_row, grad_col_stride, g_row, grad_col_stride, V,
                          STUDENT_GRAD, False, BLOCK_V)


def topk_config(vocab_size: int, k: int) -> dict:
    """Block sizes and warps of the top-k kernel for rows of `vocab_size` classes, k entries."""
    config = dict(forward_config(vocab_size))
    block_k = min(max(triton.next_power_of_2(max(k, 1)), 32 * config["num_warps"]), MAX_BLOCK_K)
    config["BLOCK_K"] = block_k
    return config


def topk_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    values: torch.Tensor,
    tail_logprob: torch.Tensor | None,
    labels: torch.Tensor | None,
    weight: torch.Tensor,
    row_stats: torch.Tensor,
    grad_student: torch.Tensor | None,
    *,
    tail: str,
    options: LossOptions,
) -> None:
    """Fill row_stats (N, 4) and, when given, grad_student (N, V) with w * dloss/ds.

    student (N, V) or (B, L, V) with N = B L, ids and values (N, k), tail_logprob and labels
    (N,) or None, weight 0-d.
    Arguments are assumed validated (fastkd.topk); any strides. grad_student may be student.
    """
    n_rows, k = ids.shape
    vocab = student.shape[-1]
    if n_rows == 0:
        return
    if row_stats.stride(1) != 1:
        raise ValueError("row_stats must have contiguous columns")
    config = topk_config(vocab, k)
    if (grad_student is not None and k > config["BLOCK_K"]
            and grad_student.untyped_storage().data_ptr() == student.untyped_storage().data_ptr()):
        # With several chunks of entries the fix-ups read the logits after the dense store:
        # in place, they would read the gradient. Compute into a buffer, then copy.
        buffer = torch.empty_like(grad_student)
        topk_rows(student, ids, values, tail_logprob, labels, weight, row_stats, buffer,
                  tail=tail, options=options)
        grad_student.copy_(buffer)
        return
    g = grad_student if grad_student is not None else row_stats
    tail_t = tail_logprob if tail_logprob is not None else row_stats
    lab = labels if labels is not None else row_stats
    _kd_topk_kernel[(n_rows,)](
        student, *_batched_strides(student),
        student.shape[1] if student.dim() == 3 else n_rows,
        ids, ids.stride(0), ids.stride(1),
        values, values.stride(0), values.stride(1),
        tail_t, tail_logprob.stride(0) if tail_logprob is not None else 0,
        lab, labels.stride(0) if labels is not None else 0,
        weight,
        row_stats, row_stats.stride(0),
        g, g.stride(0), g.stride(1),
        vocab, k,
        options.temperature, options.alpha, options.label_smoothing, options.z_loss,
        options.ignore_index,
        BUCKET=tail == "bucket",
        HAS_TAIL=tail_logprob is not None,
        HAS_LABELS=labels is not None,
        T_POWER=temperature_power(options.temperature),
        SMOOTHING=labels is not None and options.label_smoothing > 0.0,
        STUDENT_GRAD=grad_student is not None,
        ON_CHIP=config["ON_CHIP"],
        BLOCK_V=config["BLOCK_V"],
        BLOCK_K=config["BLOCK_K"],
        SINGLE_K=k <= config["BLOCK_K"],
        num_warps=config["num_warps"],
    )



def minimal_bytes(n_rows: int, counted_rows: int, vocab: int, k: int, *, element_size: int,
                  id_size: int = 8, value_size: int = 4, student_grad: bool = True,
                  label_size: int = 8) -> int:
    """Bytes any correct top-k loss must move (the bandwidth denominator of a benchmark).

    Read every counted row of the student and its k entries (an ignored row's loss and
    gradient are known without reading them), write the gradient of every row (ignored rows'
    zeros included) and read the labels: the 2-unit floor plus k * (id + value) bytes per row.
    """
    student_read = counted_rows * vocab * element_size
    entries_read = counted_rows * k * (id_size + value_size)
    gradient_write = n_rows * vocab * element_size if student_grad else 0
    return student_read + entries_read + gradient_write + n_rows * label_size
