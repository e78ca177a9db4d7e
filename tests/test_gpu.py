"""Checks that need a real GPU: compiled kernels (not the interpreter), CUDA graphs, int64 offsets.

Skipped without CUDA. Sized for one H200 (about 139 GiB): the largest test holds three 4.3 GB
tensors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import (
    assert_close,
    check_against_reference,
    check_against_truth,
    fastkd_loss,
    float64_truth,
    make_labels,
    make_logits,
    random_grad_output,
    reference_loss,
    run_loss,
    tolerance,
)

import fastkd
from fastkd.kernels.kd_loss import LOOP_BLOCK_V, MAX_ON_CHIP_V

pytestmark = [requires_cuda, pytest.mark.gpu]

DEVICE = "cuda"
LOOP_V = (MAX_ON_CHIP_V // LOOP_BLOCK_V + 1) * LOOP_BLOCK_V + 1


@pytest.fixture(params=["auto", "torch"])
def cuda_backend(request, monkeypatch):
    """auto runs the Triton kernels on CUDA tensors; torch runs the PyTorch backend there."""
    monkeypatch.setenv("FASTKD_BACKEND", request.param)
    return "triton" if request.param == "auto" else "torch"


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    return "triton"


def _check(backend, student, teacher, labels, *, teacher_grad=True, reference=True, **kwargs):
    reduction = kwargs.get("reduction", "mean")
    loss_shape = student.shape[:-1] if reduction == "none" else ()
    grad_output = random_grad_output(loss_shape).to(DEVICE)
    inputs = (student.to(DEVICE), teacher.to(DEVICE), labels.to(DEVICE))
    actual = run_loss(fastkd_loss, *inputs, grad_output=grad_output, teacher_grad=teacher_grad,
                      **kwargs)
    truth = float64_truth(*inputs, grad_output=grad_output, **kwargs)
    dtypes = dict(student_dtype=student.dtype, teacher_dtype=teacher.dtype, backend=backend)
    check_against_truth(actual, truth, teacher_grad=teacher_grad, what="cuda", **dtypes)
    if reference:
        expected = run_loss(reference_loss, *inputs, grad_output=grad_output,
                            teacher_grad=teacher_grad, **kwargs)
        check_against_reference(actual, expected, what="cuda", **dtypes)
    return actual


@pytest.mark.parametrize("vocab", [1, 1000, MAX_ON_CHIP_V - 1, MAX_ON_CHIP_V, MAX_ON_CHIP_V + 1,
                                   LOOP_V, 128256, 262144])
def test_both_kernel_paths(cuda_backend, vocab):
    rows = 24 if vocab <= 128256 else 8
    student = make_logits((rows, vocab), seed=1)
    teacher = make_logits((rows, vocab), seed=2)
    labels = make_labels((rows,), vocab, seed=3, ignore_rows=(5,))
    for reduction in ("mean", "none"):
        _check(cuda_backend, student, teacher, labels, temperature=2.0, alpha=0.3,
               reduction=reduction)


@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float32])
def test_bf16_gradients_at_llama3_vocabulary(cuda_backend, teacher_dtype):
    vocab = 128256
    student = make_logits((64, vocab), torch.bfloat16, seed=4)
    teacher = make_logits((64, vocab), teacher_dtype, seed=5)
    labels = make_labels((64,), vocab, seed=6, ignore_rows=(0, 33))
    for temperature, alpha in ((1.0, 0.5), (2.0, 0.3), (4.0, 1.0)):
        _check(cuda_backend, student, teacher, labels, temperature=temperature, alpha=alpha)


@pytest.mark.parametrize("vocab", [1000, LOOP_V, 128256])
def test_masks_and_shifts_compiled(triton_backend, vocab):
    # The compiled kernels may contract or reorder differently from the interpreter.
    student = make_logits((6, vocab), seed=7) + 1e4
    teacher = make_logits((6, vocab), seed=8) - 1e4
    masked = torch.rand((6, vocab), generator=torch.Generator().manual_seed(9)) < 0.2
    teacher[masked] = float("-inf")
    if vocab > MAX_ON_CHIP_V:
        student[:3, :LOOP_BLOCK_V] = float("-inf")
        teacher[:3, :LOOP_BLOCK_V] = float("-inf")
    labels = torch.tensor([int((~masked[row]).nonzero()[-1]) for row in range(6)])
    for alpha in (0.0, 1.0):
        _check(triton_backend, student, teacher, labels, temperature=2.0, alpha=alpha,
               reduction="none", reference=False)


def test_inplace_backward_compiled(triton_backend):
    student = make_logits((16, LOOP_V), torch.bfloat16, seed=10).to(DEVICE)
    teacher = make_logits((16, LOOP_V), torch.bfloat16, seed=11).to(DEVICE)
    labels = make_labels((16,), LOOP_V, seed=12).to(DEVICE)
    grad_output = torch.tensor(0.75, device=DEVICE)
    expected = run_loss(fastkd_loss, student, teacher, labels, grad_output=grad_output,
                        temperature=2.0)
    leaf = student.clone().requires_grad_()
    loss = fastkd.kd_loss(leaf, teacher, labels, temperature=2.0, inplace_backward=True)
    loss.backward(grad_output)
    assert torch.equal(loss.detach(), expected.loss)
    assert torch.equal(leaf.grad, expected.grad_student)
    assert torch.equal(leaf.detach(), expected.grad_student)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_graph_capture_and_replay(triton_backend, reduction):
    rows, vocab = 32, LOOP_V
    generator = torch.Generator().manual_seed(13)

    def new_batch():
        student = torch.randn(rows, vocab, generator=generator) * 3
        teacher = torch.randn(rows, vocab, generator=generator) * 3
        labels = torch.randint(0, vocab, (rows,), generator=generator)
        labels[torch.rand(rows, generator=generator) < 0.2] = -100
        return student.to(DEVICE), teacher.to(DEVICE), labels.to(DEVICE)

    static_student, static_teacher, static_labels = new_batch()
    static_student.requires_grad_()
    static_teacher.requires_grad_()
    loss_shape = (rows,) if reduction == "none" else ()
    static_grad_output = random_grad_output(loss_shape, generator).to(DEVICE)
    kwargs = dict(temperature=2.0, alpha=0.3, reduction=reduction)

    def step():
        loss = fastkd.kd_loss(static_student, static_teacher, static_labels, **kwargs)
        loss.backward(static_grad_output)
        return loss

    # Warm up on a side stream, as torch.cuda.graph requires: compiles the kernels and fills the
    # caching allocator outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            static_student.grad = static_teacher.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)

    static_student.grad = static_teacher.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    previous_loss = None
    for _ in range(3):
        student, teacher, labels = new_batch()
        grad_output = random_grad_output(loss_shape, generator).to(DEVICE)
        with torch.no_grad():
            static_student.copy_(student)
            static_teacher.copy_(teacher)
            static_labels.copy_(labels)
            static_grad_output.copy_(grad_output)
        graph.replay()
        torch.cuda.synchronize()

        eager = run_loss(fastkd_loss, student, teacher, labels, grad_output=grad_output,
                         teacher_grad=True, **kwargs)
        torch.testing.assert_close(static_loss, eager.loss, atol=0, rtol=0)
        torch.testing.assert_close(static_student.grad, eager.grad_student, atol=0, rtol=0)
        torch.testing.assert_close(static_teacher.grad, eager.grad_teacher, atol=0, rtol=0)
        truth = float64_truth(student, teacher, labels, grad_output=grad_output, **kwargs)
        assert_close(static_loss, truth.loss, tolerance(torch.float32, "loss", "triton"),
                     what="replayed loss", scale_floor=1.0)
        assert_close(static_student.grad, truth.grad_student,
                     tolerance(torch.float32, "grad", "triton"), what="replayed student grad")
        # Each replay must see the new batch, not return the captured values again.
        if previous_loss is not None:
            assert not torch.equal(static_loss, previous_loss)
        previous_loss = static_loss.clone()


@pytest.mark.parametrize("vocab", [131072, MAX_ON_CHIP_V], ids=["two-sweep", "on-chip"])
def test_more_than_2_pow_31_elements(triton_backend, vocab):
    # rows x vocab > 2^31: the rows from 2^31 // vocab on start past 2^31, where 32-bit offsets
    # would wrap to other rows or out of the tensor. One case per kernel path; for V = 131072
    # that is 16400 rows, about 4.3 GB per bf16 tensor.
    rows = 2**31 // vocab + max(16, 2**21 // vocab)
    assert rows * vocab > 2**31
    needed = 3 * rows * vocab * 2 + (1 << 30)  # student, teacher, gradient in bf16, and slack
    free, _ = torch.cuda.mem_get_info()
    assert free > needed, f"needs {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    first_past = 2**31 // vocab
    _check_large_batch(rows, vocab, [0, 1, first_past - 1, first_past, first_past + 1])
    torch.cuda.empty_cache()


def _check_large_batch(rows, vocab, checked_rows):
    """bf16 student and teacher; per-row losses and gradients of `checked_rows` and the last 3."""
    generator = torch.Generator(device=DEVICE).manual_seed(14)
    student = torch.randn(rows, vocab, generator=generator, device=DEVICE, dtype=torch.bfloat16)
    teacher = torch.randn(rows, vocab, generator=generator, device=DEVICE, dtype=torch.bfloat16)
    student.mul_(3)
    labels = torch.randint(0, vocab, (rows,), generator=generator, device=DEVICE)
    labels[rows - 2] = -100
    labels[rows - 1] = vocab - 1  # the very last element of the tensor
    student.requires_grad_()
    row_losses = fastkd.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.5,
                                reduction="none")
    grad_output = torch.rand(rows, generator=generator, device=DEVICE) + 0.5
    row_losses.backward(grad_output)

    checked = torch.tensor([*checked_rows, rows - 3, rows - 2, rows - 1], device=DEVICE)
    picked = (student.detach()[checked], teacher[checked], labels[checked])
    truth = float64_truth(*picked, temperature=2.0, alpha=0.5, reduction="none",
                          grad_output=grad_output[checked])
    assert_close(row_losses.detach()[checked], truth.loss,
                 tolerance(torch.bfloat16, "loss", "triton"), what="row losses past 2^31",
                 scale_floor=1.0)
    assert_close(student.grad[checked], truth.grad_student,
                 tolerance(torch.bfloat16, "grad", "triton"), what="gradient past 2^31")
    assert row_losses[rows - 2].item() == 0.0
    # The reduction over all rows agrees with the per-row losses (no row lost or repeated).
    total = fastkd.kd_loss(student.detach(), teacher, labels, temperature=2.0, alpha=0.5,
                           reduction="sum")
    torch.testing.assert_close(total, row_losses.detach().sum(), rtol=1e-5, atol=0)
