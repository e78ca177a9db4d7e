"""fastkd.linear_topk_kd_loss against explicit logits + fastkd.topk_kd_loss, and against the
float64 oracle chained through the projection by float64 autograd, on both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Tol, assert_close, make_labels, random_grad_output, tolerance
from test_topk import _teacher
from topk_oracle import loss_truth

import fastkd

HIDDEN, VOCAB = 16, 300


def _head(dtype=torch.float32, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.5).to(dtype)
    b = (torch.randn(VOCAB, generator=generator) * 0.5).to(dtype) if bias else None
    return weight, b


def _logits(hidden, weight, bias, scale, softcap):
    z = scale * F.linear(hidden, weight, bias)
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


CASES = [
    # (tail, reduction, scale, softcap, chunk_size)
    ("renormalize", "mean", 1.0, None, 3),
    ("bucket", "none", 0.5, 20.0, 4),
    ("bucket", "sum", 2.0, None, None),
]


@pytest.mark.parametrize(("tail", "reduction", "scale", "softcap", "chunk_size"), CASES)
def test_equals_explicit_logits(backend, tail, reduction, scale, softcap, chunk_size):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, HIDDEN, generator=generator).to(backend)
    weight, bias = (t.to(backend) for t in _head(seed=2))
    ids, values, _ = _teacher((2, 5, VOCAB), 6, temperature=2.0, tail=tail, seed=3)
    ids, values = ids.to(backend), values.to(backend)
    labels = make_labels((2, 5), VOCAB, seed=4, ignore_rows=(0, 7)).to(backend)
    options = dict(temperature=2.0, alpha=0.6, tail=tail, label_smoothing=0.1, z_loss=1e-3,
                   reduction=reduction, return_components=True)
    if reduction == "sum":
        options["normalizer"] = 4.0
    go = random_grad_output((2, 5) if reduction == "none" else (), generator).to(backend)

    h1, w1, b1 = _leaves(hidden, weight, bias)
    fused = fastkd.linear_topk_kd_loss(h1, w1, ids, values, labels, student_bias=b1,
                                       student_logit_scale=scale, student_softcap=softcap,
                                       chunk_size=chunk_size, **options)
    fused.loss.backward(go)
    h2, w2, b2 = _leaves(hidden, weight, bias)
    explicit = fastkd.topk_kd_loss(_logits(h2, w2, b2, scale, softcap), ids, values, labels,
                                   **options)
    explicit.loss.backward(go)
    tol = Tol(1e-5, 1e-4)
    for a, b in zip(fused, explicit, strict=True):
        assert_close(a, b, tol, what="loss/components vs explicit", scale_floor=1.0)
    for name, a, b in (("hidden", h1, h2), ("weight", w1, w2), ("bias", b1, b2)):
        assert_close(a.grad, b.grad, tol, what=f"d{name} vs explicit")

    # Float64 truth: the oracle's dloss/dz, chained through the projection by autograd.
    h3, w3, b3 = _leaves(*(t.cpu().double() for t in (hidden, weight, bias)))
    z = _logits(h3, w3, b3, scale, softcap)
    oracle_options = {key: value for key, value in options.items()
                      if key not in ("return_components", "normalizer")}
    truth_loss, _, truth_grad_z = loss_truth(
        z.detach(), ids.cpu(), values.cpu(), labels.cpu(), grad_output=go.cpu(),
        normalizer=options.get("normalizer"), **oracle_options)
    z.backward(truth_grad_z)
    loss_tol = tolerance(torch.float32, "loss", "triton")
    assert_close(fused.loss, truth_loss, loss_tol, what="loss vs float64", scale_floor=1.0)
    for name, a, b in (("hidden", h1, h3), ("weight", w1, w3), ("bias", b1, b3)):
        assert_close(a.grad, b.grad, Tol(2e-5, 1e-4), what=f"d{name} vs float64")


def test_bf16_head_and_frozen_weight(backend):
    """bf16 hidden states and weight (weight frozen): only dH; the logits are fp32 per chunk."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(7, HIDDEN, generator=generator).to(torch.bfloat16).to(backend)
    weight, _ = _head(torch.bfloat16, seed=6, bias=False)
    weight = weight.to(backend)
    ids, values, _ = _teacher((7, VOCAB), 64, temperature=1.0, tail="bucket", seed=7)
    ids, values = ids.to(backend), values.to(backend)
    h1 = hidden.clone().requires_grad_(True)
    fastkd.linear_topk_kd_loss(h1, weight, ids, values, tail="bucket", chunk_size=2).backward()
    h2 = hidden.clone().requires_grad_(True)
    z = F.linear(h2.float(), weight.float())
    fastkd.topk_kd_loss(z, ids, values, tail="bucket").backward()
    assert h1.grad.dtype == torch.bfloat16
    assert_close(h1.grad, h2.grad, tolerance(torch.bfloat16, "grad"), what="bf16 dH")


def test_no_grad_and_bad_input(backend):
    hidden = torch.randn(4, HIDDEN, device=backend)
    weight, _ = _head(seed=8, bias=False)
    weight = weight.to(backend)
    ids, values, _ = _teacher((4, VOCAB), 5, temperature=1.0, tail="renormalize", seed=9)
    ids, values = ids.to(backend), values.to(backend)
    with torch.no_grad():
        loss = fastkd.linear_topk_kd_loss(hidden, weight, ids, values)
    expected = fastkd.topk_kd_loss(F.linear(hidden, weight), ids, values)
    assert_close(loss, expected, Tol(1e-6, 1e-5), what="no-grad loss", scale_floor=1.0)
    with pytest.raises(ValueError, match=r"teacher_topk_ids must have shape"):
        fastkd.linear_topk_kd_loss(hidden, weight, ids[:3], values[:3])
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1"):
        fastkd.linear_topk_kd_loss(hidden, weight, ids, values, chunk_size=0)
    with pytest.raises(ValueError, match=r"student_weight must have shape"):
        fastkd.linear_topk_kd_loss(hidden, weight.T, ids, values)
    with pytest.raises(ValueError, match=r"tail must be one of"):
        fastkd.linear_topk_kd_loss(hidden, weight, ids, values, tail="ghost")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_once_and_no_double_backward(backend, reduction):
    hidden = torch.randn(4, HIDDEN, device=backend, requires_grad=True)
    weight, _ = _head(seed=10, bias=False)
    weight = weight.to(backend).requires_grad_(True)
    ids, values, _ = _teacher((4, VOCAB), 5, temperature=1.0, tail="bucket", seed=11)
    ids, values = ids.to(backend), values.to(backend)

    def loss():
        out = fastkd.linear_topk_kd_loss(hidden, weight, ids, values, tail="bucket",
                                         reduction=reduction)
        return out.sum() if reduction == "none" else out

    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss(), (hidden, weight), create_graph=True)
    if reduction == "mean":
        value = loss()
        value.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backward can run only once"):
            value.backward()
