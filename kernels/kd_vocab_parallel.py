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
the sums to the new ones: the same move the combination below makes across shards. These 8 floats
per row are all a rank contributes; one all-gather stacks them as (R, N, 8).

Combination (start of kernel 2, per row, over the R ranks). The global maxima are
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

Shard gradient (rest of kernel 2, a second sweep over the shard), the formulas of kd_loss.py with
the global statistics: p_s^T = exp((s - Ms) / T) / Z_a, p_t^T = exp((t - Mt) / T) / Z_b,
p_s = exp(s - Ms) / Z_1, and the one-hot term only in the shard that holds the label:

    w dloss/ds = w (a T (p_s^T - p_t^T) + (1 - a) (p_s - onehot(label - v_r)))
    w dloss/dt = w a T p_t^T (log p_t^T - log p_s^T - KL)          (mutual distillation only)

Every rank computes the same loss of the row; the gradient covers its own columns only, so
backward needs no communication.

Memory traffic per row of a shard of V_r elements (e = element size): kernel 1 reads s and t
(2 V_r e) and writes 32 bytes; kernel 2 reads 32 R bytes of statistics, reads s and t again and
writes the gradient (3 V_r e): 5 V_r e in all; each rank sends its 32 bytes per row to the R - 1
others and receives theirs, no N x V data crosses ranks. The two sweeps are
unavoidable, since the global statistics exist only after the collective between them. Without a
gradient (evaluation) kernel 2 reads only the statistics. Ignored rows read no logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._buffers import allocate_outputs
from .._vocab_parallel_torch import (
    NUM_STATS,
    STAT_LABEL_HIT,
    STAT_LABEL_LOGIT,
    STAT_MAX_S,
    STAT_MAX_T,
    STAT_W,
    STAT_Z_1,
    STAT_Z_A,
    STAT_Z_B,
)
from .kd_loss import (
    LN2,
    LOG2E,
    LOOP_BLOCK_V,
    LOOP_NUM_WARPS,
    _grad_sweep,
    _row_label,
    _row_stats_sweep,
    _safe_max,
    _store_zero_grads,
    scale_rows_,
)

__all__ = ["shard_stats", "shard_loss_and_grad", "scale_rows_", "NUM_STATS"]

# The statistics' column indices, as constants the compiler folds into the kernels.
_MAX_S = tl.constexpr(STAT_MAX_S)
_MAX_T = tl.constexpr(STAT_MAX_T)
_Z_A = tl.constexpr(STAT_Z_A)
_Z_1 = tl.constexpr(STAT_Z_1)
_Z_B = tl.constexpr(STAT_Z_B)
_W = tl.constexpr(STAT_W)
_LABEL_LOGIT = tl.constexpr(STAT_LABEL_LOGIT)
_LABEL_HIT = tl.constexpr(STAT_LABEL_HIT)
_NUM_STATS = tl.constexpr(NUM_STATS)


@triton.jit
def _vp_stats_kernel(
    student_ptr, student_row_stride, student_col_stride,  # (N, V_local) student shard, any strides
    teacher_ptr, teacher_row_stride, teacher_col_stride,  # (N, V_local) teacher shard, any strides
    labels_ptr, labels_stride,  # (N,) global class ids; unused without HAS_LABELS
    stats_ptr, stats_row_stride,  # (N, NUM_STATS) fp32 out, unit column stride
    V_local,  # columns in this shard, >= 1
    vocab_start,  # global id of the shard's first column
    temperature, ignore_index,
    HAS_LABELS: tl.constexpr,
    SHARE_T1: tl.constexpr,  # temperature == 1: Z_1 is Z_a
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: N * V_local can exceed 2^31
    s_row = student_ptr + row * student_row_stride
    t_row = teacher_ptr + row * teacher_row_stride
    out = stats_ptr + row * stats_row_stride
    k_t = (1.0 / temperature) * LOG2E

    label, counted = _row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if counted:
        # The same sweep as kd_loss.py's first one, over this shard only.
        max_s, max_t, z_a, z_b, z_1, w_local = _row_stats_sweep(
            s_row, student_col_stride, t_row, teacher_col_stride, V_local, k_t, SHARE_T1, BLOCK_V,
        )

        label_logit = tl.zeros((), tl.float32)
        hit = tl.zeros((), tl.float32)
        if HAS_LABELS:
            local = label - vocab_start
            in_shard = (local >= 0) & (local < V_local)
            # Only the shard that holds the label reads it; the others never touch memory.
            label_logit = tl.load(s_row + local * student_col_stride, mask=in_shard,
                                  other=0.0).to(tl.float32)
            hit = in_shard.to(tl.float32)
        tl.store(out + _MAX_S, max_s)
        tl.store(out + _MAX_T, max_t)
        tl.store(out + _Z_A, z_a)
        tl.store(out + _Z_1, z_1)
        tl.store(out + _Z_B, z_b)
        tl.store(out + _W, w_local)
        tl.store(out + _LABEL_LOGIT, label_logit)
        tl.store(out + _LABEL_HIT, hit)
    else:
        # Ignored row: its statistics are never used; zeros keep the exchanged buffer defined.
        for k in tl.static_range(_NUM_STATS):
            tl.store(out + k, 0.0)


@triton.jit
def _vp_loss_grad_kernel(
    stats_ptr, stats_rank_stride, stats_row_stride,  # (R, N, NUM_STATS) fp32, unit col stride
    world_size,  # R, the number of shards
    student_ptr, student_row_stride, student_col_stride,  # (N, V_local) student shard
    teacher_ptr, teacher_row_stride, teacher_col_stride,  # (N, V_local) teacher shard
    labels_ptr, labels_stride,  # (N,) global class ids; unused without HAS_LABELS
    weight_ptr,  # () reduction weight w: 1, 1/batch or 1/(counted rows)
    loss_ptr,  # (N,) fp32 (fp64 for fp64 inputs) out: global per-row loss, 0 for ignored rows
    grad_s_ptr, grad_s_row_stride, grad_s_col_stride,  # (N, V_local) out, student dtype; may be s
    grad_t_ptr, grad_t_row_stride, grad_t_col_stride,  # (N, V_local) out, teacher dtype
    V_local, vocab_start,
    temperature, alpha, ignore_index,
    HAS_LABELS: tl.constexpr,
    SHARE_T1: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    WORLD_BLOCK: tl.constexpr,  # power of two >= R: all shards' statistics in one vector load
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * student_row_stride
    t_row = teacher_ptr + row * teacher_row_stride
    gs_row = grad_s_ptr + row * grad_s_row_stride
    gt_row = grad_t_ptr + row * grad_t_row_stride
    neg_inf = float("-inf")
    k_t = (1.0 / temperature) * LOG2E
    inv_t = 1.0 / temperature

    label, counted = _row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)

    if counted:
        ranks = tl.arange(0, WORLD_BLOCK)
        rank_mask = ranks < world_size
        stats = stats_ptr + ranks.to(tl.int64) * stats_rank_stride + row * stats_row_stride
        # Padding lanes look like fully masked shards: max -inf, empty sums.
        shard_max_s = tl.load(stats + _MAX_S, mask=rank_mask, other=neg_inf)
        shard_max_t = tl.load(stats + _MAX_T, mask=rank_mask, other=neg_inf)
        shard_z_a = tl.load(stats + _Z_A, mask=rank_mask, other=0.0)
        shard_z_b = tl.load(stats + _Z_B, mask=rank_mask, other=0.0)
        shard_w = tl.load(stats + _W, mask=rank_mask, other=0.0)
        m_s = _safe_max(tl.max(shard_max_s, axis=0))
        m_t = _safe_max(tl.max(shard_max_t, axis=0))
        scale_b = tl.exp2((shard_max_t - m_t) * k_t)
        z_a = tl.sum(tl.exp2((shard_max_s - m_s) * k_t) * shard_z_a, axis=0)
        z_b = tl.sum(scale_b * shard_z_b, axis=0)
        if SHARE_T1:
            z_1 = z_a
        else:
            shard_z_1 = tl.load(stats + _Z_1, mask=rank_mask, other=0.0)
            z_1 = tl.sum(tl.exp2((shard_max_s - m_s) * LOG2E) * shard_z_1, axis=0)
        drift = (_safe_max(shard_max_t) - m_t) - (_safe_max(shard_max_s) - m_s)
        mass_b = scale_b * shard_z_b
        # A shard without teacher mass adds 0, even where its W is inf (masked student).
        w = tl.sum(tl.where(mass_b == 0.0, 0.0, scale_b * shard_w + drift * mass_b), axis=0)
        log2_za = tl.log2(z_a)
        log2_zb = tl.log2(z_b)
        log2_z1 = tl.log2(z_1)
        kl = w / (z_b * temperature) + LN2 * (log2_za - log2_zb)
        row_loss = alpha * temperature * temperature * kl
        if HAS_LABELS:
            hits = tl.sum(tl.load(stats + _LABEL_HIT, mask=rank_mask, other=0.0), axis=0)
            label_logit = tl.sum(tl.load(stats + _LABEL_LOGIT, mask=rank_mask, other=0.0), axis=0)
            label_logit = tl.where(hits > 0.0, label_logit, float("nan"))
            row_loss += (1.0 - alpha) * ((m_s - label_logit) + LN2 * log2_z1)
        tl.store(loss_ptr + row, row_loss.to(loss_ptr.dtype.element_ty))

        if STUDENT_GRAD or TEACHER_GRAD:
            weight = tl.load(weight_ptr).to(tl.float32)
            coef_kl = weight * alpha * temperature
            coef_ce = weight * (1.0 - alpha)
            local_label = label - vocab_start  # matches no column unless the shard holds it
            _grad_sweep(
                s_row, student_col_stride, t_row, teacher_col_stride,
                gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V_local, local_label,
                m_s, m_t, log2_za, log2_zb, log2_z1, kl, inv_t, coef_kl, coef_ce,
                SHARE_T1, STUDENT_GRAD, TEACHER_GRAD, BLOCK_V,
            )
    else:
        # Ignored row: no loss, zero gradient, and its logits are never read.
        tl.store(loss_ptr + row, 0.0)
        _store_zero_grads(gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, V_local,
                          STUDENT_GRAD, TEACHER_GRAD, BLOCK_V)


def sweep_config(vocab_local: int) -> dict:
    """Block and warps of both kernels' sweeps over a shard of `vocab_local` columns."""
    # Shards at least as wide as kd_loss's loop block use its tuned block and warps. Narrower
    # ones shrink the block to the shard, with one warp per 512 columns: the same 16 elements
    # per thread and operand as the full block (fewer below 512 columns, where one warp is the
    # floor; the 128-column floor gives each lane 4 elements, one 16-byte fp32 load).
    block = min(max(triton.next_power_of_2(vocab_local), 128), LOOP_BLOCK_V)
    num_warps = LOOP_NUM_WARPS if block == LOOP_BLOCK_V else max(block // 512, 1)
    return {"BLOCK_V": block, "num_warps": num_warps}


def shard_stats(
    student_shard: torch.Tensor,
    teacher_shard: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    vocab_start: int,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """(N, NUM_STATS) fp32 statistics of this rank's (N, V_local) shard (layout in
    fastkd._vocab_parallel_torch). Arguments are assumed validated."""
    n_rows, vocab = student_shard.shape
    stats = torch.empty((n_rows, NUM_STATS), dtype=torch.float32, device=student_shard.device)
    if n_rows == 0:
        return stats
    lab = labels if labels is not None else stats
    config = sweep_config(vocab)
    _vp_stats_kernel[(n_rows,)](
        student_shard, student_shard.stride(0), student_shard.stride(1),
        teacher_shard, teacher_shard.stride(0), teacher_shard.stride(1),
        lab, lab.stride(0) if labels is not None else 0,
        stats, stats.stride(0),
        vocab, int(vocab_start),
        float(temperature), int(ignore_index),
        HAS_LABELS=labels is not None,
        SHARE_T1=float(temperature) == 1.0,
        BLOCK_V=config["BLOCK_V"],
        num_warps=config["num_warps"],
    )
    return stats


def shard_loss_and_grad(
    gathered: torch.Tensor,
    student_shard: torch.Tensor,
    teacher_shard: torch.Tensor,
    labels: torch.Tensor | None,
    row_weight: torch.Tensor,
    *,
    vocab_start: int,
    temperature: float,
    alpha: float,
    ignore_index: int,
    student_grad: bool,
    teacher_grad: bool,
    grad_student_out: torch.Tensor | None = None,
):
    """Global per-row losses (N,) and w * dloss/d(shard) from the (R, N, NUM_STATS)
    gathered statistics: (row_losses, grad_student or None, grad_teacher or None).
    grad_student_out, when given, receives the student gradient (it may be the student shard:
    each program reads a block before it writes the same block)."""
    world_size = gathered.shape[0]
    n_rows, vocab = student_shard.shape
    row_losses, grad_s, grad_t = allocate_outputs(
        student_shard, teacher_shard, student_grad=student_grad, teacher_grad=teacher_grad,
        grad_student_out=grad_student_out,
    )
    if n_rows == 0:
        return row_losses, grad_s, grad_t
    gathered = gathered.to(torch.float32)
    if gathered.stride(2) != 1:
        gathered = gathered.contiguous()
    # Pointers that a constexpr flag leaves unused still need a tensor to point at.
    gs = grad_s if grad_s is not None else row_losses.view(1, -1)
    gt = grad_t if grad_t is not None else row_losses.view(1, -1)
    lab = labels if labels is not None else row_losses
    config = sweep_config(vocab)
    _vp_loss_grad_kernel[(n_rows,)](
        gathered, gathered.stride(0), gathered.stride(1),
        world_size,
        student_shard, student_shard.stride(0), student_shard.stride(1),
        teacher_shard, teacher_shard.stride(0), teacher_shard.stride(1),
        lab, lab.stride(0) if labels is not None else 0,
        row_weight,
        row_losses,
        gs, gs.stride(0), gs.stride(1),
        gt, gt.stride(0), gt.stride(1),
        vocab, int(vocab_start),
        float(temperature), float(alpha), int(ignore_index),
        HAS_LABELS=labels is not None,
        SHARE_T1=float(temperature) == 1.0,
        STUDENT_GRAD=student_grad,
        TEACHER_GRAD=teacher_grad,
        WORLD_BLOCK=triton.next_power_of_2(world_size),
        BLOCK_V=config["BLOCK_V"],
        num_warps=config["num_warps"],
    )
    return row_losses, grad_s, grad_t
