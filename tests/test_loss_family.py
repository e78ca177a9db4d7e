"""The divergence family and CE options on both backends against the float64 truth.

The space (6 divergences x CE options x reductions x dtypes x kernel paths x backends) is sampled
with seeded random cases rather than taken whole; each case checks the loss, both gradients with
a random grad_output, and the logged components.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from helpers import (
    assert_close,
    check_against_truth,
    family_truth,
    make_labels,
    make_logits,
    random_grad_output,
    record_error,
    run_loss,
    tolerance,
)

import fastkd
from fastkd.kernels.kd_loss import MAX_ON_CHIP_V

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# Rows on chip, and rows one element past the on-chip limit (the multi-sweep path).
ON_CHIP_V, LONG_V = 333, MAX_ON_CHIP_V + 1
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float32), (torch.float64, torch.float64)]


def _sampled_cases(count: int, seed: int):
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        divergence = fastkd.DIVERGENCES[index % len(fastkd.DIVERGENCES)]
        cases.append(dict(
            divergence=divergence,
            beta=rng.choice([0.0, 0.1, 0.5, 0.9, 1.0]),
            skew=rng.choice([0.1, 0.5]),
            temperature=rng.choice([1.0, 2.0, 0.7]),
            alpha=rng.choice([0.0, 0.3, 1.0]),
            label_smoothing=rng.choice([0.0, 0.0, 0.1]),
            z_loss=rng.choice([0.0, 1e-3]),
            reduction=rng.choice(["mean", "sum", "batchmean", "none"]),
            dtypes=rng.choice(DTYPE_PAIRS),
            long_rows=index % 4 == 3,
            teacher_grad=rng.random() < 0.4,
            seed=seed * 100 + index,
        ))
    return cases


CASES = _sampled_cases(24, seed=7)


def _run_case(case, device):
    backend = os.environ["FASTKD_BACKEND"]
    vocab = LONG_V if case["long_rows"] else ON_CHIP_V
    rows = 2 if case["long_rows"] else 5
    student_dtype, teacher_dtype = case["dtypes"]
    if backend == "triton" and torch.float64 in case["dtypes"]:
        student_dtype = teacher_dtype = torch.float32
    student = make_logits((rows, vocab), student_dtype, seed=case["seed"], device=device)
    teacher = make_logits((rows, vocab), teacher_dtype, seed=case["seed"] + 1, device=device)
    labels = make_labels((rows,), vocab, seed=case["seed"], ignore_rows=(1,), device=device)
    options = {k: case[k] for k in ("divergence", "beta", "skew", "temperature", "alpha",
                                    "label_smoothing", "z_loss", "reduction")}
    loss_shape = (rows,) if case["reduction"] == "none" else ()
    grad_output = random_grad_output(loss_shape, torch.Generator().manual_seed(case["seed"]))
    actual = run_loss(fastkd.kd_loss, student, teacher, labels, grad_output=grad_output,
                      teacher_grad=case["teacher_grad"], **options)
    truth = family_truth(student, teacher, labels, grad_output=grad_output, **options)
    what = f"[{backend}] {case}"
    # TVD's gradient row sum A = -sum q sign(p - q) / 2 cancels: its fp32 rounding is relative
    # to the terms, not to A, so its gradient carries a few more ulps than the others.
    check_against_truth(actual, truth, student_dtype=student_dtype, teacher_dtype=teacher_dtype,
                        backend=backend, teacher_grad=case["teacher_grad"], what=what,
                        grad_slack=4.0 if case["divergence"] == "tvd" else 1.0)
    _record_errors(case["divergence"], backend, student_dtype, actual, truth)
    parts = fastkd.kd_loss(student, teacher, labels, return_components=True, **options)
    loss_tol = tolerance(min(student_dtype, teacher_dtype, key=lambda d: torch.finfo(d).bits),
                         "loss", backend)
    for name, got, expected in zip(("divergence", "ce", "lse_squared"), parts[1:],
                                   truth.components, strict=True):
        assert not got.requires_grad
        assert_close(got, expected, loss_tol, what=f"{what} {name}", scale_floor=1.0)
    assert_close(parts.loss, truth.loss, loss_tol, what=f"{what} loss", scale_floor=1.0)


def _record_errors(divergence, backend, dtype, actual, truth):
    """Per-divergence largest errors for the suite's error report (FASTKD_TEST_ERROR_REPORT)."""
    for quantity, got, expected in (("loss", actual.loss, truth.loss),
                                    ("grad_student", actual.grad_student, truth.grad_student)):
        got, expected = got.detach().double().cpu(), expected.double()
        finite = expected.isfinite()
        if finite.any():
            error = (got[finite] - expected[finite]).abs().max().item()
            scale = max(expected[finite].abs().max().item(), 1.0 if quantity == "loss" else 0.0)
            if scale > 0:
                record_error(f"{divergence} {backend} {str(dtype).removeprefix('torch.')} "
                             f"{quantity}", error, error / scale)


@pytest.mark.parametrize("case", CASES, ids=[f"{c['divergence']}-{i}" for i, c in
                                             enumerate(CASES)])
def test_family_against_float64(case, backend):
    _run_case(case, backend)


@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
@pytest.mark.parametrize("long_rows", [False, True])
def test_underflow_in_both_distributions_stays_finite(divergence, long_rows, backend):
    """Logits 300 below the row's maximum underflow in both softmaxes at T = 1."""
    vocab = LONG_V if long_rows else ON_CHIP_V
    student = make_logits((2, vocab), seed=3, device=backend)
    teacher = make_logits((2, vocab), seed=4, device=backend)
    student[:, 5:50] -= 300.0
    teacher[:, 5:50] -= 300.0
    result = run_loss(fastkd.kd_loss, student, teacher, None, teacher_grad=True,
                      divergence=divergence, beta=0.4, skew=0.2)
    assert torch.isfinite(result.loss).all()
    assert torch.isfinite(result.grad_student).all()
    assert torch.isfinite(result.grad_teacher).all()
    truth = family_truth(student, teacher, None, divergence=divergence, beta=0.4, skew=0.2)
    assert_close(result.loss, truth.loss, tolerance(torch.float32, "loss",
                                                    os.environ["FASTKD_BACKEND"]),
                 what=f"{divergence} underflow", scale_floor=1.0)


@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
def test_properties(divergence, backend):
    """>= 0, exactly 0 at equal logits, invariant to a shift of either model's logits."""
    student = make_logits((4, 77), seed=11, device=backend)
    teacher = make_logits((4, 77), seed=12, device=backend)
    options = dict(divergence=divergence, beta=0.3, skew=0.3, temperature=2.0,
                   reduction="none")
    loss = fastkd.kd_loss(student, teacher, **options)
    assert (loss >= 0).all()
    assert (fastkd.kd_loss(student, student.clone(), **options) == 0).all()
    shifted = fastkd.kd_loss(student + 1e4, teacher - 1e4, **options)
    torch.testing.assert_close(shifted, loss, rtol=1e-4, atol=1e-5)


def test_jsd_endpoints_are_forward_and_reverse_kl_exactly(backend):
    student = make_logits((3, 50), seed=1, device=backend)
    teacher = make_logits((3, 50), seed=2, device=backend)
    for beta, divergence in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = fastkd.kd_loss(student, teacher, divergence="jsd", beta=beta, reduction="none")
        kl = fastkd.kd_loss(student, teacher, divergence=divergence, reduction="none")
        assert torch.equal(jsd, kl)
    # Inside the interval JSD_beta tends to 0 at the endpoints: the value jumps there.
    near = fastkd.kd_loss(student, teacher, divergence="jsd", beta=1e-4)
    assert near < 0.01 * fastkd.kd_loss(student, teacher, divergence="forward_kl")


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trl(beta, temperature, backend):
    generalized_jsd_loss = _trl_generalized_jsd()
    student = make_logits((2, 6, 40), seed=5, device=backend)
    teacher = make_logits((2, 6, 40), seed=6, device=backend)
    labels = make_labels((2, 6), 40, seed=5, ignore_rows=(0, 7), device=backend)
    ours = fastkd.kd_loss(student, teacher, labels, alpha=1.0, divergence="jsd", beta=beta,
                          temperature=temperature) / temperature**2
    theirs = generalized_jsd_loss(student, teacher, labels=labels, beta=beta,
                                  temperature=temperature)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)


def _trl_generalized_jsd():
    pytest.importorskip("trl")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def test_double_backward_raises():
    student = make_logits((3, 20), seed=1).requires_grad_()
    teacher = make_logits((3, 20), seed=2)
    loss = fastkd.kd_loss(student, teacher)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, student, create_graph=True)


def test_torch_func_grad_is_refused():
    student = make_logits((3, 20), seed=1)
    teacher = make_logits((3, 20), seed=2)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda s: fastkd.kd_loss(s, teacher))(student)


@pytest.mark.parametrize(("options", "message"), [
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(divergence="jsd", beta=1.5), r"beta must lie in \[0, 1\]"),
    (dict(divergence="skew_kl", skew=0.0), r"skew must lie in \(0, 1\)"),
    (dict(label_smoothing=-0.1), r"label_smoothing must lie in \[0, 1\]"),
    (dict(z_loss=-1.0), "z_loss must be >= 0"),
    (dict(z_loss=float("inf")), "z_loss must be finite"),
    (dict(temperature=1e30), r"temperature must lie in \(0, "),
])
def test_bad_family_options(options, message):
    student = make_logits((3, 20), seed=1)
    labels = make_labels((3,), 20)
    for function in (fastkd.kd_loss, fastkd.reference.kd_loss):
        with pytest.raises(ValueError, match=message):
            function(student, student, labels, **options)
    with pytest.raises(ValueError, match=message):
        fastkd.KDLoss(**options)


def test_label_smoothing_needs_labels():
    student = make_logits((3, 20), seed=1)
    with pytest.raises(ValueError, match="label_smoothing=0.1 smooths"):
        fastkd.kd_loss(student, student, label_smoothing=0.1)


def test_components_add_up_and_match_the_reference(backend):
    student = make_logits((6, 90), seed=8, device=backend)
    teacher = make_logits((6, 90), seed=9, device=backend)
    labels = make_labels((6,), 90, ignore_rows=(2,), device=backend)
    options = dict(temperature=2.0, alpha=0.3, divergence="jsd", beta=0.4, label_smoothing=0.1,
                   z_loss=0.01)
    parts = fastkd.kd_loss(student, teacher, labels, return_components=True, **options)
    assert isinstance(parts, fastkd.KDLossComponents)
    total = 0.3 * 4.0 * parts.divergence + 0.7 * parts.ce + 0.01 * parts.lse_squared
    torch.testing.assert_close(parts.loss, total, rtol=1e-6, atol=1e-6)
    reference = fastkd.reference.kd_loss(student, teacher, labels, return_components=True,
                                         **options)
    for got, expected in zip(parts, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    module = fastkd.KDLoss(return_components=True, **options)
    torch.testing.assert_close(module(student, teacher, labels).ce, parts.ce)


@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
def test_compile_fullgraph_traces_every_divergence(divergence):
    student = make_logits((4, 30), seed=1).requires_grad_()
    teacher = make_logits((4, 30), seed=2)
    labels = make_labels((4,), 30)

    def step(s, t, y):
        return fastkd.kd_loss(s, t, y, divergence=divergence, temperature=2.0,
                              label_smoothing=0.1, z_loss=1e-3)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher, labels)
    loss.backward()
    grad = student.grad.clone()
    student.grad = None
    expected = step(student, teacher, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, student.grad)
