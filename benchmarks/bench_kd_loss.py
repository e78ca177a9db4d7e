"""Benchmarks of fastkd against the eager and compiled reference and Liger-Kernel.

Each test measures one provider on one case with fastkd.bench.measure (the numbers in the
results table: median time, bandwidth against a device copy, peak memory, float64 error), then
lets pytest-benchmark time the same call for its own statistics and comparisons
(--benchmark-json, --benchmark-compare). Run with `pytest benchmarks`.
"""

from __future__ import annotations

import pytest
import torch

from fastkd.bench.cases import make_inputs
from fastkd.bench.measure import measure
from fastkd.bench.providers import PROVIDERS
from fastkd.bench.run import run_suite

# pytest-benchmark rounds per test: GPU calls take milliseconds, CPU ones seconds.
GPU_ROUNDS = 20
CPU_ROUNDS = 2


def _record(case, provider, state):
    if state.device == "cuda":
        return measure(case, provider, state.settings, state.references, state.built)
    # CPU memory is only comparable with each provider in a fresh process.
    (record,) = run_suite([case], [provider], state.settings, isolate=True,
                          reference_dir=state.reference_dir)
    return record


def test_kd_loss(benchmark, case, provider, bench_state):
    record = _record(case, provider, bench_state)
    bench_state.records.append(record)
    benchmark.extra_info.update({k: v for k, v in record.items()
                                 if isinstance(v, (int, float, str, bool)) or v is None})
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    if record["status"] == "oom":
        pytest.skip(f"out of memory: {record['reason']}")
    assert record["status"] == "ok", record["reason"]

    device = bench_state.device
    fn = bench_state.built.get(provider) or PROVIDERS[provider].build(device)
    bench_state.built[provider] = fn
    student, teacher, labels = make_inputs(case, device, bench_state.settings.seed)
    backward = case.mode == "fwd_bwd"

    def reset():
        student.grad = None

    def step():
        loss = fn(student, teacher, labels)
        if backward:
            loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, setup=reset, warmup_rounds=1, iterations=1,
                       rounds=GPU_ROUNDS if device == "cuda" else CPU_ROUNDS)
