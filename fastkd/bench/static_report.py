"""Static report of the shipped Triton kernels, compiled ahead of time (no GPU needed).

Each configuration is compiled with triton.compile for a GPUTarget, with the same specialization
a real launch gets: the arguments are built as the launcher builds them (CPU tensors stand in for
the device buffers; their data pointers are 16-byte aligned like CUDA allocations), and Triton's
own binder turns them into the signature, the constexprs (unit strides) and the divisibility-by-16
attributes. The cubin is then read with the cuobjdump that ships in the triton wheel: registers,
stack (spill) bytes, local and shared memory from its resource usage, and the global loads (LDG),
global stores (STG), local spill loads/stores (LDL/STL) and exponentials (MUFU.EX2) in its SASS.

Triton must not be in interpreter mode here (TRITON_INTERPRET=1 swaps the kernels for Python
functions); `collect` re-runs itself in a clean subprocess when it is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = {"sm_80": 80, "sm_90a": 90}
# Rows in the stand-in launch: a multiple of 16, like real token batches, so that strides which
# equal N (the unused gradient placeholder) specialize as they would in training.
STAND_IN_ROWS = 16
# A representative vocabulary for each forward_config class, all divisible by 16 (as 32000,
# 128256, 151936 and 262144 are): the on-chip blocks of 4096/8192 classes, a row just past the
# on-chip limit, and an LLM vocabulary, both on the two-sweep loop.
CLASS_VOCABS = {"on-chip 4096": 4000, "on-chip 8192": 8000, "loop 16000": 16000,
                "loop": 32000}
CORE_FULL_CLASS = "on-chip 8192"
CORE_TRAINING_CLASSES = ("loop",)
GRAD_COMBOS = ((True, False), (False, False), (True, True), (False, True))  # (student, teacher)


@dataclass(frozen=True)
class KernelConfig:
    kernel: str  # "kd_fwd" or "scale_rows"
    arch: str
    dtype: str
    vocab: int
    has_labels: bool = True
    student_grad: bool = True
    teacher_grad: bool = False
    share_t1: bool = False  # temperature == 1
    per_row_scale: bool = False  # scale_rows with reduction="none" (grad_output has N entries)

    @property
    def name(self) -> str:
        if self.kernel == "scale_rows":
            return f"scale_rows {self.dtype} {'per-row' if self.per_row_scale else 'scalar'}"
        flags = [
            "labels" if self.has_labels else "no-labels",
            {(True, False): "s-grad", (False, False): "no-grad", (True, True): "s+t-grad",
             (False, True): "t-grad"}[(self.student_grad, self.teacher_grad)],
        ]
        if self.share_t1:
            flags.append("T=1")
        return f"kd_fwd {self.dtype} V={self.vocab} {' '.join(flags)}"


def shipped_configs(archs=("sm_80", "sm_90a"), dtypes=("bf16", "fp32"),
                    scope: str = "full") -> list[KernelConfig]:
    """Every configuration the launchers can pick, per arch and dtype.

    scope="full": each forward_config class x labels x gradient combination, T != 1, plus T == 1
    for the common training call, and both scale kernels. scope="core", what the fast test
    compiles: the full flag matrix of the on-chip 8192 class (the register-hungriest class, as it
    keeps the whole row in registers; register allocation is not monotonic in the flags, so every
    combination counts), the training calls (labels, student grad, with and without teacher grad)
    of the loop, and the scalar scale kernel. The 4096 class has the 8192 class's 16 values per
    thread.
    """
    configs = []
    for arch in archs:
        for dtype in dtypes:
            for class_name, vocab in CLASS_VOCABS.items():
                if scope == "full" or class_name == CORE_FULL_CLASS:
                    for has_labels in (True, False):
                        for student_grad, teacher_grad in GRAD_COMBOS:
                            configs.append(KernelConfig("kd_fwd", arch, dtype, vocab, has_labels,
                                                        student_grad, teacher_grad))
                    configs.append(KernelConfig("kd_fwd", arch, dtype, vocab, share_t1=True))
                elif class_name in CORE_TRAINING_CLASSES:
                    configs.append(KernelConfig("kd_fwd", arch, dtype, vocab))
                    configs.append(KernelConfig("kd_fwd", arch, dtype, vocab, teacher_grad=True))
            per_row_options = (False, True) if scope == "full" else (False,)
            for per_row in per_row_options:
                configs.append(KernelConfig("scale_rows", arch, dtype, 0, per_row_scale=per_row))
    return configs


def _launch_arguments(config: KernelConfig):
    """(kernel, positional args, keyword args) exactly as the launcher would pass them."""
    import torch

    from fastkd.kernels import kd_loss as kernels

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype]
    n_rows = STAND_IN_ROWS
    if config.kernel == "scale_rows":
        grad = torch.empty(n_rows, 4096, dtype=dtype)
        factor = torch.ones(n_rows if config.per_row_scale else (), dtype=torch.float32)
        flat = factor.reshape(-1)
        args = (grad, grad.stride(0), grad.stride(1), flat,
                flat.stride(0) if config.per_row_scale else 0, grad.shape[1])
        kwargs = {"BLOCK_V": kernels.SCALE_BLOCK_V, "num_warps": kernels.SCALE_NUM_WARPS}
        return kernels._scale_rows_kernel, args, kwargs

    vocab = config.vocab
    student = torch.empty(n_rows, vocab, dtype=dtype)
    teacher = torch.empty(n_rows, vocab, dtype=dtype)
    row_losses = torch.empty(n_rows, dtype=torch.float32)
    weight = torch.ones((), dtype=torch.float32)
    labels = torch.zeros(n_rows, dtype=torch.int64) if config.has_labels else None
    grad_s = torch.empty_like(student) if config.student_grad else None
    grad_t = torch.empty_like(teacher) if config.teacher_grad else None
    # Same placeholders as kd_forward for pointers that a constexpr flag leaves unused.
    gs = grad_s if grad_s is not None else row_losses.view(1, -1)
    gt = grad_t if grad_t is not None else row_losses.view(1, -1)
    lab = labels if labels is not None else row_losses
    temperature = 1.0 if config.share_t1 else 2.0
    launch = kernels.forward_config(vocab)
    args = (student, student.stride(0), student.stride(1),
            teacher, teacher.stride(0), teacher.stride(1),
            lab, lab.stride(0) if labels is not None else 0,
            weight, row_losses,
            gs, gs.stride(0), gs.stride(1),
            gt, gt.stride(0), gt.stride(1),
            vocab, temperature, 0.5, -100)
    kwargs = {"HAS_LABELS": labels is not None, "SHARE_T1": config.share_t1,
              "STUDENT_GRAD": config.student_grad, "TEACHER_GRAD": config.teacher_grad,
              "ON_CHIP": launch["ON_CHIP"], "BLOCK_V": launch["BLOCK_V"],
              "num_warps": launch["num_warps"]}
    return kernels._kd_loss_fwd_kernel, args, kwargs


def cuobjdump_path() -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


_RESOURCE_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def analyse_cubin(cubin: bytes, tool: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
        cubin_path = handle.name
    try:
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin_path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tool), "-sass", cubin_path],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(cubin_path)
    resources = {key.lower(): int(value) for key, value in _RESOURCE_RE.findall(usage)}
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)

    def count(prefix: str) -> int:
        return sum(1 for op in opcodes if op == prefix or op.startswith(prefix + "."))

    return {
        "registers": resources.get("reg"),
        "stack_bytes": resources.get("stack"),
        "local_bytes": resources.get("local"),
        "shared_bytes_static": resources.get("shared"),
        "ldg": count("LDG"),
        "stg": count("STG"),
        "ldl": count("LDL"),
        "stl": count("STL"),
        "mufu_ex2": count("MUFU.EX2"),
        "sass_instructions": len(opcodes),
    }


def compile_config(config: KernelConfig) -> dict:
    """Compile one configuration and measure its cubin; never raises (errors are reported)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    row = {"config": config.name, **asdict(config)}
    try:
        kernel, args, kwargs = _launch_arguments(config)
        target = GPUTarget("cuda", ARCHS[config.arch], 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=target, options=options.__dict__)
        row["num_warps"] = compiled.metadata.num_warps
        row["block_v"] = kwargs.get("BLOCK_V")
        row["shared_bytes"] = compiled.metadata.shared
        tool = cuobjdump_path()
        if tool is None:
            row["error"] = "cuobjdump not found in the triton wheel"
        else:
            row.update(analyse_cubin(compiled.asm["cubin"], tool))
        row["spills"] = bool(row.get("stack_bytes") or row.get("local_bytes") or row.get("ldl")
                             or row.get("stl"))
    except Exception as exc:  # noqa: BLE001 - one bad configuration must not hide the others
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return row


def collect(configs: list[KernelConfig], jobs: int | None = None) -> list[dict]:
    """Compile `configs` (in parallel processes) and return one row per configuration."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _collect_in_clean_process(configs, jobs)
    jobs = jobs or min(len(configs), os.cpu_count() or 1)
    if jobs <= 1:
        return [compile_config(c) for c in configs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_config, configs))


def _collect_in_clean_process(configs, jobs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps({"configs": [asdict(c) for c in configs], "jobs": jobs})
    out = subprocess.run([sys.executable, "-m", "fastkd.bench.static_report"], input=payload,
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out)


def table(rows: list[dict]) -> str:
    lines = ["| arch | kernel / config | warps | BLOCK_V | regs | stack B | local B | smem B "
             "| LDG | STG | LDL/STL | EX2 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['config']} | error: {r['error']} "
                         "| | | | | | | | | |")
            continue
        lines.append(
            f"| {r['arch']} | {r['config']} | {r['num_warps']} | {r['block_v']} "
            f"| {r['registers']} | {r['stack_bytes']} | {r['local_bytes']} | {r['shared_bytes']} "
            f"| {r['ldg']} | {r['stg']} | {r['ldl']}/{r['stl']} | {r['mufu_ex2']} |")
    spilling = [f"{r['arch']} {r['config']}" for r in rows if r.get("spills")]
    lines.append("")
    lines.append("Spills: " + (", ".join(spilling) if spilling else "none") + ".")
    return "\n".join(lines)


def _main_stdin() -> int:
    from dataclasses import fields

    request = json.loads(sys.stdin.read())
    names = {f.name for f in fields(KernelConfig)}
    configs = [KernelConfig(**{k: v for k, v in c.items() if k in names})
               for c in request["configs"]]
    print(json.dumps(collect(configs, request.get("jobs"))))
    return 0


if __name__ == "__main__":
    sys.exit(_main_stdin())
