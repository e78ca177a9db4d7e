"""The divergence family as Triton helpers: each one's value and gradient terms per element.

Notation: p = softmax(t / T) is the teacher, q = softmax(s / T) the student, both at the loss
temperature T. Every divergence is a sum over the vocabulary of an elementwise f(p_v, q_v), so
with q_v = exp(s_v / T) / Z and d q_v / d s_u = q_v (delta_uv - q_u) / T,

    dD/ds_u = (1/T) sum_v (df/dq_v) q_v (delta_uv - q_u) = (a_u - q_u A) / T,
    a_v = q_v df/dq_v,  A = sum_v a_v,

and likewise dD/dt_u = (b_u - p_u B) / T with b_v = p_v df/dp_v, B = sum_v b_v. The kernels scale
both by T^2 (the loss is alpha T^2 D), so the gradient they store is alpha T (a - q A) times the
reduction weight. Per divergence (lam = beta for JSD, the skew for the skew divergences):

    forward_kl       f = p (log p - log q)
                     a = -p                         b = p (log p - log q + 1)
    reverse_kl       f = q (log q - log p)
                     a = q (log q - log p + 1)      b = -q
    jsd              m = lam p + (1 - lam) q,  f = lam p log(p/m) + (1 - lam) q log(q/m);
                     df/dq = (1 - lam) log(q/m) (the two 1/m terms cancel), so
                     a = (1 - lam) q log(q/m)       b = lam p log(p/m)
    tvd              f = |p - q| / 2
                     a = -q sign(p - q) / 2         b = p sign(p - q) / 2
    skew_kl          r = lam p + (1 - lam) q,  f = p log(p/r)
                     a = -(1 - lam) p q / r         b = p (log(p/r) + 1 - lam p/r)
    skew_reverse_kl  r = lam q + (1 - lam) p,  f = q log(q/r)
                     a = q (log(q/r) + 1 - lam q/r) b = -(1 - lam) p q / r

For forward KL A = -1 and B = D + 1 (reverse KL: A = D + 1, B = -1), known as soon as D is, so
D accumulates online in the first sweep over a long row. For JSD, TVD and the skew divergences
A and B need the final normalisers of the row, hence one more sweep over long rows.

Numerics: everything is computed from log p and log q, which stay finite far below the maximum
where p and q underflow; log m and log r are log-add-exps of those, never the log of a sum that
can underflow. 0 log 0 = 0: every term that carries a factor p (or q) is selected to exactly 0
where that probability is 0, whatever the other factor is (a -inf logit is masked vocabulary).
Ratios q/r and p/r are bounded by 1/(1 - lam) and 1/lam, so the skew divergences stay finite
where the student has masked an entry that the teacher supports.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import _spec

# The divergence ids of fastkd._spec, as constants the compiler folds into the kernels.
FORWARD_KL = tl.constexpr(_spec.FORWARD_KL)
REVERSE_KL = tl.constexpr(_spec.REVERSE_KL)
JSD = tl.constexpr(_spec.JSD)
TVD = tl.constexpr(_spec.TVD)
SKEW_KL = tl.constexpr(_spec.SKEW_KL)
SKEW_REVERSE_KL = tl.constexpr(_spec.SKEW_REVERSE_KL)


@triton.jit
def _times_nonzero(weight, value):
    """weight * value with 0 * anything = 0."""
    return tl.where(weight == 0.0, 0.0, weight * value)


@triton.jit
def _log_add_exp(x, y):
    # Both -inf (both distributions masked) gives -inf, not -inf - -inf = NaN.
    m = tl.maximum(x, y)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(tl.exp(x - m_safe) + tl.exp(y - m_safe))


@triton.jit
def _log_mix(log_x, log_y, log_wx, log_wy):
    """log(w_x e^log_x + w_y e^log_y), with w_x + w_y = 1: exactly log_x where the two are equal,
    so every divergence is exactly 0 at equal logits."""
    return tl.where(log_x == log_y, log_x, _log_add_exp(log_x + log_wx, log_y + log_wy))


@triton.jit
def divergence_terms(log_p, log_q, p, q, lam, log_lam, log_1m_lam, DIVERGENCE: tl.constexpr):
    """(f, a, b) of one block, in natural-log units; see the table at the top of this file."""
    if DIVERGENCE == FORWARD_KL:
        ratio = log_p - log_q
        f = _times_nonzero(p, ratio)
        a = -p
        b = _times_nonzero(p, ratio + 1.0)
    elif DIVERGENCE == REVERSE_KL:
        ratio = log_q - log_p
        f = _times_nonzero(q, ratio)
        a = _times_nonzero(q, ratio + 1.0)
        b = -q
    elif DIVERGENCE == JSD:
        log_m = _log_mix(log_p, log_q, log_lam, log_1m_lam)
        term_p = _times_nonzero(p, log_p - log_m)
        term_q = _times_nonzero(q, log_q - log_m)
        f = lam * term_p + (1.0 - lam) * term_q
        a = (1.0 - lam) * term_q
        b = lam * term_p
    elif DIVERGENCE == TVD:
        diff = p - q
        sign = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
        f = 0.5 * tl.abs(diff)
        a = -0.5 * q * sign
        b = 0.5 * p * sign
    elif DIVERGENCE == SKEW_KL:
        log_r = _log_mix(log_p, log_q, log_lam, log_1m_lam)
        f = _times_nonzero(p, log_p - log_r)
        a = -(1.0 - lam) * _times_nonzero(p, tl.exp(log_q - log_r))
        b = _times_nonzero(p, log_p - log_r + 1.0 - lam * tl.exp(log_p - log_r))
    else:  # SKEW_REVERSE_KL
        log_r = _log_mix(log_q, log_p, log_lam, log_1m_lam)
        f = _times_nonzero(q, log_q - log_r)
        a = _times_nonzero(q, log_q - log_r + 1.0 - lam * tl.exp(log_q - log_r))
        b = -(1.0 - lam) * _times_nonzero(q, tl.exp(log_p - log_r))
    return f, a, b


@triton.jit
def online_row_sums(divergence, DIVERGENCE: tl.constexpr):
    """(A, B) of forward and reverse KL from the row's D (see the top of this file)."""
    if DIVERGENCE == FORWARD_KL:
        return -1.0, divergence + 1.0
    return divergence + 1.0, -1.0
