"""The long-row decision kit: measure each FASTKD_LONG_ROWS strategy on one GPU and write the
selection table that `auto` would use.

    python -m fastkd.bench.long_rows --out DIR            # on a GPU, ~3 minutes
    python -m fastkd.bench.long_rows --out DIR --dry-run  # tiny CPU shapes, Triton interpreter

It records, in DIR/long_rows.json: the device and versions; the measured copy bandwidth (a
device-to-device copy of the benchmark's own byte count) and the L2 size torch reports; an
exp2-throughput microbenchmark (a dependent chain per element, so it counts SFU issue, not
memory); and for every strategy and shape the median time, the bandwidth over the hand-counted
floor (read student + teacher, write the gradient: 3 N V e bytes) as a fraction of the measured
copy bandwidth, the largest error against fastkd.reference on sampled rows, and whether three runs
were bitwise identical. DIR/long_rows_selection.json maps each (V, dtype, divergence) to the
fastest strategy that was correct and deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

GPU_SHAPES = [(n, v) for n in (4096, 16384) for v in (32000, 128256, 151936, 262144)]
DRY_RUN_SHAPES = [(3, 8193), (2, 20000)]
STRATEGIES = ("loop", "two_launch", "split")
# Rows of each case compared with the float32 reference (the whole batch would not fit twice).
CHECKED_ROWS = 8


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(num_bytes: int, device, repeats: int) -> float:
    """GB/s of a device-to-device copy moving num_bytes (read + write counted)."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, repeats)
    return num_bytes / (ms * 1e-3) / 1e9


def exp2_throughput(device) -> float | None:
    """Giga-exp2 per second of a chain of 64 dependent exp2 per element (None on CPU)."""
    if device.type != "cuda":
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def _chain(x_ptr, n, STEPS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        for _ in tl.static_range(STEPS):
            x = tl.exp2(x * -0.5)  # stays in (0, 1]: no overflow, no denormals
        tl.store(x_ptr + offs, x, mask=offs < n)

    n = 1 << 24
    x = torch.rand(n, device=device)
    steps = 64
    ms = _median_ms(lambda: _chain[(triton.cdiv(n, 1024),)](x, n, STEPS=steps, BLOCK=1024),
                    device, 5)
    return n * steps / (ms * 1e-3) / 1e9


def run_case(n_rows: int, vocab: int, divergence: str, device, repeats: int, strategies):
    import fastkd

    gen = torch.Generator(device="cpu").manual_seed(vocab + n_rows)
    student = (torch.randn(n_rows, vocab, generator=gen) * 3).to(torch.bfloat16).to(device)
    teacher = (torch.randn(n_rows, vocab, generator=gen) * 3).to(torch.bfloat16).to(device)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen).to(device)
    options = dict(temperature=2.0, alpha=0.5, divergence=divergence)
    floor_bytes = 3 * n_rows * vocab * student.element_size()
    rows = slice(0, min(CHECKED_ROWS, n_rows))
    check = student[rows].float().requires_grad_()
    expected = fastkd.reference.kd_loss(check, teacher[rows].float(), labels[rows],
                                        reduction="sum", **options)
    expected.backward()
    results = []
    for strategy in strategies:
        os.environ["FASTKD_LONG_ROWS"] = strategy
        entry = {"strategy": strategy, "n_rows": n_rows, "vocab": vocab,
                 "divergence": divergence, "dtype": "bf16"}
        try:
            leaf = student.detach().requires_grad_()

            def step(leaf=leaf):
                leaf.grad = None
                fastkd.kd_loss(leaf, teacher, labels, **options).backward()

            ms = _median_ms(step, device, repeats)
            grads = []
            for _ in range(3):
                step()
                grads.append(leaf.grad.clone())
            entry["deterministic"] = all(torch.equal(g, grads[0]) for g in grads[1:])
            part = student[rows].detach().requires_grad_()
            got = fastkd.kd_loss(part, teacher[rows], labels[rows], reduction="sum", **options)
            got.backward()
            entry["loss_error"] = abs(float(got) - float(expected)) / max(abs(float(expected)),
                                                                          1.0)
            entry["grad_error"] = float((part.grad.float() - check.grad).abs().max()
                                        / check.grad.abs().max())
            entry["ms"] = ms
            entry["gb_per_s"] = floor_bytes / (ms * 1e-3) / 1e9
        except Exception as error:  # noqa: BLE001 - a strategy that cannot run is reported
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        results.append(entry)
    os.environ.pop("FASTKD_LONG_ROWS", None)
    return results, floor_bytes


def selection_table(cases: list[dict]) -> dict:
    """The fastest correct, deterministic strategy per (V, dtype, divergence), over all N."""
    best: dict[str, dict[str, float]] = {}
    for entry in cases:
        ok = ("error" not in entry and entry["deterministic"] and entry["grad_error"] < 5e-2
              and entry["loss_error"] < 1e-2)
        if not ok:
            continue
        key = f"{entry['vocab']}/{entry['dtype']}/{entry['divergence']}"
        best.setdefault(key, {}).setdefault(entry["strategy"], 0.0)
        best[key][entry["strategy"]] += entry["ms"]
    return {key: min(times, key=times.get) for key, times in best.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on CPU through Triton's interpreter (split skipped)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, shapes, strategies, repeats = torch.device("cpu"), DRY_RUN_SHAPES, \
            ("loop", "two_launch"), 1
    else:
        device, shapes, strategies, repeats = torch.device("cuda"), GPU_SHAPES, STRATEGIES, \
            args.repeats
    os.environ["FASTKD_BACKEND"] = "triton"
    import triton

    import fastkd

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton.__version__, "fastkd": fastkd.__version__},
        "l2_bytes": (torch.cuda.get_device_properties(device).L2_cache_size
                     if device.type == "cuda" else None),
        "exp2_giga_per_s": exp2_throughput(device),
        "cases": [],
    }
    cases = [(n, v, "forward_kl") for n, v in shapes] + [(shapes[0][0], shapes[-1][1], "jsd")]
    for n_rows, vocab, divergence in cases:
        results, floor_bytes = run_case(n_rows, vocab, divergence, device, repeats, strategies)
        copy = copy_bandwidth(floor_bytes, device, repeats)
        for entry in results:
            entry["copy_gb_per_s"] = copy
            if "gb_per_s" in entry:
                entry["fraction_of_copy"] = entry["gb_per_s"] / copy
            print(json.dumps(entry), flush=True)
        report["cases"].extend(results)
    selection = selection_table(report["cases"])
    (args.out / "long_rows.json").write_text(json.dumps(report, indent=1))
    (args.out / "long_rows_selection.json").write_text(json.dumps(selection, indent=1))
    print(json.dumps(selection, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
