"""torch.compile: the fused loss traces with fullgraph=True and matches eager mode."""

import pytest
import torch
from conftest import TRITON_DEVICE, requires_cuda

import fastkd
from fastkd import reference

HIDDEN, VOCAB = 16, 300


def _training_step(head, hidden, teacher_logits, labels, **loss_options):
    """One step's loss: student logits from a linear LM head, then the fused KD loss."""
    student_logits = head(hidden)
    loss = fastkd.kd_loss(student_logits, teacher_logits, labels, **loss_options)
    if loss.dim() > 0:  # reduction="none": weight the rows so the backward sees a real grad_output
        loss = (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum()
    return loss


def _make_inputs(device, batch=3, seq=5, teacher_requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB).to(device)
    hidden = torch.randn(batch, seq, HIDDEN, generator=gen).to(device)
    teacher_logits = (3 * torch.randn(batch, seq, VOCAB, generator=gen)).to(device)
    teacher_logits.requires_grad_(teacher_requires_grad)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels[0, :3] = -100
    return head, hidden, teacher_logits, labels.to(device)


def _loss_and_grads(step, head, hidden, teacher_logits, labels, **loss_options):
    head.zero_grad(set_to_none=True)
    teacher_logits.grad = None
    loss = step(head, hidden, teacher_logits, labels, **loss_options)
    loss.backward()
    grads = [head.weight.grad.clone(), head.bias.grad.clone()]
    if teacher_logits.requires_grad:
        grads.append(teacher_logits.grad.clone())
    return loss.detach(), grads


@pytest.mark.parametrize("use_compile", [False, True])
@pytest.mark.parametrize(
    "loss_options",
    [
        dict(temperature=2.0, alpha=0.3),
        dict(temperature=1.0, alpha=0.5, reduction="none"),
        dict(temperature=4.0, alpha=1.0, reduction="sum"),
    ],
    ids=["mean-T2", "none-T1", "sum-T4"],
)
def test_compiled_step_matches_eager_reference(backend, use_compile, loss_options):
    head, hidden, teacher_logits, labels = _make_inputs(backend)
    step = torch.compile(_training_step, fullgraph=True) if use_compile else _training_step
    loss, grads = _loss_and_grads(step, head, hidden, teacher_logits, labels, **loss_options)

    def reference_step(head, hidden, teacher_logits, labels, **options):
        loss = reference.kd_loss(head(hidden), teacher_logits, labels, **options)
        if loss.dim() > 0:
            loss = (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum()
        return loss

    expected_loss, expected_grads = _loss_and_grads(
        reference_step, head, hidden, teacher_logits, labels, **loss_options
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_compiled_mutual_distillation_gives_teacher_gradient():
    head, hidden, teacher_logits, labels = _make_inputs("cpu", teacher_requires_grad=True)
    options = dict(temperature=2.0, alpha=0.5)
    compiled = torch.compile(_training_step, fullgraph=True)
    loss, grads = _loss_and_grads(compiled, head, hidden, teacher_logits, labels, **options)
    eager_loss, eager_grads = _loss_and_grads(
        _training_step, head, hidden, teacher_logits, labels, **options
    )
    assert len(grads) == 3 and grads[2].abs().sum() > 0
    torch.testing.assert_close(loss, eager_loss)
    for grad, expected in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, expected)


def test_compile_handles_new_sequence_lengths_without_breaking():
    head = torch.nn.Linear(HIDDEN, VOCAB)
    compiled = torch.compile(_training_step, fullgraph=True, dynamic=True)
    for seq in (4, 7, 11):
        hidden = torch.randn(2, seq, HIDDEN)
        teacher_logits = torch.randn(2, seq, VOCAB)
        labels = torch.randint(0, VOCAB, (2, seq))
        got = compiled(head, hidden, teacher_logits, labels, temperature=2.0)
        expected = reference.kd_loss(head(hidden), teacher_logits, labels, temperature=2.0)
        torch.testing.assert_close(got, expected)


def test_inplace_backward_is_refused_under_compile():
    head, hidden, teacher_logits, labels = _make_inputs("cpu")
    compiled = torch.compile(_training_step, fullgraph=True)
    with pytest.raises(Exception, match="inplace_backward"):
        compiled(head, hidden, teacher_logits, labels, inplace_backward=True)


@pytest.mark.parametrize("student_grad", [False, True])
def test_custom_op_passes_opcheck(student_grad):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(6, 37, generator=gen)
    teacher = torch.randn(6, 37, generator=gen)
    labels = torch.randint(0, 37, (6,), generator=gen)
    weight = torch.tensor(1.0 / 6)
    row_stats = torch.empty(6, 4)
    grad_student = torch.empty(6, 37) if student_grad else None
    for divergence in fastkd.DIVERGENCES:
        torch.library.opcheck(
            torch.ops.fastkd.kd_rows.default,
            (student, teacher, labels, weight, row_stats, grad_student, None, divergence, 2.0,
             0.5, 0.3, 0.1, 0.1, 0.01, -100),
        )
    grad = torch.randn(6, 37, generator=gen)
    torch.library.opcheck(torch.ops.fastkd.scale_rows_.default, (grad, torch.tensor(0.5)))
    torch.library.opcheck(torch.ops.fastkd.mean_weight.default, (labels, -100, torch.float32))
    torch.library.opcheck(torch.ops.fastkd.sum_row_stats.default,
                          (torch.randn(6, 4, generator=gen), weight, student_grad))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("use_compile", [False, True])
def test_compiled_step_on_cuda(use_compile):
    assert TRITON_DEVICE == "cuda"
    head, hidden, teacher_logits, labels = _make_inputs("cuda")
    step = torch.compile(_training_step, fullgraph=True) if use_compile else _training_step
    loss, grads = _loss_and_grads(step, head, hidden, teacher_logits, labels, temperature=2.0)
    expected_loss, expected_grads = _loss_and_grads(
        _training_step, head.cpu(), hidden.cpu(), teacher_logits.cpu(), labels.cpu(),
        temperature=2.0,
    )
    torch.testing.assert_close(loss.cpu(), expected_loss, rtol=1e-4, atol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.cpu(), expected, rtol=1e-3, atol=1e-5)
