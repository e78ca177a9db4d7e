"""fastkd.linear_kd_loss against float64 on explicit logits, and its integration behaviour.

The float64 truth projects both models in float64 autograd and takes dloss/dlogits from the
closed forms of tests/helpers.py, so neither the fused loss nor fastkd.reference is trusted.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, float64_truth, make_labels, random_grad_output, tolerance

import fastkd
from fastkd import kernels as _kernels_package  # noqa: F401  (fastkd.kernels is importable)
from fastkd.kernels.kd_loss import MAX_ON_CHIP_V
from fastkd.linear import default_chunk_size

IGNORE = -100
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
         "teacher_bias")


def make_case(*, lead=(12,), h_s=16, h_t=24, vocab=300, dtype=torch.float32, bias=(True, False),
              seed=0, ignore_rows=(3,), labels=True, teacher_grad=False):
    """Leaf tensors (hidden, weight, bias per model) and labels; logits of a few units."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    tensors = [
        randn(*lead, h_s), randn(vocab, h_s, std=h_s**-0.5 * 2), randn(vocab) if bias[0] else None,
        randn(*lead, h_t), randn(vocab, h_t, std=h_t**-0.5 * 2), randn(vocab) if bias[1] else None,
    ]
    for i, tensor in enumerate(tensors):
        if tensor is not None:
            tensor.requires_grad_(i < 3 or teacher_grad)
    y = make_labels(lead, vocab, seed=seed, ignore_rows=ignore_rows) if labels else None
    return tensors, y


def project64(hidden, weight, bias, scale, softcap):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = scale * z
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def truth(tensors, labels, *, scales=(1.0, 1.0), softcaps=(None, None), grad_output=None,
          **options):
    """float64 loss and gradients of every tensor that requires grad."""
    leaves = [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
              for t in tensors]
    z_s = project64(*leaves[:3], scales[0], softcaps[0])
    z_t = project64(*leaves[3:], scales[1], softcaps[1])
    result = float64_truth(z_s.detach(), z_t.detach(), labels, grad_output=grad_output,
                           **options)
    outputs = [z_s] + ([z_t] if z_t.requires_grad else [])
    grads = [result.grad_student] + ([result.grad_teacher] if z_t.requires_grad else [])
    torch.autograd.backward(outputs, grads)
    return result.loss, [None if t is None else t.grad for t in leaves]


def run(tensors, labels, *, grad_output=None, **kwargs):
    for t in tensors:
        if t is not None:
            t.grad = None
    loss = fastkd.linear_kd_loss(*tensors[:2], *tensors[3:5], labels, student_bias=tensors[2],
                                 teacher_bias=tensors[5], **kwargs)
    if grad_output is not None:
        loss.backward(grad_output.to(loss.dtype))
    elif any(t is not None and t.requires_grad for t in tensors):
        loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in tensors]


def check(tensors, labels, backend_name, *, grad_output=None, what="", **kwargs):
    """fastkd's loss and every gradient within the helpers' tolerance of the float64 truth."""
    loss_options = {k: kwargs[k] for k in ("temperature", "alpha", "reduction") if k in kwargs}
    scales = (kwargs.get("student_logit_scale", 1.0), kwargs.get("teacher_logit_scale", 1.0))
    softcaps = (kwargs.get("student_softcap"), kwargs.get("teacher_softcap"))
    loss64, grads64 = truth(tensors, labels, scales=scales, softcaps=softcaps,
                            grad_output=grad_output, ignore_index=IGNORE, **loss_options)
    loss, grads = run(tensors, labels, grad_output=grad_output, **kwargs)
    dtype = tensors[0].dtype
    assert_close(loss, loss64, tolerance(dtype, "loss", backend_name), what=f"{what} loss",
                 record=f"linear {backend_name} {dtype} loss", scale_floor=1.0)
    for name, tensor, grad, grad64 in zip(NAMES, tensors, grads, grads64, strict=True):
        if tensor is None or not tensor.requires_grad:
            assert grad is None, f"{what}: {name} got a gradient it did not ask for"
            continue
        assert grad is not None and grad.dtype == tensor.dtype, f"{what}: {name} gradient"
        assert_close(grad, grad64, tolerance(tensor.dtype, "grad", backend_name),
                     what=f"{what} {name} grad", record=f"linear {backend_name} {dtype} {name}")
    return loss


@pytest.fixture
def backend_name(backend, monkeypatch):
    import os

    return os.environ["FASTKD_BACKEND"]


# Sampled corners: chunk sizes dividing N or not, one chunk, N = 1, scale and softcap on either
# side, biases on and off, fp32 and bf16, a (B, L, H) leading shape, every reduction, a random
# grad_output, mutual distillation.
CASES = {
    "mean_T2_chunk5": dict(case=dict(), kw=dict(temperature=2.0, alpha=0.5, chunk_size=5)),
    "sum_chunk4_divides": dict(case=dict(bias=(False, True)),
                               kw=dict(reduction="sum", chunk_size=4, alpha=0.3),
                               grad_output=True),
    "one_row": dict(case=dict(lead=(1,), ignore_rows=()), kw=dict(temperature=0.7, chunk_size=3)),
    "student_softcap_scale": dict(
        case=dict(lead=(2, 5)),
        kw=dict(student_softcap=3.0, student_logit_scale=1.7, temperature=2.0, chunk_size=3)),
    "teacher_softcap_scale_mutual": dict(
        case=dict(bias=(True, True), teacher_grad=True),
        kw=dict(teacher_softcap=2.5, teacher_logit_scale=0.6, temperature=1.5, chunk_size=7)),
    "both_softcap_none_reduction": dict(
        case=dict(lead=(2, 3, 2), teacher_grad=True),
        kw=dict(reduction="none", student_softcap=4.0, teacher_softcap=6.0, chunk_size=5,
                alpha=0.6), grad_output=True),
    "bf16_batchmean": dict(case=dict(dtype=torch.bfloat16, lead=(3, 4)),
                           kw=dict(reduction="batchmean", temperature=2.0, chunk_size=5)),
    "bf16_softcap_mutual": dict(
        case=dict(dtype=torch.bfloat16, teacher_grad=True, bias=(True, True)),
        kw=dict(student_softcap=5.0, teacher_logit_scale=2.0, chunk_size=8)),
    "no_labels_default_chunk": dict(case=dict(labels=False, lead=(24,)),
                                    kw=dict(temperature=3.0)),
    "float64": dict(case=dict(dtype=torch.float64, lead=(7,)),
                    kw=dict(temperature=2.0, chunk_size=2, student_softcap=2.0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64(backend_name, name):
    spec = CASES[name]
    tensors, labels = make_case(**spec["case"])
    grad_output = None
    if spec.get("grad_output"):
        shape = tensors[0].shape[:-1] if spec["kw"].get("reduction") == "none" else ()
        grad_output = random_grad_output(shape, torch.Generator().manual_seed(1))
    check(tensors, labels, backend_name, grad_output=grad_output, what=name, **spec["kw"])


def test_vocabulary_past_the_on_chip_limit(backend_name):
    """V just over MAX_ON_CHIP_V takes the kernel's two-sweep path; few rows keep it fast."""
    tensors, labels = make_case(lead=(3,), h_s=8, h_t=8, vocab=MAX_ON_CHIP_V + 5,
                                ignore_rows=(1,), bias=(True, True))
    check(tensors, labels, backend_name, temperature=2.0, alpha=0.5, chunk_size=2,
          student_softcap=4.0, what="long rows")


def test_ignored_rows_and_all_rows_ignored(backend_name):
    tensors, labels = make_case(lead=(9,), ignore_rows=(0, 4, 8))
    check(tensors, labels, backend_name, temperature=2.0, chunk_size=4, what="some ignored")
    labels = torch.full_like(labels, IGNORE)
    loss = check(tensors, labels, backend_name, temperature=2.0, chunk_size=4, what="all ignored")
    assert loss.item() == 0.0
    assert all(t.grad is None or not t.grad.any() for t in tensors if t is not None)


def test_no_grad_computes_the_loss_only(backend_name):
    tensors, labels = make_case()
    with_grad, _ = run(tensors, labels, temperature=2.0, chunk_size=5)
    for t in tensors:
        if t is not None:
            t.grad = None
    with torch.no_grad():
        loss = fastkd.linear_kd_loss(*tensors[:2], *tensors[3:5], labels,
                                     student_bias=tensors[2], temperature=2.0, chunk_size=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, with_grad, rtol=0, atol=0)


def test_default_chunk_size_is_a_budget_on_chunk_times_vocab():
    assert default_chunk_size(10**6, 32000, torch.device("cpu")) == 256
    assert default_chunk_size(10**6, 151936, torch.device("cuda")) == 832
    assert default_chunk_size(5, 32000, torch.device("cpu")) == 5
    assert default_chunk_size(10**6, 10**9, torch.device("cpu")) == 1
