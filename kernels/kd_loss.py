"""Fused knowledge-distillation loss: Triton kernels and their launchers.

Math (one row i; s, t are the student's and teacher's logits over V classes, T the temperature,
a the mixing weight alpha, y the label, w the reduction weight of the row):

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._buffers import allocate_outputs

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
def _row_stats_sweep(
    s_row, student_col_stride, t_row, teacher_col_stride, V, k_t,
    SHARE_T1: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One streaming sweep over a row (or a vocabulary shard of it): the online statistics.

    Returns the raw maxima max_s, max_t (-inf while every logit seen is -inf), Z_a, Z_b, Z_1
    relative to their safe versions, and W centred on them. Exponents are shifted by the safe
    maxima and rescaling from a raw -inf gives exp2(-inf) = 0, never NaN. When a block raises the
    maxima, W moves to the new centre exactly (see the comment at the top of this file).
    """
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    max_s = tl.full((), neg_inf, tl.float32)
    max_t = tl.full((), neg_inf, tl.float32)
    z_a = tl.zeros((), tl.float32)
    z_b = tl.zeros((), tl.float32)
    z_1 = tl.zeros((), tl.float32)
    w_sum = tl.zeros((), tl.float32)
    m_s_prev = tl.zeros((), tl.float32)
    m_t_prev = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        s = tl.load(s_row + offs * student_col_stride, mask=mask, other=neg_inf).to(tl.float32)
        t = tl.load(t_row + offs * teacher_col_stride, mask=mask, other=neg_inf).to(tl.float32)
        max_s_new = tl.maximum(max_s, tl.max(s, axis=0))
        max_t_new = tl.maximum(max_t, tl.max(t, axis=0))
        m_s = _safe_max(max_s_new)
        m_t = _safe_max(max_t_new)
        rescale_t = tl.exp2((max_t - m_t) * k_t)
        e_b = tl.exp2((t - m_t) * k_t)
        z_a = z_a * tl.exp2((max_s - m_s) * k_t) + tl.sum(tl.exp2((s - m_s) * k_t), axis=0)
        w_sum = (w_sum + z_b * ((m_t_prev - m_t) - (m_s_prev - m_s))) * rescale_t
        w_sum += tl.sum(tl.where(e_b == 0.0, 0.0, e_b * ((t - m_t) - (s - m_s))), axis=0)
        z_b = z_b * rescale_t + tl.sum(e_b, axis=0)
        if not SHARE_T1:
            z_1 = z_1 * tl.exp2((max_s - m_s) * LOG2E) + tl.sum(
                tl.exp2((s - m_s) * LOG2E), axis=0
            )
        m_s_prev = m_s
        m_t_prev = m_t
        max_s = max_s_new
        max_t = max_t_new
    if SHARE_T1:
        z_1 = z_a
    return max_s, max_t, z_a, z_b, z_1, w_sum


@triton.jit
def _kd_row_grads(
    s, t, p_st, p_tt, p_s1, cols, label, m_s, m_t, log2_za, log2_zb, kl, inv_t, coef_kl, coef_ce,
    TEACHER_GRAD: tl.constexpr,
):
    """Gradients of one block of a row from its probabilities and the row's final statistics."""
    onehot = (cols == label).to(tl.float32)
    grad_s = coef_kl * (p_st - p_tt) + coef_ce * (p_s1 - onehot)
    if TEACHER_GRAD:
        log_ratio = ((t - m_t) - (s - m_s)) * inv_t - LN2 * (log2_zb - log2_za)
        grad_t = tl.where(p_tt == 0.0, 0.0, coef_kl * p_tt * (log_ratio - kl))
    else:
        grad_t = grad_s
    return grad_s, grad_t


@triton.jit
def _grad_sweep(
    s_row, student_col_stride, t_row, teacher_col_stride,
    gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V, label,
    m_s, m_t, log2_za, log2_zb, log2_z1, kl, inv_t, coef_kl, coef_ce,
    SHARE_T1: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Second sweep over a row (or shard): gradients from the final statistics, stored.

    Last block first: those bytes were read most recently by the first sweep and are the
    likeliest to still be in L2.
    """
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    k_t = inv_t * LOG2E
    num_blocks = tl.cdiv(V, BLOCK_V)
    for k in range(0, num_blocks):
        offs = (num_blocks - 1 - k) * BLOCK_V + cols
        mask = offs < V
        s = tl.load(s_row + offs * student_col_stride, mask=mask, other=neg_inf).to(tl.float32)
        t = tl.load(t_row + offs * teacher_col_stride, mask=mask, other=neg_inf).to(tl.float32)
        p_st = tl.exp2((s - m_s) * k_t - log2_za)
        p_tt = tl.exp2((t - m_t) * k_t - log2_zb)
        if SHARE_T1:
            p_s1 = p_st
        else:
            p_s1 = tl.exp2((s - m_s) * LOG2E - log2_z1)
        grad_s, grad_t = _kd_row_grads(
            s, t, p_st, p_tt, p_s1, offs, label, m_s, m_t, log2_za, log2_zb, kl,
            inv_t, coef_kl, coef_ce, TEACHER_GRAD,
        )
        if STUDENT_GRAD:
            tl.store(gs_row + offs * grad_s_col_stride, grad_s.to(gs_row.dtype.element_ty),
                     mask=mask)
        if TEACHER_GRAD:
            tl.store(gt_row + offs * grad_t_col_stride, grad_t.to(gt_row.dtype.element_ty),
                     mask=mask)


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
def _kd_loss_fwd_kernel(
    student_ptr, student_row_stride, student_col_stride,  # (N, V) logits, any dtype/strides
    teacher_ptr, teacher_row_stride, teacher_col_stride,  # (N, V) logits, any dtype/strides
    labels_ptr, labels_stride,  # (N,) integer class ids; unused without HAS_LABELS
    weight_ptr,  # () fp32 reduction weight w: 1, 1/batch or 1/(counted rows)
    loss_ptr,  # (N,) fp32 out: per-row loss, 0 for ignored rows
    grad_s_ptr, grad_s_row_stride, grad_s_col_stride,  # (N, V) out, student dtype; may alias s
    grad_t_ptr, grad_t_row_stride, grad_t_col_stride,  # (N, V) out, teacher dtype
    V,  # vocabulary size, >= 1
    temperature, alpha, ignore_index,  # runtime scalars: changing them does not recompile
    HAS_LABELS: tl.constexpr,
    SHARE_T1: tl.constexpr,  # temperature == 1: the CE softmax is the KL softmax
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    ON_CHIP: tl.constexpr,  # V <= BLOCK_V: keep the row in registers, read it once
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: N * V can exceed 2^31
    s_row = student_ptr + row * student_row_stride
    t_row = teacher_ptr + row * teacher_row_stride
    gs_row = grad_s_ptr + row * grad_s_row_stride
    gt_row = grad_t_ptr + row * grad_t_row_stride
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    k_t = (1.0 / temperature) * LOG2E
    inv_t = 1.0 / temperature

    label, counted = _row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if counted:
        weight = tl.load(weight_ptr).to(tl.float32)
        if ON_CHIP:
            mask = cols < V
            s = tl.load(s_row + cols * student_col_stride, mask=mask, other=neg_inf).to(tl.float32)
            t = tl.load(t_row + cols * teacher_col_stride, mask=mask, other=neg_inf).to(tl.float32)
            m_s = _safe_max(tl.max(s, axis=0))
            m_t = _safe_max(tl.max(t, axis=0))
            # The exponentials stay in registers and become the probabilities of the gradient:
            # 3 exp2 per element in all (2 when T == 1).
            e_a = tl.exp2((s - m_s) * k_t)
            e_b = tl.exp2((t - m_t) * k_t)
            z_a = tl.sum(e_a, axis=0)
            z_b = tl.sum(e_b, axis=0)
            if SHARE_T1:
                e_1 = e_a
            else:
                e_1 = tl.exp2((s - m_s) * LOG2E)
            z_1 = tl.sum(e_1, axis=0)
            w_sum = tl.sum(tl.where(e_b == 0.0, 0.0, e_b * ((t - m_t) - (s - m_s))), axis=0)
        else:
            # Sweep 1: online max / sum-exp of the three softmaxes and of W, block by block.
            max_s, max_t, z_a, z_b, z_1, w_sum = _row_stats_sweep(
                s_row, student_col_stride, t_row, teacher_col_stride, V, k_t, SHARE_T1, BLOCK_V,
            )
            m_s = _safe_max(max_s)
            m_t = _safe_max(max_t)

        log2_za = tl.log2(z_a)
        log2_zb = tl.log2(z_b)
        log2_z1 = tl.log2(z_1)
        kl = (w_sum / z_b) * inv_t + LN2 * (log2_za - log2_zb)
        row_loss = alpha * temperature * temperature * kl
        if HAS_LABELS:
            in_range = (label >= 0) & (label < V)
            # Out-of-range labels never touch memory; their NaN makes the caller's bug visible.
            s_label = tl.load(
                s_row + label * student_col_stride, mask=in_range, other=float("nan")
            ).to(tl.float32)
            ce = (m_s - s_label) + LN2 * log2_z1
            row_loss += (1.0 - alpha) * ce
        tl.store(loss_ptr + row, row_loss)

        if STUDENT_GRAD or TEACHER_GRAD:
            coef_kl = weight * alpha * temperature
            coef_ce = weight * (1.0 - alpha)
            if ON_CHIP:
                grad_s, grad_t = _kd_row_grads(
                    s, t, e_a * (1.0 / z_a), e_b * (1.0 / z_b), e_1 * (1.0 / z_1), cols, label,
                    m_s, m_t, log2_za, log2_zb, kl, inv_t, coef_kl, coef_ce, TEACHER_GRAD,
                )
                if STUDENT_GRAD:
                    tl.store(gs_row + cols * grad_s_col_stride,
                             grad_s.to(grad_s_ptr.dtype.element_ty), mask=mask)
                if TEACHER_GRAD:
                    tl.store(gt_row + cols * grad_t_col_stride,
                             grad_t.to(grad_t_ptr.dtype.element_ty), mask=mask)
            else:
                _grad_sweep(
                    s_row, student_col_stride, t_row, teacher_col_stride,
                    gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V, label,
                    m_s, m_t, log2_za, log2_zb, log2_z1, kl, inv_t, coef_kl, coef_ce,
                    SHARE_T1, STUDENT_GRAD, TEACHER_GRAD, BLOCK_V,
                )
    else:
        # Ignored row: no loss, zero gradient, and its logits are never read.
        tl.store(loss_ptr + row, 0.0)
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


def forward_config(vocab_size: int) -> dict:
    """Block size and warps the forward kernel uses for rows of `vocab_size` classes."""
    if vocab_size <= MAX_ON_CHIP_V:
        block = max(triton.next_power_of_2(vocab_size), 128)
        # 16 values per thread and operand: enough loads in flight per thread, no spills.
        num_warps = min(max(block // 512, 1), 16)
        return {"ON_CHIP": True, "BLOCK_V": block, "num_warps": num_warps}
    return {"ON_CHIP": False, "BLOCK_V": LOOP_BLOCK_V, "num_warps": LOOP_NUM_WARPS}


def kd_forward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    row_weight: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int,
    student_grad: bool,
    teacher_grad: bool,
    grad_student_out: torch.Tensor | None = None,
):
    """Launch the fused forward on 2-D (N, V) logits.

    Returns (row_losses fp32 (N,), grad_student (N, V) or None, grad_teacher (N, V) or None).
    grad_student_out, when given, receives the student gradient (it may be the student logits
    themselves, for inplace_backward). Arguments are assumed validated by fastkd._validation.
    """
    n_rows, vocab = student_logits.shape
    row_losses, grad_s, grad_t = allocate_outputs(
        student_logits, teacher_logits, student_grad=student_grad, teacher_grad=teacher_grad,
        grad_student_out=grad_student_out,
    )
    if n_rows == 0:
        return row_losses, grad_s, grad_t
    # Pointers that a constexpr flag leaves unused still need a tensor to point at.
    gs = grad_s if grad_s is not None else row_losses.view(1, -1)
    gt = grad_t if grad_t is not None else row_losses.view(1, -1)
    lab = labels if labels is not None else row_losses
    config = forward_config(vocab)
    _kd_loss_fwd_kernel[(n_rows,)](
        student_logits, student_logits.stride(0), student_logits.stride(1),
        teacher_logits, teacher_logits.stride(0), teacher_logits.stride(1),
        lab, lab.stride(0) if labels is not None else 0,
        row_weight,
        row_losses,
        gs, gs.stride(0), gs.stride(1),
        gt, gt.stride(0), gt.stride(1),
        vocab,
        float(temperature), float(alpha), int(ignore_index),
        HAS_LABELS=labels is not None,
        SHARE_T1=float(temperature) == 1.0,
        STUDENT_GRAD=student_grad,
        TEACHER_GRAD=teacher_grad,
        ON_CHIP=config["ON_CHIP"],
        BLOCK_V=config["BLOCK_V"],
        num_warps=config["num_warps"],
    )
    return row_losses, grad_s, grad_t


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
