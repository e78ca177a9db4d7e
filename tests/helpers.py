"""Float64 ground truth of the KD loss and the per-dtype tolerances every test compares with.

The ground truth is deliberately written apart from fastkd.reference: no log_softmax, no
autograd. It forms the softmaxes from explicit exp / sum / log in float64 with masks for -inf
entries, and the gradients from their closed forms, so a mistake shared by the reference and the
fused code cannot hide.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from dataclasses import dataclass

import torch

import fastkd


@dataclass(frozen=True)
class Tol:
    """|actual - expected| <= atol * max|expected| + rtol * |expected|, elementwise.

    atol is scaled by the largest magnitude of the expected tensor (at least 1 for losses), so
    one entry serves every reduction weight, grad_output and vocabulary size.
    """

    atol: float
    rtol: float


# Keyed by dtype: "loss" by the least precise logits dtype (the loss itself is fp32 for half
# inputs, so those rows only cover fp32 arithmetic on exactly representable values), "grad" by the
# dtype the gradient is stored in. A half gradient is rounded twice: when the forward stores
# w * dloss/dlogits and when backward scales it by grad_output; Triton's interpreter rounds toward
# zero, a full ulp each time, so rtol is two ulps relative: 2^-6 for bf16, 2^-9 for fp16.
TOLERANCES: dict[torch.dtype, dict[str, Tol]] = {
    torch.float64: {"loss": Tol(atol=1e-10, rtol=1e-10), "grad": Tol(atol=1e-12, rtol=1e-9)},
    torch.float32: {"loss": Tol(atol=1e-5, rtol=5e-6), "grad": Tol(atol=2e-6, rtol=1e-4)},
    torch.float16: {"loss": Tol(atol=1e-5, rtol=5e-6), "grad": Tol(atol=2e-5, rtol=2.0**-9)},
    torch.bfloat16: {"loss": Tol(atol=1e-5, rtol=5e-6), "grad": Tol(atol=1e-4, rtol=2.0**-6)},
}

_PRECISION_ORDER = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def tolerance(dtype: torch.dtype, quantity: str, backend: str = "torch") -> Tol:
    """The tolerance of `quantity` ("loss" or "grad") for `dtype` on `backend`.

    The Triton kernels compute in fp32 whatever the input dtype, so on that backend float64
    inputs get the float32 tolerance.
    """
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32
    return TOLERANCES[dtype][quantity]


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    return min(dtypes, key=_PRECISION_ORDER.index)


# Largest errors seen against the float64 truth, per (dtype, quantity), for the suite's report.
# Written as JSON at exit when FASTKD_TEST_ERROR_REPORT names a file.
MAX_ERRORS: dict[str, dict[str, float]] = {}


def record_error(key: str, abs_err: float, rel_err: float) -> None:
    entry = MAX_ERRORS.setdefault(key, {"abs": 0.0, "rel": 0.0})
    entry["abs"] = max(entry["abs"], abs_err)
    entry["rel"] = max(entry["rel"], rel_err)


@atexit.register
def _write_error_report() -> None:
    path = os.environ.get("FASTKD_TEST_ERROR_REPORT")
    if path and MAX_ERRORS:
        with open(path, "w") as report:
            json.dump(MAX_ERRORS, report, indent=1, sort_keys=True)


def assert_close(actual, expected, tol: Tol, *, what: str, record: str | None = None,
                 scale_floor: float = 0.0) -> None:
    """Compare in float64 under `tol`; NaN and +-inf must sit exactly where expected."""
    assert actual is not None, f"{what}: got None"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    # What the stored dtype cannot hold: two roundings of its subnormal spacing, and fp32
    # underflow (flushed to zero on GPUs) for everything the kernels compute in fp32.
    stored = torch.finfo(actual.dtype)
    floor = 2 * stored.tiny * stored.eps
    if actual.dtype != torch.float64:
        floor += torch.finfo(torch.float32).tiny
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    nan_actual, nan_expected = actual.isnan(), expected.isnan()
    assert torch.equal(nan_actual, nan_expected), (
        f"{what}: NaN at {nan_actual.nonzero().tolist()[:8]}, "
        f"expected at {nan_expected.nonzero().tolist()[:8]}"
    )
    infinite = expected.isinf()
    assert torch.equal(actual[infinite], expected[infinite]), f"{what}: infinities differ"
    finite = expected.isfinite()
    actual, expected = actual[finite], expected[finite]
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), scale_floor)
    error = (actual - expected).abs()
    if record is not None and scale > 1e3 * floor:
        # Gradients that underflow the stored dtype are the floor's business, not a precision
        # figure worth reporting.
        record_error(record, error.max().item(), error.max().item() / scale)
    bound = tol.atol * scale + tol.rtol * expected.abs() + floor
    worst = (error - bound).argmax()
    assert bool((error <= bound).all()), (
        f"{what}: |actual - expected| = {error[worst].item():.3e} > bound "
        f"{bound[worst].item():.3e} (actual {actual[worst].item():.9g}, expected "
        f"{expected[worst].item():.9g}; max error {error.max().item():.3e}, scale {scale:.3g})"
    )


@dataclass
class Result:
    loss: torch.Tensor
    grad_student: torch.Tensor | None
    grad_teacher: torch.Tensor | None
    # (divergence, ce, lse_squared) under the loss's reduction, when known
    components: tuple | None = None


def _softmax_parts(logits: torch.Tensor, temperature: float):
    """(probabilities, log-probabilities) along the rows.

    A log-probability is -inf only at a -inf logit: far below the maximum it is large and
    negative but finite, even where its probability underflows to 0.
    """
    row_max = logits.amax(dim=-1, keepdim=True)
    # A fully masked row would give -inf - (-inf); any finite shift gives the same softmax.
    row_max = torch.where(torch.isinf(row_max) & (row_max < 0), 0.0, row_max)
    scaled = (logits - row_max) / temperature
    exps = torch.exp(scaled)
    total = exps.sum(dim=-1, keepdim=True)
    probs = exps / total
    log_probs = torch.where(torch.isneginf(logits), float("-inf"), scaled - torch.log(total))
    return probs, log_probs


def float64_truth(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_output: torch.Tensor | float | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalizer=None,
) -> Result:
    """Loss and both gradients of `grad_output * loss`, in float64.

    Forward KL with plain CE uses the closed forms below; every other divergence or CE option
    goes through family_truth (float64 autograd of explicit formulas).
    """
    if (divergence, label_smoothing, z_loss, normalizer) != ("forward_kl", 0.0, 0.0, None):
        return family_truth(
            student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
            ignore_index=ignore_index, reduction=reduction, grad_output=grad_output,
            divergence=divergence, beta=beta, skew=skew, label_smoothing=label_smoothing,
            z_loss=z_loss, normalizer=normalizer)
    if alpha is None:
        alpha = 0.5 if labels is not None else 1.0
    T = float(temperature)
    vocab = student_logits.shape[-1]
    leading_shape = student_logits.shape[:-1]
    s = student_logits.detach().cpu().to(torch.float64).reshape(-1, vocab)
    t = teacher_logits.detach().cpu().to(torch.float64).reshape(-1, vocab)
    n_rows = s.shape[0]

    p_sT, log_p_sT = _softmax_parts(s, T)
    p_tT, log_p_tT = _softmax_parts(t, T)
    teacher_support = p_tT > 0
    # Over the teacher's support only: 0 * log 0 = 0 and masked entries add nothing.
    kl_terms = torch.where(teacher_support, p_tT * (log_p_tT - log_p_sT), 0.0)
    kl = kl_terms.sum(dim=-1)
    row_losses = alpha * T * T * kl

    grad_s = alpha * T * (p_sT - p_tT)
    if labels is None:
        counted = torch.ones(n_rows, dtype=torch.bool)
    else:
        y = labels.detach().cpu().reshape(-1).to(torch.int64)
        counted = y != ignore_index
        in_range = (y >= 0) & (y < vocab)
        p_s1, log_p_s1 = _softmax_parts(s, 1.0)
        picked = torch.where(in_range, y, 0)
        ce = -log_p_s1[torch.arange(n_rows), picked]
        ce = torch.where(in_range, ce, float("nan"))
        row_losses = torch.where(counted, row_losses + (1.0 - alpha) * ce, 0.0)
        onehot = torch.zeros_like(s)
        onehot[torch.arange(n_rows)[in_range], y[in_range]] = 1.0
        grad_ce = p_s1 - onehot
        grad_ce[~in_range] = float("nan")
        grad_s = grad_s + (1.0 - alpha) * grad_ce

    # d(T^2 KL)/dt = T * p_t * (log p_t - log p_s - KL), zero off the teacher's support.
    grad_t = torch.where(
        teacher_support, alpha * T * p_tT * (log_p_tT - log_p_sT - kl[:, None]), 0.0
    )

    counted_rows = int(counted.sum())
    if reduction == "none":
        loss = row_losses.reshape(leading_shape)
        row_weight = torch.ones(n_rows, dtype=torch.float64)
    else:
        if reduction == "sum":
            weight = 1.0
        elif reduction == "mean":
            weight = 1.0 / max(counted_rows, 1)
        elif reduction == "batchmean":
            weight = 1.0 / (leading_shape[0] if len(leading_shape) else 1)
        else:
            raise ValueError(reduction)
        loss = row_losses.sum() * weight
        row_weight = torch.full((n_rows,), weight, dtype=torch.float64)

    if grad_output is None:
        grad_output = 1.0
    grad_output = torch.as_tensor(grad_output, dtype=torch.float64).detach().cpu()
    row_scale = row_weight * grad_output.reshape(-1).expand(n_rows)
    row_scale = torch.where(counted, row_scale, 0.0)[:, None]
    # Ignored rows get an exact 0 (never 0 * NaN) as the fused op writes them.
    grad_s = torch.where(counted[:, None], grad_s * row_scale, 0.0)
    grad_t = torch.where(counted[:, None], grad_t * row_scale, 0.0)
    return Result(loss, grad_s.reshape(student_logits.shape), grad_t.reshape(teacher_logits.shape))


def _safe_log(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """log p where p > 0 and 0 elsewhere: the unselected branch of a 0 * log 0 stays finite, so
    autograd gets no 0 * inf = NaN."""
    return torch.where(p > 0, log_p, 0.0)


def _kl_terms(p, log_p, log_q):
    return torch.where(p > 0, p * (_safe_log(p, log_p) - torch.where(p > 0, log_q, 0.0)), 0.0)


def _log_mix(log_x, log_y, weight_x: float):
    """log(weight_x e^log_x + (1 - weight_x) e^log_y), in log space."""
    both = torch.isneginf(log_x) & torch.isneginf(log_y)
    stacked = torch.stack([torch.where(both, 0.0, log_x) + math.log(weight_x),
                           torch.where(both, 0.0, log_y) + math.log(1.0 - weight_x)])
    top = stacked.amax(dim=0).detach()
    mixed = top + torch.log(torch.exp(stacked - top).sum(dim=0))
    return torch.where(both, float("-inf"), mixed)


def divergence_rows(p, log_p, q, log_q, divergence: str, *, beta: float, skew: float):
    """Per-row D(p, q) written out term by term (0 log 0 = 0), for float64 autograd."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl_terms(p, log_p, log_q).sum(-1)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl_terms(q, log_q, log_p).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return (beta * _kl_terms(p, log_p, log_m) + (1 - beta) * _kl_terms(q, log_q, log_m)).sum(-1)
    if divergence == "skew_kl":
        return _kl_terms(p, log_p, _log_mix(log_p, log_q, skew)).sum(-1)
    if divergence == "skew_reverse_kl":
        return _kl_terms(q, log_q, _log_mix(log_q, log_p, skew)).sum(-1)
    raise ValueError(divergence)


def family_truth(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=None,
                 ignore_index=-100, reduction="mean", grad_output=None, divergence="forward_kl",
                 beta=0.5, skew=0.1, label_smoothing=0.0, z_loss=0.0, normalizer=None) -> Result:
    """Float64 truth of the whole loss family (every divergence and CE option).

    Softmaxes from explicit exp / sum / log (no log_softmax, no fastkd code); gradients from
    float64 autograd of `grad_output * loss`.
    """
    if alpha is None:
        alpha = 0.5 if labels is not None else 1.0
    T = float(temperature)
    vocab = student_logits.shape[-1]
    leading_shape = student_logits.shape[:-1]
    s = student_logits.detach().cpu().to(torch.float64).reshape(-1, vocab).requires_grad_()
    t = teacher_logits.detach().cpu().to(torch.float64).reshape(-1, vocab).requires_grad_()
    n_rows = s.shape[0]
    q, log_q = _softmax_parts(s, T)
    p, log_p = _softmax_parts(t, T)
    d = divergence_rows(p, log_p, q, log_q, divergence, beta=beta, skew=skew)
    p_1, log_p_1 = _softmax_parts(s, 1.0)
    row_max = s.amax(dim=-1)
    row_max = torch.where(torch.isneginf(row_max), 0.0, row_max).detach()
    lse = row_max + torch.log(torch.exp(s - row_max[:, None]).sum(-1))
    ce = torch.zeros_like(d)
    if labels is None:
        counted = torch.ones(n_rows, dtype=torch.bool)
    else:
        y = labels.detach().cpu().reshape(-1).to(torch.int64)
        counted = y != ignore_index
        in_range = (y >= 0) & (y < vocab)
        picked = torch.where(in_range, y, 0)
        nll = -log_p_1[torch.arange(n_rows), picked]
        ce = (1 - label_smoothing) * nll
        if label_smoothing > 0:
            ce = ce + label_smoothing * (-log_p_1).mean(-1)
        ce = torch.where(in_range, ce, float("nan"))
    rows = [alpha * T * T * d + (1 - alpha) * ce + z_loss * lse * lse, d, ce, lse * lse]
    rows = [torch.where(counted, r, 0.0) for r in rows]
    if reduction == "none":
        reduced = [r.reshape(leading_shape) for r in rows]
    else:
        if reduction == "sum":
            divisor = 1.0 if normalizer is None else float(normalizer)
        elif reduction == "mean":
            divisor = max(int(counted.sum()), 1)
        else:
            divisor = leading_shape[0] if len(leading_shape) else 1
            divisor = max(divisor, 1)
        reduced = [r.sum() / divisor for r in rows]
    go = 1.0 if grad_output is None else grad_output
    go = torch.as_tensor(go, dtype=torch.float64).detach().cpu()
    loss = reduced[0]
    grad_s, grad_t = torch.autograd.grad((loss * go).sum(), (s, t), allow_unused=True)
    # Ignored rows get an exact 0 (never 0 * NaN) as the fused op writes them.
    grad_s = torch.where(counted[:, None], grad_s, 0.0)
    grad_t = torch.where(counted[:, None], grad_t, 0.0)
    return Result(loss.detach(), grad_s.reshape(student_logits.shape),
                  grad_t.reshape(teacher_logits.shape),
                  components=tuple(r.detach() for r in reduced[1:]))


def run_loss(
    loss_fn,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    grad_output: torch.Tensor | float | None = None,
    teacher_grad: bool = False,
    student_grad: bool = True,
    **kwargs,
) -> Result:
    """Loss and gradients of `loss_fn` on leaf copies of the inputs (same strides: detach()).

    grad_output None takes the plain loss.backward() path (scalar reductions) or
    loss.sum().backward() ("none").
    """
    student = student_logits.detach().requires_grad_(student_grad)
    teacher = teacher_logits.detach().requires_grad_(teacher_grad)
    loss = loss_fn(student, teacher, labels, **kwargs)
    if student_grad or teacher_grad:
        if grad_output is None:
            (loss if loss.dim() == 0 else loss.sum()).backward()
        else:
            loss.backward(torch.as_tensor(grad_output, dtype=loss.dtype, device=loss.device))
    return Result(loss.detach(), student.grad, teacher.grad)


def random_grad_output(loss_shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random, sign-mixed grad_output away from 1 (the scale kernel skips factor 1)."""
    values = torch.rand(loss_shape, generator=generator, dtype=torch.float64) * 2.0 + 0.25
    signs = torch.where(torch.rand(loss_shape, generator=generator) < 0.3, -1.0, 1.0)
    return (values * signs).to(torch.float32)


def make_logits(shape, dtype=torch.float32, *, scale=3.0, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(
        dtype).to(device)


def make_labels(leading_shape, vocab, *, seed=0, device="cpu", ignore_rows=(),
                ignore_index=-100, dtype=torch.int64):
    """Labels in [0, vocab) with the flat rows in `ignore_rows` set to ignore_index."""
    generator = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, tuple(leading_shape), generator=generator)
    flat = labels.reshape(-1)
    for row in ignore_rows:
        flat[row] = ignore_index
    return flat.reshape(leading_shape).to(dtype).to(device)


def check_against_truth(actual: Result, truth: Result, *, student_dtype, teacher_dtype,
                        backend: str, teacher_grad: bool = False, student_grad: bool = True,
                        what: str = "", grad_slack: float = 1.0) -> None:
    """Loss and the requested gradients within the table's tolerances of the float64 truth
    (the gradients' times grad_slack)."""

    def grad_tol(dtype):
        tol = tolerance(dtype, "grad", backend)
        return Tol(tol.atol * grad_slack, tol.rtol * grad_slack)

    loss_dtype = least_precise(student_dtype, teacher_dtype)
    record_backend = "triton" if backend == "triton" else "torch"
    assert_close(actual.loss, truth.loss, tolerance(loss_dtype, "loss", backend),
                 what=f"{what} loss", record=f"{record_backend} {_name(loss_dtype)} loss",
                 scale_floor=1.0)
    if student_grad:
        assert actual.grad_student is not None, f"{what}: no student gradient"
        assert actual.grad_student.dtype == student_dtype
        assert_close(actual.grad_student, truth.grad_student,
                     grad_tol(student_dtype), what=f"{what} student grad",
                     record=f"{record_backend} {_name(student_dtype)} grad_student")
    if teacher_grad:
        assert actual.grad_teacher is not None, f"{what}: no teacher gradient"
        assert actual.grad_teacher.dtype == teacher_dtype
        assert_close(actual.grad_teacher, truth.grad_teacher,
                     grad_tol(teacher_dtype), what=f"{what} teacher grad",
                     record=f"{record_backend} {_name(teacher_dtype)} grad_teacher")
    else:
        assert actual.grad_teacher is None, f"{what}: teacher got a gradient it did not ask for"


# The reference's autograd gradient is an fp32 softmax backward whose row sum over V products
# costs it up to ~2e-5 of the gradient's scale at V = 128256 (fastkd's closed form is tighter).
REFERENCE_SLACK = 10


def check_against_reference(actual: Result, reference: Result, *, student_dtype, teacher_dtype,
                            backend: str, what: str = "") -> None:
    """fastkd against fastkd.reference, REFERENCE_SLACK times the table's tolerance.

    The float64 truth is the strict check; this one catches semantic differences (masks,
    reductions, dtypes), so it allows for the reference's own fp32 error.
    """
    loss_dtype = least_precise(student_dtype, teacher_dtype)
    loss_tol = tolerance(loss_dtype, "loss", backend)
    slack = REFERENCE_SLACK
    assert_close(actual.loss, reference.loss, Tol(slack * loss_tol.atol, slack * loss_tol.rtol),
                 what=f"{what} loss vs reference", scale_floor=1.0)
    for name, mine, theirs, dtype in (
        ("student", actual.grad_student, reference.grad_student, student_dtype),
        ("teacher", actual.grad_teacher, reference.grad_teacher, teacher_dtype),
    ):
        if theirs is None:
            assert mine is None, f"{what}: unexpected {name} gradient"
            continue
        grad_tol = tolerance(dtype, "grad", backend)
        assert_close(mine, theirs, Tol(slack * grad_tol.atol, slack * grad_tol.rtol),
                     what=f"{what} {name} grad vs reference")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fastkd_loss(student, teacher, labels, **kwargs):
    return fastkd.kd_loss(student, teacher, labels, **kwargs)


def reference_loss(student, teacher, labels, **kwargs):
    return fastkd.reference.kd_loss(student, teacher, labels, **kwargs)
