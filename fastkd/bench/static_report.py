"""Static report of the shipped Triton kernels, compiled ahead of time (no GPU needed).

What is compiled. `KERNELS` is the one table of launch configurations: per kernel, the shipped
launcher to call and the axes it specializes on (dtype, row length class, labels, which
gradients, T == 1, ...). Every point of an entry's axes is one configuration. For each, the
launcher itself runs on stand-in CPU tensors (data pointers 16-byte aligned like CUDA
allocations, row counts and row lengths multiples of 16 like real token batches and
vocabularies) while `JITFunction.run` is intercepted: the launch it would make (arguments,
constexprs, warps) is captured, not executed, and compiled with `triton.compile` for a
`GPUTarget` (sm_80, sm_90a) with the specialization Triton's binder gives those arguments. No
argument list is copied here, so a new kernel, or a new constexpr of a launcher, is one table
entry or one axis value.

What is measured, with the cuobjdump from the triton wheel: registers, stack frame and local
memory (spill_bytes) from the resource usage; from the SASS:

- Loops are found by their backward branches: a `BRA` to a lower address closes a loop whose
  body is [target, branch]. Element loops are the loops with a plain global load (LDG; a loop
  whose only loads are the .STRONG polls of a wait on a counter does not count) that contain no
  other such loop; the ignored-row loop that only stores zeros has no load, nor does the trap
  `BRA` to itself after the last `EXIT`.
- long_rows kernels (rows streamed block by block, or a persistent loop over rows): per-element
  counts are the instructions (NOPs excluded), MUFU.EX2, and LDG/STG bytes (from each
  instruction's width: .128 = 16 bytes, .64 = 8, .U16 = 2, plain = 4) of one iteration of each
  element loop (the longest path through its body, inner loops cut at their back edge), summed
  over the element loops (both sweeps of a two-sweep kernel) and divided by the elements one
  thread handles per iteration, BLOCK / (32 * num_warps). A long_rows kernel without an
  element loop would have zero per-element counts. Per-row work inside an element loop (the
  split kernel's statistics exchange) counts as if every thread issued it.
- On-chip kernels (the whole row in registers): the same counts along the longest path from the
  kernel's entry to an exit (the branch graph with loops cut at their back edge and calls not
  followed: what a counted row executes, its per-row prologue and epilogue included, the
  ignored-row branch not), divided by the elements per thread, BLOCK / (32 * num_warps).
- ctas_per_sm: the smallest of the register limit (registers per thread rounded up to a
  256-register allocation per warp, warps per SM rounded down to a multiple of 4), the shared
  memory limit (static + dynamic shared memory plus the 1 KB the driver reserves per CTA,
  against 228 KB on sm_90a and 164 KB on sm_80), 64 warps and 32 CTAs per SM.

Triton must not be in interpreter mode here (TRITON_INTERPRET=1 swaps the kernels for Python
functions); `collect` re-runs itself in a clean subprocess when it is. Compiles are cached by
Triton's own cache (TRITON_CACHE_DIR), the measurements of each cubin beside it
(fastkd-static/, keyed by the kernel's hash, the analysis parameters and this module's source),
so a second report neither compiles nor disassembles again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from fastkd._spec import DIVERGENCES, ONLINE_DIVERGENCES

ARCHS = {"sm_80": 80, "sm_90a": 90}
# Per-SM limits of the occupancy computation (CUDA occupancy calculator, compute capability 8.0
# and 9.0): 64K registers allocated per warp in units of 256, warps in groups of 4, shared memory
# in 128-byte units plus 1 KB reserved per CTA.
SM_LIMITS = {
    "sm_80": {"registers": 65536, "shared_bytes": 164 * 1024, "warps": 64, "ctas": 32},
    "sm_90a": {"registers": 65536, "shared_bytes": 228 * 1024, "warps": 64, "ctas": 32},
}
REGISTER_UNIT = 256
WARP_GRANULARITY = 4
SHARED_UNIT = 128
SHARED_RESERVED_PER_CTA = 1024

# Rows in the stand-in launch: a multiple of 16, like real token batches, so that strides which
# equal N (the unused gradient placeholder) specialize as they would in training.
STAND_IN_ROWS = 16
# Shards in the stand-in vocab-parallel launch (a common tensor-parallel degree).
STAND_IN_WORLD_SIZE = 8
# (student, teacher) gradients.
GRADS = ((True, False), (False, False), (True, True), (False, True))
GRAD_NAMES = {(True, False): "s-grad", (False, False): "no-grad", (True, True): "s+t-grad",
              (False, True): "t-grad"}
DTYPES = ("bf16", "fp32")


@dataclass(frozen=True)
class Case:
    """One point of a kernel's launch axes (what the launcher specializes on)."""

    dtype: str = "bf16"
    vocab: int = 32000  # row length (a shard's width for the vocab-parallel kernels)
    has_labels: bool = True
    grads: tuple[bool, bool] = (True, False)  # (student, teacher)
    temperature: float = 2.0
    divergence: str = "forward_kl"
    label_smoothing: float = 0.0
    per_row_scale: bool = False  # scale_rows: grad_output with one value per row ("none")
    k: int = 0  # top-k teachers: entries per row
    tail: str = "bucket"  # top-k teachers: "bucket" or "renormalize"
    stored_tail: bool = False  # top-k teachers: a stored tail log-prob per row

    @property
    def temperature_is_one(self) -> bool:
        return self.temperature == 1.0

    def options(self):
        """The validated loss options of this case (ValueError: not a valid configuration)."""
        from fastkd._spec import check_loss_options

        return check_loss_options(
            temperature=self.temperature, alpha=0.5 if self.has_labels else 1.0,
            divergence=self.divergence, label_smoothing=self.label_smoothing,
            has_labels=self.has_labels)


@dataclass(frozen=True)
class Kernel:
    """A table entry: how to launch one shipped kernel and which configurations it has."""

    jit: str  # "module:attribute" of the JITFunction
    launch: Callable[[Case], None]  # calls the shipped launcher on stand-in tensors
    axes: dict  # Case field -> values; the configurations are their valid combinations
    vocab_classes: dict  # row length class name -> stand-in row length
    # Subsets of the axes' product, each the configurations that match any of its rules
    # ({axis: allowed values}): the full report's and the fast test's.
    full: tuple = ({},)
    core: tuple = ()
    long_rows: Callable[[dict], bool] = lambda constexprs: True  # from the captured constexprs
    # Whether auto runs it for LLM vocabularies: (vocab class, case) -> bool.
    default: Callable[[str, Case], bool] = lambda vocab_class, case: False
    block: str = "BLOCK_V"  # constexpr: row elements one program handles per iteration


# ----- the calls into the shipped launchers (the only code that knows their signatures) -----

def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def _stand_in_rows(case: Case):
    """Student, teacher, labels, reduction weight and gradient buffers as a training call has
    them."""
    import torch

    dtype = _torch_dtype(case.dtype)
    student = torch.empty(STAND_IN_ROWS, case.vocab, dtype=dtype)
    teacher = torch.empty(STAND_IN_ROWS, case.vocab, dtype=dtype)
    labels = torch.zeros(STAND_IN_ROWS, dtype=torch.int64) if case.has_labels else None
    weight = torch.ones((), dtype=torch.float32)
    grad_student = torch.empty_like(student) if case.grads[0] else None
    grad_teacher = torch.empty_like(teacher) if case.grads[1] else None
    return student, teacher, labels, weight, grad_student, grad_teacher


def _launch_kd_fwd(case: Case) -> None:
    import torch

    from fastkd._spec import NUM_ROW_STATS
    from fastkd.kernels import kd_loss

    student, teacher, labels, weight, grad_student, grad_teacher = _stand_in_rows(case)
    row_stats = torch.empty(STAND_IN_ROWS, NUM_ROW_STATS, dtype=torch.float32)
    kd_loss.kd_rows(student, teacher, labels, weight, row_stats, grad_student, grad_teacher,
                    case.options())


def _launch_vp_stats(case: Case) -> None:
    from fastkd.kernels import kd_vocab_parallel

    student, teacher, labels, *_ = _stand_in_rows(case)
    kd_vocab_parallel.shard_stats(student, teacher, labels, vocab_start=0,
                                  options=case.options())


def _stand_in_row_state(options):
    """The combined row state of STAND_IN_WORLD_SIZE shards (values do not matter here)."""
    import torch

    from fastkd import _torch_backend

    gathered = torch.zeros(STAND_IN_WORLD_SIZE, STAND_IN_ROWS, _torch_backend.NUM_STATS)
    return _torch_backend.combine_stats(gathered, options)


def _launch_vp_sums(case: Case) -> None:
    from fastkd.kernels import kd_vocab_parallel

    options = case.options()
    student, teacher, labels, *_ = _stand_in_rows(case)
    kd_vocab_parallel.shard_divergence_sums(_stand_in_row_state(options), student, teacher,
                                            options, labels=labels)


def _launch_vp_grads(case: Case) -> None:
    import torch

    from fastkd import _torch_backend
    from fastkd.kernels import kd_vocab_parallel

    options = case.options()
    student, teacher, labels, weight, grad_student, grad_teacher = _stand_in_rows(case)
    state = _stand_in_row_state(options)
    sums = (None if options.divergence_id in ONLINE_DIVERGENCES
            else torch.zeros(STAND_IN_ROWS, 3))
    _, a_sum, b_sum = _torch_backend.row_statistics(state, sums, labels, options)
    kd_vocab_parallel.shard_grads(state, a_sum, b_sum, student, teacher, labels, weight, options,
                                  vocab_start=0, grad_student=grad_student,
                                  grad_teacher=grad_teacher)


def _launch_kd_topk(case: Case) -> None:
    import torch

    from fastkd._spec import NUM_ROW_STATS
    from fastkd.kernels import kd_topk

    student, _, labels, weight, grad_student, _ = _stand_in_rows(case)
    ids = torch.zeros(STAND_IN_ROWS, case.k, dtype=torch.int64)
    values = torch.zeros(STAND_IN_ROWS, case.k, dtype=student.dtype)
    tail_logprob = torch.zeros(STAND_IN_ROWS) if case.stored_tail else None
    row_stats = torch.empty(STAND_IN_ROWS, NUM_ROW_STATS, dtype=torch.float32)
    kd_topk.topk_rows(student, ids, values, tail_logprob, labels, weight, row_stats,
                      grad_student, tail=case.tail, options=case.options())


def _launch_kd_split(case: Case) -> None:
    import torch

    from fastkd._spec import NUM_ROW_STATS
    from fastkd.kernels import kd_split

    student, teacher, labels, weight, grad_student, grad_teacher = _stand_in_rows(case)
    row_stats = torch.empty(STAND_IN_ROWS, NUM_ROW_STATS, dtype=torch.float32)
    kd_split.split_rows(student, teacher, labels, weight, row_stats, grad_student,
                        grad_teacher, case.options())


def _auto_long_rows(vocab: int) -> str:
    """The long-row strategy auto picks for `vocab` (kernels/kd_loss.py's measured table)."""
    from fastkd.kernels import kd_loss

    return kd_loss.AUTO_LONG_ROWS.get(vocab, "loop")


def _launch_scale_rows(case: Case) -> None:
    import torch

    from fastkd.kernels import kd_loss

    grad = torch.empty(STAND_IN_ROWS, case.vocab, dtype=_torch_dtype(case.dtype))
    factor = torch.ones(STAND_IN_ROWS if case.per_row_scale else (), dtype=torch.float32)
    kd_loss.scale_rows_(grad, factor)


# ----- the table -----

# The divergences that need the row sums sweep (kernel 2 of the vocab-parallel loss).
_SWEEP_DIVERGENCES = tuple(name for i, name in enumerate(DIVERGENCES)
                           if i not in ONLINE_DIVERGENCES)
_FLAGS = {"has_labels": (True, False), "grads": GRADS, "temperature": (2.0, 1.0),
          "divergence": DIVERGENCES, "label_smoothing": (0.0, 0.1)}
# The training call: labels, student gradient, forward KL, no smoothing (T = 2 and T = 1).
_TRAINING = {"has_labels": (True,), "grads": ((True, False),), "divergence": ("forward_kl",),
             "label_smoothing": (0.0,)}
# The fast test's training calls: bf16 at T = 2 and T = 1.
_CORE_TRAINING = {**_TRAINING, "dtype": ("bf16",)}
# Every divergence's training call at T = 2 on the kernel that LLM vocabularies take.
_EVERY_DIVERGENCE = {"dtype": ("bf16",), "has_labels": (True,), "grads": ((True, False),),
                     "temperature": (2.0,), "label_smoothing": (0.0,)}
# The full report: forward KL's whole flag matrix, every divergence's training call (T = 2 and
# T = 1), and label smoothing on forward KL's training call at T = 2.
_FULL = ({"divergence": ("forward_kl",), "label_smoothing": (0.0,)},
         {"has_labels": (True,), "grads": ((True, False),), "label_smoothing": (0.0,)},
         {"has_labels": (True,), "grads": ((True, False),), "divergence": ("forward_kl",),
          "temperature": (2.0,)})


def _without_grads(rule: dict) -> dict:
    return {axis: values for axis, values in rule.items() if axis != "grads"}


KERNELS: dict[str, Kernel] = {
    # The fused loss: on-chip classes (the whole row in registers: 4096 and 8192 blocks; smaller
    # rows get smaller blocks with the same 16 values per thread) and the looping kernel that
    # every LLM vocabulary takes (two sweeps, three for the divergences that need row sums).
    "kd_fwd": Kernel(
        jit="fastkd.kernels.kd_loss:_kd_loss_fwd_kernel",
        launch=_launch_kd_fwd,
        axes={"dtype": DTYPES, "vocab": ("on-chip 4096", "on-chip 8192", "LLM"), **_FLAGS},
        vocab_classes={"on-chip 4096": 4000, "on-chip 8192": 8000, "LLM": 32000},
        full=_FULL,
        # The training calls; fp32's at T = 2 on the 8192 class and the loop; the other flag
        # combinations that take the most registers in the 8192 class (the register-hungriest:
        # the whole row in registers), at T = 2 with forward KL; every divergence's training
        # call on the 8192 class and the loop.
        core=(_CORE_TRAINING,
              {**_TRAINING, "dtype": ("fp32",), "vocab": ("on-chip 8192", "LLM"),
               "temperature": (2.0,)},
              {"dtype": ("bf16",), "vocab": ("on-chip 8192",), "temperature": (2.0,),
               "grads": ((True, False), (True, True)), "divergence": ("forward_kl",),
               "label_smoothing": (0.0,)},
              {**_EVERY_DIVERGENCE, "vocab": ("on-chip 8192", "LLM")}),
        long_rows=lambda constexprs: not constexprs["ON_CHIP"],
        default=lambda vocab_class, case: (vocab_class == "LLM"
                                           and _auto_long_rows(case.vocab) == "loop"),
    ),
    # Vocab-parallel: statistics sweep over a shard (kernel 1); after the all-gather, for the
    # divergences that need them, the shard's row sums (kernel 2); then the shard's gradient
    # (kernel 3).
    "vp_stats": Kernel(
        jit="fastkd.kernels.kd_vocab_parallel:_vp_stats_kernel",
        launch=_launch_vp_stats,
        axes={"dtype": DTYPES, "vocab": ("shard",), "has_labels": (True, False),
              "grads": ((False, False),), "temperature": (2.0, 1.0),
              "divergence": DIVERGENCES, "label_smoothing": (0.0, 0.1)},
        vocab_classes={"shard": 32000},
        full=tuple(_without_grads(rule) for rule in _FULL),
        core=(_without_grads(_CORE_TRAINING),),
    ),
    "vp_sums": Kernel(
        jit="fastkd.kernels.kd_vocab_parallel:_vp_rows_kernel",
        launch=_launch_vp_sums,
        axes={"dtype": DTYPES, "vocab": ("shard",), "has_labels": (True, False),
              "grads": ((False, False),), "temperature": (2.0, 1.0),
              "divergence": _SWEEP_DIVERGENCES, "label_smoothing": (0.0,)},
        vocab_classes={"shard": 32000},
        full=({"has_labels": (True,)},),
        core=({"dtype": ("bf16",), "has_labels": (True,), "temperature": (2.0,),
               "divergence": ("jsd",)},),
    ),
    "vp_grads": Kernel(
        jit="fastkd.kernels.kd_vocab_parallel:_vp_rows_kernel",
        launch=_launch_vp_grads,
        # Launched only when some gradient is wanted.
        axes={"dtype": DTYPES, "vocab": ("shard",),
              **{**_FLAGS, "grads": tuple(grads for grads in GRADS if any(grads))}},
        vocab_classes={"shard": 32000},
        full=_FULL,
        core=(_CORE_TRAINING,),
    ),
    # Sparse teachers: k stored (id, value) entries per row against the dense student.
    "kd_topk": Kernel(
        jit="fastkd.kernels.kd_topk:_kd_topk_kernel",
        launch=_launch_kd_topk,
        axes={"dtype": DTYPES, "vocab": ("on-chip 8192", "LLM"), "has_labels": (True, False),
              "grads": ((True, False), (False, False)), "temperature": (2.0, 1.0),
              "k": (64, 2048), "tail": ("bucket", "renormalize"), "stored_tail": (False, True)},
        vocab_classes={"on-chip 8192": 8000, "LLM": 128256},
        full=({"has_labels": (True,), "grads": ((True, False),), "stored_tail": (False,)},
              {"k": (64,), "tail": ("bucket",), "temperature": (2.0,)}),
        # Both tails with one chunk of entries (k = 64) at T = 2, bucket at T = 1, and several
        # chunks (k = 2048) on the loop.
        core=({"dtype": ("bf16",), "has_labels": (True,), "grads": ((True, False),),
               "temperature": (2.0,), "k": (64,), "stored_tail": (False,)},
              {"dtype": ("bf16",), "vocab": ("LLM",), "has_labels": (True,),
               "grads": ((True, False),), "k": (64,), "tail": ("bucket",),
               "stored_tail": (False,)},
              {"dtype": ("fp32",), "vocab": ("LLM",), "has_labels": (True,),
               "grads": ((True, False),), "temperature": (2.0,), "k": (2048,),
               "tail": ("renormalize",), "stored_tail": (False,)}),
        long_rows=lambda constexprs: not constexprs["ON_CHIP"],
        default=lambda vocab_class, case: vocab_class == "LLM",
    ),
    # Long rows split over co-resident programs (FASTKD_LONG_ROWS=split): one persistent,
    # cooperative launch; each program keeps its slice of a row in registers.
    "kd_split": Kernel(
        jit="fastkd.kernels.kd_split:_split_kernel",
        launch=_launch_kd_split,
        axes={"dtype": DTYPES, "vocab": ("LLM", "LLM 128256"), **_FLAGS},
        vocab_classes={"LLM": 32000, "LLM 128256": 128256},
        full=_FULL,
        core=({**_CORE_TRAINING, "vocab": ("LLM",), "temperature": (2.0,)},),
        block="SLICE",
        default=lambda vocab_class, case: _auto_long_rows(case.vocab) == "split",
    ),
    # Backward: the saved gradient times grad_output (skipped on the device when it is 1).
    "scale_rows": Kernel(
        jit="fastkd.kernels.kd_loss:_scale_rows_kernel",
        launch=_launch_scale_rows,
        axes={"dtype": DTYPES, "vocab": ("LLM",), "has_labels": (False,),
              "grads": ((True, False),), "temperature": (1.0,), "per_row_scale": (False, True)},
        vocab_classes={"LLM": 32000},
        core=({"dtype": ("bf16",), "per_row_scale": (False,)},),
    ),
}


@dataclass(frozen=True)
class Config:
    """One compiled configuration: a table entry, a point of its axes and an architecture."""

    kernel: str
    arch: str
    vocab_class: str
    case: Case

    @property
    def name(self) -> str:
        case, axes = self.case, KERNELS[self.kernel].axes
        if self.kernel == "scale_rows":
            return f"scale_rows {case.dtype} {'per-row' if case.per_row_scale else 'scalar'}"
        parts = [self.kernel, case.dtype, self.vocab_class,
                 "labels" if case.has_labels else "no-labels"]
        if len(axes.get("grads", ())) > 1:
            parts.append(GRAD_NAMES[case.grads])
        parts.append("T=1" if case.temperature_is_one else f"T={case.temperature:g}")
        if len(axes.get("divergence", ())) > 1:
            parts.append(case.divergence)
        if case.label_smoothing:
            parts.append(f"smoothing={case.label_smoothing:g}")
        if case.k:
            parts.append(f"{case.tail} k={case.k}" + (" stored-tail" if case.stored_tail else ""))
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "arch": self.arch, "vocab_class": self.vocab_class,
                "case": asdict(self.case)}

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        case = dict(data["case"])
        case["grads"] = tuple(case["grads"])
        return cls(data["kernel"], data["arch"], data["vocab_class"], Case(**case))


def _axis_points(axes: dict):
    names = list(axes)
    for values in itertools.product(*(axes[name] for name in names)):
        yield dict(zip(names, values, strict=True))


def shipped_configs(archs=("sm_80", "sm_90a"), dtypes=DTYPES, scope: str = "full",
                    kernels=None) -> list[Config]:
    """Every configuration of the table (scope="full") or the fast test's subset ("core")."""
    configs = []
    for name, entry in KERNELS.items():
        if kernels is not None and name not in kernels:
            continue
        for arch in archs:
            for point in _axis_points(entry.axes):
                if point.get("dtype", "bf16") not in dtypes:
                    continue
                rules = entry.core if scope == "core" else entry.full
                if not any(all(point[axis] in allowed for axis, allowed in rule.items())
                           for rule in rules):
                    continue
                vocab_class = point.pop("vocab")
                case = Case(vocab=entry.vocab_classes[vocab_class], **point)
                try:
                    case.options()
                except ValueError:  # e.g. label smoothing without labels: not a launch
                    continue
                configs.append(Config(name, arch, vocab_class, case))
    return configs


# ----- capture, compile, analyse -----

class _Captured(Exception):
    """Raised out of the launcher once the kernel of interest has been captured."""


@contextlib.contextmanager
def _captured_launches(target):
    """Within the block, `kernel[grid](...)` (and `kernel.warmup(...)`) records (kernel, args,
    kwargs) instead of compiling or launching; reaching `target` ends the launcher's call."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.run

    def capture(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))
        if self is target:
            raise _Captured

    JITFunction.run = capture
    try:
        yield launches
    except _Captured:
        pass
    finally:
        JITFunction.run = original


def _resolve(path: str):
    import importlib

    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def capture_launch(config: Config):
    """(JITFunction, args, kwargs) of the launch the shipped launcher makes for `config`."""
    entry = KERNELS[config.kernel]
    target = _resolve(entry.jit)
    with _captured_launches(target) as launches:
        entry.launch(config.case)
    matching = [launch for launch in launches if launch[0] is target]
    if len(matching) != 1:
        names = [launch[0].__name__ for launch in launches]
        raise RuntimeError(f"{config.kernel}: expected one launch of {entry.jit}, got {names}")
    return matching[0]


def cuobjdump_path() -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


_RESOURCE_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_SASS_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass(frozen=True)
class Instruction:
    address: int
    predicated: bool
    opcode: str  # with its modifiers, e.g. LDG.E.128
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def branch_target(self) -> int | None:
        if self.base != "BRA" or not self.operands:
            return None
        return int(self.operands.split()[0].rstrip(","), 16)


def parse_sass(sass: str) -> list[Instruction]:
    """Every instruction of a cuobjdump SASS listing, in address order."""
    return [Instruction(int(m.group(1), 16), m.group(2) is not None, m.group(3),
                        m.group(4).strip()) for m in _SASS_RE.finditer(sass)]


def find_loops(instructions) -> list[tuple[int, int]]:
    """(first, last) addresses of every loop body: a branch back to a lower address."""
    return [(ins.branch_target, ins.address) for ins in instructions
            if ins.branch_target is not None and ins.branch_target < ins.address]


def element_loops(instructions) -> list[tuple[int, int]]:
    """The loops over a row's elements: loops with a plain global load (not only the .STRONG
    polls of a loop that waits on a counter) that contain no other such loop."""
    reading = [(first, last) for first, last in find_loops(instructions)
               if any(ins.base == "LDG" and "STRONG" not in ins.opcode.split(".")
                      for ins in instructions if first <= ins.address <= last)]
    return [loop for loop in reading
            if not any(other != loop and loop[0] <= other[0] and other[1] <= loop[1]
                       for other in reading)]


def longest_path(instructions) -> list[Instruction]:
    """The instructions of the longest path from the entry to an exit, loops cut at their back
    edge and calls not followed: what one row executes on the kernel's most expensive branch."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    leaders = {0}
    for i, ins in enumerate(instructions):
        if ins.base in ("BRA", "EXIT", "RET"):
            leaders.add(i + 1)
            if ins.branch_target in index:
                leaders.add(index[ins.branch_target])
    starts = sorted(leader for leader in leaders if leader < len(instructions))
    blocks = [instructions[a:b] for a, b in zip(starts, starts[1:] + [len(instructions)],
                                                strict=True)]
    block_of = {block[0].address: k for k, block in enumerate(blocks)}

    def successors(k):
        last = blocks[k][-1]
        out = []
        target = last.branch_target
        if target is not None and target > last.address and target in block_of:
            out.append(block_of[target])
        falls_through = last.predicated or last.base not in ("BRA", "EXIT", "RET")
        if falls_through and k + 1 < len(blocks):
            out.append(k + 1)
        return out

    # Forward edges only, so block order is a topological order: relax from the last block.
    best: list[tuple[int, list[int]]] = [(0, [])] * len(blocks)
    for k in range(len(blocks) - 1, -1, -1):
        weight = sum(1 for ins in blocks[k] if ins.opcode != "NOP")
        tails = [best[j] for j in successors(k)]
        tail = max(tails, key=lambda t: t[0]) if tails else (0, [])
        best[k] = (weight + tail[0], [k, *tail[1]])
    return [ins for k in best[0][1] for ins in blocks[k]]


def _access_bytes(opcode: str) -> int:
    modifiers = set(opcode.split(".")[1:])
    for width, size in (("256", 32), ("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1),
                        ("S8", 1)):
        if width in modifiers:
            return size
    return 4


def per_element(instructions, elements_per_thread: float, long_rows: bool) -> dict:
    """Per-element instructions, EX2 and global bytes (method in the module docstring)."""
    if long_rows:
        loops = element_loops(instructions)
        # One iteration of each: the longest path through its body, inner loops cut.
        body = [ins for first, last in loops
                for ins in longest_path([i for i in instructions if first <= i.address <= last])]
    else:
        loops = []
        body = longest_path(instructions)

    def per(count):
        return round(count / elements_per_thread, 3)

    return {
        "element_loops": len(loops),
        "instructions_per_element": per(sum(1 for ins in body if ins.opcode != "NOP")),
        "ex2_per_element": per(sum(1 for ins in body if ins.opcode == "MUFU.EX2")),
        "ldg_bytes_per_element": per(sum(_access_bytes(ins.opcode) for ins in body
                                         if ins.base == "LDG")),
        "stg_bytes_per_element": per(sum(_access_bytes(ins.opcode) for ins in body
                                         if ins.base == "STG")),
    }


def ctas_per_sm(arch: str, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident CTAs per SM from registers, shared memory and warps (see the module docstring)."""
    limits = SM_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_regs = limits["registers"] // regs_per_warp // WARP_GRANULARITY * WARP_GRANULARITY
    by_regs = warps_by_regs // num_warps
    shared = -(-shared_bytes // SHARED_UNIT) * SHARED_UNIT + SHARED_RESERVED_PER_CTA
    by_shared = limits["shared_bytes"] // shared
    by_warps = limits["warps"] // num_warps
    return min(by_regs, by_shared, by_warps, limits["ctas"])


def _dump(tool: Path, cubin: bytes) -> str:
    """cuobjdump's resource usage and SASS of a cubin, in one listing."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
        cubin_path = handle.name
    try:
        return subprocess.run([str(tool), "--dump-resource-usage", "--dump-sass", cubin_path],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(cubin_path)


def compile_launch(kernel, args, kwargs, arch: str):
    """triton.compile of a captured launch for `arch`, specialized as a real launch would be."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", ARCHS[arch], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    named_constexprs = {kernel.arg_names[key[0]]: value for key, value in constexprs.items()
                        if len(key) == 1 and isinstance(value, (bool, int, float, str))}
    return compiled, named_constexprs


def _analysis_cache(compiled, *parameters) -> Path:
    """Where the measurements of one cubin are kept: next to Triton's cache, keyed by the
    compiled kernel's hash, the analysis parameters and this module's source."""
    import hashlib

    import triton

    text = json.dumps([compiled.metadata.hash, *parameters]).encode()
    key = hashlib.sha256(text + Path(__file__).read_bytes()).hexdigest()
    return Path(triton.knobs.cache.dir) / "fastkd-static" / f"{key}.json"


def _analyse(compiled, arch: str, num_warps: int, elements_per_thread: float,
             long_rows: bool) -> dict:
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found in the triton wheel")
    listing = _dump(tool, compiled.asm["cubin"])
    resources = {k.lower(): int(v) for k, v in _RESOURCE_RE.findall(listing)}
    instructions = parse_sass(listing)
    ops = [ins.base for ins in instructions]
    registers = resources.get("reg", 0)
    shared = resources.get("shared", 0) + compiled.metadata.shared
    return {
        "registers": registers,
        "spill_bytes": resources.get("stack", 0) + resources.get("local", 0),
        "local_loads": ops.count("LDL"),
        "local_stores": ops.count("STL"),
        "shared_bytes": shared,
        "ctas_per_sm": ctas_per_sm(arch, registers, num_warps, shared),
        **per_element(instructions, elements_per_thread, long_rows),
        "sass_instructions": len(instructions),
    }


def measure(config: Config) -> dict:
    """Compile one configuration and measure its cubin; never raises (errors are reported)."""
    entry = KERNELS[config.kernel]
    case = config.case
    row = {"config": config.name, "arch": config.arch, "kernel": config.kernel,
           "dtype": case.dtype, "vocab_class": config.vocab_class, "vocab": case.vocab,
           "has_labels": case.has_labels, "student_grad": case.grads[0],
           "teacher_grad": case.grads[1], "temperature_is_one": case.temperature_is_one,
           "divergence": case.divergence, "label_smoothing": case.label_smoothing}
    try:
        kernel, args, kwargs = capture_launch(config)
        compiled, constexprs = compile_launch(kernel, args, kwargs, config.arch)
        num_warps = compiled.metadata.num_warps
        block = constexprs[entry.block]
        elements_per_thread = block / (32 * num_warps)
        long_rows = bool(entry.long_rows(constexprs))
        parameters = (config.arch, num_warps, elements_per_thread, long_rows)
        cache = _analysis_cache(compiled, *parameters)
        if cache.exists():
            analysis = json.loads(cache.read_text())
        else:
            analysis = _analyse(compiled, *parameters)
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(analysis))
            partial.replace(cache)
        row.update({
            "long_rows": long_rows,
            "default": bool(entry.default(config.vocab_class, config.case)),
            "num_warps": num_warps,
            "block": block,
            "elements_per_thread": elements_per_thread,
            **analysis,
        })
    except Exception as exc:  # noqa: BLE001 - one bad configuration must not hide the others
        message = str(exc).splitlines()[0][:300] if str(exc) else ""
        row["error"] = f"{type(exc).__name__}: {message}"
    return row


def _measure_dict(data: dict) -> dict:
    return measure(Config.from_dict(data))


def collect(configs: list[Config], jobs: int | None = None) -> list[dict]:
    """Compile `configs` (in parallel processes) and return one row per configuration."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _collect_in_clean_process(configs, jobs)
    jobs = jobs or min(len(configs), os.cpu_count() or 1)
    if jobs <= 1:
        return [measure(c) for c in configs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_measure_dict, [c.to_dict() for c in configs]))


def _collect_in_clean_process(configs, jobs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps({"configs": [c.to_dict() for c in configs], "jobs": jobs})
    out = subprocess.run([sys.executable, "-m", "fastkd.bench.static_report"], input=payload,
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out)


def table(rows: list[dict]) -> str:
    lines = ["| arch | config | warps | block | regs | spill B | CTAs/SM | instr/el | EX2/el "
             "| LDG B/el | STG B/el |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['config']} | error: {r['error']} "
                         "| | | | | | | | |")
            continue
        lines.append(
            f"| {r['arch']} | {r['config']} | {r['num_warps']} | {r['block']} "
            f"| {r['registers']} | {r['spill_bytes']} | {r['ctas_per_sm']} "
            f"| {r['instructions_per_element']:.2f} | {r['ex2_per_element']:.2f} "
            f"| {r['ldg_bytes_per_element']:.2f} | {r['stg_bytes_per_element']:.2f} |")
    spilling = [f"{r['arch']} {r['config']}" for r in rows if r.get("spill_bytes")]
    lines.append("")
    lines.append("Spills: " + (", ".join(spilling) if spilling else "none") + ".")
    return "\n".join(lines)


def document(rows: list[dict]) -> dict:
    """The machine-readable report: one entry per configuration, and what produced it."""
    import triton

    return {"triton_version": triton.__version__, "archs": sorted({r["arch"] for r in rows}),
            "kernels": sorted({r["kernel"] for r in rows}), "entries": rows}


def _main_stdin() -> int:
    request = json.loads(sys.stdin.read())
    configs = [Config.from_dict(c) for c in request["configs"]]
    print(json.dumps(collect(configs, request.get("jobs"))))
    return 0


if __name__ == "__main__":
    sys.exit(_main_stdin())
