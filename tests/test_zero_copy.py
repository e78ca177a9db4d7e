"""No copy of the logits before the kernel: fastkd.kd_loss reads (B, L, V) logits where they are.

torch.profiler records every aten op of the forward (with input shapes); an op that allocates a
copy of its input (clone, contiguous, _to_copy: what `reshape` of a non-viewable tensor and
`.to(dtype)` run) on a tensor of at least the logits' size is an N x V copy. Ops inside Triton
launches are the interpreter staging the kernel's arguments and are not looked at
(fastkd.bench.launches). The PyTorch backend's chunk workspace is an allocation, not a copy op,
and holds at most one chunk of rows (here the whole input, as the inputs are small).
"""

import math

import pytest
import torch
from helpers import assert_close, float64_truth, make_labels, make_logits, tolerance

import fastkd
from fastkd.bench import launches

COPY_OPS = frozenset({"aten::clone", "aten::contiguous", "aten::_to_copy", "aten::_reshape_copy",
                      "aten::index_select", "aten::cat"})
B, L, V = 2, 5, 37


def logits_sized_copies(fn, numel: int) -> list[str]:
    """The copy-like ops of fn() whose input has at least `numel` elements, e.g. 'aten::clone
    [[2, 4, 37]]'."""
    prof, _ = launches.profile(fn, record_shapes=True)
    found = []

    def visit(event) -> bool:
        if event.name in COPY_OPS and any(
                shape and math.prod(shape) >= numel for shape in event.input_shapes):
            found.append(f"{event.name} {event.input_shapes}")
        return True

    launches.walk(prof.events(), visit)
    return found


def _inputs(device, requires_grad):
    s = make_logits((B, L, V), seed=1, device=device).requires_grad_(requires_grad)
    t = make_logits((B, L, V), seed=2, device=device)
    y = make_labels((B, L), V, seed=3, device=device, ignore_rows=(2,))
    return s, t, y


def test_detector_sees_the_copy_of_a_sliced_reshape():
    s = torch.randn(B, L, V)
    assert logits_sized_copies(lambda: s[:, :-1].reshape(-1, V), B * (L - 1) * V)
    assert not logits_sized_copies(lambda: s.reshape(-1, V), s.numel())


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_full_logits_with_shifted_labels_are_not_copied(backend, requires_grad):
    s, t, y = _inputs(backend, requires_grad)
    labels = fastkd.shift_labels(y)
    losses = []
    copies = logits_sized_copies(lambda: losses.append(fastkd.kd_loss(s, t, labels,
                                                                      temperature=2.0)), s.numel())
    assert not copies, copies
    truth = float64_truth(s, t, labels, temperature=2.0)
    assert_close(losses[0].detach(), truth.loss, tolerance(torch.float32, "loss"),
                 what="recipe loss", scale_floor=1.0)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_sliced_logits_are_not_copied(backend, requires_grad):
    """(B, L - 1, V) views are read through their strides too."""
    s, t, y = _inputs(backend, requires_grad)
    sliced_s, sliced_t, sliced_y = s[:, :-1], t[:, :-1], y[:, 1:]
    losses = []
    copies = logits_sized_copies(
        lambda: losses.append(fastkd.kd_loss(sliced_s, sliced_t, sliced_y, temperature=2.0)),
        sliced_s.numel())
    assert not copies, copies
    truth = float64_truth(sliced_s, sliced_t, sliced_y, temperature=2.0)
    assert_close(losses[0].detach(), truth.loss, tolerance(torch.float32, "loss"),
                 what="sliced loss", scale_floor=1.0)


def test_recipe_backward_writes_no_second_gradient(backend):
    """Backward of the shifted-label recipe scales the saved gradient in place (or not at all);
    the sliced call's backward zero-fills a full (B, L, V) gradient (aten::slice_backward)."""
    s, t, y = _inputs(backend, requires_grad=True)
    recipe = fastkd.kd_loss(s, t, fastkd.shift_labels(y))
    sliced = fastkd.kd_loss(s[:, :-1], t[:, :-1], y[:, 1:])
    recipe_ops = launches.count_launches(recipe.backward, cuda=False).aten
    sliced_ops = launches.count_launches(sliced.backward, cuda=False).aten
    assert "aten::slice_backward" in sliced_ops
    assert not {"aten::slice_backward", *COPY_OPS} & set(recipe_ops), recipe_ops
