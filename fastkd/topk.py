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
