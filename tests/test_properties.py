"""Properties of the KD loss over generated inputs (hypothesis), on both backends.

Examples are bounded and derandomized so the suite stays fast and reproducible; the Triton
interpreter gets fewer of them.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import (
    Tol,
    assert_close,
    check_against_reference,
    check_against_truth,
    fastkd_loss,
    float64_truth,
    random_grad_output,
    reference_loss,
    run_loss,
    tolerance,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkd


def _settings(max_examples):
    # The backend fixture only sets FASTKD_BACKEND, the same for every example.
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _examples(torch_examples: int) -> int:
    """The interpreter runs kernels in Python: a quarter of the examples, at least 5."""
    if os.environ["FASTKD_BACKEND"] == "triton":
        return max(5, torch_examples // 4)
    return torch_examples


def _backend_name() -> str:
    return os.environ["FASTKD_BACKEND"]


@st.composite
def logits_pairs(draw, max_rows=6, max_vocab=300, dtypes=(torch.float32,)):
    """(student, teacher) logits of one generated shape, from a seeded generator."""
    leading = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    if len(leading) and torch.Size(leading).numel() > max_rows:
        leading = [max_rows]
    vocab = draw(st.integers(1, max_vocab))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    student_dtype = draw(st.sampled_from(dtypes))
    teacher_dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(seed)
    shape = (*leading, vocab)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale)
    return student.to(student_dtype), teacher.to(teacher_dtype), generator


def _labels(generator, leading, vocab, ignore_fraction):
    labels = torch.randint(0, vocab, tuple(leading), generator=generator)
    ignored = torch.rand(tuple(leading), generator=generator) < ignore_fraction
    return torch.where(ignored, -100, labels)


temperatures = st.sampled_from([0.5, 1.0, 2.0, 4.0]) | st.floats(0.25, 8.0)
alphas = st.sampled_from([0.0, 0.3, 1.0]) | st.floats(0.0, 1.0)
reductions = st.sampled_from(["mean", "sum", "batchmean", "none"])


def test_equal_logits_have_zero_kl(backend):
    @_settings(_examples(30))
    @given(pair=logits_pairs(), temperature=temperatures, reduction=reductions)
    def check(pair, temperature, reduction):
        student, _, _ = pair
        result = run_loss(fastkd_loss, student.to(backend), student.to(backend), None,
                          teacher_grad=True, temperature=temperature, reduction=reduction)
        loss_tol = tolerance(torch.float32, "loss", _backend_name())
        assert_close(result.loss, torch.zeros_like(result.loss, dtype=torch.float64),
                     loss_tol, what="KL(p || p)", scale_floor=1.0)
        # With p_s = p_t both gradients vanish; the bound is fp32 rounding of probabilities.
        grad_tol = Tol(atol=tolerance(torch.float32, "grad").atol, rtol=0.0)
        for grad in (result.grad_student, result.grad_teacher):
            assert_close(grad, torch.zeros_like(grad, dtype=torch.float64), grad_tol,
                         what="gradient at KL = 0", scale_floor=1.0)

    check()


def _exactly_shiftable(logits: torch.Tensor) -> torch.Tensor:
    # Multiples of 2^-10 below 16 in magnitude: adding an integer up to 1000 stays exact in fp32,
    # so the shifted input differs from the original by the shift alone.
    return (logits.clamp(-15, 15) * 1024).round() / 1024


def test_shifting_logits_changes_nothing(backend):
    @_settings(_examples(30))
    @given(pair=logits_pairs(), temperature=temperatures, alpha=alphas, reduction=reductions,
           student_shift=st.integers(-1000, 1000), teacher_shift=st.integers(-1000, 1000))
    def check(pair, temperature, alpha, reduction, student_shift, teacher_shift):
        student, teacher, generator = pair
        student, teacher = _exactly_shiftable(student), _exactly_shiftable(teacher)
        labels = _labels(generator, student.shape[:-1], student.shape[-1], 0.2)
        kwargs = dict(temperature=temperature, alpha=alpha, reduction=reduction)
        grad_output = random_grad_output(student.shape[:-1] if reduction == "none" else (),
                                         generator)
        results = [
            run_loss(fastkd_loss, (student + ds).to(backend), (teacher + dt).to(backend),
                     labels.to(backend), grad_output=grad_output.to(backend), teacher_grad=True,
                     **kwargs)
            for ds, dt in ((0, 0), (student_shift, teacher_shift))
        ]
        # Both runs are fp32 approximations of one float64 value: each may be off by the table.
        name = _backend_name()
        loss_tol, grad_tol = tolerance(torch.float32, "loss", name), tolerance(
            torch.float32, "grad", name)
        double = lambda tol: Tol(2 * tol.atol, 2 * tol.rtol)
        assert_close(results[1].loss, results[0].loss, double(loss_tol), what="shifted loss",
                     scale_floor=1.0)
        assert_close(results[1].grad_student, results[0].grad_student, double(grad_tol),
                     what="shifted student grad")
        assert_close(results[1].grad_teacher, results[0].grad_teacher, double(grad_tol),
                     what="shifted teacher grad")

    check()


def test_pure_distillation_loss_is_not_negative(backend):
    @_settings(_examples(40))
    @given(pair=logits_pairs(), temperature=temperatures, with_labels=st.booleans(),
           near=st.sampled_from([0.0, 1e-3, 1e-6]))
    def check(pair, temperature, with_labels, near):
        student, teacher, generator = pair
        if near:
            # Nearly equal distributions: KL is tiny and rounding could push it below zero.
            teacher = student + near * teacher
        labels = (_labels(generator, student.shape[:-1], student.shape[-1], 0.3)
                  if with_labels else None)
        rows = fastkd.kd_loss(student.to(backend), teacher.to(backend),
                              labels.to(backend) if labels is not None else None,
                              temperature=temperature, alpha=1.0, reduction="none")
        # KL >= 0 exactly; the fp32 result of a KL near 0 may round to a few 1e-7 below it (the
        # reference's too), which the loss tolerance admits, and nothing more.
        floor = -tolerance(torch.float32, "loss", _backend_name()).atol
        assert (rows >= floor).all(), rows[rows < floor]

    check()


def test_random_inputs_match_reference_and_truth(backend):
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    @_settings(_examples(60))
    @given(pair=logits_pairs(dtypes=dtypes), temperature=temperatures, alpha=alphas,
           reduction=reductions, ignore_fraction=st.sampled_from([0.0, 0.3, 1.0]),
           teacher_grad=st.booleans(), plain_backward=st.booleans())
    def check(pair, temperature, alpha, reduction, ignore_fraction, teacher_grad,
              plain_backward):
        student, teacher, generator = pair
        labels = _labels(generator, student.shape[:-1], student.shape[-1], ignore_fraction)
        loss_shape = student.shape[:-1] if reduction == "none" else ()
        grad_output = None if plain_backward else random_grad_output(loss_shape, generator)
        kwargs = dict(temperature=temperature, alpha=alpha, reduction=reduction)
        device_inputs = (student.to(backend), teacher.to(backend), labels.to(backend))
        device_grad_output = grad_output.to(backend) if grad_output is not None else None
        actual = run_loss(fastkd_loss, *device_inputs, grad_output=device_grad_output,
                          teacher_grad=teacher_grad, **kwargs)
        expected = run_loss(reference_loss, *device_inputs, grad_output=device_grad_output,
                            teacher_grad=teacher_grad, **kwargs)
        truth = float64_truth(student, teacher, labels, grad_output=grad_output, **kwargs)
        dtypes = dict(student_dtype=student.dtype, teacher_dtype=teacher.dtype,
                      backend=_backend_name())
        check_against_truth(actual, truth, teacher_grad=teacher_grad, what="generated",
                            **dtypes)
        check_against_reference(actual, expected, what="generated", **dtypes)

    check()


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_linearity_in_alpha(backend, reduction):
    # loss(alpha) = alpha * loss(1) + (1 - alpha) * loss(0), row by row and after reduction.
    @_settings(_examples(12))
    @given(pair=logits_pairs(), temperature=temperatures, alpha=alphas)
    def check(pair, temperature, alpha):
        student, teacher, generator = pair
        labels = _labels(generator, student.shape[:-1], student.shape[-1], 0.25)
        inputs = (student.to(backend), teacher.to(backend), labels.to(backend))
        losses = {
            a: fastkd.kd_loss(*inputs, temperature=temperature, alpha=a, reduction=reduction)
            for a in (0.0, 1.0, alpha)
        }
        mixed = alpha * losses[1.0].double() + (1 - alpha) * losses[0.0].double()
        loss_tol = tolerance(torch.float32, "loss", _backend_name())
        assert_close(losses[alpha], mixed, Tol(3 * loss_tol.atol, 3 * loss_tol.rtol),
                     what="alpha mix", scale_floor=1.0)

    check()
