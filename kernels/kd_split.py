"""Split-row KD loss (FASTKD_LONG_ROWS=split): one long row over G co-resident programs.

Row i of V > MAX_ON_CHIP_V classes is cut into G = ceil(V / SLICE) slices. The G programs of a
group each load their slice into registers once, reduce it to the partial statistics of
kd_loss.py's slot sweep (maxima, Z_a, Z_b, Z_1, W, the centred logit sum and its count), publish
them to a workspace and wait until the whole group has: a release increment of the row's arrival
counter after the stores, then acquire loads of it until it reaches G. Every member then combines
the G partials in the same fixed order (kd_loss._combine_partials, the vocab-parallel combination),
so all of them hold bit-identical row statistics without any float atomics, and writes its
slice's gradient from the registers it loaded: the probabilities are the slice's exponentials
times one per-slice constant, q = e_a exp2((m_slice - M) / T - log2 Z_a), with no second exp.
JSD, TVD and the skew divergences exchange a second time: the slice sums of D, A and B (a second
increment of the same counter, waiting for 2G).

Memory traffic per row: read s and t once, write the gradient once (3 V e, the floor), plus the
workspace (44 G bytes) and the counter. Exponentials per element: those of the on-chip path.

Safety of the wait:
- the grid is launched cooperatively (all programs co-resident or the launch fails) and never has
  more programs than fit at once, computed from the compiled kernel's registers, shared memory and
  warps and the device's SM count;
- it is a whole number of groups, and every member of a group walks the same rows in the same
  order (persistent loop), so no member waits for a program that has not been scheduled;
- the workspace and the counters are zeroed on the device before each launch (no host sync, so
  the launch can be captured in a CUDA graph).
Triton's interpreter runs programs one after another, so the wait cannot run on CPU: the launcher
refuses CPU tensors. Where a cooperative launch is refused (MIG, MPS), the loss falls back to
`two_launch` with a one-time warning.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from .. import _torch_backend
from .._spec import LossOptions
from .divergences import FORWARD_KL, REVERSE_KL, divergence_terms, online_row_sums
from .kd_loss import (
    LN2,
    LOG2E,
    _block_grads,
    _combine_partials,
    _label_logit,
    _power,
    _row_label,
    _row_loss_and_coefficients,
    _safe_max,
    _store_grads,
    _store_row_stats,
    kernel_flags,
)

# Columns per slice: a power of two that stays in registers (the on-chip row size).
SLICE_V = 8192
SLICE_NUM_WARPS = 16
# The workspace row of one slice: 8 partial statistics, then D, A, B of the second exchange.
_NUM_PARTIALS = tl.constexpr(11)
NUM_PARTIALS = 11


@triton.jit
def _publish_and_wait(arrivals, target):
    """Count this program in and wait until `target` programs of the group have arrived."""
    # Every thread's workspace stores come before the counter's release.
    tl.debug_barrier()
    tl.atomic_add(arrivals, 1, sem="release", scope="gpu")
    while tl.atomic_add(arrivals, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _split_kernel(
    student_ptr, student_row_stride, student_col_stride,  # (N, V) logits, any dtype/strides
    teacher_ptr, teacher_row_stride, teacher_col_stride,  # (N, V) logits
    labels_ptr, labels_stride,  # (N,) class ids; unused without HAS_LABELS
    weight_ptr,  # () reduction weight w
    row_stats_ptr, row_stats_stride,  # (N, 4) fp32 out: loss, D, CE, lse^2
    grad_s_ptr, grad_s_row_stride, grad_s_col_stride,  # (N, V) out; may alias the student
    grad_t_ptr, grad_t_row_stride, grad_t_col_stride,  # (N, V) out
    partials_ptr,  # (N, G_BLOCK, NUM_PARTIALS) fp32 workspace, zeroed
    arrivals_ptr,  # (N,) int32 workspace, zeroed: programs of the row's group that arrived
    n_rows, V,
    temperature, alpha, lam, label_smoothing, z_loss, ignore_index,
    G: tl.constexpr,  # slices per row, programs per group
    G_BLOCK: tl.constexpr,  # next power of two >= G
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, T_POWER: tl.constexpr,
    SMOOTHING: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    SLICE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_groups = tl.num_programs(0) // G
    group = pid // G
    member = pid % G
    cols = member * SLICE + tl.arange(0, SLICE)
    mask = cols < V
    parts = tl.arange(0, G_BLOCK)
    part_mask = parts < G
    neg_inf = float("-inf")
    inv_t = 1.0 / temperature
    k_t = inv_t * LOG2E
    log_lam = tl.log(tl.maximum(lam, 1e-30))
    log_1m_lam = tl.log(tl.maximum(1.0 - lam, 1e-30))
    ONLINE: tl.constexpr = (DIVERGENCE == FORWARD_KL) or (DIVERGENCE == REVERSE_KL)
    weight = tl.load(weight_ptr).to(tl.float32)
    # Every member of a group walks the same rows: the waits below always find the group whole.
    for row_index in range(group, n_rows, num_groups):
        row = row_index.to(tl.int64)
        s_row = student_ptr + row * student_row_stride
        t_row = teacher_ptr + row * teacher_row_stride
        gs_row = grad_s_ptr + row * grad_s_row_stride
        gt_row = grad_t_ptr + row * grad_t_row_stride
        stats_row = row_stats_ptr + row * row_stats_stride
        mine = partials_ptr + (row * G_BLOCK + member) * _NUM_PARTIALS
        label, counted = _row_label(labels_ptr, labels_stride, row, ignore_index, HAS_LABELS)
        if counted:
            s = tl.load(s_row + cols * student_col_stride, mask=mask, other=neg_inf).to(
                tl.float32)
            t = tl.load(t_row + cols * teacher_col_stride, mask=mask, other=neg_inf).to(
                tl.float32)
            # Read before any member writes a gradient (which may overwrite the logits).
            s_label, in_range = _label_logit(s_row, student_col_stride, label, V, HAS_LABELS)
            slice_max_s = tl.max(s, axis=0)
            slice_max_t = tl.max(t, axis=0)
            m_s = _safe_max(slice_max_s)
            m_t = _safe_max(slice_max_t)
            e_a = tl.exp2((s - m_s) * k_t)
            e_b = tl.exp2((t - m_t) * k_t)
            if T_POWER == 1:
                e_1 = e_a
            elif T_POWER == 0:
                e_1 = tl.exp2((s - m_s) * LOG2E)
            else:
                e_1 = _power(e_a, T_POWER)
            w_part = tl.zeros((), tl.float32)
            if DIVERGENCE == FORWARD_KL:
                w_part = tl.sum(tl.where(e_b == 0.0, 0.0, e_b * ((t - m_t) - (s - m_s))), axis=0)
            elif DIVERGENCE == REVERSE_KL:
                w_part = tl.sum(tl.where(e_a == 0.0, 0.0, e_a * ((s - m_s) - (t - m_t))), axis=0)
            tl.store(mine + 0, slice_max_s)
            tl.store(mine + 1, slice_max_t)
            tl.store(mine + 2, tl.sum(e_a, axis=0))
            tl.store(mine + 3, tl.sum(e_b, axis=0))
            tl.store(mine + 4, tl.sum(e_1, axis=0))
            tl.store(mine + 5, w_part)
            tl.store(mine + 6, tl.sum(tl.where(mask, s - m_s, 0.0), axis=0))
            tl.store(mine + 7, tl.sum(mask.to(tl.float32), axis=0))
            _publish_and_wait(arrivals_ptr + row, G)

            group_row = partials_ptr + (row * G_BLOCK + parts) * _NUM_PARTIALS
            row_max_s, row_max_t, z_a, z_b, z_1, w_sum, sum_s = _combine_partials(
                tl.load(group_row + 0, mask=part_mask, other=neg_inf),
                tl.load(group_row + 1, mask=part_mask, other=neg_inf),
                tl.load(group_row + 2, mask=part_mask, other=0.0),
                tl.load(group_row + 3, mask=part_mask, other=0.0),
                tl.load(group_row + 4, mask=part_mask, other=0.0),
                tl.load(group_row + 5, mask=part_mask, other=0.0),
                tl.load(group_row + 6, mask=part_mask, other=0.0),
                tl.load(group_row + 7, mask=part_mask, other=0.0),
                k_t, DIVERGENCE, T_POWER,
            )
            row_m_s = _safe_max(row_max_s)
            row_m_t = _safe_max(row_max_t)
            log2_za = tl.log2(z_a)
            log2_zb = tl.log2(z_b)
            log2_z1 = tl.log2(z_1)
            # The slice's exponentials become the row's probabilities with one factor each.
            q = e_a * tl.exp2((m_s - row_m_s) * k_t - log2_za)
            p = e_b * tl.exp2((m_t - row_m_t) * k_t - log2_zb)
            p_1 = e_1 * tl.exp2((m_s - row_m_s) * LOG2E - log2_z1)
            a_sum = tl.zeros((), tl.float32)
            b_sum = tl.zeros((), tl.float32)
            if DIVERGENCE == FORWARD_KL:
                divergence = (w_sum / z_b) * inv_t + LN2 * (log2_za - log2_zb)
                a = q
                b = p
            elif DIVERGENCE == REVERSE_KL:
                divergence = (w_sum / z_a) * inv_t + LN2 * (log2_zb - log2_za)
            if not ONLINE or DIVERGENCE == REVERSE_KL:
                log_q = ((s - row_m_s) * k_t - log2_za) * LN2
                log_p = ((t - row_m_t) * k_t - log2_zb) * LN2
                f, a, b = divergence_terms(log_p, log_q, p, q, lam, log_lam, log_1m_lam,
                                           DIVERGENCE)
            if not ONLINE:
                tl.store(mine + 8, tl.sum(f, axis=0))
                tl.store(mine + 9, tl.sum(a, axis=0))
                tl.store(mine + 10, tl.sum(b, axis=0))
                _publish_and_wait(arrivals_ptr + row, 2 * G)
                divergence = tl.sum(tl.load(group_row + 8, mask=part_mask, other=0.0), axis=0)
                a_sum = tl.sum(tl.load(group_row + 9, mask=part_mask, other=0.0), axis=0)
                b_sum = tl.sum(tl.load(group_row + 10, mask=part_mask, other=0.0), axis=0)
            else:
                a_sum, b_sum = online_row_sums(divergence, DIVERGENCE)
            row_loss, ce, lse, coef_div, coef_p1, coef_label, coef_uniform = \
                _row_loss_and_coefficients(
                    s_label, in_range, V, row_m_s, log2_z1, sum_s, divergence, weight,
                    temperature, alpha, label_smoothing, z_loss, HAS_LABELS, SMOOTHING,
                )
            if member == 0:
                _store_row_stats(stats_row, row_loss, divergence, ce, lse)
            if STUDENT_GRAD or TEACHER_GRAD:
                grad_s, grad_t = _block_grads(
                    s, t, p, q, p_1, a, b, cols, label, row_m_s, row_m_t, log2_za, log2_zb,
                    divergence, a_sum, b_sum, inv_t, coef_div, coef_p1, coef_label,
                    coef_uniform, DIVERGENCE, HAS_LABELS, True, SMOOTHING, TEACHER_GRAD,
                )
                _store_grads(gs_row, grad_s_col_stride, gt_row, grad_t_col_stride, cols, mask,
                             grad_s, grad_t, STUDENT_GRAD, TEACHER_GRAD, True)
        else:
            if member == 0:
                _store_row_stats(stats_row, 0.0, 0.0, 0.0, 0.0)
            if STUDENT_GRAD:
                tl.store(gs_row + cols * grad_s_col_stride,
                         tl.zeros((SLICE,), grad_s_ptr.dtype.element_ty), mask=mask)
            if TEACHER_GRAD:
                tl.store(gt_row + cols * grad_t_col_stride,
                         tl.zeros((SLICE,), grad_t_ptr.dtype.element_ty), mask=mask)


# Per-SM limits of the NVIDIA GPUs Triton targets (sm_80 and sm_90): registers, threads, CTAs.
_REGISTERS_PER_SM = 65536
_THREADS_PER_SM = 2048
_CTAS_PER_SM = 32


def resident_programs(compiled, device: torch.device) -> int:
    """How many programs of `compiled` fit on the device at once (all SMs)."""
    props = torch.cuda.get_device_properties(device)
    threads = 32 * compiled.metadata.num_warps
    by_registers = _REGISTERS_PER_SM // max(compiled.n_regs * threads, 1)
    by_threads = _THREADS_PER_SM // threads
    shared_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    by_shared = (shared_per_sm // compiled.metadata.shared if compiled.metadata.shared
                 else _CTAS_PER_SM)
    per_sm = min(by_registers, by_threads, by_shared, _CTAS_PER_SM)
    return per_sm * props.multi_processor_count


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"FASTKD_LONG_ROWS=split is unavailable here ({reason}); using two_launch",
                  RuntimeWarning, stacklevel=3)


def split_rows(student, teacher, labels, weight, row_stats, grad_student, grad_teacher,
               options: LossOptions) -> None:
    """Fill row_stats and the (N, V) gradients of long rows with the split-row kernel."""
    from .kd_loss import _two_launch_rows

    if student.dim() == 3:
        _torch_backend.per_batch(split_rows, student, teacher, labels, weight, row_stats,
                                 grad_student, grad_teacher, options)
        return
    n_rows, vocab = student.shape
    parts = triton.cdiv(vocab, SLICE_V)
    parts_block = triton.next_power_of_2(parts)
    partials = torch.zeros((n_rows, parts_block, NUM_PARTIALS), dtype=torch.float32,
                           device=student.device)
    arrivals = torch.zeros((n_rows,), dtype=torch.int32, device=student.device)
    gs = grad_student if grad_student is not None else row_stats
    gt = grad_teacher if grad_teacher is not None else row_stats
    lab = labels if labels is not None else row_stats
    args = (
        student, student.stride(0), student.stride(1),
        teacher, teacher.stride(0), teacher.stride(1),
        lab, lab.stride(0) if labels is not None else 0,
        weight, row_stats, row_stats.stride(0),
        gs, gs.stride(0), gs.stride(1),
        gt, gt.stride(0), gt.stride(1),
        partials, arrivals, n_rows, vocab,
        float(options.temperature), float(options.alpha), float(options.divergence_parameter),
        float(options.label_smoothing), float(options.z_loss), int(options.ignore_index),
    )
    meta = dict(G=parts, G_BLOCK=parts_block,
                **kernel_flags(options, has_labels=labels is not None),
                STUDENT_GRAD=grad_student is not None, TEACHER_GRAD=grad_teacher is not None,
                SLICE=SLICE_V, num_warps=SLICE_NUM_WARPS)
    compiled = _split_kernel.warmup(*args, grid=(parts,), **meta)
    groups = min(n_rows, resident_programs(compiled, student.device) // parts)
    if groups == 0:
        _warn_fallback(f"a row needs {parts} co-resident programs")
        _two_launch_rows(student, teacher, labels, weight, row_stats, grad_student,
                         grad_teacher, options)
        return
    try:
        _split_kernel[(groups * parts,)](*args, launch_cooperative_grid=True, **meta)
    except RuntimeError as error:  # cooperative launches refused (MIG, MPS)
        _warn_fallback(str(error).splitlines()[0][:120])
        _two_launch_rows(student, teacher, labels, weight, row_stats, grad_student,
                         grad_teacher, options)
