"""Measuring one provider on one case: time, bandwidth, peak memory and error.

GPU: median time from triton.testing.do_bench (CUDA events, L2 flushed and gradients reset between
repetitions); peak memory from torch.cuda.max_memory_allocated after a reset, minus what was
allocated before the call (inputs included).
CPU: median wall time of a few repetitions; peak memory as resident set size (RSS) high-water mark
after the inputs exist, minus the RSS at that point. tracemalloc would miss torch's allocations,
which bypass Python's allocator; RSS sees them. Each provider runs in its own process (see
fastkd.bench.worker), so one provider's freed-but-cached pages never count for another.
"""

from __future__ import annotations

import ctypes
import gc
import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import reference
from .cases import (
    ALPHA,
    IGNORE_INDEX,
    TEMPERATURE,
    Case,
    gradient_buffer_bytes,
    make_inputs,
    make_labels,
    minimal_bytes,
)
from .providers import PROVIDERS, LossFn

# Rows of the gradient compared against float64 (the loss is compared over all rows). A float64
# copy of every row would not fit next to the inputs at N=16384, V=262144 (34 GB per tensor).
ACCURACY_ROWS_GPU = 256
ACCURACY_ROWS_CPU = 32
# Rows of the small CPU warm-up call.
CPU_WARMUP_ROWS = 8
# Rows per chunk of the float64 reference loss: bounds its temporaries to a few hundred MB.
REFERENCE_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Settings:
    device: str
    seed: int = 0
    accuracy_rows: int | None = None
    # do_bench budget per measurement, in ms of GPU time (triton's defaults).
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    # CPU: timed repetitions after the warm-up call, cut short once cpu_budget_s is spent.
    cpu_reps: int = 3
    cpu_budget_s: float = 2.5
    # torch intra-op threads for CPU runs (None: torch's default, one per core).
    cpu_threads: int | None = None
    # Device-copy bandwidth per case name, measured once by the parent of isolated workers so
    # that every provider of a case is compared with the same figure.
    copy_bandwidth: dict = field(default_factory=dict)

    def rows_for_accuracy(self, case: Case) -> int:
        rows = self.accuracy_rows
        if rows is None:
            rows = ACCURACY_ROWS_GPU if self.device == "cuda" else ACCURACY_ROWS_CPU
        return min(rows, case.n_rows)


# ---------------------------------------------------------------------------------------------
# float64 reference


def reference_key(case: Case, seed: int) -> str:
    # The mode does not change the inputs: one reference serves fwd and fwd_bwd.
    return f"N{case.n_rows}-V{case.vocab}-{case.dtype}-seed{seed}"


def compute_reference(case: Case, device: str, seed: int, grad_rows: int) -> dict:
    """float64 loss over all rows and float64 gradient of the first `grad_rows` rows."""
    student, teacher, labels = make_inputs(case, device, seed, requires_grad=False)
    counted = int((labels != IGNORE_INDEX).sum())
    chunk = max(1, REFERENCE_CHUNK_ELEMENTS // case.vocab)
    total = 0.0
    with torch.no_grad():
        for start in range(0, case.n_rows, chunk):
            rows = slice(start, start + chunk)
            total += float(reference.kd_loss(
                student[rows].double(), teacher[rows].double(), labels[rows],
                temperature=TEMPERATURE, alpha=ALPHA, ignore_index=IGNORE_INDEX,
                reduction="sum"))
    scale = 1.0 / max(counted, 1)  # reduction="mean": over counted rows
    head = student[:grad_rows].double().requires_grad_()
    head_loss = reference.kd_loss(head, teacher[:grad_rows].double(), labels[:grad_rows],
                                  temperature=TEMPERATURE, alpha=ALPHA,
                                  ignore_index=IGNORE_INDEX, reduction="sum")
    (head_grad,) = torch.autograd.grad(head_loss, head)
    return {"loss": total * scale, "grad": (head_grad * scale).cpu(), "counted": counted}


class ReferenceStore:
    """float64 references, computed once per input set, optionally cached in a folder so that
    worker processes reuse what the parent computed."""

    def __init__(self, device: str, seed: int, folder: Path | None = None):
        self.device = device
        self.seed = seed
        self.folder = folder
        # Only the latest reference stays in memory: cases come ordered so that consecutive ones
        # share it, and each holds up to 256 float64 rows of V (0.5 GB at V=262144).
        self._memory: dict[str, dict] = {}

    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.pt"

    def get(self, case: Case, grad_rows: int) -> dict:
        key = reference_key(case, self.seed)
        if key in self._memory and self._memory[key]["grad"].shape[0] >= grad_rows:
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.exists():
            ref = torch.load(path)
            if ref["grad"].shape[0] >= grad_rows:
                self._memory = {key: ref}
                return ref
        ref = compute_reference(case, self.device, self.seed, grad_rows)
        self._memory = {key: ref}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ref, path)
        return ref


def errors(loss: float, grad_head: torch.Tensor | None, ref: dict) -> dict:
    """Largest absolute and relative error of the loss and the gradient.

    The gradient's relative error is max|g - g64| / max|g64|: an elementwise ratio would divide
    by entries that are 0 or 1e-12 and say nothing about the gradient's quality.
    """
    ref_loss = ref["loss"]
    out = {
        "loss": loss,
        "loss_abs_err": abs(loss - ref_loss),
        "loss_rel_err": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30),
        "grad_abs_err": None,
        "grad_rel_err": None,
    }
    if grad_head is not None:
        ref_grad = ref["grad"][: grad_head.shape[0]].to(grad_head.device)
        diff = (grad_head - ref_grad).abs().max().item()
        out["grad_abs_err"] = diff
        out["grad_rel_err"] = diff / max(ref_grad.abs().max().item(), 1e-30)
    return out


# ---------------------------------------------------------------------------------------------
# Resident memory on CPU (Linux /proc)


def _read_status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS, so the baseline RSS holds live data only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM); Linux >= 4.0 supports it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class RssPeak:
    """Peak RSS above the RSS at __enter__: VmHWM when it can be reset, else ru_maxrss."""

    def __enter__(self):
        _release_free_heap()
        self.method = "VmHWM" if _reset_peak_rss() else "ru_maxrss"
        self.baseline_kib = _read_status_kib("VmRSS")
        if self.baseline_kib is None:
            self.method = "unavailable"
        return self

    def __exit__(self, *exc):
        if self.method == "VmHWM":
            peak = _read_status_kib("VmHWM")
        elif self.method == "ru_maxrss":
            # Never reset: the process-wide peak, an upper bound if an earlier step went higher.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        else:
            peak = None
        self.peak_bytes = None if peak is None else max(peak - self.baseline_kib, 0) * 1024
        return False


# ---------------------------------------------------------------------------------------------
# Timing


def _cpu_median_ms(step, reset, reps: int, budget_s: float,
                   earlier_ms: list[float] | None = None) -> tuple[float, int]:
    """Median over `earlier_ms` plus up to `reps` more runs, at least one, within budget_s."""
    times = list(earlier_ms or [])
    spent = 0.0
    target = len(times) + reps
    while len(times) < target and (spent == 0.0 or spent < budget_s):
        reset()
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
    return statistics.median(times), len(times)


def _gpu_median_ms(step, grads_to_reset, settings: Settings) -> float:
    from triton.testing import do_bench

    return do_bench(step, warmup=settings.gpu_warmup_ms, rep=settings.gpu_rep_ms,
                    grad_to_none=grads_to_reset, return_mode="median")


_copy_cache: dict[tuple[str, int], float] = {}


def copy_bandwidth(num_bytes: int, settings: Settings) -> float:
    """Bytes/s of a device-to-device copy moving `num_bytes` in all (half read, half written)."""
    key = (settings.device, num_bytes)
    if key not in _copy_cache:
        half = max(num_bytes // 2, 1)
        src = torch.empty(half, dtype=torch.uint8, device=settings.device)
        src.fill_(1)
        dst = torch.empty_like(src)
        if settings.device == "cuda":
            ms = _gpu_median_ms(lambda: dst.copy_(src), None, settings)
        else:
            dst.copy_(src)  # first touch of dst's pages is not a copy cost
            ms, _ = _cpu_median_ms(lambda: dst.copy_(src), lambda: None, settings.cpu_reps,
                                   settings.cpu_budget_s)
        _copy_cache[key] = 2 * half / (ms * 1e-3)
        del src, dst
    return _copy_cache[key]


# ---------------------------------------------------------------------------------------------
# One provider, one case


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def base_record(case: Case, provider: str, settings: Settings) -> dict:
    return {"case": case.name, **case.to_dict(), "provider": provider, "device": settings.device,
            "status": "ok", "reason": None}


def measure(case: Case, provider_name: str, settings: Settings, references: ReferenceStore,
            built: dict[str, LossFn]) -> dict:
    """Everything the report needs about one provider on one case; never raises."""
    provider = PROVIDERS[provider_name]
    record = base_record(case, provider_name, settings)
    reason = provider.skip_reason(case, settings.device)
    if reason is not None:
        record.update(status="skipped", reason=reason)
        return record
    tensors: list = []
    try:
        if provider_name not in built:
            built[provider_name] = provider.build(settings.device)
        _measure_into(record, case, built[provider_name], settings, references, tensors)
    except Exception as exc:  # noqa: BLE001 - the report says which provider failed and why
        record["status"] = "oom" if _is_oom(exc) else "error"
        record["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        tensors.clear()
        gc.collect()
        if settings.device == "cuda":
            torch.cuda.empty_cache()
    return record


def _measure_into(record, case, fn, settings, references, tensors):
    device = settings.device
    is_cuda = device == "cuda"
    backward = case.mode == "fwd_bwd"
    rows = settings.rows_for_accuracy(case)
    ref = references.get(case, rows)
    counted = int((make_labels(case, settings.seed) != IGNORE_INDEX).sum())
    num_bytes = minimal_bytes(case, counted)
    # Measured before the inputs exist, so the largest cases still fit next to the copy buffers.
    copy_bw = settings.copy_bandwidth.get(case.name) or copy_bandwidth(num_bytes, settings)

    student, teacher, labels = make_inputs(case, device, settings.seed)
    tensors += [student, teacher, labels]

    def step():
        loss = fn(student, teacher, labels)
        if backward:
            loss.backward()
        return loss

    def reset_grad():
        student.grad = None

    def check(loss):
        # Errors come from the first full-size call, before an in-place provider (fastkd
        # inplace_backward, Liger's cross-entropy) overwrites the inputs on a later call.
        grad_head = student.grad[:rows].double() if backward else None
        record.update(errors(float(loss.detach()), grad_head, ref))

    if is_cuda:
        # Full-size warm-up: static-shape torch.compile compiles for exactly this shape.
        check(step())
        reset_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        record["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
        record["memory_method"] = "torch.cuda.max_memory_allocated"
        reset_grad()
        time_ms = _gpu_median_ms(step, [student] if backward else None, settings)
        record["reps"] = None
    else:
        # CPU runs are seconds long: warm up on a few cloned rows (lazy initialisation, and the
        # dynamic-shape compile that then serves the full shape), then one full-size call gives
        # the error, the peak memory and the first timing sample.
        few = slice(0, min(CPU_WARMUP_ROWS, case.n_rows))
        warm_student = student.detach()[few].clone().requires_grad_(backward)
        warm_loss = fn(warm_student, teacher[few].clone(), labels[few].clone())
        if backward:
            warm_loss.backward()
        del warm_student, warm_loss
        with RssPeak() as peak:
            start = time.perf_counter()
            loss = step()
            first_ms = (time.perf_counter() - start) * 1e3
        record["peak_mem_bytes"] = peak.peak_bytes
        record["memory_method"] = peak.method
        check(loss)
        del loss
        reset_grad()
        time_ms, reps = _cpu_median_ms(step, reset_grad, settings.cpu_reps - 1,
                                       settings.cpu_budget_s - first_ms * 1e-3, [first_ms])
        record["reps"] = reps
    reset_grad()
    record["time_ms"] = time_ms
    record["bytes"] = num_bytes
    record["bandwidth_gbps"] = num_bytes / (time_ms * 1e-3) / 1e9
    record["copy_bandwidth_gbps"] = copy_bw / 1e9
    record["fraction_of_copy"] = record["bandwidth_gbps"] / record["copy_bandwidth_gbps"]
    record["grad_buffer_bytes"] = gradient_buffer_bytes(case)
    for key in ("loss", "loss_abs_err", "loss_rel_err"):
        if record[key] is not None and not math.isfinite(record[key]):
            record["reason"] = f"non-finite {key}"
