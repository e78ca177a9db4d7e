"""The implementations the benchmark compares, all called as fn(student, teacher, labels) -> loss.

Every provider computes the same loss with the same settings (fastkd.bench.cases: T, alpha,
ignore_index, reduction="mean"). Baselines come from fastkd.reference, never a local copy, so the
benchmark and the tests always compare against the same code.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import reference
from ..functional import kd_loss
from .cases import ALPHA, IGNORE_INDEX, TEMPERATURE, Case

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# torch.compile recompiles per shape, dtype and requires_grad; the default limit (8) would make
# it fall back to eager in the middle of a sweep, silently. One slot per case is plenty.
COMPILE_CACHE_LIMIT = 256
COMPILE_DYNAMIC_ENV = "FASTKD_BENCH_COMPILE_DYNAMIC"


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    build: Callable[[str], LossFn]
    # Why this provider cannot run a case on a device (None: it can).
    skip_reason: Callable[[Case, str], str | None]
    # Inputs it overwrites (in-place gradients): accuracy runs give it clones.
    mutates_student: bool = False


def _always(case: Case, device: str) -> str | None:
    return None


def _build_fastkd(device: str) -> LossFn:
    def fastkd_loss(student, teacher, labels):
        return kd_loss(student, teacher, labels, temperature=TEMPERATURE, alpha=ALPHA,
                       ignore_index=IGNORE_INDEX)
    return fastkd_loss


def _build_fastkd_inplace(device: str) -> LossFn:
    def fastkd_inplace_loss(student, teacher, labels):
        return kd_loss(student, teacher, labels, temperature=TEMPERATURE, alpha=ALPHA,
                       ignore_index=IGNORE_INDEX, inplace_backward=True)
    return fastkd_inplace_loss


def _inplace_skip(case: Case, device: str) -> str | None:
    if case.mode != "fwd_bwd":
        return "n/a: inplace_backward only changes runs with a gradient"
    return None


def _build_eager(device: str) -> LossFn:
    def eager_loss(student, teacher, labels):
        return reference.kd_loss(student, teacher, labels, temperature=TEMPERATURE, alpha=ALPHA,
                                 ignore_index=IGNORE_INDEX)
    return eager_loss


def raise_compile_limits() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), COMPILE_CACHE_LIMIT))


def compile_is_dynamic(device: str) -> bool:
    """Static shapes on CUDA (the fastest kernels); dynamic on CPU, where each compile costs
    10-20 s on 2 cores and one graph per dtype and mode keeps the sweep inside its budget.
    FASTKD_BENCH_COMPILE_DYNAMIC=1/0 overrides (set by `fastkd-bench --compile-dynamic`, and
    inherited by the worker processes)."""
    override = os.environ.get(COMPILE_DYNAMIC_ENV, "")
    if override in ("0", "1"):
        return override == "1"
    return device != "cuda"


def _build_compiled(device: str) -> LossFn:
    raise_compile_limits()
    compiled = torch.compile(reference.kd_loss, dynamic=compile_is_dynamic(device))

    def compiled_loss(student, teacher, labels):
        return compiled(student, teacher, labels, temperature=TEMPERATURE, alpha=ALPHA,
                        ignore_index=IGNORE_INDEX)
    return compiled_loss


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _liger_skip(case: Case, device: str) -> str | None:
    if not liger_installed():
        return "not installed (pip install liger-kernel)"
    if device != "cuda":
        return f"unsupported device: Liger-Kernel's Triton kernels need a GPU, not {device}"
    return None


def _build_liger(device: str) -> LossFn:
    """Liger-Kernel's closest composition: LigerKLDIVLoss on log-softmaxed inputs plus
    LigerCrossEntropyLoss, with T^2, alpha and the ignored-row mask applied as the reference does.

    LigerKLDIVLoss has no ignore_index, so ignored rows are zeroed in both log-distributions
    (exp(0) * (0 - 0) = 0, and torch.where sends no gradient to the zeroed rows); the KL sum is
    divided by the counted rows like reduction="mean". LigerCrossEntropyLoss writes its
    gradient into the student logits during the forward, so it runs after the softmaxes read them.
    """
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    kl_div = LigerKLDIVLoss(reduction="sum", log_target=True)
    cross_entropy = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")

    def liger_loss(student, teacher, labels):
        counted = labels != IGNORE_INDEX
        keep = counted[:, None]
        log_p_student = F.log_softmax(student / TEMPERATURE, dim=-1)
        log_p_teacher = F.log_softmax(teacher / TEMPERATURE, dim=-1)
        kl_sum = kl_div(torch.where(keep, log_p_student, 0.0),
                        torch.where(keep, log_p_teacher, 0.0))
        kl_mean = kl_sum / counted.sum().clamp(min=1)
        ce = cross_entropy(student, labels)
        return ALPHA * TEMPERATURE**2 * kl_mean + (1.0 - ALPHA) * ce
    return liger_loss


PROVIDERS = {
    "fastkd": Provider("fastkd", "fastkd.kd_loss (Triton on CUDA, torch backend on CPU)",
                       _build_fastkd, _always),
    "fastkd_inplace": Provider("fastkd_inplace", "fastkd.kd_loss(inplace_backward=True)",
                               _build_fastkd_inplace, _inplace_skip, mutates_student=True),
    "eager": Provider("eager", "fastkd.reference.kd_loss, eager PyTorch", _build_eager, _always),
    "compile": Provider("compile", "torch.compile(fastkd.reference.kd_loss)", _build_compiled,
                        _always),
    "liger": Provider("liger", "LigerKLDIVLoss + LigerCrossEntropyLoss composition",
                      _build_liger, _liger_skip, mutates_student=True),
}


def default_providers(device: str) -> list[str]:
    if device == "cuda":
        return ["fastkd", "fastkd_inplace", "eager", "compile", "liger"]
    # On CPU, inplace_backward saves memory the same way but has no target of its own.
    return ["fastkd", "eager", "compile", "liger"]
