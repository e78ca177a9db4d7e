"""reduction="sum" with a normalizer: the gradient-accumulation pattern, folded into the kernel."""

import pytest
import torch

import fastkd
from fastkd import reference


def _micro_batches(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for rows, ignored in ((5, 1), (3, 2)):  # uneven counts: per-micro-batch means would be wrong
        student = (2 * torch.randn(rows, 203, generator=gen)).to(device)
        teacher = (2 * torch.randn(rows, 203, generator=gen)).to(device)
        labels = torch.randint(0, 203, (rows,), generator=gen)
        labels[:ignored] = -100
        batches.append((student, teacher, labels.to(device)))
    return batches


@pytest.mark.parametrize("as_tensor", [False, True])
def test_accumulated_sum_over_global_count_equals_mean_of_whole_batch(backend, as_tensor):
    batches = _micro_batches(backend)
    n_tokens = sum(int((labels != -100).sum()) for _, _, labels in batches)
    normalizer = torch.tensor(n_tokens, device=backend) if as_tensor else float(n_tokens)
    options = dict(temperature=2.0, alpha=0.3)

    leaves = [student.clone().requires_grad_() for student, _, _ in batches]
    total = 0.0
    for leaf, (_, teacher, labels) in zip(leaves, batches, strict=True):
        loss = fastkd.kd_loss(leaf, teacher, labels, reduction="sum", normalizer=normalizer,
                              **options)
        loss.backward()
        total = total + loss.detach()

    whole_student = torch.cat([s for s, _, _ in batches]).requires_grad_()
    whole_loss = reference.kd_loss(whole_student, torch.cat([t for _, t, _ in batches]),
                                   torch.cat([y for _, _, y in batches]), **options)
    whole_loss.backward()
    torch.testing.assert_close(total, whole_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([leaf.grad for leaf in leaves]), whole_student.grad,
                               rtol=1e-4, atol=1e-7)

    naive = sum(
        reference.kd_loss(s, t, y, **options) for s, t, y in batches
    ) / len(batches)
    assert not torch.allclose(naive, whole_loss), "uneven counts should break per-batch means"


def test_normalizer_matches_the_reference_with_a_random_grad_output(backend):
    student, teacher, labels = _micro_batches(backend, seed=3)[0]
    grad_output = torch.tensor(0.37, device=backend)
    fused_leaf = student.clone().requires_grad_()
    fastkd.kd_loss(fused_leaf, teacher, labels, reduction="sum", normalizer=2.5).backward(
        grad_output)
    reference_leaf = student.clone().requires_grad_()
    reference.kd_loss(reference_leaf, teacher, labels, reduction="sum", normalizer=2.5).backward(
        grad_output)
    torch.testing.assert_close(fused_leaf.grad, reference_leaf.grad, rtol=1e-4, atol=1e-7)


def test_module_forwards_the_normalizer():
    student, teacher, labels = _micro_batches("cpu")[0]
    criterion = fastkd.KDLoss(temperature=2.0, alpha=0.5, reduction="sum")
    torch.testing.assert_close(
        criterion(student, teacher, labels, normalizer=4.0),
        criterion(student, teacher, labels) / 4.0,
    )


@pytest.mark.parametrize(
    "normalizer, reduction, error, match",
    [
        (2.0, "mean", ValueError, "normalizer.*reduction='sum'"),
        (0.0, "sum", ValueError, "normalizer must be > 0"),
        (float("nan"), "sum", ValueError, "normalizer must be finite"),
        (torch.ones(2), "sum", TypeError, "normalizer must be a positive number"),
        (torch.tensor(True), "sum", TypeError, "normalizer"),
        ("8", "sum", TypeError, "normalizer"),
    ],
)
def test_bad_normalizer_is_refused(normalizer, reduction, error, match):
    student, teacher, labels = _micro_batches("cpu")[0]
    with pytest.raises(error, match=match):
        fastkd.kd_loss(student, teacher, labels, reduction=reduction, normalizer=normalizer)
