"""fastkd.topk_kd_loss and fastkd.teacher_topk on both backends against the float64 oracle
(topk_oracle.py) and, for tail="renormalize", against fastkd.kd_loss with a dense teacher.

Shapes are sized for Triton's interpreter: a few rows, V ~ 300 on chip and V = MAX_ON_CHIP_V + 1
(the two-sweep path) with 2 rows.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import Tol, assert_close, make_labels, make_logits, random_grad_output, tolerance
from topk_oracle import loss_truth

import fastkd
from fastkd.kernels.kd_loss import MAX_ON_CHIP_V

ON_CHIP_V = 300
LOOP_V = MAX_ON_CHIP_V + 1


def _backend() -> str:
    return os.environ["FASTKD_BACKEND"]


def _teacher(shape, k, *, temperature, tail, seed=0, dtype=torch.float32):
    """(ids, values) of a random teacher: raw top-k logits for renormalize, log-probs at T for
    bucket (from fastkd.teacher_topk)."""
    logits = make_logits(shape, torch.float32, scale=3.0, seed=seed + 100)
    ids, logprobs = fastkd.teacher_topk(logits, k, temperature=temperature)
    values = logprobs if tail == "bucket" else logits.gather(-1, ids)
    return ids, values.to(dtype), logits


def run_topk(student, ids, values, labels=None, *, grad_output=None, **kwargs):
    """(loss, components (3, ...), student gradient) of fastkd.topk_kd_loss."""
    x = student.detach().requires_grad_(True)
    out = fastkd.topk_kd_loss(x, ids, values, labels, return_components=True, **kwargs)
    if grad_output is None:
        (out.loss if out.loss.dim() == 0 else out.loss.sum()).backward()
    else:
        out.loss.backward(grad_output.to(out.loss.device, out.loss.dtype))
    components = torch.stack([out.divergence, out.ce, out.lse_squared])
    return out.loss.detach(), components, x.grad


def check_case(device, student, ids, values, labels=None, *, tail_logprob=None, grad_output=True,
               seed=0, what="", **kwargs):
    """Hold fastkd on `device` to the float64 oracle: loss, components and student gradient."""
    backend = _backend()
    student, ids, values = student.to(device), ids.to(device), values.to(device)
    labels = labels.to(device) if labels is not None else None
    if tail_logprob is not None:
        tail_logprob = tail_logprob.to(device)
        kwargs["teacher_tail_logprob"] = tail_logprob
    reduction = kwargs.get("reduction", "mean")
    go = None
    if grad_output:
        shape = student.shape[:-1] if reduction == "none" else ()
        go = random_grad_output(shape, torch.Generator().manual_seed(seed + 7))
    loss, components, grad = run_topk(student, ids, values, labels, grad_output=go, **kwargs)
    oracle_kwargs = {key: value for key, value in kwargs.items()
                     if key != "teacher_tail_logprob"}
    if oracle_kwargs.get("alpha") is None:
        oracle_kwargs["alpha"] = 0.5 if labels is not None else 1.0
    truth_loss, truth_components, truth_grad = loss_truth(
        student, ids, values, labels, tail_logprob=tail_logprob, grad_output=go,
        **oracle_kwargs)
    label = f"[{backend}] {what} {tuple(student.shape)} k={ids.shape[-1]} {student.dtype} {kwargs}"
    loss_tol = tolerance(torch.float32 if student.dtype != torch.float64 else torch.float64,
                         "loss", backend)
    assert_close(loss, truth_loss, loss_tol, what=f"{label} loss",
                 record=f"{backend} topk loss", scale_floor=1.0)
    assert_close(components, truth_components, loss_tol, what=f"{label} components",
                 scale_floor=1.0)
    assert grad.dtype == student.dtype
    assert_close(grad, truth_grad, tolerance(student.dtype, "grad", backend),
                 what=f"{label} grad", record=f"{backend} topk {student.dtype} grad")
    return loss, grad


# --- renormalize is kd_loss with a dense teacher that is -inf outside the ids ---------------

RENORMALIZE_CASES = [
    # (leading shape, V, k, dtype, temperature, alpha, reduction)
    ((3,), ON_CHIP_V, 5, torch.float32, 2.0, 0.5, "mean"),
    ((2, 2), ON_CHIP_V, 64, torch.bfloat16, 1.0, 0.7, "none"),
    ((3,), ON_CHIP_V, 1, torch.float32, 0.5, 1.0, "sum"),
    ((2,), LOOP_V, 64, torch.float32, 2.0, 0.5, "mean"),
    ((2,), LOOP_V, 5, torch.bfloat16, 1.0, 0.3, "batchmean"),
]


@pytest.mark.parametrize(("leading", "vocab", "k", "dtype", "temperature", "alpha", "reduction"),
                         RENORMALIZE_CASES)
def test_renormalize_equals_dense_kd_loss(backend, leading, vocab, k, dtype, temperature, alpha,
                                          reduction):
    student = make_logits((*leading, vocab), dtype, seed=vocab + k)
    ids, values, logits = _teacher((*leading, vocab), k, temperature=temperature,
                                   tail="renormalize", seed=k)
    labels = make_labels(leading, vocab, seed=k, ignore_rows=(1,))
    kwargs = dict(temperature=temperature, alpha=alpha, reduction=reduction)
    loss, grad = check_case(backend, student, ids, values, labels, what="renormalize", **kwargs)

    dense = torch.full_like(logits, float("-inf")).scatter(-1, ids, values.float())
    x = student.detach().to(backend).requires_grad_(True)
    dense_loss = fastkd.kd_loss(x, dense.to(backend), labels.to(backend), **kwargs)
    # check_case's grad_output: same seed.
    go = random_grad_output(leading if reduction == "none" else (),
                            torch.Generator().manual_seed(7))
    dense_loss.backward(go.to(dense_loss.device, dense_loss.dtype))
    assert_close(loss, dense_loss.detach(), tolerance(torch.float32, "loss", _backend()),
                 what="renormalize vs kd_loss loss", scale_floor=1.0)
    assert_close(grad, x.grad, tolerance(dtype, "grad", _backend()),
                 what="renormalize vs kd_loss grad")


# --- bucket against the oracle ---------------------------------------------------------------

BUCKET_CASES = [
    # (leading shape, V, k, dtype, temperature, alpha, reduction, stored tail)
    ((3,), ON_CHIP_V, 5, torch.float32, 2.0, 0.5, "mean", False),
    ((3,), ON_CHIP_V, 64, torch.bfloat16, 1.0, 0.5, "sum", True),
    ((2, 2), ON_CHIP_V, 1, torch.float32, 3.0, 0.8, "none", False),
    ((2,), LOOP_V, 64, torch.float32, 2.0, 0.5, "batchmean", True),
    ((2,), LOOP_V, 5, torch.bfloat16, 1.0, 1.0, "mean", False),
]


@pytest.mark.parametrize(("leading", "vocab", "k", "dtype", "temperature", "alpha", "reduction",
                          "stored_tail"), BUCKET_CASES)
def test_bucket_against_oracle(backend, leading, vocab, k, dtype, temperature, alpha, reduction,
                               stored_tail):
    student = make_logits((*leading, vocab), dtype, seed=vocab + k + 1)
    ids, values, _ = _teacher((*leading, vocab), k, temperature=temperature, tail="bucket",
                              seed=k, dtype=dtype)
    labels = make_labels(leading, vocab, seed=k, ignore_rows=(0,))
    tail_logprob = None
    if stored_tail:
        # A tail that is not 1 - sum(p): the loss must use it as given.
        tail_logprob = torch.full(leading, math.log(0.3))
    check_case(backend, student, ids, values, labels, tail_logprob=tail_logprob,
               temperature=temperature, alpha=alpha, reduction=reduction, tail="bucket",
               what="bucket")


def test_stored_tail_is_used(backend):
    student = make_logits((2, ON_CHIP_V), seed=3)
    ids, values, _ = _teacher((2, ON_CHIP_V), 5, temperature=1.0, tail="bucket")
    args = (student.to(backend), ids.to(backend), values.to(backend))
    plain = fastkd.topk_kd_loss(*args, tail="bucket", reduction="none")
    stored = fastkd.topk_kd_loss(*args, tail="bucket", reduction="none",
                                 teacher_tail_logprob=torch.full((2,), -5.0, device=backend))
    assert (plain - stored).abs().min() > 1e-3


def test_bucket_at_k_equal_V_is_dense_kd(backend):
    """k = V: no tail class; the loss is the dense forward KL to the teacher's softmax at T."""
    vocab, temperature = ON_CHIP_V, 2.0
    student = make_logits((3, vocab), seed=5)
    ids, values, logits = _teacher((3, vocab), vocab, temperature=temperature, tail="bucket")
    labels = make_labels((3,), vocab, seed=5)
    kwargs = dict(temperature=temperature, alpha=0.5)
    loss, grad = check_case(backend, student, ids, values, labels, tail="bucket", what="k=V",
                            grad_output=False, **kwargs)
    x = student.to(backend).requires_grad_(True)
    dense = fastkd.kd_loss(x, logits.to(backend), labels.to(backend), **kwargs)
    dense.backward()
    assert_close(loss, dense.detach(), tolerance(torch.float32, "loss", _backend()),
                 what="k=V vs kd_loss", scale_floor=1.0)
    assert_close(grad, x.grad, tolerance(torch.float32, "grad", _backend()),
                 what="k=V vs kd_loss grad")


@pytest.mark.parametrize("stored_tail", [False, True])
def test_bucket_at_k_V_minus_1_with_a_tiny_tail(backend, stored_tail):
    """The student's tail mass is e^-40 (1 - sum q_k is below fp32's resolution): the loss and
    the gradient stay finite and exact, the tail entry's gradient included."""
    vocab = ON_CHIP_V
    student = make_logits((2, vocab), seed=9, scale=1.0)
    student[:, 17] = student.max() - 40.0
    order = torch.argsort(student, dim=-1, descending=True)
    ids = order[:, : vocab - 1]  # every id but 17
    logits = make_logits((2, vocab), seed=10, scale=1.0)
    values = torch.log_softmax(logits, -1).gather(-1, ids)
    tail = torch.log_softmax(logits, -1)[:, 17] if stored_tail else None
    loss, grad = check_case(backend, student, ids, values, tail_logprob=tail, tail="bucket",
                            grad_output=False, what="tiny tail")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # The tail entry's gradient is about -p_tail / 2 (w = 1/2): checked on its own scale.
    _, _, truth_grad = loss_truth(student, ids, values, tail_logprob=tail, tail="bucket",
                                  alpha=1.0)
    assert_close(grad[:, 17], truth_grad[:, 17], Tol(atol=0.0, rtol=1e-4),
                 what="tail entry gradient")


# --- padding, invalid ids, ignored rows ---------------------------------------------------------

@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
def test_padding_with_invalid_ids(backend, tail, vocab):
    """-inf values are padding: their ids (here out of range or negative) are never read."""
    rows = 3 if vocab == ON_CHIP_V else 2
    student = make_logits((rows, vocab), seed=11)
    ids, values, _ = _teacher((rows, vocab), 8, temperature=2.0, tail=tail, seed=1)
    values[0, 5:] = float("-inf")
    ids[0, 5:] = torch.tensor([-1, vocab, 2**31 - 1])
    values[1, :2] = float("-inf")
    ids[1, :2] = vocab + 7
    labels = make_labels((rows,), vocab, seed=2)
    loss, grad = check_case(backend, student, ids, values, labels, tail=tail, temperature=2.0,
                            alpha=0.5, reduction="none", what="padding")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_out_of_range_ids_give_nan_rows(backend, tail):
    student = make_logits((3, ON_CHIP_V), seed=12)
    ids, values, _ = _teacher((3, ON_CHIP_V), 5, temperature=1.0, tail=tail, seed=2)
    ids[1, 3] = ON_CHIP_V  # not padding: a caller bug
    ids = ids.to(torch.int32)
    loss, grad = check_case(backend, student, ids, values, tail=tail, reduction="none",
                            what="out-of-range id")
    assert loss[1].isnan() and grad[1].isnan().all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored(backend, reduction):
    student = make_logits((3, ON_CHIP_V), seed=13)
    ids, values, _ = _teacher((3, ON_CHIP_V), 5, temperature=1.0, tail="bucket")
    labels = torch.full((3,), -100)
    loss, grad = check_case(backend, student, ids, values, labels, tail="bucket",
                            reduction=reduction, what="all ignored")
    assert loss.item() == 0.0 and (grad == 0).all()


# --- options -------------------------------------------------------------------------------

@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize(("vocab", "shift"), [(ON_CHIP_V, 0.0), (LOOP_V, 1e4)])
def test_ce_options_and_components(backend, tail, vocab, shift):
    """label_smoothing and z_loss with labels, z_loss without labels (every row counts), on
    logits shifted by 1e4 (the smoothing sum is centred, so the shift costs no precision)."""
    leading = (2, 2) if vocab == ON_CHIP_V else (2,)
    student = make_logits((*leading, vocab), seed=14) + shift
    ids, values, _ = _teacher((*leading, vocab), 5, temperature=2.0, tail=tail, seed=3)
    labels = make_labels(leading, vocab, seed=3, ignore_rows=(2,) if len(leading) > 1 else ())
    z_loss = 1e-3 if shift == 0.0 else 1e-9
    check_case(backend, student, ids, values, labels, tail=tail, temperature=2.0, alpha=0.4,
               label_smoothing=0.1, z_loss=z_loss, reduction="mean", what="ce options")
    check_case(backend, student, ids, values, tail=tail, temperature=2.0, z_loss=z_loss,
               reduction="sum", normalizer=3.0, what="no labels")


def test_renormalize_with_ce_options_equals_dense_kd_loss(backend):
    student = make_logits((3, ON_CHIP_V), seed=22).to(backend)
    ids, values, logits = _teacher((3, ON_CHIP_V), 7, temperature=2.0, tail="renormalize")
    dense = torch.full_like(logits, float("-inf")).scatter(-1, ids, values)
    labels = make_labels((3,), ON_CHIP_V, seed=10).to(backend)
    kwargs = dict(temperature=2.0, alpha=0.6, label_smoothing=0.2, z_loss=1e-3,
                  return_components=True, reduction="none")
    x = student.clone().requires_grad_(True)
    mine = fastkd.topk_kd_loss(x, ids.to(backend), values.to(backend), labels, **kwargs)
    mine.loss.sum().backward()
    y = student.clone().requires_grad_(True)
    theirs = fastkd.kd_loss(y, dense.to(backend), labels, **kwargs)
    theirs.loss.sum().backward()
    tol = tolerance(torch.float32, "loss", _backend())
    for a, b in zip(mine, theirs, strict=True):
        assert_close(a, b, tol, what="components vs kd_loss", scale_floor=1.0)
    assert_close(x.grad, y.grad, tolerance(torch.float32, "grad", _backend()),
                 what="grad vs kd_loss")


def test_no_grad_forward_and_module(backend):
    student = make_logits((3, ON_CHIP_V), seed=15).to(backend)
    ids, values, _ = _teacher((3, ON_CHIP_V), 5, temperature=2.0, tail="bucket")
    ids, values = ids.to(backend), values.to(backend)
    labels = make_labels((3,), ON_CHIP_V, seed=4).to(backend)
    module = fastkd.TopKKDLoss(temperature=2.0, alpha=0.5, tail="bucket")
    with torch.no_grad():
        a = module(student, ids, values, labels)
    b = fastkd.topk_kd_loss(student, ids, values, labels, temperature=2.0, alpha=0.5,
                            tail="bucket")
    assert torch.equal(a, b)


def test_inplace_backward(backend):
    student = make_logits((3, ON_CHIP_V), seed=16).to(backend)
    ids, values, _ = _teacher((3, ON_CHIP_V), 5, temperature=2.0, tail="renormalize")
    ids, values = ids.to(backend), values.to(backend)
    x = student.clone().requires_grad_(True)
    fastkd.topk_kd_loss(x, ids, values, temperature=2.0).backward()
    y = student.clone().requires_grad_(True)
    fastkd.topk_kd_loss(y, ids, values, temperature=2.0, inplace_backward=True).backward()
    assert torch.equal(x.grad, y.grad)


# --- teacher_topk -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_teacher_topk_matches_log_softmax_topk(dtype):
    logits = make_logits((2, 3, ON_CHIP_V), dtype, seed=17)
    logits[0, 0, :10] = logits[0, 0, 10]  # ties
    logits[1, 2, 5:] = float("-inf")  # fewer than k finite entries: -inf (padding)
    ids, logprobs = fastkd.teacher_topk(logits, 12, temperature=2.0)
    assert ids.dtype == torch.int64
    assert logprobs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    full = torch.log_softmax(logits.double() / 2.0, -1)
    expected, _ = full.topk(12, dim=-1)
    tol = tolerance(torch.float64 if dtype == torch.float64 else torch.float32, "loss")
    assert_close(logprobs, expected, tol, what="teacher_topk values", scale_floor=1.0)
    # Ids may break ties differently, but each must carry its own log-prob and be distinct.
    assert_close(logprobs, full.gather(-1, ids), tol, what="teacher_topk ids", scale_floor=1.0)
    finite = logprobs.isfinite()
    assert (ids.sort(-1).values.diff(dim=-1) != 0).all()
    assert (logprobs.diff(dim=-1)[finite[..., 1:]] <= 0).all()
    # The tail: everything outside the ids, summed over the complement.
    same_ids, same_logprobs, tail = fastkd.teacher_topk(logits, 12, temperature=2.0,
                                                        return_tail_logprob=True)
    assert torch.equal(same_ids, ids) and torch.equal(same_logprobs, logprobs)
    outside = torch.ones_like(full, dtype=torch.bool).scatter_(-1, ids, False)
    expected_tail = torch.where(outside, full, float("-inf")).logsumexp(-1)
    assert_close(tail, expected_tail, tol, what="teacher_topk tail", scale_floor=1.0)
    _, _, no_tail = fastkd.teacher_topk(logits[..., :12], 12, return_tail_logprob=True)
    assert torch.isneginf(no_tail).all()


def test_teacher_topk_tail_feeds_the_bucket_loss(backend):
    """A peaked teacher: the stored tail is exact where 1 - sum(p) has lost its digits."""
    logits = make_logits((3, ON_CHIP_V), seed=26)
    logits[:, :5] += 30.0
    ids, logprobs, tail = fastkd.teacher_topk(logits, 5, return_tail_logprob=True)
    full = torch.log_softmax(logits.double(), -1)
    exact_tail = full[:, 5:].logsumexp(-1)
    assert_close(tail, exact_tail, Tol(0.0, 1e-5), what="tiny tail log-prob")
    assert (1.0 - logprobs.exp().sum(-1) <= 0.0).any()  # fp32 has lost the tail
    student = make_logits((3, ON_CHIP_V), seed=27)
    check_case(backend, student, ids, logprobs, tail_logprob=tail, tail="bucket",
               what="teacher_topk tail")


# --- bad input ----------------------------------------------------------------------------------

def _good():
    student = torch.randn(2, 3, 11)
    ids = torch.randint(0, 11, (2, 3, 4))
    values = torch.randn(2, 3, 4)
    return student, ids, values


@pytest.mark.parametrize(("change", "error", "message"), [
    (lambda s, i, v: (s, i[..., :0], v[..., :0]), ValueError, r"k in \[1, vocab=11\]"),
    (lambda s, i, v: (s, torch.zeros(2, 3, 12, dtype=torch.int64), torch.zeros(2, 3, 12)),
     ValueError, r"k in \[1, vocab=11\]"),
    (lambda s, i, v: (s, i.float(), v), TypeError, r"teacher_topk_ids must be an int32 or int64"),
    (lambda s, i, v: (s, i.to(torch.int16), v), TypeError, r"teacher_topk_ids must be an int32"),
    (lambda s, i, v: (s, i[:1], v[:1]), ValueError, r"teacher_topk_ids must have shape"),
    (lambda s, i, v: (s, i, v[..., :3]), ValueError, r"teacher_topk_values must have the shape"),
    (lambda s, i, v: (s, i, v.long()), TypeError, r"teacher_topk_values must be a floating"),
    (lambda s, i, v: (s, i.tolist(), v), TypeError, r"teacher_topk_ids must be a torch.Tensor"),
])
def test_bad_entries(change, error, message):
    student, ids, values = change(*_good())
    with pytest.raises(error, match=message):
        fastkd.topk_kd_loss(student, ids, values)


def test_bad_tail_options():
    student, ids, values = _good()
    with pytest.raises(ValueError, match=r"tail must be one of"):
        fastkd.topk_kd_loss(student, ids, values, tail="zero")
    with pytest.raises(ValueError, match=r"tail must be one of"):
        fastkd.TopKKDLoss(tail="ghost")
    with pytest.raises(ValueError, match=r"needs tail='bucket'"):
        fastkd.topk_kd_loss(student, ids, values, teacher_tail_logprob=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"teacher_tail_logprob must have the student's leading"):
        fastkd.topk_kd_loss(student, ids, values, tail="bucket",
                            teacher_tail_logprob=torch.zeros(2))


def test_bad_teacher_topk_arguments():
    logits = torch.randn(2, 11)
    with pytest.raises(ValueError, match=r"k must lie in \[1, vocab=11\]"):
        fastkd.teacher_topk(logits, 0)
    with pytest.raises(ValueError, match=r"k must lie in \[1, vocab=11\]"):
        fastkd.teacher_topk(logits, 12)
    with pytest.raises(TypeError, match=r"k must be an int"):
        fastkd.teacher_topk(logits, 2.0)
    with pytest.raises(TypeError, match=r"teacher_logits must be a floating"):
        fastkd.teacher_topk(logits.long(), 2)
    with pytest.raises(ValueError, match=r"temperature must lie in"):
        fastkd.teacher_topk(logits, 2, temperature=0.0)
    with pytest.raises(TypeError, match=r"return_tail_logprob must be a bool"):
        fastkd.teacher_topk(logits, 2, return_tail_logprob=1)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("inplace", [False, True])
def test_entries_in_several_chunks(backend, monkeypatch, tail, inplace):
    """k larger than the kernel's chunk of entries (shrunk here to 32): statistics, membership
    and fix-ups loop over chunks; in place, the launcher computes into a buffer first."""
    from fastkd.kernels import kd_topk

    monkeypatch.setattr(kd_topk, "MAX_BLOCK_K", 32)
    student = make_logits((3, ON_CHIP_V), seed=18)
    ids, values, _ = _teacher((3, ON_CHIP_V), 100, temperature=2.0, tail=tail, seed=5)
    values[2, 50:] = float("-inf")
    labels = make_labels((3,), ON_CHIP_V, seed=6)
    kwargs = dict(tail=tail, temperature=2.0, alpha=0.5, label_smoothing=0.05)
    loss, grad = check_case(backend, student, ids, values, labels, what="chunks", **kwargs)
    x = student.clone().to(backend).requires_grad_(True)
    out = fastkd.topk_kd_loss(x, ids.to(backend), values.to(backend), labels.to(backend),
                              inplace_backward=inplace, **kwargs)
    out.backward(random_grad_output((), torch.Generator().manual_seed(7)))
    assert_close(x.grad, grad, Tol(0.0, 0.0), what="inplace vs not")


# --- dtypes, strides, NaN, empty ---------------------------------------------------------------

@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_float64_and_bf16_values(backend, tail):
    student = make_logits((3, ON_CHIP_V), torch.float64, seed=19)
    ids, values, _ = _teacher((3, ON_CHIP_V), 5, temperature=2.0, tail=tail, seed=7,
                              dtype=torch.bfloat16)
    labels = make_labels((3,), ON_CHIP_V, seed=7)
    loss, _ = check_case(backend, student, ids, values, labels, tail=tail, temperature=2.0,
                         what="fp64 student, bf16 values")
    assert loss.dtype == torch.float64


def test_strided_inputs(backend):
    """A sliced student, transposed leading dims of the entries: read through their strides."""
    wide = make_logits((2, 3, 2 * ON_CHIP_V), seed=20)
    student = wide[..., ::2]
    ids, values, _ = _teacher((3, 2, ON_CHIP_V), 6, temperature=2.0, tail="bucket", seed=8)
    ids, values = ids.transpose(0, 1), values.transpose(0, 1)
    assert not student.is_contiguous() and not ids.is_contiguous()
    labels = make_labels((3, 2), ON_CHIP_V, seed=8).T
    check_case(backend, student, ids, values, labels, tail="bucket", temperature=2.0,
               reduction="none", what="strided")


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
def test_sliced_batch_is_read_in_place(backend, vocab):
    """logits[:, :-1] (a causal LM's shift) cannot be viewed as (N, V): the kernel reads it
    through its (B, L, V) strides."""
    full = make_logits((2, 3, vocab), seed=28)
    student = full[:, :-1]
    ids, values, _ = _teacher((2, 2, vocab), 5, temperature=2.0, tail="bucket", seed=14)
    labels = make_labels((2, 2), vocab, seed=15, ignore_rows=(1,))
    check_case(backend, student, ids, values, labels, tail="bucket", temperature=2.0,
               label_smoothing=0.1, what="sliced batch")


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_nan_logits_propagate(backend, tail):
    student = make_logits((3, ON_CHIP_V), seed=21)
    student[1, 7] = float("nan")
    ids, values, _ = _teacher((3, ON_CHIP_V), 5, temperature=2.0, tail=tail, seed=9)
    labels = make_labels((3,), ON_CHIP_V, seed=9)
    loss, grad = check_case(backend, student, ids, values, labels, tail=tail, temperature=2.0,
                            reduction="none", what="NaN logit")
    assert loss[1].isnan() and torch.isfinite(loss[[0, 2]]).all()


def test_empty_batch(backend):
    student = torch.zeros(0, ON_CHIP_V, device=backend, requires_grad=True)
    ids = torch.zeros(0, 4, dtype=torch.int64, device=backend)
    values = torch.zeros(0, 4, device=backend)
    loss = fastkd.topk_kd_loss(student, ids, values)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == student.shape


# --- torch.compile ----------------------------------------------------------------------------

def _topk_step(head, hidden, ids, values, labels):
    logits = head(hidden)
    return fastkd.topk_kd_loss(logits, ids, values, labels, temperature=2.0, alpha=0.5,
                               tail="bucket", label_smoothing=0.1)


def test_compiled_step_matches_eager(backend):
    """The op traces with fullgraph=True (no graph break) and gives eager mode's loss and
    gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, ON_CHIP_V).to(backend)
    hidden = torch.randn(2, 3, 16, device=backend)
    ids, values, _ = _teacher((2, 3, ON_CHIP_V), 5, temperature=2.0, tail="bucket")
    labels = make_labels((2, 3), ON_CHIP_V, seed=11, ignore_rows=(1,)).to(backend)
    results = []
    for step in (_topk_step, torch.compile(_topk_step, fullgraph=True)):
        head.zero_grad(set_to_none=True)
        loss = step(head, hidden, ids.to(backend), values.to(backend), labels)
        loss.backward()
        results.append((loss.detach(), head.weight.grad.clone(), head.bias.grad.clone()))
    for eager, compiled in zip(*results, strict=True):
        assert_close(compiled, eager, Tol(1e-6, 1e-5), what="compiled vs eager")


def test_backward_once_and_no_function_transforms(backend):
    student = make_logits((3, ON_CHIP_V), seed=23).to(backend)
    ids, values, _ = _teacher((3, ON_CHIP_V), 5, temperature=2.0, tail="bucket")
    ids, values = ids.to(backend), values.to(backend)
    x = student.clone().requires_grad_(True)
    loss = fastkd.topk_kd_loss(x, ids, values, tail="bucket")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()
    y = student.clone().requires_grad_(True)
    loss = fastkd.topk_kd_loss(y, ids, values, tail="bucket")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, y, create_graph=True)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda s: fastkd.topk_kd_loss(s, ids, values))(student)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("student_grad", [False, True])
def test_custom_op_passes_opcheck(tail, student_grad):
    student = make_logits((6, 37), seed=24)
    ids, values, _ = _teacher((6, 37), 4, temperature=2.0, tail=tail)
    labels = make_labels((6,), 37, seed=12, ignore_rows=(2,))
    tail_logprob = torch.full((6,), -3.0) if tail == "bucket" else None
    grad_student = torch.empty(6, 37) if student_grad else None
    torch.library.opcheck(
        torch.ops.fastkd.topk_rows.default,
        (student, ids, values, tail_logprob, labels, torch.tensor(1.0 / 5), torch.empty(6, 4),
         grad_student, tail, 2.0, 0.5, 0.1, 0.01, -100),
    )


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_row_of_padding_only(backend, tail):
    """No teacher entry: renormalize has no teacher (NaN loss and gradient, like kd_loss with an
    all -inf teacher); bucket puts all of the teacher's mass in the tail (D = 0)."""
    student = make_logits((3, ON_CHIP_V), seed=25)
    ids, values, _ = _teacher((3, ON_CHIP_V), 5, temperature=1.0, tail=tail, seed=13)
    values[1] = float("-inf")
    loss, grad = check_case(backend, student, ids, values, tail=tail, reduction="none",
                            what="padding only")
    if tail == "renormalize":
        assert loss[1].isnan() and grad[1].isnan().all()
    else:
        assert loss[1] == 0.0 and (grad[1].abs() < 1e-6).all()
