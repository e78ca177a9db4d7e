"""PyTorch backend of the vocab-parallel KD loss: shard statistics, their combination, and the
shard gradient.

It mirrors the launcher interface of fastkd.kernels.kd_vocab_parallel (shard_stats,
shard_loss_and_grad, scale_rows_), so fastkd.distributed does not care which one runs. The math is
derived in the comment block of kernels/kd_vocab_parallel.py; this module also defines the layout
of the per-row statistics that both backends exchange.
"""

from __future__ import annotations

import torch

from ._buffers import allocate_outputs, loss_dtype
from ._torch_backend import CHUNK_ELEMENTS, scale_rows_

__all__ = ["NUM_STATS", "shard_stats", "combine_stats", "shard_loss_and_grad", "scale_rows_"]

# Columns of the (N, NUM_STATS) statistics one shard contributes per row. The maxima are raw
# (-inf for a fully masked shard); the sums are relative to the shard's safe maxima.
STAT_MAX_S = 0  # max of the student logits over the shard
STAT_MAX_T = 1  # max of the teacher logits over the shard
STAT_Z_A = 2  # sum exp((s - m_s) / T)
STAT_Z_1 = 3  # sum exp(s - m_s)
STAT_Z_B = 4  # sum exp((t - m_t) / T)
STAT_W = 5  # sum exp((t - m_t) / T) * ((t - m_t) - (s - m_s))
STAT_LABEL_LOGIT = 6  # s[label] if the label falls in this shard, else 0
STAT_LABEL_HIT = 7  # 1 if the label falls in this shard, else 0
NUM_STATS = 8


def _safe(m: torch.Tensor) -> torch.Tensor:
    # A fully masked shard has max -inf; shifting by it gives -inf - -inf = NaN, shifting by 0
    # gives exp(-inf) = 0, its true contribution.
    return torch.where(m == float("-inf"), 0.0, m)


def _row_chunks(n_rows: int, vocab: int):
    chunk = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, chunk):
        yield slice(start, min(start + chunk, n_rows))


def shard_stats(
    student_shard: torch.Tensor,
    teacher_shard: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    vocab_start: int,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """(N, NUM_STATS) statistics of this rank's (N, V_local) shard; see the layout above.

    Ignored rows get statistics too (they are never used), so this needs no row selection.
    """
    n_rows, vocab = student_shard.shape
    dtype = loss_dtype(student_shard, teacher_shard)
    stats = torch.zeros((n_rows, NUM_STATS), dtype=dtype, device=student_shard.device)
    T = temperature
    for rows in _row_chunks(n_rows, vocab):
        s = student_shard[rows].to(dtype)
        t = teacher_shard[rows].to(dtype)
        max_s = s.amax(dim=-1)
        max_t = t.amax(dim=-1)
        s_c = s - _safe(max_s)[:, None]
        t_c = t - _safe(max_t)[:, None]
        e_b = torch.exp(t_c / T)
        z_a = torch.exp(s_c / T).sum(dim=-1)
        out = stats[rows]
        out[:, STAT_MAX_S] = max_s
        out[:, STAT_MAX_T] = max_t
        out[:, STAT_Z_A] = z_a
        out[:, STAT_Z_1] = z_a if T == 1.0 else torch.exp(s_c).sum(dim=-1)
        out[:, STAT_Z_B] = e_b.sum(dim=-1)
        # 0 * log 0 = 0: a masked teacher entry contributes nothing, even against a masked student.
        out[:, STAT_W] = torch.where(e_b == 0, 0.0, e_b * (t_c - s_c)).sum(dim=-1)
        if labels is not None:
            local = labels[rows].long() - vocab_start
            hit = (local >= 0) & (local < vocab)
            logit = s.gather(1, torch.where(hit, local, 0)[:, None]).squeeze(1)
            out[:, STAT_LABEL_LOGIT] = torch.where(hit, logit, 0.0)
            out[:, STAT_LABEL_HIT] = hit.to(dtype)
    return stats


def combine_stats(gathered: torch.Tensor, temperature: float):
    """Global per-row statistics from every rank's (R, N, NUM_STATS) shard statistics.

    Returns (m_s, m_t, log_z_a, log_z_b, log_z_1, kl, label_logit), each (N,): safe global maxima,
    the log partition functions relative to them, the KL term and s[label] (NaN when no shard
    holds the label, i.e. it lies outside the global vocabulary).
    """
    T = temperature
    max_s, max_t = gathered[..., STAT_MAX_S], gathered[..., STAT_MAX_T]
    z_b_shard = gathered[..., STAT_Z_B]
    m_s = _safe(max_s.amax(dim=0))
    m_t = _safe(max_t.amax(dim=0))
    # Raw shard maxima: a fully masked shard rescales by exp(-inf) = 0.
    scale_a = torch.exp((max_s - m_s) / T)
    scale_1 = torch.exp(max_s - m_s)
    scale_b = torch.exp((max_t - m_t) / T)
    z_a = (scale_a * gathered[..., STAT_Z_A]).sum(dim=0)
    z_1 = (scale_1 * gathered[..., STAT_Z_1]).sum(dim=0)
    z_b = (scale_b * z_b_shard).sum(dim=0)
    # Move each shard's W from its own maxima to the global ones: both differences are small
    # whatever the logits' offset, so a 1e4 shift costs no precision.
    drift = (_safe(max_t) - m_t) - (_safe(max_s) - m_s)
    weighted = scale_b * (gathered[..., STAT_W] + drift * z_b_shard)
    # A shard whose teacher mass vanishes contributes 0, even if its W is inf (masked student).
    w = torch.where(scale_b * z_b_shard == 0, 0.0, weighted).sum(dim=0)
    log_z_a, log_z_b, log_z_1 = z_a.log(), z_b.log(), z_1.log()
    kl = w / (z_b * T) + log_z_a - log_z_b
    hits = gathered[..., STAT_LABEL_HIT].sum(dim=0)
    label_logit = torch.where(
        hits > 0, gathered[..., STAT_LABEL_LOGIT].sum(dim=0), float("nan")
    )
    return m_s, m_t, log_z_a, log_z_b, log_z_1, kl, label_logit


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
    """Global per-row losses and w * dloss/d(shard) from the gathered statistics.

    Returns (row_losses (N,), grad_student (N, V_local) or None, grad_teacher or None); the
    losses are the same on every rank, the gradients cover this rank's columns only.
    grad_student_out, when given, receives the student gradient (it may be the student shard).
    """
    n_rows, vocab = student_shard.shape
    dtype = gathered.dtype
    T = temperature
    m_s, m_t, log_z_a, log_z_b, log_z_1, kl, label_logit = combine_stats(gathered, T)
    row_losses = alpha * T * T * kl
    counted = None
    if labels is not None:
        counted = labels.long() != ignore_index
        ce = (m_s - label_logit) + log_z_1
        row_losses = torch.where(counted, row_losses + (1.0 - alpha) * ce, 0.0)

    _, grad_s, grad_t = allocate_outputs(
        student_shard, teacher_shard, student_grad=student_grad, teacher_grad=teacher_grad,
        grad_student_out=grad_student_out,
    )
    if not (student_grad or teacher_grad):
        return row_losses, grad_s, grad_t

    weight = row_weight.to(dtype)
    coef_kl = weight * (alpha * T)
    for rows in _row_chunks(n_rows, vocab):
        # New tensors from here on: writing the gradient over the shard (in place) is safe.
        s_c = student_shard[rows].to(dtype) - m_s[rows, None]
        t_c = teacher_shard[rows].to(dtype) - m_t[rows, None]
        log_p_tt = t_c / T - log_z_b[rows, None]
        log_p_st = s_c / T - log_z_a[rows, None]
        p_tt = log_p_tt.exp()
        keep = None if counted is None else counted[rows, None]
        if student_grad:
            g = coef_kl * (log_p_st.exp() - p_tt)
            if labels is not None:
                p_s1 = (s_c - log_z_1[rows, None]).exp()
                local = labels[rows].long() - vocab_start
                hit = (local >= 0) & (local < vocab)
                p_s1.scatter_add_(1, torch.where(hit, local, 0)[:, None], -hit[:, None].to(dtype))
                g = g + weight * (1.0 - alpha) * p_s1
                g = torch.where(keep, g, 0.0)  # not 0 * g: g may hold NaN
            grad_s[rows] = g
        if teacher_grad:
            log_ratio = log_p_tt - log_p_st
            g = torch.where(p_tt == 0, 0.0, coef_kl * p_tt * (log_ratio - kl[rows, None]))
            if keep is not None:
                g = torch.where(keep, g, 0.0)
            grad_t[rows] = g
    return row_losses, grad_s, grad_t
