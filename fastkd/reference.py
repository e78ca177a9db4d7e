"""Plain-PyTorch reference of the knowledge-distillation loss.

This is the textbook block that fastkd replaces, made exact for fastkd's masking and reduction
rules. Gradients come from autograd. It is what the tests and the benchmarks compare against, and
what users can call to check fastkd on their own data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._autograd import KDLossComponents, batchmean_divisor
from ._spec import validate_kd_call

__all__ = ["kd_loss", "row_divergence", "reduce_rows"]


def _kl(log_p, log_q):
    """KL(p || q) per row; 0 * log 0 = 0. Selecting the log-ratio (not the product) keeps the
    unselected branch finite, so autograd gets no 0 * inf = NaN."""
    p = log_p.exp()
    return (p * torch.where(p == 0, 0.0, log_p - log_q)).sum(dim=-1)


def _log_mix(log_x, log_y, weight_x: float):
    """log(weight_x e^log_x + (1 - weight_x) e^log_y) in log space. Where both are -inf the
    result is -inf, computed from finite stand-ins so that autograd gets no NaN there."""
    both = torch.isneginf(log_x) & torch.isneginf(log_y)
    mixed = torch.logsumexp(torch.stack([torch.where(both, 0.0, log_x) + math.log(weight_x),
                                         torch.where(both, 0.0, log_y) + math.log(1 - weight_x)]),
                            dim=0)
    return torch.where(both, float("-inf"), mixed)


def row_divergence(log_p, log_q, name: str, *, beta: float = 0.5, skew: float = 0.1):
    """D(p, q) per row from the teacher's and student's log-probabilities at the temperature."""
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if name == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    if name == "skew_kl":
        log_r = _log_mix(log_p, log_q, skew)
        return _kl(log_p, log_r)
    if name == "skew_reverse_kl":
        log_r = _log_mix(log_q, log_p, skew)
        return _kl(log_q, log_r)
    raise ValueError(name)


def reduce_rows(row_losses, counted, leading_shape, reduction, normalizer=None):
    """Apply a reduction to per-row losses (ignored rows already hold 0)."""
    if reduction == "none":
        return row_losses.reshape(leading_shape)
    total = row_losses.sum()
    if reduction == "sum":
        return total if normalizer is None else total / normalizer
    if reduction == "batchmean":
        return total / batchmean_divisor(leading_shape)
    # "mean": over counted rows; all rows ignored gives 0 (not NaN as F.cross_entropy would).
    return total / counted.sum().clamp(min=1)


def kd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature=1.0,
    alpha=None,
    divergence="forward_kl",
    beta=0.5,
    skew=0.1,
    label_smoothing=0.0,
    z_loss=0.0,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    inplace_backward=False,
    return_components=False,
):
    """Reference KD loss; same signature and semantics as :func:`fastkd.kd_loss`.

    Computes in float32 (float64 for float64 inputs); ``inplace_backward`` is accepted for signature
    parity and ignored.
    """
    spec = validate_kd_call(
        student_logits, teacher_logits, labels, normalizer=normalizer,
        temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
        label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
        reduction=reduction,
    )
    options = spec.options
    T, alpha = options.temperature, options.alpha
    compute_dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    s = student_logits.to(compute_dtype).reshape(-1, spec.vocab_size)
    t = teacher_logits.to(compute_dtype).reshape(-1, spec.vocab_size)

    d = row_divergence(F.log_softmax(t / T, dim=-1), F.log_softmax(s / T, dim=-1),
                       options.divergence, beta=options.beta, skew=options.skew)
    lse_squared = torch.logsumexp(s, dim=-1) ** 2
    ce = torch.zeros_like(d)
    if labels is None:
        counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        y = labels.reshape(-1).long()
        counted = y != ignore_index
        in_range = (y >= 0) & (y < spec.vocab_size)
        ce = F.cross_entropy(s, torch.where(in_range, y, 0), reduction="none",
                             label_smoothing=options.label_smoothing)
        # A label outside the vocabulary is a caller bug: make it loud (NaN), never read it.
        ce = torch.where(in_range, ce, float("nan"))
    terms = [alpha * T * T * d + (1.0 - alpha) * ce + options.z_loss * lse_squared,
             d, ce, lse_squared]
    reduced = [
        reduce_rows(torch.where(counted, term, 0.0), counted, spec.leading_shape,
                    options.reduction, spec.normalizer)
        for term in terms
    ]
    if return_components:
        return KDLossComponents(reduced[0], *(r.detach() for r in reduced[1:]))
    return reduced[0]
