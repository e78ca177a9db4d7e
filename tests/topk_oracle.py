"""Float64 ground truth of the top-k KD loss, written apart from fastkd: the teacher is built as an
explicit distribution (a dense teacher over the ids, or the k entries plus one tail class), the
student's softmax from exp / sum / log, and the gradient by float64 autograd of that loss, so the
closed-form gradient of the kernel and of the PyTorch backend is checked, not copied.
"""

from __future__ import annotations

import torch

ROW_LOSS, ROW_DIVERGENCE, ROW_CE, ROW_LSE_SQUARED = 0, 1, 2, 3


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    m = x.max().detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return (x - m) - torch.log(torch.exp(x - m).sum())


def _xlogy_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) with 0 log 0 = 0; selecting the ratio keeps autograd NaN-free."""
    support = p > 0
    ratio = torch.where(support, log_p - log_q, torch.zeros_like(log_q))
    return (torch.where(support, p, torch.zeros_like(p)) * ratio).sum()


def row_truth(s_row, ids_row, values_row, tail_lp, label, *, tail, temperature, alpha,
              label_smoothing=0.0, z_loss=0.0):
    """(loss, D, CE, lse^2) of one counted row, as float64 tensors differentiable in s_row."""
    T = float(temperature)
    vocab = s_row.shape[0]
    v = values_row.to(torch.float64)
    ids = ids_row.to(torch.int64)
    live = v != float("-inf")
    ids, v = ids[live], v[live]
    log_q = _log_softmax(s_row / T)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        # A non-padding id outside the vocabulary: D (and so the loss) is NaN.
        d = torch.full((), float("nan"), dtype=torch.float64)
    elif tail == "renormalize" and ids.numel() == 0:
        # Every entry is padding: there is no teacher distribution to renormalise.
        d = torch.full((), float("nan"), dtype=torch.float64)
    elif tail == "renormalize":
        teacher = torch.full((vocab,), float("-inf"), dtype=torch.float64)
        teacher[ids] = v / T
        log_p = _log_softmax(teacher)
        d = _xlogy_ratio(log_p.exp(), log_p, log_q)
    else:
        p = v.exp()
        d = _xlogy_ratio(p, v, log_q[ids])
        outside = torch.ones(vocab, dtype=torch.bool)
        outside[ids] = False
        if bool(outside.any()):
            if tail_lp is not None:
                log_p_tail = torch.as_tensor(float(tail_lp), dtype=torch.float64)
                p_tail = log_p_tail.exp()
            else:
                p_tail = torch.clamp(1.0 - p.sum(), min=0.0)
                log_p_tail = p_tail.log()
            q_tail = log_q.exp()[outside].sum()
            d = d + _xlogy_ratio(p_tail.reshape(1), log_p_tail.reshape(1),
                                 q_tail.log().reshape(1))
    lse = torch.logsumexp(s_row, dim=0)
    loss = alpha * T * T * d + z_loss * lse * lse
    ce = torch.zeros((), dtype=torch.float64)
    if label is not None:
        y = int(label)
        if 0 <= y < vocab:
            ce = (1 - label_smoothing) * (lse - s_row[y]) + label_smoothing * (
                lse - s_row.sum() / vocab)
        else:
            ce = torch.full((), float("nan"), dtype=torch.float64)
        loss = loss + (1 - alpha) * ce
    return loss, d, ce, lse * lse


def rows_truth(student, ids, values, tail_logprob=None, labels=None, *, row_scale=None,
               tail="renormalize", temperature=1.0, alpha=1.0, label_smoothing=0.0, z_loss=0.0,
               ignore_index=-100):
    """Row statistics (N, 4) and d(sum_i row_scale_i loss_i)/ds (N, V), in float64.

    Ignored rows: zeros. A row whose loss is NaN gets a NaN gradient row.
    """
    s = student.detach().cpu().to(torch.float64).reshape(-1, student.shape[-1])
    n_rows, vocab = s.shape
    ids = ids.detach().cpu().reshape(n_rows, -1)
    values = values.detach().cpu().reshape(n_rows, -1)
    if row_scale is None:
        row_scale = torch.ones(n_rows, dtype=torch.float64)
    row_scale = torch.as_tensor(row_scale, dtype=torch.float64).reshape(-1).expand(n_rows)
    stats = torch.zeros(n_rows, 4, dtype=torch.float64)
    grad = torch.zeros(n_rows, vocab, dtype=torch.float64)
    for i in range(n_rows):
        label = None if labels is None else int(labels.reshape(-1)[i])
        if label is not None and label == ignore_index:
            continue
        tail_lp = None if tail_logprob is None else float(tail_logprob.reshape(-1)[i])
        s_row = s[i].clone().requires_grad_(True)
        parts = row_truth(s_row, ids[i], values[i], tail_lp, label, tail=tail,
                          temperature=temperature, alpha=alpha,
                          label_smoothing=label_smoothing, z_loss=z_loss)
        stats[i] = torch.stack([x.detach() for x in parts])
        if torch.isnan(parts[0]):
            grad[i] = float("nan")
            continue
        (g,) = torch.autograd.grad(parts[0] * row_scale[i], s_row)
        grad[i] = g
    return stats, grad


def reduction_scale(labels, leading_shape, reduction, ignore_index=-100, normalizer=None):
    """The reduction's weight of each row as kd_loss defines it: (weight, counted mask)."""
    n_rows = 1
    for size in leading_shape:
        n_rows *= size
    if labels is None:
        counted = torch.ones(n_rows, dtype=torch.bool)
    else:
        counted = labels.detach().cpu().reshape(-1) != ignore_index
    if reduction == "mean":
        weight = 1.0 / max(int(counted.sum()), 1)
    elif reduction == "batchmean":
        weight = 1.0 / (max(leading_shape[0], 1) if len(leading_shape) else 1)
    elif reduction == "sum":
        weight = 1.0 if normalizer is None else 1.0 / float(normalizer)
    else:
        weight = 1.0
    return weight, counted


def loss_truth(student, ids, values, labels=None, *, tail_logprob=None, reduction="mean",
               normalizer=None, grad_output=None, ignore_index=-100, **options):
    """(loss, components (3,) or (3, *leading), d(grad_output * loss)/ds) in float64."""
    leading_shape = student.shape[:-1]
    weight, counted = reduction_scale(labels, leading_shape, reduction, ignore_index, normalizer)
    n_rows = counted.numel()
    go = torch.ones(()) if grad_output is None else torch.as_tensor(grad_output)
    go = go.detach().cpu().to(torch.float64).reshape(-1).expand(n_rows)
    stats, grad = rows_truth(student, ids, values, tail_logprob, labels, row_scale=weight * go,
                             ignore_index=ignore_index, **options)
    if reduction == "none":
        loss = stats[:, ROW_LOSS].reshape(leading_shape)
        components = stats[:, 1:].T.reshape(3, *leading_shape)
    else:
        loss = stats[:, ROW_LOSS].sum() * weight
        components = stats[:, 1:].sum(dim=0) * weight
    return loss, components, grad.reshape(student.shape)
