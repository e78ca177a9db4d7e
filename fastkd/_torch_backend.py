"""PyTorch backend: the fused kernel's math and hand-written gradient, chunked over rows.

Used for CPU tensors (and on request through FASTKD_BACKEND=torch). It mirrors the launcher
interface of fastkd.kernels.kd_loss, so the autograd Function does not care which one runs.
The derivation of every formula is in the comment block of kernels/kd_loss.py; this file uses the
same centred form: with d_s = s - max(s) and d_t = t - max(t),

    p_s^T = exp(d_s / T) / Z_a      p_t^T = exp(d_t / T) / Z_b      p_s = exp(d_s) / Z_1
    KL    = sum p_t^T * (d_t - d_s) / T + log Z_a - log Z_b
    CE    = log Z_1 - d_s[y]

Rows go through in chunks that reuse a few preallocated fp32 buffers in place, so the working set
stays in cache and no temporary grows with N (fresh multi-MiB allocations cost page faults on
every call on CPU).
"""

from __future__ import annotations

import torch

from ._buffers import allocate_outputs, loss_dtype

# About this many elements per chunk: five fp32 buffers of 1M elements (20 MiB) sit in a server
# CPU's L3, and a chunk is large enough that a call is a few hundred aten ops, not thousands. With
# 256K-element chunks a 2-thread call was 10% faster on an idle machine but up to 8x slower on a
# busy one, where every small op waits at OpenMP's barrier for a preempted thread.
CHUNK_ELEMENTS = 1 << 20


def _centre_(buffer: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """buffer <- logits - rowmax(logits), in the buffer's (fp32/fp64) precision."""
    buffer.copy_(logits)
    buffer.sub_(buffer.amax(dim=-1, keepdim=True))
    return buffer


def _exp_sum_(out: torch.Tensor, centred: torch.Tensor, scale: float) -> torch.Tensor:
    """out <- exp(centred * scale); returns the row sums (the softmax normaliser)."""
    torch.mul(centred, scale, out=out)
    out.exp_()
    return out.sum(dim=-1, keepdim=True)


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
    """Same contract as fastkd.kernels.kd_loss.kd_forward, for any device PyTorch supports."""
    n_rows, vocab = student_logits.shape
    device = student_logits.device
    compute_dtype = loss_dtype(student_logits, teacher_logits)
    row_losses, grad_s, grad_t = allocate_outputs(
        student_logits, teacher_logits, student_grad=student_grad, teacher_grad=teacher_grad,
        grad_student_out=grad_student_out,
    )
    if n_rows == 0:
        return row_losses, grad_s, grad_t

    inv_t = 1.0 / temperature
    weight = row_weight.to(compute_dtype)
    chunk = max(1, min(n_rows, CHUNK_ELEMENTS // vocab))
    centred_s, centred_t, p_st, p_tt, scratch = (
        torch.empty((chunk, vocab), dtype=compute_dtype, device=device) for _ in range(5)
    )
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        rows = stop - start
        d_s = _centre_(centred_s[:rows], student_logits[start:stop])
        d_t = _centre_(centred_t[:rows], teacher_logits[start:stop])
        e_a, e_b, work = p_st[:rows], p_tt[:rows], scratch[:rows]
        z_a = _exp_sum_(e_a, d_s, inv_t)
        z_b = _exp_sum_(e_b, d_t, inv_t)
        log_z_ratio = z_a.log() - z_b.log()  # log Z_a - log Z_b, (rows, 1)

        # KL = sum e_b (d_t - d_s) / (T Z_b) + log Z_a - log Z_b. Where the teacher is masked
        # (-inf) e_b is 0 and d_t - d_s is -inf, or NaN if both are -inf; 0 * log 0 = 0, so
        # exactly those NaNs become 0. NaN logits still reach the loss through Z_a or Z_b.
        torch.sub(d_t, d_s, out=work)
        work.mul_(e_b)
        work.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        kl = work.sum(dim=-1, keepdim=True).div_(z_b).mul_(inv_t).add_(log_z_ratio)
        loss = (alpha * temperature * temperature) * kl.squeeze(1)

        counted = None
        if labels is not None:
            y = labels[start:stop].long()
            counted = y != ignore_index
            in_range = (y >= 0) & (y < vocab)
            safe_y = torch.where(in_range, y, 0)[:, None]
            if temperature == 1.0:
                e_1, z_1 = e_a, z_a  # the KL softmax is the CE softmax
            else:
                e_1 = work
                z_1 = _exp_sum_(e_1, d_s, 1.0)
            # A label outside the vocabulary reads nothing and makes its row NaN.
            ce = torch.where(in_range, z_1.squeeze(1).log() - d_s.gather(1, safe_y).squeeze(1),
                             float("nan"))
            loss = torch.where(counted, loss + (1.0 - alpha) * ce, 0.0)
        row_losses[start:stop] = loss

        coef_kl = weight * (alpha * temperature)
        if teacher_grad:
            # d(T^2 KL)/dt = T p_t^T (log p_t^T - log p_s^T - KL), 0 where p_t^T = 0.
            g_t = torch.sub(d_t, d_s).mul_(inv_t).sub_(kl).add_(log_z_ratio)
            g_t.mul_(e_b).div_(z_b).mul_(coef_kl)
            # Exactly where p_t^T = 0 the product is 0 (0 * log 0); a NaN logit elsewhere in the
            # row must still show, as in autograd.
            g_t.masked_fill_(e_b == 0, 0.0)
            if counted is not None:
                g_t[~counted] = 0.0
            grad_t[start:stop] = g_t
        if student_grad:
            # a T (p_s^T - p_t^T) + (1 - a) (p_s - onehot(y)), times the reduction weight.
            if labels is not None and temperature == 1.0:
                # e_1 is e_a: take the CE part before e_a becomes the gradient.
                work.copy_(e_1)
                e_1 = work
            g_s = e_a.div_(z_a).sub_(e_b.div_(z_b)).mul_(coef_kl)
            if labels is not None:
                coef_ce = weight * (1.0 - alpha)
                g_s.add_(e_1.div_(z_1).mul_(coef_ce))
                onehot = (-coef_ce * in_range.to(compute_dtype))[:, None].expand(rows, 1)
                g_s.scatter_add_(1, safe_y, onehot)
                g_s[~counted] = 0.0  # not 0 * g: g may hold NaN
            grad_s[start:stop] = g_s
    return row_losses, grad_s, grad_t


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad (N, V) *= grad_output, in place; grad_output is a scalar or has N elements."""
    factor = grad_output if grad_output.dim() == 0 else grad_output.reshape(-1, 1)
    return grad.mul_(factor.to(grad.dtype))
