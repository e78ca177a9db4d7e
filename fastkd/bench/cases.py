"""Benchmark cases: shapes, inputs, and the byte count that bandwidth is measured against."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass

import torch

# The loss settings every case uses: a typical distillation recipe (T = 2, even mix).
TEMPERATURE = 2.0
ALPHA = 0.5
IGNORE_INDEX = -100
# Share of rows whose label is ignore_index: padding and prompt tokens in a typical SFT batch.
IGNORED_FRACTION = 0.05
# Logit scale: a standard deviation of 2 gives peaked but not one-hot softmaxes, like LM heads.
LOGIT_STD = 2.0

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
MODES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class Case:
    """One benchmark point: N rows of V classes in one dtype, forward only or forward+backward."""

    n_rows: int
    vocab: int
    dtype: str
    mode: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def name(self) -> str:
        return f"N{self.n_rows}-V{self.vocab}-{self.dtype}-{self.mode}"

    def to_dict(self) -> dict:
        return asdict(self)


def grid(n_rows, vocabs, dtypes, modes=MODES) -> list[Case]:
    # Both modes of a shape are adjacent: they share inputs, float64 reference and copy size.
    return [Case(n, v, d, m) for d in dtypes for n in n_rows for v in vocabs for m in modes]


# Shape sets. "gpu" is the LLM grid (N x V); "gpu-quick" is the subset the one-command GPU check
# runs in its time budget; "cpu" fits the 3-minute budget of a 2-core machine.
SHAPE_SETS = {
    "gpu": grid((4096, 16384), (32000, 128256, 151936, 262144), ("bf16", "fp32")),
    "gpu-quick": grid((4096,), (32000, 128256, 262144), ("bf16",)) + grid(
        (4096,), (128256,), ("fp32",)
    ),
    "cpu": grid((512,), (32000, 128256), ("fp32", "bf16")),
    # A seconds-long smoke test of the whole pipeline (tests, dry runs).
    "tiny": grid((64,), (1000, 4000), ("fp32",)),
}


def default_shape_set(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


def make_inputs(case: Case, device: str, seed: int = 0, requires_grad: bool | None = None):
    """Student logits, teacher logits and labels for `case`, the same for every provider.

    Logits are drawn straight in their dtype (no fp32 temporary twice their size), so the memory
    resident after this call is the inputs and nothing else. The student requires grad in
    fwd_bwd mode; the teacher never does (it is a frozen model's output).
    """
    if requires_grad is None:
        requires_grad = case.mode == "fwd_bwd"
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case.n_rows, case.vocab)
    teacher = torch.randn(shape, generator=gen, device=device, dtype=case.torch_dtype)
    teacher.mul_(LOGIT_STD)
    # The student is a noisy copy of the teacher, as after some distillation steps.
    student = torch.randn(shape, generator=gen, device=device, dtype=case.torch_dtype)
    student.mul_(LOGIT_STD * 0.5).add_(teacher)
    labels = make_labels(case, seed).to(device)
    student.requires_grad_(requires_grad)
    return student, teacher, labels


def make_labels(case: Case, seed: int = 0) -> torch.Tensor:
    """Labels on the host (so counting ignored rows never syncs a device), ~5% ignored."""
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, case.vocab, (case.n_rows,), generator=gen)
    ignored = torch.rand(case.n_rows, generator=gen) < IGNORED_FRACTION
    return labels.masked_fill(ignored, IGNORE_INDEX)


def minimal_bytes(case: Case, counted_rows: int | None = None) -> int:
    """Bytes any correct implementation must move for `case`: the bandwidth denominator.

    - read the student and the teacher logits of every counted row (N_counted * V * e each;
      an ignored row's logits need not be read, its loss and gradient are known to be 0);
    - write the student gradient of every row, ignored rows' zeros included (N * V * e),
      in fwd_bwd mode only;
    - read the labels (N * 8, int64).
    The scalar loss and per-row scratch are a few bytes per row and are left out. Counting the
    ignored rows' reads too would overstate every provider's bandwidth by up to ~3% here.
    """
    if counted_rows is None:
        counted_rows = int((make_labels(case) != IGNORE_INDEX).sum())
    logits_read = 2 * counted_rows * case.vocab * case.element_size
    gradient_write = case.n_rows * case.vocab * case.element_size if case.mode == "fwd_bwd" else 0
    labels_read = case.n_rows * 8
    return logits_read + gradient_write + labels_read


def gradient_buffer_bytes(case: Case) -> int:
    """Size of one student-gradient buffer: the memory target's allowance."""
    return case.n_rows * case.vocab * case.element_size


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def device_slug(device: str) -> str:
    """Folder name of a device's results, e.g. nvidia-h200 or cpu-intel-xeon-...-2-cores."""
    name = device_name(device)
    return _slug(name if device == "cuda" else f"cpu {name}")
