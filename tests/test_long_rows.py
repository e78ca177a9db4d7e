"""Long-row strategies (FASTKD_LONG_ROWS) of the Triton backend against the float64 truth.

`two_launch` runs in Triton's interpreter, so every helper it shares with the vocab-parallel
kernels is checked here on CPU; `split` needs its slices co-resident on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE, requires_cuda
from helpers import (
    check_against_truth,
    family_truth,
    make_labels,
    make_logits,
    random_grad_output,
    run_loss,
)

import fastkd
from fastkd.kernels.kd_loss import MAX_ON_CHIP_V, SPLIT_SLICE_V

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    return TRITON_DEVICE


CASES = [
    # (divergence, vocab, dtype, extra logits treatment)
    ("forward_kl", MAX_ON_CHIP_V + 1, torch.float32, "masked"),
    ("reverse_kl", 2 * SPLIT_SLICE_V + 5, torch.bfloat16, "shift"),
    ("jsd", MAX_ON_CHIP_V + 1, torch.bfloat16, "masked"),
    ("tvd", 3 * SPLIT_SLICE_V - 7, torch.float32, "shift"),
    ("skew_kl", MAX_ON_CHIP_V + 1, torch.float32, "masked"),
    ("skew_reverse_kl", 2 * SPLIT_SLICE_V, torch.bfloat16, None),
]


def _inputs(vocab, dtype, treatment, rows=3, seed=0, device="cpu"):
    student = make_logits((rows, vocab), torch.float64, seed=seed)
    teacher = make_logits((rows, vocab), torch.float64, seed=seed + 1)
    if treatment == "masked":
        # A whole slice masked for both models, and scattered teacher-only masks.
        student[0, SPLIT_SLICE_V:] = float("-inf")
        teacher[0, SPLIT_SLICE_V:] = float("-inf")
        teacher[1, ::7] = float("-inf")
    elif treatment == "shift":
        student += 1e4
        teacher -= 1e4
    labels = make_labels((rows,), vocab, seed=seed, ignore_rows=(2,) if rows > 2 else ())
    labels[0] = 3  # the first slice: row 0's other slices are masked
    return student.to(dtype).to(device), teacher.to(dtype).to(device), labels.to(device)


@pytest.mark.parametrize("divergence,vocab,dtype,treatment", CASES)
def test_two_launch_against_float64(divergence, vocab, dtype, treatment, triton_backend,
                                    monkeypatch):
    monkeypatch.setenv("FASTKD_LONG_ROWS", "two_launch")
    student, teacher, labels = _inputs(vocab, dtype, treatment, device=triton_backend)
    options = dict(divergence=divergence, beta=0.3, skew=0.2, temperature=2.0,
                   label_smoothing=0.1 if treatment != "masked" else 0.0, z_loss=1e-3)
    grad_output = random_grad_output((), torch.Generator().manual_seed(1))
    teacher_grad = divergence != "tvd"
    actual = run_loss(fastkd.kd_loss, student, teacher, labels, grad_output=grad_output,
                      teacher_grad=teacher_grad, **options)
    truth = family_truth(student, teacher, labels, grad_output=grad_output, **options)
    check_against_truth(actual, truth, student_dtype=dtype, teacher_dtype=dtype,
                        backend="triton", teacher_grad=teacher_grad,
                        what=f"two_launch {divergence} V={vocab} {treatment}")


def test_two_launch_equals_loop_at_an_llm_vocabulary(triton_backend, monkeypatch):
    """V = 262144: 32 slices; a sampled row against the two-sweep loop and the truth."""
    student, teacher, labels = _inputs(262144, torch.bfloat16, None, rows=1,
                                       device=triton_backend)
    results = {}
    for strategy in ("loop", "two_launch"):
        monkeypatch.setenv("FASTKD_LONG_ROWS", strategy)
        results[strategy] = run_loss(fastkd.kd_loss, student, teacher, labels,
                                     temperature=2.0, alpha=0.5)
    truth = family_truth(student, teacher, labels, temperature=2.0, alpha=0.5)
    for strategy, result in results.items():
        check_against_truth(result, truth, student_dtype=torch.bfloat16,
                            teacher_dtype=torch.bfloat16, backend="triton",
                            what=f"{strategy} V=262144")


def test_unknown_strategy_is_refused(triton_backend, monkeypatch):
    monkeypatch.setenv("FASTKD_LONG_ROWS", "fastest")
    student = make_logits((2, MAX_ON_CHIP_V + 1), device=triton_backend)
    with pytest.raises(ValueError, match="FASTKD_LONG_ROWS must be one of"):
        fastkd.kd_loss(student, student)


@pytest.mark.skipif(TRITON_DEVICE == "cuda", reason="checks the CPU refusal")
def test_split_refuses_cpu_tensors(triton_backend, monkeypatch):
    monkeypatch.setenv("FASTKD_LONG_ROWS", "split")
    student = make_logits((2, MAX_ON_CHIP_V + 1))
    with pytest.raises(RuntimeError, match="split needs CUDA tensors"):
        fastkd.kd_loss(student, student)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_split_and_two_launch_equal_loop_on_gpu(divergence, vocab, monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    student, teacher, labels = _inputs(vocab, torch.bfloat16, None, rows=64, device="cuda")
    outputs = {}
    for strategy in ("loop", "two_launch", "split"):
        monkeypatch.setenv("FASTKD_LONG_ROWS", strategy)
        runs = [run_loss(fastkd.kd_loss, student, teacher, labels, temperature=2.0,
                         divergence=divergence) for _ in range(3)]
        for run in runs[1:]:  # deterministic: bitwise equal from run to run
            assert torch.equal(run.loss, runs[0].loss)
            assert torch.equal(run.grad_student, runs[0].grad_student)
        outputs[strategy] = runs[0]
    truth = family_truth(student, teacher, labels, temperature=2.0, divergence=divergence)
    for strategy, result in outputs.items():
        check_against_truth(result, truth, student_dtype=torch.bfloat16,
                            teacher_dtype=torch.bfloat16, backend="triton",
                            what=f"{strategy} V={vocab}")


@requires_cuda
@pytest.mark.gpu
def test_split_is_cuda_graph_capturable(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    monkeypatch.setenv("FASTKD_LONG_ROWS", "split")
    student, teacher, labels = _inputs(32000, torch.bfloat16, None, rows=64, device="cuda")
    student.requires_grad_()
    eager = fastkd.kd_loss(student, teacher, labels, temperature=2.0)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fastkd.kd_loss(student, teacher, labels, temperature=2.0)  # warm up (compile)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fastkd.kd_loss(student, teacher, labels, temperature=2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
