"""Top-k checks that need a real GPU: the compiled kernel (tl.histogram, the barrier between the
dense store and the entries' stores, in place), LLM vocabularies and CUDA graphs.

Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import Tol, assert_close, make_labels, make_logits, random_grad_output, tolerance
from test_topk import _teacher, check_case
from topk_oracle import loss_truth

import fastkd
from fastkd.kernels.kd_loss import MAX_ON_CHIP_V

pytestmark = [requires_cuda, pytest.mark.gpu]

DEVICE = "cuda"


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    return "triton"


@pytest.mark.parametrize(("vocab", "k", "dtype", "tail"), [
    (1000, 5, torch.float32, "renormalize"),
    (MAX_ON_CHIP_V, 64, torch.bfloat16, "bucket"),
    (MAX_ON_CHIP_V + 1, 64, torch.bfloat16, "renormalize"),
    (128256, 64, torch.bfloat16, "bucket"),
    (128256, 2048, torch.float32, "bucket"),
    (151936, 128, torch.bfloat16, "renormalize"),
])
def test_compiled_kernel_against_oracle(triton_backend, vocab, k, dtype, tail):
    student = make_logits((4, vocab), dtype, seed=vocab)
    ids, values, _ = _teacher((4, vocab), k, temperature=2.0, tail=tail, seed=k, dtype=dtype)
    values[3, k // 2:] = float("-inf")
    ids[3, k // 2:] = -7
    labels = make_labels((4,), vocab, seed=k, ignore_rows=(1,))
    check_case(DEVICE, student, ids, values, labels, tail=tail, temperature=2.0, alpha=0.5,
               label_smoothing=0.1, z_loss=1e-4, reduction="none", what="cuda")


@pytest.mark.parametrize("vocab", [MAX_ON_CHIP_V, 32000])
def test_tiny_tail_at_k_V_minus_1(triton_backend, vocab):
    """Membership from tl.histogram over every block: the tail is one entry at e^-40.

    The teacher's tail is stored: 1 - sum(p) over thousands of fp32 entries is itself off by
    ~1e-7, which would swamp the tail entry's gradient (about -p_tail / 2)."""
    student = make_logits((2, vocab), seed=3, scale=1.0)
    student[:, 17] = student.max() - 40.0
    ids = torch.argsort(student, dim=-1, descending=True)[:, : vocab - 1]
    logits = make_logits((2, vocab), seed=4, scale=1.0)
    values = torch.log_softmax(logits, -1).gather(-1, ids)
    tail = torch.log_softmax(logits.double(), -1)[:, 17].float()
    loss, grad = check_case(DEVICE, student, ids, values, tail_logprob=tail, tail="bucket",
                            grad_output=False, what="tiny tail")
    _, _, truth_grad = loss_truth(student, ids, values, tail_logprob=tail, tail="bucket",
                                  alpha=1.0)
    assert_close(grad[:, 17], truth_grad[:, 17], Tol(atol=0.0, rtol=1e-4), what="tail entry")


@pytest.mark.parametrize("vocab", [4000, MAX_ON_CHIP_V, 32000])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_inplace_equals_out_of_place(triton_backend, vocab, tail):
    """In place the entries' logits are gathered before any dense store: bit-identical to a
    separate gradient buffer, over many rows (a race would show in some of them)."""
    student = make_logits((256, vocab), torch.bfloat16, seed=5).to(DEVICE)
    ids, values, _ = _teacher((256, vocab), 64, temperature=2.0, tail=tail, seed=6)
    ids, values = ids.to(DEVICE), values.to(DEVICE)
    labels = make_labels((256,), vocab, seed=7, ignore_rows=(3, 9)).to(DEVICE)
    grads = []
    for inplace in (False, True):
        x = student.clone().requires_grad_(True)
        fastkd.topk_kd_loss(x, ids, values, labels, temperature=2.0, tail=tail,
                            inplace_backward=inplace).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)


def test_cuda_graph_capture_and_replay(triton_backend):
    rows, vocab, k = 32, MAX_ON_CHIP_V + 1, 64
    generator = torch.Generator().manual_seed(13)

    def new_batch():
        student = (torch.randn(rows, vocab, generator=generator) * 3).to(DEVICE)
        ids, values, _ = _teacher((rows, vocab), k, temperature=2.0, tail="bucket",
                                  seed=int(torch.randint(0, 1000, (), generator=generator)))
        labels = torch.randint(0, vocab, (rows,), generator=generator)
        labels[torch.rand(rows, generator=generator) < 0.2] = -100
        return student, ids.to(DEVICE), values.to(DEVICE), labels.to(DEVICE)

    static = new_batch()
    static[0].requires_grad_()
    static_grad_output = random_grad_output((), generator).to(DEVICE)
    kwargs = dict(temperature=2.0, alpha=0.3, tail="bucket")

    def step():
        loss = fastkd.topk_kd_loss(*static, **kwargs)
        loss.backward(static_grad_output)
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            static[0].grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    static[0].grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    for _ in range(2):
        batch = new_batch()
        grad_output = random_grad_output((), generator).to(DEVICE)
        with torch.no_grad():
            for target, source in zip(static, batch, strict=True):
                target.copy_(source)
            static_grad_output.copy_(grad_output)
        graph.replay()
        torch.cuda.synchronize()
        truth_loss, _, truth_grad = loss_truth(*[t.cpu() for t in batch], grad_output=grad_output,
                                               **kwargs)
        assert_close(static_loss, truth_loss, tolerance(torch.float32, "loss", "triton"),
                     what="replayed loss", scale_floor=1.0)
        assert_close(static[0].grad, truth_grad, tolerance(torch.float32, "grad", "triton"),
                     what="replayed grad")
