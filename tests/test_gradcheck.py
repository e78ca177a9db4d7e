"""torch.autograd.gradcheck of fastkd's hand-written gradients, float64 on the PyTorch backend.

gradcheck backpropagates through one graph many times (once per Jacobian row, and everything
twice to test reentrancy), which the fused op refuses by design: its gradient is computed once, in
the forward, and scaled in place by the one backward. So the function handed to gradcheck runs a
fresh fastkd forward and backward for every vector-Jacobian product; the analytical gradient it
checks is still exactly fastkd's.
"""

from __future__ import annotations

import pytest
import torch

import fastkd


class _FreshGraphPerBackward(torch.autograd.Function):
    """fastkd.kd_loss whose backward re-runs the fused op, so it can be called repeatedly."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, kwargs):
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.labels, ctx.kwargs = labels, kwargs
        return fastkd.kd_loss(student_logits, teacher_logits, labels, **kwargs)

    @staticmethod
    def backward(ctx, grad_output):
        student_logits, teacher_logits = ctx.saved_tensors
        wants_student, wants_teacher = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            student = student_logits.detach().requires_grad_(wants_student)
            teacher = teacher_logits.detach().requires_grad_(wants_teacher)
            loss = fastkd.kd_loss(student, teacher, ctx.labels, **ctx.kwargs)
            loss.backward(grad_output)
        return student.grad, teacher.grad, None, None


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "torch")


def _inputs(leading, vocab, seed, *, ignore_rows=(), masked_teacher=False):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*leading, vocab, generator=generator, dtype=torch.float64)
    teacher = torch.randn(*leading, vocab, generator=generator, dtype=torch.float64) * 2
    if masked_teacher:
        teacher.reshape(-1, vocab)[:, 1] = float("-inf")
    labels = torch.randint(0, vocab, tuple(leading), generator=generator)
    for row in ignore_rows:
        labels.reshape(-1)[row] = -100
    return student, teacher, labels


def _gradcheck(student, teacher, labels, wrt, **kwargs):
    student = student.requires_grad_("student" in wrt)
    teacher = teacher.requires_grad_("teacher" in wrt)

    def loss_of(student_logits, teacher_logits):
        return _FreshGraphPerBackward.apply(student_logits, teacher_logits, labels, kwargs)

    assert torch.autograd.gradcheck(loss_of, (student, teacher), eps=1e-6, atol=1e-7, rtol=1e-5)


WRT = [("student",), ("teacher",), ("student", "teacher")]


@pytest.mark.parametrize("wrt", WRT, ids=["+".join(w) for w in WRT])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_gradcheck_reductions(reduction, wrt):
    student, teacher, labels = _inputs((2, 3), 7, seed=1, ignore_rows=(4,))
    _gradcheck(student, teacher, labels, wrt, temperature=2.0, alpha=0.3, reduction=reduction)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_gradcheck_temperature_and_alpha(temperature, alpha):
    student, teacher, labels = _inputs((3,), 6, seed=2, ignore_rows=(1,))
    _gradcheck(student, teacher, labels, ("student", "teacher"), temperature=temperature,
               alpha=alpha, reduction="mean")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_without_labels(reduction):
    student, teacher, _ = _inputs((2, 2), 5, seed=3)
    _gradcheck(student, teacher, None, ("student", "teacher"), temperature=2.0,
               reduction=reduction)


def test_gradcheck_masked_teacher_entries():
    # -inf teacher entries: the gradient there is 0 and stays finite (finite differences move
    # -inf nowhere, so the numerical gradient is 0 too).
    student, teacher, labels = _inputs((3,), 6, seed=4, masked_teacher=True)
    _gradcheck(student, teacher, labels, ("student", "teacher"), temperature=2.0, alpha=0.5,
               reduction="sum")


def test_gradcheck_single_row_1d():
    student, teacher, labels = _inputs((), 9, seed=5)
    for reduction in ("mean", "batchmean", "none"):
        _gradcheck(student, teacher, labels, ("student", "teacher"), temperature=2.0,
                   alpha=0.3, reduction=reduction)


def test_gradcheck_all_rows_ignored():
    student, teacher, labels = _inputs((3,), 5, seed=6, ignore_rows=(0, 1, 2))
    _gradcheck(student, teacher, labels, ("student", "teacher"), temperature=2.0, alpha=0.5,
               reduction="mean")


def test_wrapper_checks_the_fused_gradient():
    # The wrapper must return fastkd's gradient, not something else that happens to pass.
    student, teacher, labels = _inputs((4,), 8, seed=7)
    direct_student = student.clone().requires_grad_()
    direct_teacher = teacher.clone().requires_grad_()
    fastkd.kd_loss(direct_student, direct_teacher, labels, temperature=2.0).backward()
    wrapped_student = student.clone().requires_grad_()
    wrapped_teacher = teacher.clone().requires_grad_()
    _FreshGraphPerBackward.apply(wrapped_student, wrapped_teacher, labels,
                                 dict(temperature=2.0)).backward()
    assert torch.equal(wrapped_student.grad, direct_student.grad)
    assert torch.equal(wrapped_teacher.grad, direct_teacher.grad)
