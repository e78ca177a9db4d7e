"""Count what one loss call launches: Triton kernels plus the aten ops that would run on the device.

    from fastkd.bench.launches import count_launches
    counts = count_launches(lambda: fastkd.kd_loss(s, t, y).backward())
    counts.triton, counts.aten, counts.total

Triton launches are counted where every launch passes, `run` of Triton's JITFunction (compiled
kernels) and InterpretedFunction (TRITON_INTERPRET=1): `kernel[grid](...)` calls it once per
launch, whatever launcher or custom op made the call. Each launch runs inside a profiler range
named ``triton::<kernel>``, so the aten ops that Triton's interpreter runs to stage the arguments
are told apart from the loss's own.

aten ops are counted with torch.profiler (CPU activity, so this works without a GPU): the
outermost aten op of each call counts once, unless it is in `NO_KERNEL_OPS` (allocation, views,
metadata, and wrappers such as `.to`, `.contiguous` or `torch.full`), in which case the ops it
calls are looked at the same way. So `torch.full` counts once (its `fill_`), `.to(dtype)` once
(its `copy_`), a `.to` that changes nothing not at all, and `sum` once (not the bool-to-int copy
that the CPU implementation makes inside it). On CUDA tensors each counted op of the Triton path
is one kernel launch; a composite op (cross_entropy) counts once although it launches several.
`count_launches` also reports the CUDA profiler's kernel count when the tensors are on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

# aten ops that launch no device kernel: allocation, views, metadata, and wrappers whose data
# work, when there is any, is a counted op they call (copy_, fill_).
NO_KERNEL_OPS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::resize_", "aten::set_", "aten::lift_fresh",
    "aten::view", "aten::_reshape_alias", "aten::reshape", "aten::_unsafe_view", "aten::view_as",
    "aten::as_strided", "aten::expand", "aten::expand_as", "aten::slice", "aten::select",
    "aten::narrow", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::transpose",
    "aten::t", "aten::flatten", "aten::unflatten", "aten::alias", "aten::detach",
    "aten::detach_", "aten::unbind", "aten::split", "aten::movedim", "aten::diagonal",
    "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::result_type",
    "aten::_has_compatible_shallow_copy_type", "aten::requires_grad_",
    "aten::zeros_like", "aten::ones_like", "aten::full_like", "aten::new_zeros",
    "aten::new_ones", "aten::new_full", "aten::zeros", "aten::ones", "aten::full",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_conj", "aten::conj",
})
# aten ops that copy a device value to the host and wait for it.
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
                      "aten::equal", "aten::nonzero", "aten::allclose"})
TRITON_RANGE_PREFIX = "triton::"


@dataclass
class LaunchCount:
    """What one call launched: Triton kernels and counted aten ops, each in call order."""

    triton: list[str] = field(default_factory=list)
    aten: list[str] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)  # host<->device synchronising ops
    cuda_kernels: int | None = None  # from the CUDA profiler, on GPU tensors only

    @property
    def total(self) -> int:
        return len(self.triton) + len(self.aten)

    def as_dict(self) -> dict:
        return {"total": self.total, "triton": len(self.triton), "aten": len(self.aten),
                "triton_kernels": self.triton, "aten_ops": self.aten, "syncs": self.syncs,
                "cuda_kernels": self.cuda_kernels}


@contextlib.contextmanager
def triton_launches():
    """Within the block, every Triton launch is recorded (its kernel's name, in order) and runs in
    a profiler range ``triton::<kernel>``. Yields the list of names."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    names: list[str] = []
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def wrap(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            name = self.__name__
            names.append(name)
            with torch.profiler.record_function(TRITON_RANGE_PREFIX + name):
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return run

    for cls, original in originals.items():
        cls.run = wrap(original)
    try:
        yield names
    finally:
        for cls, original in originals.items():
            cls.run = original


def walk(events, visit):
    """visit(event) on every profiler event outside the Triton launch ranges, outermost first;
    visit returns whether to look at the event's callees."""

    def descend(event):
        if event.name.startswith(TRITON_RANGE_PREFIX):
            return  # the interpreter's staging of a launch's arguments
        if visit(event):
            for child in event.cpu_children:
                descend(child)

    for event in events:
        if event.cpu_parent is None:
            descend(event)


def counted_aten_ops(events) -> list:
    """The profiler events that count as one device op each (see the module docstring)."""
    counted = []

    def visit(event) -> bool:
        if event.name.startswith("aten::") and event.name not in NO_KERNEL_OPS:
            counted.append(event)
            return False
        return True

    walk(events, visit)
    return sorted(counted, key=lambda e: e.time_range.start)


def sync_ops(events) -> list:
    """The events, at any depth, that wait for a device value on the host."""
    found = []

    def visit(event) -> bool:
        if event.name in SYNC_OPS:
            found.append(event)
            return False
        return True

    walk(events, visit)
    return found


def profile(fn: Callable[[], object], *, record_shapes: bool = False, cuda: bool = False):
    """Run fn() under torch.profiler with Triton launches recorded: (profiler, Triton names)."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with triton_launches() as names, torch.profiler.profile(
            activities=activities, record_shapes=record_shapes) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return prof, names


def count_launches(fn: Callable[[], object], *, cuda: bool | None = None) -> LaunchCount:
    """Launches of fn(): Triton kernels and counted aten ops (CUDA kernels too when cuda)."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    prof, names = profile(fn, cuda=cuda)
    events = prof.events()
    count = LaunchCount(triton=list(names), aten=[e.name for e in counted_aten_ops(events)],
                        syncs=[e.name for e in sync_ops(events)])
    if cuda:
        cuda_type = torch.autograd.DeviceType.CUDA
        count.cuda_kernels = sum(1 for e in events if e.device_type == cuda_type)
    return count


# ----- the calls the launch counts are kept for -----

REDUCTIONS = {  # name -> kd_loss keyword arguments (besides the logits and labels)
    "mean": {"reduction": "mean"},
    "sum": {"reduction": "sum"},
    "sum+normalizer": {"reduction": "sum", "normalizer": "tensor"},
    "none": {"reduction": "none"},
}


def kd_loss_launches(reduction: str, *, backward: bool, device="cpu", n_rows: int = 8,
                     vocab: int = 40, dtype=None) -> LaunchCount:
    """Launches of one fastkd.kd_loss call with labels (and of its backward when asked), on
    (n_rows, vocab) logits whose student requires grad. The backward's grad_output is made
    before counting starts (as an optimizer step's loss scale would be)."""
    import torch

    import fastkd

    dtype = dtype or torch.float32
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(n_rows, vocab, generator=generator).to(device, dtype)
    student.requires_grad_(True)
    teacher = torch.randn(n_rows, vocab, generator=generator).to(device, dtype)
    labels = torch.randint(0, vocab, (n_rows,), generator=generator).to(device)
    labels[::3] = -100
    kwargs = dict(REDUCTIONS[reduction])
    if kwargs.get("normalizer") == "tensor":
        kwargs["normalizer"] = torch.tensor(float(n_rows), device=device)
    shape = (n_rows,) if reduction == "none" else ()
    grad_output = torch.ones(shape, device=device)

    def call():
        loss = fastkd.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.5, **kwargs)
        if backward:
            loss.backward(grad_output)

    count = count_launches(call, cuda=torch.device(device).type == "cuda")
    if backward and student.grad is None:
        raise RuntimeError("the backward produced no student gradient")
    return count
