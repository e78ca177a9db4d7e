"""fastkd.shift_labels: next-token labels for full-length logits, the causal-LM recipe that
replaces slicing the logits; the loss and gradient of the recipe against the float64 closed form
of the sliced call."""

import math
import os

import pytest
import torch
from helpers import (
    Result,
    check_against_truth,
    fastkd_loss,
    float64_truth,
    make_labels,
    make_logits,
    random_grad_output,
    run_loss,
)

import fastkd


def _shift_by_loop(labels, ignore_index):
    flat = labels.reshape(math.prod(labels.shape[:-1]), labels.shape[-1])
    out = torch.empty_like(flat)
    for row in range(flat.shape[0]):
        for i in range(flat.shape[1]):
            out[row, i] = flat[row, i + 1] if i + 1 < flat.shape[1] else ignore_index
    return out.reshape(labels.shape)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1), (2, 0), (0, 3)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_matches_the_definition(shape, dtype):
    labels = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    if labels.numel():
        labels.view(-1)[0] = -100  # an ignored label stays ignored one position earlier
    shifted = fastkd.shift_labels(labels)
    assert shifted.shape == labels.shape and shifted.dtype == dtype
    assert torch.equal(shifted, _shift_by_loop(labels, -100))
    assert shifted.data_ptr() != labels.data_ptr() or labels.numel() == 0  # a new tensor
    assert torch.equal(labels, labels.clone())  # the input is not modified


def test_custom_ignore_index_and_strided_labels():
    base = torch.arange(24).reshape(4, 6)
    labels = base.t()  # (6, 4), not contiguous: rows are sequences of length 4
    shifted = fastkd.shift_labels(labels, ignore_index=-1)
    assert torch.equal(shifted, _shift_by_loop(labels.contiguous(), -1))
    assert torch.equal(shifted[:, -1], torch.full((6,), -1))


@pytest.mark.parametrize(("labels", "ignore_index", "error", "match"), [
    (torch.zeros(3), -100, TypeError, "integer tensor"),
    (torch.zeros(3, dtype=torch.bool), -100, TypeError, "integer tensor"),
    ([1, 2, 3], -100, TypeError, "torch.Tensor"),
    (torch.tensor(3), -100, ValueError, "0-d"),
    (torch.zeros(3, dtype=torch.int64), -100.0, TypeError, "ignore_index must be an int"),
    (torch.zeros(3, dtype=torch.int64), True, TypeError, "ignore_index must be an int"),
    (torch.zeros(3, dtype=torch.uint8), -100, ValueError, "representable"),
])
def test_bad_input_is_named(labels, ignore_index, error, match):
    with pytest.raises(error, match=match):
        fastkd.shift_labels(labels, ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recipe_equals_the_sliced_call_in_float64(backend, dtype, reduction):
    """kd_loss(s, t, shift_labels(y)) on full (B, L, V) logits: the loss of the sliced call
    kd_loss(s[:, :-1], t[:, :-1], y[:, 1:]) and its gradient, with 0 at the last position."""
    B, L, V = 2, 6, 37
    s = make_logits((B, L, V), dtype, seed=1, device=backend)
    t = make_logits((B, L, V), dtype, seed=2, device=backend)
    y = make_labels((B, L), V, seed=3, device=backend, ignore_rows=(4, 5, 9))
    grad_output = random_grad_output(())
    actual = run_loss(fastkd_loss, s, t, fastkd.shift_labels(y), temperature=2.0, alpha=0.4,
                      reduction=reduction, grad_output=grad_output.to(backend))
    sliced = float64_truth(s[:, :-1], t[:, :-1], y[:, 1:], temperature=2.0, alpha=0.4,
                           reduction=reduction, grad_output=grad_output)
    last = torch.zeros(B, 1, V, dtype=torch.float64)
    truth = Result(sliced.loss, torch.cat([sliced.grad_student, last], dim=1), None)
    check_against_truth(actual, truth, student_dtype=dtype, teacher_dtype=dtype,
                        backend=os.environ["FASTKD_BACKEND"], what=f"{dtype} {reduction}")
    assert torch.all(actual.grad_student[:, -1] == 0)


def test_one_dimensional_labels(backend):
    L, V = 9, 21
    s = make_logits((L, V), seed=4, device=backend)
    t = make_logits((L, V), seed=5, device=backend)
    y = make_labels((L,), V, seed=6, device=backend)
    actual = run_loss(fastkd_loss, s, t, fastkd.shift_labels(y), temperature=1.0)
    sliced = float64_truth(s[:-1], t[:-1], y[1:], temperature=1.0)
    truth = Result(sliced.loss, torch.cat([sliced.grad_student, torch.zeros(1, V)]), None)
    check_against_truth(actual, truth, student_dtype=torch.float32, teacher_dtype=torch.float32,
                        backend=os.environ["FASTKD_BACKEND"], what="1-D")
