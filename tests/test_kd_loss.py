"""fastkd.kd_loss on both backends against the float64 truth (helpers.py) and fastkd.reference.

Shapes are chosen for the Triton interpreter on a small CPU: few rows, and the kernel's block
boundaries rather than big grids.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import (
    Result,
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

# The first vocabulary of the two-sweep path that ends one element past a loop block.
_LOOP_BLOCKS = MAX_ON_CHIP_V // LOOP_BLOCK_V + 1
LOOP_V = _LOOP_BLOCKS * LOOP_BLOCK_V + 1
ON_CHIP_V = 1000


def _backend_name() -> str:
    return os.environ["FASTKD_BACKEND"]


def _grad_output(kind, loss_shape, seed=0):
    """None: the plain backward path (grad_output 1); "random": random scalar or per-row values."""
    if kind is None:
        return None
    return random_grad_output(loss_shape, torch.Generator().manual_seed(seed + 7))


def check_case(device, student, teacher, labels=None, *, grad_output="random", teacher_grad=False,
               student_grad=True, compare_reference=True, seed=0, what="", **kwargs) -> Result:
    """Run fastkd on `device` and hold it to the float64 truth and, if asked, the reference."""
    backend = _backend_name()
    student, teacher = student.to(device), teacher.to(device)
    labels = labels.to(device) if labels is not None else None
    reduction = kwargs.get("reduction", "mean")
    loss_shape = student.shape[:-1] if reduction == "none" else ()
    grad_output = _grad_output(grad_output, loss_shape, seed)
    actual = run_loss(fastkd_loss, student, teacher, labels, grad_output=grad_output,
                      teacher_grad=teacher_grad, student_grad=student_grad, **kwargs)
    truth = float64_truth(student, teacher, labels, grad_output=grad_output, **kwargs)
    label = f"[{backend}] {what} {tuple(student.shape)} {student.dtype}/{teacher.dtype} {kwargs}"
    check_against_truth(actual, truth, student_dtype=student.dtype, teacher_dtype=teacher.dtype,
                        backend=backend, teacher_grad=teacher_grad, student_grad=student_grad,
                        what=label)
    if compare_reference:
        expected = run_loss(reference_loss, student, teacher, labels, grad_output=grad_output,
                            teacher_grad=teacher_grad, student_grad=student_grad, **kwargs)
        check_against_reference(actual, expected, student_dtype=student.dtype,
                                teacher_dtype=teacher.dtype, backend=backend, what=label)
    return actual


# --- vocabulary sizes and shapes -------------------------------------------------------------

VOCABS = sorted({
    1, 2, ON_CHIP_V,
    LOOP_BLOCK_V - 1, LOOP_BLOCK_V, LOOP_BLOCK_V + 1,
    MAX_ON_CHIP_V - 1, MAX_ON_CHIP_V, MAX_ON_CHIP_V + 1,
    LOOP_V - 2, LOOP_V - 1, LOOP_V,  # loop path: one short of, exactly on, one past a block
    3 * MAX_ON_CHIP_V + 4321,  # several loop blocks, not a power of two
})


@pytest.mark.parametrize("vocab", VOCABS)
def test_vocab_sizes(backend, vocab):
    student = make_logits((3, vocab), seed=vocab)
    teacher = make_logits((3, vocab), seed=vocab + 1)
    labels = make_labels((3,), vocab, seed=vocab)
    check_case(backend, student, teacher, labels, temperature=2.0, alpha=0.3,
               teacher_grad=True, what=f"V={vocab}")


@pytest.mark.parametrize("shape", [(41, 1271), (252, 507), (3, 7, 131), (5, 1, 67)])
def test_irregular_shapes(backend, shape):
    student = make_logits(shape, seed=11)
    teacher = make_logits(shape, seed=12)
    leading = shape[:-1]
    ignore_rows = (0, 5) if len(leading) == 1 or leading[-1] > 1 else (1,)
    labels = make_labels(leading, shape[-1], seed=3, ignore_rows=ignore_rows)
    check_case(backend, student, teacher, labels, temperature=1.5, alpha=0.5, what="irregular")


@pytest.mark.parametrize("vocab", [32000, 128256, 262144])
def test_llm_vocabularies(backend, vocab):
    rows = 4 if vocab < 100000 else 2
    student = make_logits((rows, vocab), seed=21)
    teacher = make_logits((rows, vocab), seed=22)
    labels = make_labels((rows,), vocab, seed=4)
    check_case(backend, student, teacher, labels, temperature=2.0, alpha=0.5, teacher_grad=True,
               what="LLM vocabulary")


def test_llm_vocabulary_bf16_student(backend):
    student = make_logits((2, 128256), torch.bfloat16, seed=23)
    teacher = make_logits((2, 128256), torch.float32, seed=24)
    labels = make_labels((2,), 128256, seed=5)
    check_case(backend, student, teacher, labels, temperature=1.0, alpha=0.5, what="bf16 LLM")


def test_single_row_as_1d_logits(backend):
    vocab = 333
    student = make_logits((vocab,), seed=31)
    teacher = make_logits((vocab,), seed=32)
    label = torch.tensor(17)
    for reduction in ("mean", "sum", "batchmean", "none"):
        result = check_case(backend, student, teacher, label, temperature=2.0, alpha=0.3,
                            reduction=reduction, what="1-D logits")
        assert result.loss.shape == ()
        assert result.grad_student.shape == (vocab,)
    check_case(backend, student, teacher, None, temperature=2.0, reduction="batchmean",
               what="1-D logits, no labels")


# --- temperature, alpha, reductions ----------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_temperature_and_alpha(backend, temperature, alpha):
    student = make_logits((2, 3, 300), seed=41)
    teacher = make_logits((2, 3, 300), seed=42)
    labels = make_labels((2, 3), 300, seed=6, ignore_rows=(4,))
    check_case(backend, student, teacher, labels, temperature=temperature, alpha=alpha,
               teacher_grad=True, what="T/alpha grid")


@pytest.mark.parametrize(("vocab", "grad_output"),
                         [(ON_CHIP_V, None), (ON_CHIP_V, "random"), (LOOP_V, "random")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_reductions(backend, reduction, grad_output, vocab):
    shape = (2, 3, vocab) if vocab == ON_CHIP_V else (3, vocab)
    student = make_logits(shape, seed=51)
    teacher = make_logits(shape, seed=52)
    labels = make_labels(shape[:-1], vocab, seed=7, ignore_rows=(1,))
    result = check_case(backend, student, teacher, labels, temperature=2.0, alpha=0.3,
                        reduction=reduction, grad_output=grad_output, teacher_grad=True,
                        what="reduction")
    assert result.loss.shape == (shape[:-1] if reduction == "none" else ())


@pytest.mark.parametrize("grad_output_layout", ["expanded", "transposed"])
def test_none_reduction_with_strided_grad_output(backend, grad_output_layout):
    # loss.sum() * c hands backward an expanded (stride 0) grad_output; a transposed one is a
    # non-contiguous per-row factor whose logical order must be kept.
    student = make_logits((3, 4, 129), seed=53).to(backend).requires_grad_()
    teacher = make_logits((3, 4, 129), seed=54).to(backend)
    labels = make_labels((3, 4), 129, seed=8, ignore_rows=(2,)).to(backend)
    loss = fastkd.kd_loss(student, teacher, labels, temperature=2.0, reduction="none")
    if grad_output_layout == "expanded":
        (loss.sum() * 3.0).backward()
        grad_output = torch.full((3, 4), 3.0)
    else:
        grad_output = random_grad_output((4, 3)).t()
        loss.backward(grad_output.to(backend))
    truth = float64_truth(student, teacher, labels, temperature=2.0, reduction="none",
                          grad_output=grad_output)
    assert_close(student.grad, truth.grad_student,
                 tolerance(torch.float32, "grad", _backend_name()), what="student grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_all_rows_ignored(backend, reduction):
    student = make_logits((4, 100), seed=61)
    teacher = make_logits((4, 100), seed=62)
    labels = torch.full((4,), -100)
    result = check_case(backend, student, teacher, labels, temperature=2.0, reduction=reduction,
                        teacher_grad=True, what="all ignored")
    assert not result.loss.isnan().any()
    assert torch.count_nonzero(result.loss) == 0
    assert torch.count_nonzero(result.grad_student) == 0
    assert torch.count_nonzero(result.grad_teacher) == 0


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
def test_custom_ignore_index(backend, vocab):
    student = make_logits((4, vocab), seed=63)
    teacher = make_logits((4, vocab), seed=64)
    # A label that equals the default -100 is out of range here, so its row is NaN.
    labels = torch.tensor([3, 7, 7, vocab - 1])
    result = check_case(backend, student, teacher, labels, temperature=2.0, ignore_index=7,
                        reduction="none", teacher_grad=True, what="ignore_index=7")
    assert torch.count_nonzero(result.loss[1:3]) == 0
    assert torch.count_nonzero(result.grad_student[1:3]) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_labels_none(backend, reduction):
    student = make_logits((2, 3, 250), seed=71)
    teacher = make_logits((2, 3, 250), seed=72)
    check_case(backend, student, teacher, None, temperature=2.0, reduction=reduction,
               teacher_grad=True, what="no labels")
    check_case(backend, student, teacher, None, temperature=2.0, alpha=1.0, reduction=reduction,
               what="no labels, alpha=1")


# --- masks and numerical stability -----------------------------------------------------------

def _masked_pair(vocab, seed, *, student_too):
    student = make_logits((3, vocab), seed=seed)
    teacher = make_logits((3, vocab), seed=seed + 1)
    generator = torch.Generator().manual_seed(seed)
    masked = torch.rand((3, vocab), generator=generator) < 0.3
    masked[:, -1] = True  # the last (partial) block is masked too
    masked[2] = False  # an unmasked row next to masked ones
    teacher[masked] = float("-inf")
    if student_too:
        student[masked] = float("-inf")
    # Labels on entries both distributions keep.
    labels = torch.tensor([int((~masked[row]).nonzero()[0]) for row in range(3)])
    return student, teacher, labels


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
@pytest.mark.parametrize("student_too", [False, True], ids=["teacher-masked", "both-masked"])
def test_masked_vocabulary(backend, vocab, student_too):
    student, teacher, labels = _masked_pair(vocab, 81, student_too=student_too)
    result = check_case(backend, student, teacher, labels, temperature=2.0, alpha=0.5,
                        reduction="none", teacher_grad=True, what="masked vocabulary")
    assert torch.isfinite(result.loss).all()
    assert torch.isfinite(result.grad_student).all()
    assert torch.isfinite(result.grad_teacher).all()
    masked = torch.isinf(teacher)
    assert torch.count_nonzero(result.grad_teacher.cpu()[masked]) == 0
    if student_too:
        assert torch.count_nonzero(result.grad_student.cpu()[masked]) == 0


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
def test_label_on_a_masked_entry_is_an_infinite_loss(backend, vocab):
    # -log p_s(y) with p_s(y) = 0: the loss is +inf (not NaN), the gradient stays finite.
    student = make_logits((3, vocab), seed=93)
    teacher = make_logits((3, vocab), seed=94)
    labels = torch.tensor([5, vocab - 1, 7])
    student[0, 5] = teacher[0, 5] = float("-inf")
    student[1, vocab - 1] = teacher[1, vocab - 1] = float("-inf")
    result = check_case(backend, student, teacher, labels, temperature=2.0, alpha=0.5,
                        reduction="none", teacher_grad=True, what="label on -inf")
    assert result.loss.cpu().isinf().tolist() == [True, True, False]
    assert torch.isfinite(result.grad_student).all() and torch.isfinite(result.grad_teacher).all()


@pytest.mark.parametrize("student_shift", [0.0, 1e4], ids=["unshifted", "student+1e4"])
def test_masked_first_loop_block(backend, student_shift):
    # Sweep 1 starts with a block in which every entry is -inf: its running maxima stay -inf.
    vocab = LOOP_V
    student = make_logits((2, vocab), seed=91) + student_shift
    teacher = make_logits((2, vocab), seed=92)
    student[:, :LOOP_BLOCK_V] = float("-inf")
    teacher[:, :LOOP_BLOCK_V] = float("-inf")
    teacher[1, LOOP_BLOCK_V:2 * LOOP_BLOCK_V] = float("-inf")  # the teacher's first two blocks
    labels = torch.tensor([LOOP_BLOCK_V + 5, vocab - 1])
    for alpha in (1.0, 0.5):
        result = check_case(backend, student, teacher, labels, temperature=2.0, alpha=alpha,
                            reduction="none", teacher_grad=True, what="masked first block")
        assert torch.isfinite(result.loss).all()
        assert torch.count_nonzero(result.grad_student[:, :LOOP_BLOCK_V]) == 0


SHIFTS = [(1e4, 1e4), (-1e4, -1e4), (1e4, -1e4), (0.0, 1e4), (1e4, 0.0)]


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
@pytest.mark.parametrize("shifts", SHIFTS, ids=[f"s{s:+g}-t{t:+g}" for s, t in SHIFTS])
def test_shifted_logits(backend, vocab, shifts):
    student_shift, teacher_shift = shifts
    student = make_logits((2, vocab), seed=101) + student_shift
    teacher = make_logits((2, vocab), seed=102) + teacher_shift
    labels = make_labels((2,), vocab, seed=9)
    # Pure CE and pure KL apart, so neither term's error hides behind the other's size.
    for alpha in (0.0, 1.0):
        check_case(backend, student, teacher, labels, temperature=2.0, alpha=alpha,
                   reduction="none", teacher_grad=True, compare_reference=False,
                   what=f"shifted {shifts}")


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_step_of_1e4_inside_the_row(backend, vocab, which):
    # The running maxima jump by 1e4 in a later block (mid-block, too): everything summed before
    # the jump must be rescaled, not anchored to the first block's maxima.
    student = make_logits((2, vocab), seed=103)
    teacher = make_logits((2, vocab), seed=104)
    steps = (2 * vocab // 3, LOOP_BLOCK_V + 100 if vocab > MAX_ON_CHIP_V else vocab // 2)
    for row, step in enumerate(steps):
        if which in ("student", "both"):
            student[row, step:] += 1e4
        if which in ("teacher", "both"):
            teacher[row, step:] += 1e4
    labels = torch.tensor([vocab - 1, 0])
    for alpha in (0.0, 1.0):
        check_case(backend, student, teacher, labels, temperature=2.0, alpha=alpha,
                   reduction="none", teacher_grad=True, compare_reference=False,
                   what=f"{which} step")


def test_peaked_and_flat_rows(backend):
    # A near one-hot teacher (its softmax underflows to 0 on most entries without -inf) and a
    # constant row, where every probability is 1/V.
    vocab = 2000
    student = make_logits((3, vocab), seed=111)
    teacher = make_logits((3, vocab), seed=112)
    teacher[0] *= 100.0
    student[1] = 0.0
    teacher[2] = 5.0
    labels = make_labels((3,), vocab, seed=10)
    check_case(backend, student, teacher, labels, temperature=1.0, alpha=0.5, teacher_grad=True,
               reduction="sum", what="peaked/flat")


def test_torch_backend_chunk_boundaries(monkeypatch):
    # The PyTorch backend works through rows in chunks that reuse buffers: shrink the chunks so
    # ignored, masked and out-of-range rows fall on both sides of several boundaries.
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    vocab = 97
    monkeypatch.setattr(fastkd._torch_backend, "CHUNK_ELEMENTS", 3 * vocab + 5)
    student = make_logits((11, vocab), seed=241)
    teacher = make_logits((11, vocab), seed=242)
    teacher[2:5, :10] = float("-inf")
    student[4, :10] = float("-inf")
    labels = make_labels((11,), vocab, seed=23, ignore_rows=(2, 3, 9))
    labels[4] = 50
    for temperature in (1.0, 2.0):
        for reduction in ("mean", "none"):
            check_case("cpu", student, teacher, labels, temperature=temperature, alpha=0.3,
                       reduction=reduction, teacher_grad=True, what="small chunks")
            check_case("cpu", student, teacher, None, temperature=temperature,
                       reduction=reduction, teacher_grad=True, what="small chunks, no labels")


# --- dtypes and layouts ----------------------------------------------------------------------

DTYPE_PAIRS = [
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float32),
    (torch.float32, torch.float64),
    (torch.bfloat16, torch.float64),
    (torch.float64, torch.float64),
]


# The two-sweep path converts on load exactly like the on-chip one: a few pairs suffice there.
DTYPE_CASES = [(pair, ON_CHIP_V) for pair in DTYPE_PAIRS] + [
    (pair, LOOP_V) for pair in DTYPE_PAIRS[:1] + DTYPE_PAIRS[2:3] + DTYPE_PAIRS[-1:]
]


@pytest.mark.parametrize(("dtypes", "vocab"), DTYPE_CASES,
                         ids=[f"{str(s)[6:]}-{str(t)[6:]}-{v}" for (s, t), v in DTYPE_CASES])
def test_dtype_combinations(backend, dtypes, vocab):
    student_dtype, teacher_dtype = dtypes
    student = make_logits((3, vocab), student_dtype, seed=121)
    teacher = make_logits((3, vocab), teacher_dtype, seed=122)
    labels = make_labels((3,), vocab, seed=11, ignore_rows=(1,))
    result = check_case(backend, student, teacher, labels, temperature=2.0, alpha=0.5,
                        teacher_grad=True, what="dtypes")
    # Like the reference: float64 as soon as either input is float64.
    expected_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    assert result.loss.dtype == expected_dtype


def test_loss_dtype(backend):
    for dtype, expected in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        student = make_logits((2, 50), dtype, seed=1).to(backend)
        teacher = make_logits((2, 50), dtype, seed=2).to(backend)
        labels = make_labels((2,), 50).to(backend)
        for reduction in ("mean", "none"):
            loss = fastkd.kd_loss(student, teacher, labels, reduction=reduction)
            assert loss.dtype == expected, (dtype, reduction, loss.dtype)


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
def test_noncontiguous_slices(backend, vocab):
    big_student = make_logits((3, vocab + 37), seed=131)
    big_teacher = make_logits((3, 2 * vocab), seed=132)
    student = big_student[:, :vocab]
    teacher = big_teacher[:, ::2]  # column stride 2
    big_labels = make_labels((3, 2), vocab, seed=12)
    labels = big_labels[:, 0]  # stride 2
    assert not student.is_contiguous() and not teacher.is_contiguous()
    assert not labels.is_contiguous()
    check_case(backend, student, teacher, labels, temperature=2.0, alpha=0.3, teacher_grad=True,
               what="sliced")


def test_transposed_leading_dims(backend):
    # (seq, batch, V) storage viewed as (batch, seq, V): reshape to rows must keep the order.
    storage_student = make_logits((5, 3, 300), seed=141)
    storage_teacher = make_logits((5, 3, 300), seed=142)
    student = storage_student.transpose(0, 1)
    teacher = storage_teacher.transpose(0, 1)
    labels = make_labels((5, 3), 300, seed=13, ignore_rows=(4,)).t()
    for reduction in ("mean", "none", "batchmean"):
        check_case(backend, student, teacher, labels, temperature=2.0, reduction=reduction,
                   teacher_grad=True, what="transposed")


# --- inplace_backward, teacher gradients, autograd plumbing ----------------------------------

@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward(backend, reduction, vocab):
    shape = (2, 2, vocab)
    student = make_logits(shape, seed=151).to(backend)
    teacher = make_logits(shape, seed=152).to(backend)
    labels = make_labels(shape[:-1], vocab, seed=14, ignore_rows=(3,)).to(backend)
    loss_shape = shape[:-1] if reduction == "none" else ()
    grad_output = random_grad_output(loss_shape).to(backend)
    kwargs = dict(temperature=2.0, alpha=0.5, reduction=reduction)

    out_of_place = run_loss(fastkd_loss, student, teacher, labels, grad_output=grad_output,
                            **kwargs)
    leaf = student.clone().requires_grad_()
    loss = fastkd.kd_loss(leaf, teacher, labels, inplace_backward=True, **kwargs)
    assert torch.equal(loss.detach(), out_of_place.loss)
    loss.backward(grad_output)
    assert torch.equal(leaf.grad, out_of_place.grad_student)
    # The logits' own storage now holds the (scaled) gradient.
    assert torch.equal(leaf.detach(), out_of_place.grad_student)
    truth = float64_truth(student, teacher, labels, grad_output=grad_output, **kwargs)
    assert_close(leaf.grad, truth.grad_student, tolerance(torch.float32, "grad", _backend_name()),
                 what="inplace gradient")


def test_inplace_backward_on_a_view_that_reshape_copies(backend):
    # A transposed view cannot be flattened to rows without a copy: the gradient then cannot live
    # in the logits, and the result must still be right.
    student = make_logits((4, 3, 200), seed=161).to(backend).transpose(0, 1)
    teacher = make_logits((3, 4, 200), seed=162).to(backend)
    labels = make_labels((3, 4), 200, seed=15).to(backend)
    expected = run_loss(fastkd_loss, student, teacher, labels, temperature=2.0)
    leaf = student.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    assert not leaf.is_contiguous()
    loss = fastkd.kd_loss(leaf, teacher, labels, temperature=2.0, inplace_backward=True)
    loss.backward()
    assert torch.equal(loss.detach(), expected.loss)
    assert torch.equal(leaf.grad, expected.grad_student)


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
def test_inplace_backward_into_a_slice(backend, vocab):
    # The gradient goes into the slice's elements only: the rest of the row buffer is untouched.
    big = make_logits((3, vocab + 13), seed=164).to(backend)
    untouched = big[:, vocab:].clone()
    teacher = make_logits((3, vocab), seed=165).to(backend)
    labels = make_labels((3,), vocab, seed=24, ignore_rows=(1,)).to(backend)
    expected = run_loss(fastkd_loss, big[:, :vocab].clone(), teacher, labels, teacher_grad=True,
                        temperature=2.0)
    leaf = big[:, :vocab].detach().requires_grad_()  # a view of big's storage
    teacher_leaf = teacher.clone().requires_grad_()
    loss = fastkd.kd_loss(leaf, teacher_leaf, labels, temperature=2.0, inplace_backward=True)
    loss.backward()
    assert torch.equal(leaf.grad, expected.grad_student)
    assert torch.equal(teacher_leaf.grad, expected.grad_teacher)
    assert torch.equal(big[:, :vocab], expected.grad_student)
    assert torch.equal(big[:, vocab:], untouched)


def test_inplace_backward_on_overlapping_logits(backend):
    # One row of logits expanded over the batch (row stride 0): every row shares the same
    # memory, which cannot hold a gradient per row. fastkd must compute out of place or refuse
    # with a ValueError, never return a gradient scrambled by overlapping writes.
    base = make_logits((1, 40), seed=166).to(backend)
    teacher = make_logits((3, 40), seed=167).to(backend)
    labels = make_labels((3,), 40, seed=25).to(backend)
    reference_leaf = base.clone().requires_grad_()
    fastkd.kd_loss(reference_leaf.expand(3, 40), teacher, labels, temperature=2.0).backward()
    leaf = base.clone().requires_grad_()
    try:
        loss = fastkd.kd_loss(leaf.expand(3, 40), teacher, labels, temperature=2.0,
                              inplace_backward=True)
    except ValueError as error:
        assert "inplace_backward" in str(error)
        return
    loss.backward()
    assert_close(leaf.grad, reference_leaf.grad, tolerance(torch.float32, "grad", _backend_name()),
                 what="gradient through expanded logits")


def test_inplace_backward_in_a_graph_bumps_the_version(backend):
    # The logits are overwritten: an op that saved them for its backward must raise, not use the
    # gradient as if it were the logits.
    weight = torch.randn(16, 300, dtype=torch.float32).to(backend).requires_grad_()
    hidden = torch.randn(4, 16).to(backend)
    student = hidden @ weight
    squared = student.pow(2)  # saves `student` for its backward
    teacher = make_logits((4, 300), seed=163).to(backend)
    loss = fastkd.kd_loss(student, teacher, None, inplace_backward=True) + squared.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
def test_teacher_gradient_only(backend, vocab):
    student = make_logits((3, vocab), seed=171)
    teacher = make_logits((3, vocab), seed=172)
    labels = make_labels((3,), vocab, seed=16, ignore_rows=(0,))
    check_case(backend, student, teacher, labels, temperature=4.0, alpha=0.3, teacher_grad=True,
               student_grad=False, what="teacher only")


def test_gradients_accumulate_over_calls(backend):
    # Gradient accumulation: the second backward adds to .grad (which may be the first call's
    # own buffer), so the sum must equal the two gradients added up.
    student = make_logits((3, 500), seed=183).to(backend)
    teacher = make_logits((3, 500), seed=184).to(backend)
    labels = make_labels((3,), 500, seed=26).to(backend)
    single = run_loss(fastkd_loss, student, teacher, labels, teacher_grad=True, temperature=2.0)
    student_leaf = student.clone().requires_grad_()
    teacher_leaf = teacher.clone().requires_grad_()
    for scale in (1.0, 0.5):
        loss = fastkd.kd_loss(student_leaf, teacher_leaf, labels, temperature=2.0)
        (loss * scale).backward()
        assert torch.equal(loss.detach(), single.loss)  # deterministic, bit for bit
    torch.testing.assert_close(student_leaf.grad, 1.5 * single.grad_student)
    torch.testing.assert_close(teacher_leaf.grad, 1.5 * single.grad_teacher)


def test_no_grad_forward(backend):
    student = make_logits((3, 400), seed=181).to(backend).requires_grad_()
    teacher = make_logits((3, 400), seed=182).to(backend).requires_grad_()
    labels = make_labels((3,), 400, seed=17).to(backend)
    with torch.no_grad():
        loss = fastkd.kd_loss(student, teacher, labels, temperature=2.0)
    assert not loss.requires_grad
    truth = float64_truth(student, teacher, labels, temperature=2.0)
    assert_close(loss, truth.loss, tolerance(torch.float32, "loss", _backend_name()),
                 what="no_grad loss", scale_floor=1.0)
    # Inputs that do not require grad at all take the same path.
    plain = fastkd.kd_loss(student.detach(), teacher.detach(), labels, temperature=2.0)
    assert torch.equal(plain, loss)


def test_backward_twice_raises(backend):
    student = make_logits((3, 300), seed=191).to(backend).requires_grad_()
    teacher = make_logits((3, 300), seed=192).to(backend).requires_grad_()
    labels = make_labels((3,), 300, seed=18).to(backend)
    loss = fastkd.kd_loss(student, teacher, labels, temperature=2.0)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    with pytest.raises(RuntimeError):
        loss.backward()
    # The failed second pass must not have scaled or added anything.
    assert torch.equal(student.grad, first)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels(backend, dtype):
    student = make_logits((2, 3, 200), seed=201)
    teacher = make_logits((2, 3, 200), seed=202)
    # uint8 cannot hold -100: its rows are ignored through ignore_index=255 instead.
    ignore_index = 255 if dtype == torch.uint8 else -100
    labels = make_labels((2, 3), 200, seed=19, ignore_rows=(2,), ignore_index=ignore_index,
                         dtype=dtype)
    narrow = check_case(backend, student, teacher, labels, temperature=2.0,
                        ignore_index=ignore_index, what=f"{dtype} labels")
    wide = run_loss(fastkd_loss, student.to(backend), teacher.to(backend),
                    labels.long().to(backend), temperature=2.0, ignore_index=ignore_index)
    # check_case used a random grad_output: compare the loss, the gradient is checked above.
    # (Not bit for bit: on a GPU each label dtype is its own compiled kernel.)
    torch.testing.assert_close(narrow.loss, wide.loss, rtol=1e-6, atol=0)


def test_grad_output_with_exact_ones_and_zeros(backend):
    # The scale kernel leaves rows whose factor is exactly 1 untouched; rows with 0 must become
    # 0, and the rows around them must still be scaled.
    student = make_logits((6, 700), seed=203)
    teacher = make_logits((6, 700), seed=204)
    labels = make_labels((6,), 700, seed=22, ignore_rows=(5,))
    grad_output = torch.tensor([1.0, 0.0, -1.0, 1.0, 2.5, 1.0])
    actual = run_loss(fastkd_loss, student.to(backend), teacher.to(backend), labels.to(backend),
                      grad_output=grad_output.to(backend), teacher_grad=True, temperature=2.0,
                      reduction="none")
    truth = float64_truth(student, teacher, labels, temperature=2.0, reduction="none",
                          grad_output=grad_output)
    check_against_truth(actual, truth, student_dtype=torch.float32, teacher_dtype=torch.float32,
                        backend=_backend_name(), teacher_grad=True, what="grad_output 1/0")
    assert torch.count_nonzero(actual.grad_student[1]) == 0


# --- bad values inside tensors ---------------------------------------------------------------

@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
def test_out_of_range_labels_give_nan_rows(backend, vocab):
    student = make_logits((6, vocab), seed=211).to(backend)
    teacher = make_logits((6, vocab), seed=212).to(backend)
    labels = torch.tensor([0, vocab, -1, vocab - 1, 2**40, -(2**40)]).to(backend)
    bad_rows = torch.tensor([False, True, True, False, True, True])
    for alpha in (0.0, 0.5):
        result = run_loss(fastkd_loss, student, teacher, labels, grad_output=None,
                          temperature=2.0, alpha=alpha, reduction="none")
        loss = result.loss.cpu()
        assert torch.equal(loss.isnan(), bad_rows), loss
        truth = float64_truth(student, teacher, labels, temperature=2.0, alpha=alpha,
                              reduction="none")
        backend_name = _backend_name()
        assert_close(loss[~bad_rows], truth.loss[~bad_rows],
                     tolerance(torch.float32, "loss", backend_name), what="good rows' loss",
                     scale_floor=1.0)
        # Gradients of NaN rows are unspecified; the others must be untouched by their neighbours.
        assert_close(result.grad_student.cpu()[~bad_rows], truth.grad_student[~bad_rows],
                     tolerance(torch.float32, "grad", backend_name), what="good rows' grad")
        mean = fastkd.kd_loss(student, teacher, labels, temperature=2.0, alpha=alpha)
        assert mean.isnan()


def test_out_of_range_label_with_alpha_one_is_still_nan(backend):
    # (1 - alpha) * NaN is NaN: a bad label is reported even when CE has no weight.
    student = make_logits((2, 100), seed=213).to(backend)
    teacher = make_logits((2, 100), seed=214).to(backend)
    labels = torch.tensor([5, 100]).to(backend)
    loss = fastkd.kd_loss(student, teacher, labels, alpha=1.0, reduction="none").cpu()
    assert not loss[0].isnan() and loss[1].isnan()


@pytest.mark.parametrize("vocab", [ON_CHIP_V, LOOP_V])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_logits_propagate(backend, vocab, where):
    student = make_logits((3, vocab), seed=221)
    teacher = make_logits((3, vocab), seed=222)
    (student if where == "student" else teacher)[1, vocab // 2] = float("nan")
    labels = make_labels((3,), vocab, seed=20)
    student, teacher, labels = student.to(backend), teacher.to(backend), labels.to(backend)
    for alpha in (0.3, 1.0):
        rows = fastkd.kd_loss(student, teacher, labels, temperature=2.0, alpha=alpha,
                              reduction="none").cpu()
        assert torch.equal(rows.isnan(), torch.tensor([False, True, False])), rows
        for reduction in ("mean", "sum"):
            assert fastkd.kd_loss(student, teacher, labels, temperature=2.0, alpha=alpha,
                                  reduction=reduction).isnan()


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_logits_reach_the_gradients(backend, where):
    # As in the reference (autograd): a NaN logit makes its row's gradients NaN, for the student
    # and for a teacher that requires grad, so AMP's inf/NaN check on gradients sees it. Rows
    # next to it keep finite gradients; an ignored NaN row keeps its zeros.
    student = make_logits((4, 300), seed=223)
    teacher = make_logits((4, 300), seed=224)
    (student if where == "student" else teacher)[1, 7] = float("nan")
    (student if where == "student" else teacher)[3, 9] = float("nan")
    labels = torch.tensor([1, 2, 3, -100])
    result = run_loss(fastkd_loss, student.to(backend), teacher.to(backend), labels.to(backend),
                      teacher_grad=True, temperature=2.0, alpha=0.5, reduction="none")
    for name, grad in (("student", result.grad_student), ("teacher", result.grad_teacher)):
        nan_rows = grad.cpu().isnan().all(dim=1)
        finite_rows = grad.cpu().isfinite().all(dim=1)
        assert nan_rows.tolist() == [False, True, False, False], f"{name} gradient NaN rows"
        assert finite_rows.tolist() == [True, False, True, True], f"{name} gradient finite rows"
        assert torch.count_nonzero(grad[3]) == 0, f"{name} gradient of the ignored row"


# --- the module ------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(),
    dict(temperature=2.0, alpha=0.3, reduction="sum"),
    dict(temperature=0.5, alpha=1.0, ignore_index=3, reduction="none"),
    dict(temperature=4.0, reduction="batchmean", inplace_backward=True),
])
def test_module_matches_function(backend, config):
    student = make_logits((2, 3, 257), seed=231).to(backend)
    teacher = make_logits((2, 3, 257), seed=232).to(backend)
    labels = make_labels((2, 3), 257, seed=21, ignore_rows=(1,)).to(backend)
    labels[0, 2] = 3
    criterion = fastkd.KDLoss(**config)
    from_module = run_loss(lambda s, t, y: criterion(s, t, y), student.clone(), teacher, labels,
                           teacher_grad=True)
    from_function = run_loss(fastkd_loss, student.clone(), teacher, labels, teacher_grad=True,
                             **config)
    # Bit for bit, NaN rows included (config 3 turns the default -100 labels out of range).
    for mine, theirs in zip(vars(from_module).values(), vars(from_function).values(),
                            strict=True):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0, equal_nan=True)
    truth = float64_truth(student, teacher, labels,
                          **{k: v for k, v in config.items() if k != "inplace_backward"})
    assert_close(from_module.loss, truth.loss, tolerance(torch.float32, "loss", _backend_name()),
                 what="module loss", scale_floor=1.0)


@pytest.mark.parametrize("leading", [(0,), (2, 0)])
def test_empty_batch(backend, leading):
    # No rows at all: every reduction is 0 (not NaN), "none" is empty, gradients are empty.
    for reduction in ("mean", "sum", "batchmean", "none"):
        student = torch.randn(*leading, 10).to(backend).requires_grad_()
        teacher = torch.randn(*leading, 10).to(backend).requires_grad_()
        labels = torch.zeros(leading, dtype=torch.long).to(backend)
        loss = fastkd.kd_loss(student, teacher, labels, reduction=reduction)
        expected = fastkd.reference.kd_loss(student, teacher, labels, reduction=reduction)
        torch.testing.assert_close(loss, expected, atol=0, rtol=0)
        assert loss.shape == (leading if reduction == "none" else ())
        assert not loss.isnan().any()
        loss.sum().backward()
        assert student.grad.shape == student.shape and teacher.grad.shape == teacher.shape
