"""Every bad argument gets its own error: the right type, and a message that names the argument."""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE, requires_cuda

import fastkd

V = 11


def _inputs(*leading, vocab=V, dtype=torch.float32):
    student = torch.randn(*leading, vocab, dtype=dtype)
    teacher = torch.randn(*leading, vocab, dtype=dtype)
    labels = torch.randint(0, max(vocab, 1), leading)
    return student, teacher, labels


def _call_module(student, teacher, labels=None, **kwargs):
    return fastkd.KDLoss(**kwargs)(student, teacher, labels)


# The fused function, the reference and the module share one validation; each must use it.
ENTRY_POINTS = {
    "kd_loss": fastkd.kd_loss,
    "reference": fastkd.reference.kd_loss,
    "KDLoss.forward": _call_module,
}


@pytest.fixture(params=list(ENTRY_POINTS))
def entry_point(request):
    return ENTRY_POINTS[request.param]


BAD_TEMPERATURES = [
    (0.0, ValueError, r"temperature must lie in \(0, "),
    (-1.0, ValueError, r"temperature must lie in \(0, "),
    (float("inf"), ValueError, r"temperature must be finite"),
    (float("-inf"), ValueError, r"temperature must be finite"),
    (float("nan"), ValueError, r"temperature must be finite"),
    (torch.tensor(2.0), TypeError, r"temperature must be a Python float"),
    ("2", TypeError, r"temperature must be a Python float"),
    (True, TypeError, r"temperature must be a Python float"),
    (None, TypeError, r"temperature must be a Python float"),
]


@pytest.mark.parametrize(("temperature", "error", "message"), BAD_TEMPERATURES,
                         ids=[repr(value) for value, _, _ in BAD_TEMPERATURES])
def test_bad_temperature(temperature, error, message):
    student, teacher, labels = _inputs(4)
    for function in (fastkd.kd_loss, fastkd.reference.kd_loss):
        with pytest.raises(error, match=message):
            function(student, teacher, labels, temperature=temperature)


def test_good_temperatures_are_accepted():
    # Ints are fine (a Python number, not a tensor), and so are extreme but finite values.
    student, teacher, labels = _inputs(4)
    for temperature in (1, 3, 1e-3, 1e3):
        assert torch.isfinite(fastkd.kd_loss(student, teacher, labels, temperature=temperature))


BAD_ALPHAS = [
    (-0.1, ValueError, r"alpha must lie in \[0, 1\]"),
    (1.5, ValueError, r"alpha must lie in \[0, 1\]"),
    (float("nan"), ValueError, r"alpha must be finite"),
    (float("inf"), ValueError, r"alpha must be finite"),
    (torch.tensor(0.5), TypeError, r"alpha must be a Python float"),
    (False, TypeError, r"alpha must be a Python float"),
]


@pytest.mark.parametrize(("alpha", "error", "message"), BAD_ALPHAS,
                         ids=[repr(value) for value, _, _ in BAD_ALPHAS])
def test_bad_alpha(alpha, error, message):
    student, teacher, labels = _inputs(4)
    for function in (fastkd.kd_loss, fastkd.reference.kd_loss):
        with pytest.raises(error, match=message):
            function(student, teacher, labels, alpha=alpha)


def test_mismatched_student_and_teacher(entry_point):
    student, _, labels = _inputs(4)
    for teacher in (torch.randn(4, V + 1), torch.randn(5, V), torch.randn(1, 4, V)):
        with pytest.raises(ValueError, match=r"student_logits and teacher_logits must have the "
                                             r"same shape"):
            entry_point(student, teacher, labels)


@pytest.mark.parametrize("labels_shape", [(5,), (4, 1), (1, 4), (), (2, 2)])
def test_mismatched_labels(entry_point, labels_shape):
    student, teacher, _ = _inputs(4)
    labels = torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must have the logits' leading shape \(4,\)"):
        entry_point(student, teacher, labels)


def test_labels_for_1d_logits_must_be_0d(entry_point):
    student, teacher = torch.randn(V), torch.randn(V)
    with pytest.raises(ValueError, match=r"labels must have the logits' leading shape \(\)"):
        entry_point(student, teacher, torch.tensor([1]))


def test_empty_vocabulary(entry_point):
    student, teacher, labels = _inputs(4, vocab=0)
    with pytest.raises(ValueError, match=r"student_logits has an empty vocabulary"):
        entry_point(student, teacher, labels)


def test_zero_dim_logits(entry_point):
    with pytest.raises(ValueError, match=r"student_logits must have shape \(\.\.\., vocab\)"):
        entry_point(torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_non_float_logits(entry_point, which, dtype):
    student, teacher, labels = _inputs(4)
    bad = torch.ones(4, V, dtype=dtype)
    args = (bad, teacher) if which == "student_logits" else (student, bad)
    with pytest.raises(TypeError, match=rf"{which} must be a floating tensor"):
        entry_point(*args, labels)


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_logits_not_a_tensor(entry_point, which):
    student, teacher, labels = _inputs(4)
    bad = student.tolist()
    args = (bad, teacher) if which == "student_logits" else (student, bad)
    with pytest.raises(TypeError, match=rf"{which} must be a torch.Tensor"):
        entry_point(*args, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool, torch.complex64])
def test_non_integer_labels(entry_point, dtype):
    student, teacher, labels = _inputs(4)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        entry_point(student, teacher, labels.to(dtype))


def test_labels_not_a_tensor(entry_point):
    student, teacher, labels = _inputs(4)
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor or None"):
        entry_point(student, teacher, labels.tolist())


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, "elementwise_mean"])
def test_unknown_reduction(reduction):
    student, teacher, labels = _inputs(4)
    for function in (fastkd.kd_loss, fastkd.reference.kd_loss):
        with pytest.raises(ValueError, match=r"reduction must be one of"):
            function(student, teacher, labels, reduction=reduction)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.999])
def test_labels_none_needs_alpha_one(alpha):
    student, teacher, _ = _inputs(4)
    for function in (fastkd.kd_loss, fastkd.reference.kd_loss):
        with pytest.raises(ValueError, match=rf"alpha={alpha} mixes in hard-label cross-entropy, "
                                             r"which needs labels"):
            function(student, teacher, None, alpha=alpha)


@pytest.mark.parametrize("ignore_index", [1.5, -100.0, "x", True, torch.tensor(-100)])
def test_bad_ignore_index(ignore_index):
    student, teacher, labels = _inputs(4)
    for function in (fastkd.kd_loss, fastkd.reference.kd_loss):
        with pytest.raises(TypeError, match=r"ignore_index must be an int"):
            function(student, teacher, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1])
def test_ignore_index_outside_int64(entry_point, ignore_index):
    # Labels are at most int64: a larger ignore_index can match no label, and the custom op's
    # schema cannot even carry it. Say so by name instead of an overflow deep inside.
    student, teacher, labels = _inputs(4)
    with pytest.raises(ValueError, match=r"ignore_index"):
        entry_point(student, teacher, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("flag", [1, 0, "yes", None])
def test_bad_inplace_backward(flag):
    student, teacher, labels = _inputs(4)
    with pytest.raises(TypeError, match=r"inplace_backward must be a bool"):
        fastkd.kd_loss(student, teacher, labels, inplace_backward=flag)


@pytest.mark.parametrize("choice", ["cuda", "Triton2", "pytorch", "none"])
def test_bad_backend_variable(monkeypatch, choice):
    monkeypatch.setenv("FASTKD_BACKEND", choice)
    student, teacher, labels = _inputs(4)
    with pytest.raises(ValueError, match=r"FASTKD_BACKEND must be one of"):
        fastkd.kd_loss(student, teacher, labels)


@pytest.mark.parametrize("choice", ["TORCH", " triton ", ""])
def test_backend_variable_is_forgiving_about_case_and_blanks(monkeypatch, choice):
    # Documented: surrounding blanks and case do not matter; empty means auto.
    monkeypatch.setenv("FASTKD_BACKEND", choice)
    student, teacher, labels = (tensor.to(TRITON_DEVICE) for tensor in _inputs(4))
    expected = fastkd.reference.kd_loss(student, teacher, labels)
    torch.testing.assert_close(fastkd.kd_loss(student, teacher, labels), expected)


def test_auto_backend_runs_torch_on_cpu(monkeypatch):
    # Unset and "auto" pick the PyTorch backend for CPU tensors, interpreter or not.
    student, teacher, labels = _inputs(4)
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    expected = fastkd.kd_loss(student, teacher, labels, temperature=2.0, reduction="none")
    monkeypatch.setenv("FASTKD_BACKEND", "auto")
    assert fastkd.functional.select_backend(student.device) is fastkd._torch_backend
    auto = fastkd.kd_loss(student, teacher, labels, temperature=2.0, reduction="none")
    monkeypatch.delenv("FASTKD_BACKEND")
    unset = fastkd.kd_loss(student, teacher, labels, temperature=2.0, reduction="none")
    assert torch.equal(auto, expected) and torch.equal(unset, expected)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    student, teacher, labels = _inputs(4)  # CPU tensors, even on a GPU machine
    with pytest.raises(RuntimeError, match=r"FASTKD_BACKEND=triton got cpu tensors.*"
                                           r"TRITON_INTERPRET=1"):
        fastkd.kd_loss(student, teacher, labels)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        fastkd.kd_loss(student, teacher, labels)


def test_errors_come_before_any_work(monkeypatch):
    # A bad argument is reported even when the backend could not run: validation goes first.
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    student, teacher, labels = _inputs(4)
    with pytest.raises(ValueError, match=r"temperature must lie in \(0, "):
        fastkd.kd_loss(student, teacher, labels, temperature=0.0)


@requires_cuda
@pytest.mark.gpu
def test_devices_must_match():
    student, teacher, labels = _inputs(4)
    with pytest.raises(ValueError, match=r"teacher_logits must be on the same device"):
        fastkd.kd_loss(student.cuda(), teacher, labels.cuda())
    with pytest.raises(ValueError, match=r"labels must be on the logits' device"):
        fastkd.kd_loss(student.cuda(), teacher.cuda(), labels)


# --- KDLoss constructor: fail when the criterion is built, not at the first step -----------

BAD_MODULE_ARGS = [
    (dict(temperature=0.0), ValueError, r"temperature must lie in \(0, "),
    (dict(temperature=-2.0), ValueError, r"temperature must lie in \(0, "),
    (dict(temperature=float("nan")), ValueError, r"temperature must be finite"),
    (dict(temperature=float("inf")), ValueError, r"temperature must be finite"),
    (dict(temperature=torch.tensor(2.0)), TypeError, r"temperature must be a Python float"),
    (dict(alpha=-0.5), ValueError, r"alpha must lie in \[0, 1\]"),
    (dict(alpha=2.0), ValueError, r"alpha must lie in \[0, 1\]"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be finite"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
    (dict(ignore_index=True), TypeError, r"ignore_index must be an int"),
    (dict(inplace_backward="yes"), TypeError, r"inplace_backward must be a bool"),
    (dict(inplace_backward=1), TypeError, r"inplace_backward must be a bool"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_MODULE_ARGS,
                         ids=[f"{next(iter(k))}={next(iter(k.values()))!r}"
                              for k, _, _ in BAD_MODULE_ARGS])
def test_module_constructor_rejects(kwargs, error, message):
    with pytest.raises(error, match=message):
        fastkd.KDLoss(**kwargs)


def test_module_without_labels_needs_alpha_one():
    # alpha < 1 is a valid constructor argument (labels come per call); the call without labels
    # is the error.
    criterion = fastkd.KDLoss(alpha=0.5)
    student, teacher, labels = _inputs(4)
    assert torch.isfinite(criterion(student, teacher, labels))
    with pytest.raises(ValueError, match=r"alpha=0.5 mixes in hard-label cross-entropy"):
        criterion(student, teacher)


def test_module_accepts_good_arguments():
    criterion = fastkd.KDLoss(temperature=2, alpha=0.0, ignore_index=-1, reduction="batchmean",
                              inplace_backward=True)
    text = repr(criterion)
    for fragment in ("temperature=2", "alpha=0.0", "ignore_index=-1", "'batchmean'",
                     "inplace_backward=True"):
        assert fragment in text

