"""Launches per fastkd.kd_loss call on the Triton path: Triton kernels plus aten ops on device
tensors, counted with fastkd.bench.launches (a launch hook and torch.profiler; under Triton's
interpreter on CPU, the real kernels on a GPU). A change that launches more fails here."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import TRITON_DEVICE

from fastkd.bench import launches

# Launches of one call with labels (student gradient, T = 2), at most: reduction ->
# (forward, forward + backward). Lower them when the launcher gets leaner. The backward adds the
# gradient scale kernel (which returns at once when grad_output is 1).
MAX_LAUNCHES = {
    "mean": (3, 4),  # weight (count and reciprocal in one kernel) | kernel | column sums
    "sum": (3, 4),  # weight 1 (fill) | kernel | column sums
    "sum+normalizer": (3, 4),  # reciprocal | kernel | column sums (times the weight)
    "none": (2, 3),  # weight 1 (fill) | kernel
}


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("reduction", sorted(MAX_LAUNCHES))
def test_launches_per_call(triton_backend, reduction, backward):
    count = launches.kd_loss_launches(reduction, backward=backward, device=TRITON_DEVICE)
    limit = MAX_LAUNCHES[reduction][backward]
    assert count.total <= limit, f"{reduction}: {count.as_dict()} exceeds {limit} launches"
    # The loss itself runs in Triton, and the call waits for the device nowhere.
    assert count.triton, count.as_dict()
    assert not count.syncs, count.as_dict()
    if count.cuda_kernels is not None:  # on a GPU: the CUDA profiler's kernels agree
        assert count.cuda_kernels <= limit, count.as_dict()


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, x + 1.0, mask=offs < n)


def test_counter_on_known_ops():
    x = torch.zeros(300, device=TRITON_DEVICE)

    def call():
        y = torch.full((3,), 2.0, device=x.device)  # 1: fill
        y.to(torch.float32)  # nothing: already float32
        y.to(torch.float64)  # 1: copy
        x.view(3, 100).t().reshape(-1)  # the views count nothing, the flattening copy 1
        _add_one_kernel[(3,)](x, 300, BLOCK=128)  # 1 Triton launch
        _add_one_kernel[(3,)](x, 300, BLOCK=128)
        x.sum()  # 1

    count = launches.count_launches(call)
    assert count.triton == ["_add_one_kernel", "_add_one_kernel"]
    # The reshape of a transposed view copies (clone -> copy_); the interpreter's staging of
    # the kernels' arguments is not counted.
    assert count.aten == ["aten::fill_", "aten::copy_", "aten::copy_", "aten::sum"]
    assert count.total == 6 and not count.syncs
    assert torch.equal(x, torch.full_like(x, 2.0))


def test_counter_sees_host_syncs():
    x = torch.ones(4, device=TRITON_DEVICE)
    count = launches.count_launches(lambda: (x.sum() > 0).item())
    assert count.syncs == ["aten::item"]
