"""Vocab-parallel KD loss: Triton kernels for the shard statistics and the shard gradient.

Rank r of R holds columns [v_r, v_r + V_r) of the vocabulary for all N rows (Megatron layout,
V_r may differ between ranks). Notation and the single-device derivation are in
kernels/kd_loss.py; here every quantity of a row is split over shards.

Shard statistics (kernel 1, one program per row, one sweep over the shard). With the shard's
raw maxima m_s^r = max s, m_t^r = max t (-inf if the shard is masked) and their safe versions
ms^r, mt^r (0 instead of -inf):

    Z_a^r = sum exp((s - ms^r) / T)    Z_1^r = sum exp(s - ms^r)    Z_b^r = sum exp((t - mt^r) / T)
    W^r   = sum exp((t - mt^r) / T) * ((t - mt^r) - (s - ms^r))    (0 where the teacher is masked)
    y^r   = s[label - v_r] and hit^r = 1 if the label falls in the shard, else 0 and 0

Kernel 1 accumulates them block by block and, whenever a block raises the running maxima, moves
the sums to the new ones: the same move the combination below makes across shards. With the
centred logit sum (label smoothing) and the shard's column count they make 10 floats per row
(layout in fastkd._torch_backend), all a rank contributes; one all-gather stacks them as
(R, N, 10). Reverse KL accumulates W weighted by the student instead of the teacher.

Combination (fastkd._torch_backend.combine_stats, O(N R) work on the device, shared with the
PyTorch backend). The global maxima are
M_s = max_r m_s^r and M_t = max_r m_t^r (safe: Ms, Mt). Rescaling each shard's sums from its own
maxima to the global ones, with a_r = exp((m_s^r - Ms) / T), o_r = exp(m_s^r - Ms),
b_r = exp((m_t^r - Mt) / T) (0 for a masked shard, since the raw maximum is -inf):

    Z_a = sum_r a_r Z_a^r      Z_1 = sum_r o_r Z_1^r      Z_b = sum_r b_r Z_b^r
    W   = sum_r b_r (W^r + ((mt^r - Mt) - (ms^r - Ms)) Z_b^r)
        = sum_v exp((t_v - Mt) / T) ((t_v - Mt) - (s_v - Ms))

W^r is taken relative to the shard's own maxima and moved to the global ones by the drift term:
every difference there (t - mt^r, mt^r - Mt, ...) subtracts two values of the same tensor, so a
common 1e4 offset of the logits cancels before any rounding and costs no precision. Then

    KL = W / (T Z_b) + log Z_a - log Z_b          CE = (Ms - s[label]) + log Z_1
    s[label] = sum_r y^r if sum_r hit^r > 0, else NaN (label outside the global vocabulary)

JSD, TVD and the skew divergences then need D and the gradient row sums A, B (kernels/
divergences.py), which exist only once the global normalisers do: kernel 2 sums them over the
shard (one more read of s and t) and an all-reduce of N x 3 floats adds the shards.

Shard gradient (kernel 3, a sweep over the shard), the formulas of kd_loss.py with the global
statistics: p_s^T = exp((s - Ms) / T) / Z_a, p_t^T = exp((t - Mt) / T) / Z_b,
p_s = exp(s - Ms) / Z_1, and the one-hot term only in the shard that holds the label:

    w dloss/ds = w (a T (p_s^T - p_t^T) + (1 - a) (p_s - onehot(label - v_r)))
    w dloss/dt = w a T p_t^T (log p_t^T - log p_s^T - KL)          (mutual distillation only)

Every rank computes the same loss of the row; the gradient covers its own columns only, so
backward needs no communication.

Memory traffic per row of a shard of V_r elements (e = element size): kernel 1 reads s and t
(2 V_r e) and writes 40 bytes; kernel 3 reads the row's combined statistics (48 bytes), reads s
and t again and writes the gradient (3 V_r e): 5 V_r e in all, 7 V_r e with kernel 2; each rank
sends its 40 bytes per row to the R - 1 others and receives theirs, no N x V data crosses ranks.
The sweeps are unavoidable, since the global statistics exist only after the collective between
them. Without a gradient (evaluation) kernel 3 does not run. Ignored rows read no logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _torch_backend
from .._spec import LossOptions
from .kd_loss import (
    LOG2E,
    LOOP_BLOCK_V,
    LOOP_NUM_WARPS,
    _divergence_sums_sweep,
    _grad_sweep,
    _row_label,
    _row_stats_sweep,
    _store_zero_grads,
    kernel_flags,
    scale_rows_,
)

__all__ = ["shard_stats", "shard_divergence_sums", "shard_grads", "scale_rows_"]

# The statistics' column indices (fastkd._torch_backend's layout), as compile-time constants.
_MAX_S = tl.constexpr(_torch_backend.STAT_MAX_S)
_MAX_T = tl.constexpr(_torch_backend.STAT_MAX_T)
_Z_A = tl.constexpr(_torch_backend.STAT_Z_A)
_Z_1 = tl.constexpr(_torch_backend.STAT_Z_1)
_Z_B = tl.constexpr(_torch_backend.STAT_Z_B)
_W = tl.constexpr(_torch_backend.STAT_W)
_SUM_S = tl.constexpr(_torch_backend.STAT_SUM_S)
_COLUMNS = tl.constexpr(_torch_backend.STAT_COLUMNS)
_LABEL_LOGIT = tl.constexpr(_torch_backend.STAT_LABEL_LOGIT)
_LABEL_HIT = tl.constexpr(_torch_backend.STAT_LABEL_HIT)
_NUM_STATS = tl.constexpr(_torch_backend.NUM_STATS)

# Columns of the (N, NUM_ROW_STATE) combined row state that kernels 2 and 3 read.
_STATE_COLUMNS = ("m_s", "m_t", "log2_za", "log2_zb", "log2_z1", "divergence", "a_sum", "b_sum",
                  "coef_div", "coef_p1", "coef_label", "coef_uniform")
NUM_ROW_STATE = len(_STATE_COLUMNS)


@triton.jit
def _vp_stats_kernel(
    student_ptr, student_row_stride, student_col_stride,  # (N, V_local) student shard, any strides
    teacher_ptr, teacher_row_stride, teacher_col_stride,  # (N, V_local) teacher shard, any strides
    labels_ptr, labels_stride,  # (N,) global class ids; unused without HAS_LABELS
    stats_ptr, stats_slice_stride, stats_row_stride,  # (G, N, NUM_STATS) fp32 out, unit columns
    V_local,  # columns in this shard, >= 1
    vocab_start,  # global id of the shard's first column
    slice_cols,  # columns per slice: program (row, g) covers [g slice_cols, (g+1) slice_cols)
    temperature, ignore_index,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    T_POWER: tl.constexpr,
    SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: N * V_local can exceed 2^31
    part = tl.program_id(1)
    first_col = part.to(tl.int64) * slice_cols
    V_local = tl.minimum(V_local - first_col, slice_cols)  # this program's columns
    vocab_start = vocab_start + first_col
    s_row = student_ptr + row * student_row_stride + first_col * student_col_stride
    t_row = teacher_ptr + row * teacher_row_stride + first_col * teacher_col_stride
    out = stats_ptr + part * stats_slice_stride + row * stats_row_stride
    k_t = (1.0 / temperature) * LOG2E

    label, counted = _row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if counted:
        # The same sweep as kd_loss.py's first one, over this shard only.
        max_s, max_t, z_a, z_b, z_1, w_local, sum_s = _row_stats_sweep(
            s_row, student_col_stride, t_row, teacher_col_stride, V_local, k_t,
            DIVERGENCE, T_POWER, SMOOTHING, BLOCK_V,
        )
        label_logit = tl.zeros((), tl.float32)
        hit = tl.zeros((), tl.float32)
        if HAS_LABELS:
            local = label - vocab_start
            in_shard = (local >= 0) & (local < V_local)
            # Only the shard that holds the label reads it; the others never touch memory.
            label_logit = tl.load(s_row + local * student_col_stride, mask=in_shard,
                                  other=0.0).to(tl.float32)
            label_logit = tl.where(in_shard, label_logit - tl.where(
                max_s == float("-inf"), 0.0, max_s), 0.0)
            hit = in_shard.to(tl.float32)
        tl.store(out + _MAX_S, max_s)
        tl.store(out + _MAX_T, max_t)
        tl.store(out + _Z_A, z_a)
        tl.store(out + _Z_1, z_1)
        tl.store(out + _Z_B, z_b)
        tl.store(out + _W, w_local)
        tl.store(out + _SUM_S, sum_s)
        tl.store(out + _COLUMNS, V_local * 1.0)
        tl.store(out + _LABEL_LOGIT, label_logit)
        tl.store(out + _LABEL_HIT, hit)
    else:
        # Ignored row: its statistics are never used; zeros keep the exchanged buffer defined,
        # and the column count keeps the combined vocabulary size finite.
        for k in tl.static_range(_NUM_STATS):
            tl.store(out + k, 0.0)
        tl.store(out + _COLUMNS, V_local * 1.0)


@triton.jit
def _vp_rows_kernel(
    state_ptr, state_row_stride,  # (N, NUM_ROW_STATE) fp32 combined row state, unit col stride
    sums_ptr, sums_slice_stride, sums_row_stride,  # (G, N, 3) fp32 out (SUMS only): D, A, B
    student_ptr, student_row_stride, student_col_stride,  # (N, V_local) student shard
    teacher_ptr, teacher_row_stride, teacher_col_stride,  # (N, V_local) teacher shard
    labels_ptr, labels_stride,  # (N,) global class ids; unused without HAS_LABELS
    grad_s_ptr, grad_s_row_stride, grad_s_col_stride,  # (N, V_local) out; may be the student
    grad_t_ptr, grad_t_row_stride, grad_t_col_stride,  # (N, V_local) out
    V_local, vocab_start,
    slice_cols,  # columns per slice, as in _vp_stats_kernel
    temperature, lam, ignore_index,
    SUMS: tl.constexpr,  # kernel 2 (shard sums of D, A, B) rather than kernel 3 (gradients)
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    T_POWER: tl.constexpr,
    SMOOTHING: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    first_col = part.to(tl.int64) * slice_cols
    V_local = tl.minimum(V_local - first_col, slice_cols)
    vocab_start = vocab_start + first_col
    s_row = student_ptr + row * student_row_stride + first_col * student_col_stride
    t_row = teacher_ptr + row * teacher_row_stride + first_col * teacher_col_stride
    gs_row = grad_s_ptr + row * grad_s_row_stride + first_col * grad_s_col_stride
    gt_row = grad_t_ptr + row * grad_t_row_stride + first_col * grad_t_col_stride
    sums = sums_ptr + part * sums_slice_stride + row * sums_row_stride
    state = state_ptr + row * state_row_stride
    inv_t = 1.0 / temperature
    log_lam = tl.log(tl.maximum(lam, 1e-30))
    log_1m_lam = tl.log(tl.maximum(1.0 - lam, 1e-30))

    label, counted = _row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)
    if counted:
        m_s = tl.load(state + 0)
        m_t = tl.load(state + 1)
        log2_za = tl.load(state + 2)
        log2_zb = tl.load(state + 3)
        if SUMS:
            d_sum, a_sum, b_sum = _divergence_sums_sweep(
                s_row, student_col_stride, t_row, teacher_col_stride, V_local,
                m_s, m_t, log2_za, log2_zb, inv_t * LOG2E, lam, log_lam, log_1m_lam,
                DIVERGENCE, BLOCK_V,
            )
            tl.store(sums, d_sum)
            tl.store(sums + 1, a_sum)
            tl.store(sums + 2, b_sum)
        else:
            _grad_sweep(
                s_row, student_col_stride, t_row, teacher_col_stride,
                gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V_local,
                label - vocab_start,
                m_s, m_t, log2_za, log2_zb, tl.load(state + 4), tl.load(state + 5),
                tl.load(state + 6), tl.load(state + 7), inv_t, lam, log_lam, log_1m_lam,
                tl.load(state + 8), tl.load(state + 9), tl.load(state + 10),
                tl.load(state + 11),
                DIVERGENCE, T_POWER, HAS_LABELS, SMOOTHING, STUDENT_GRAD, TEACHER_GRAD,
                BLOCK_V,
            )
    elif SUMS:
        for k in tl.static_range(3):
            tl.store(sums + k, 0.0)
    else:
        _store_zero_grads(gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V_local,
                          STUDENT_GRAD, TEACHER_GRAD, BLOCK_V)


def sweep_config(vocab_local: int) -> dict:
    """Block and warps of the kernels' sweeps over a shard of `vocab_local` columns."""
    # Shards at least as wide as kd_loss's loop block use its tuned block and warps. Narrower
    # ones shrink the block to the shard, with one warp per 512 columns: the same 16 elements
    # per thread and operand as the full block (fewer below 512 columns, where one warp is the
    # floor; the 128-column floor gives each lane 4 elements, one 16-byte fp32 load).
    block = min(max(triton.next_power_of_2(vocab_local), 128), LOOP_BLOCK_V)
    num_warps = LOOP_NUM_WARPS if block == LOOP_BLOCK_V else max(block // 512, 1)
    return {"BLOCK_V": block, "num_warps": num_warps}


def _slices(vocab: int, slice_cols: int | None) -> tuple[int, int]:
    """(columns per slice, number of slices G) of a shard; None: the shard is one slice."""
    if slice_cols is None or slice_cols >= vocab:
        return vocab, 1
    return slice_cols, triton.cdiv(vocab, slice_cols)


def shard_stats(student, teacher, labels, *, vocab_start: int, options: LossOptions,
                slice_cols: int | None = None):
    """(G, N, NUM_STATS) fp32 statistics of this rank's (N, V_local) shard, one slab per slice
    of slice_cols columns (layout in fastkd._torch_backend). Arguments are assumed validated."""
    n_rows, vocab = student.shape
    cols, parts = _slices(vocab, slice_cols)
    stats = torch.empty((parts, n_rows, _torch_backend.NUM_STATS), dtype=torch.float32,
                        device=student.device)
    if n_rows == 0:
        return stats
    lab = labels if labels is not None else stats
    config = sweep_config(cols)
    _vp_stats_kernel[(n_rows, parts)](
        student, student.stride(0), student.stride(1),
        teacher, teacher.stride(0), teacher.stride(1),
        lab, lab.stride(0) if labels is not None else 0,
        stats, stats.stride(0), stats.stride(1),
        vocab, int(vocab_start), cols,
        float(options.temperature), int(options.ignore_index),
        **kernel_flags(options, has_labels=labels is not None),
        BLOCK_V=config["BLOCK_V"],
        num_warps=config["num_warps"],
    )
    return stats


def _row_state(state, a_sum, b_sum, labels, weight, options: LossOptions) -> torch.Tensor:
    """The (N, NUM_ROW_STATE) fp32 combined state of the rows (base-2 logs, as the sweeps)."""
    log2e = 1.4426950408889634
    divergence = state.divergence if state.divergence is not None else a_sum
    columns = [state.m_s, state.m_t, state.log_z_a * log2e, state.log_z_b * log2e,
               state.log_z_1 * log2e, divergence, a_sum, b_sum]
    if weight is not None:
        columns.extend(_torch_backend.gradient_coefficients(state, labels, weight, options))
    else:
        columns.extend([torch.zeros_like(state.m_s)] * 4)
    return torch.stack([c.to(torch.float32).expand_as(state.m_s) for c in columns], dim=1)


def _launch_rows(state_rows, sums, student, teacher, labels, grad_student, grad_teacher,
                 options: LossOptions, vocab_start: int, slice_cols, *, want_sums: bool):
    n_rows, vocab = student.shape
    if n_rows == 0:
        return
    cols, parts = _slices(vocab, slice_cols)
    lab = labels if labels is not None else state_rows
    gs = grad_student if grad_student is not None else state_rows
    gt = grad_teacher if grad_teacher is not None else state_rows
    out = sums if sums is not None else state_rows.view(1, *state_rows.shape)
    config = sweep_config(cols)
    _vp_rows_kernel[(n_rows, parts)](
        state_rows, state_rows.stride(0),
        out, out.stride(0), out.stride(1),
        student, student.stride(0), student.stride(1),
        teacher, teacher.stride(0), teacher.stride(1),
        lab, lab.stride(0) if labels is not None else 0,
        gs, gs.stride(0), gs.stride(1),
        gt, gt.stride(0), gt.stride(1),
        vocab, int(vocab_start), cols,
        float(options.temperature), float(options.divergence_parameter),
        int(options.ignore_index),
        SUMS=want_sums,
        **kernel_flags(options, has_labels=labels is not None),
        STUDENT_GRAD=grad_student is not None,
        TEACHER_GRAD=grad_teacher is not None,
        BLOCK_V=config["BLOCK_V"],
        num_warps=config["num_warps"],
    )


def shard_divergence_sums(state, student, teacher, options: LossOptions, *, labels=None,
                          vocab_start: int = 0, slice_cols: int | None = None):
    """(G, N, 3) fp32 sums of D, A, B (JSD, TVD, skew) per slice; ignored rows hold zeros."""
    zero = torch.zeros_like(state.m_s)
    state_rows = _row_state(state, zero, zero, None, None, options)
    _, parts = _slices(student.shape[1], slice_cols)
    sums = torch.empty((parts, student.shape[0], 3), dtype=torch.float32, device=student.device)
    _launch_rows(state_rows, sums, student, teacher, labels, None, None, options, vocab_start,
                 slice_cols, want_sums=True)
    return sums


def shard_grads(state, a_sum, b_sum, student, teacher, labels, weight, options: LossOptions, *,
                vocab_start: int, grad_student=None, grad_teacher=None,
                slice_cols: int | None = None) -> None:
    """w * dloss/d(shard) into grad_student / grad_teacher (grad_student may be the shard)."""
    state_rows = _row_state(state, a_sum, b_sum, labels, weight, options)
    _launch_rows(state_rows, None, student, teacher, labels, grad_student, grad_teacher, options,
                 vocab_start, slice_cols, want_sums=False)
