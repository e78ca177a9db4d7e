"""Shared test set-up.

Without a GPU the Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before
triton decorates any kernel, so it is set here, before anything imports fastkd.kernels.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# The interpreter runs every kernel on CPU tensors; on a GPU machine Triton runs on CUDA tensors.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ("torch", "triton")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The suite's tensors are small: one intra-op thread is as fast, and on a busy two-core
    machine PyTorch's thread pool, spinning for cores other processes hold, made the suite's ops
    up to 50x slower (4 min 14 s instead of 37 s for the core modules)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test once per backend; yields the device its tensors must live on."""
    monkeypatch.setenv("FASTKD_BACKEND", request.param)
    return TRITON_DEVICE if request.param == "triton" else "cpu"
