"""`fastkd-bench` (also `python -m fastkd.bench`): benchmark fastkd against its baselines.

    fastkd-bench                      # GPU shapes on CUDA, CPU shapes otherwise
    fastkd-bench --shapes gpu-quick   # the reduced GPU set of benchmarks/gpu_check.sh
    fastkd-bench --static             # registers/spills/loads/stores of every shipped kernel
    fastkd-bench --static --json PATH # the same report as one JSON document at PATH

Results go to OUT_DIR/<device-slug>/: results.json, results.md, time_vs_V.png,
bandwidth_vs_V.png (the static report to OUT_DIR/static/).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

from . import linear
from .cases import (
    ALPHA,
    IGNORED_FRACTION,
    MODES,
    SHAPE_SETS,
    TEMPERATURE,
    default_shape_set,
    device_name,
    device_slug,
)
from .providers import (
    COMPILE_DYNAMIC_ENV,
    PROVIDERS,
    compile_is_dynamic,
    default_providers,
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: str) -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "triton": _version("triton"), "liger-kernel": _version("liger-kernel"),
                "fastkd": _version("fastkd")}
    if device == "cuda":
        versions["cuda"] = torch.version.cuda
        try:
            versions["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            versions["driver"] = "unknown (nvidia-smi unavailable)"
    return versions


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fastkd-bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when available")
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS),
                        help="shape set (default: gpu on CUDA, cpu otherwise)")
    parser.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS),
                        help="default: every provider that applies to the device")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out-dir", type=Path, default=Path("results"),
                        help="results go to OUT_DIR/<device-slug>/ (default: ./results)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-isolate", action="store_true",
                        help="CPU: run providers in this process (faster, memory not comparable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-rep-ms", type=int, default=100,
                        help="GPU time per do_bench measurement")
    parser.add_argument("--cpu-reps", type=int, default=3,
                        help="CPU: full-size timed runs at most (the first also gives memory and "
                             "error); stops early after 2.5 s")
    parser.add_argument("--cpu-threads", type=int,
                        help="CPU: torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--compile-dynamic", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile dynamic shapes (auto: off on CUDA, on on CPU); "
                             "on compiles one graph per dtype and mode instead of one per case")
    parser.add_argument("--no-progress", action="store_true")
    static = parser.add_argument_group("static kernel report")
    static.add_argument("--static", action="store_true",
                        help="compile every shipped kernel config and report registers, "
                             "spills, shared memory, global loads/stores (no GPU needed)")
    static.add_argument("--arch", nargs="+", default=["sm_80", "sm_90a"],
                        choices=["sm_80", "sm_90a"])
    static.add_argument("--scope", choices=("full", "core"), default="full")
    static.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
    static.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the report's entries (one per configuration) to PATH")
    linear.add_arguments(parser)
    return parser.parse_args(argv)


def run_static(args) -> int:
    from . import static_report

    if static_report.cuobjdump_path() is None:
        print("cuobjdump is missing from the triton wheel: cannot read the cubins",
              file=sys.stderr)
        return 2
    configs = static_report.shipped_configs(archs=tuple(args.arch), scope=args.scope)
    print(f"compiling {len(configs)} kernel configurations for {', '.join(args.arch)} ...",
          file=sys.stderr)
    rows = static_report.collect(configs, args.jobs)
    text = static_report.table(rows)
    print(text)
    out = args.out_dir / "static"
    out.mkdir(parents=True, exist_ok=True)
    import json

    document = static_report.document(rows)
    (out / "static_report.json").write_text(json.dumps(document, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1))
    (out / "static_report.md").write_text(
        "# fastkd static kernel report\n\nCompiled ahead of time with triton "
        f"{_version('triton')}; counts from cuobjdump.\n\n{text}\n")
    print(f"\nwritten to {out}/", file=sys.stderr)
    errors = [r for r in rows if "error" in r]
    return 1 if errors else 0


def run_benchmark(args) -> int:
    import torch

    from . import report
    from .measure import Settings
    from .run import run_suite

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    if args.compile_dynamic != "auto":
        os.environ[COMPILE_DYNAMIC_ENV] = "1" if args.compile_dynamic == "on" else "0"
    shapes = args.shapes or default_shape_set(device)
    cases = [c for c in SHAPE_SETS[shapes] if c.mode in args.modes]
    providers = args.providers or default_providers(device)
    settings = Settings(device=device, seed=args.seed, gpu_rep_ms=args.gpu_rep_ms,
                        cpu_reps=args.cpu_reps, cpu_threads=args.cpu_threads)
    isolate = device == "cpu" and not args.no_isolate
    out_dir = args.out_dir / device_slug(device)
    name = device_name(device)
    print(f"fastkd-bench on {name}: {len(cases)} cases x {len(providers)} providers "
          f"({shapes} shapes) -> {out_dir}/", file=sys.stderr)

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(cases) * len(providers), unit="run", file=sys.stderr)
        except ImportError:
            print("(tqdm not installed: no progress bar)", file=sys.stderr)

    load_before = _load_average()
    started = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "device": device, "device_name": name, "device_slug": device_slug(device),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "elapsed_s": None,
        "shapes": shapes, "providers": providers,
        "provider_descriptions": {p: PROVIDERS[p].description for p in providers},
        "compile_dynamic": compile_is_dynamic(device),
        "temperature": TEMPERATURE, "alpha": ALPHA, "ignored_fraction": IGNORED_FRACTION,
        "timing": ("median of triton.testing.do_bench (CUDA events, L2 flushed, grads reset)"
                   if device == "cuda" else
                   f"median wall time of up to {settings.cpu_reps} full-size runs after a "
                   "warm-up on a few rows"),
        "memory": ("torch.cuda.max_memory_allocated above the allocations before the call"
                   if device == "cuda" else
                   "peak RSS above the RSS after inputs exist, one process per provider"
                   if isolate else "peak RSS in a shared process (--no-isolate: not comparable)"),
        "versions": environment(device),
        # Other processes on the machine skew CPU timings: say how busy it was.
        "load_average_1min": {"start": load_before, "end": None},
        "cpu_count": os.cpu_count(),
        "torch_threads": settings.cpu_threads or torch.get_num_threads(),
        "accuracy_rows": {c.name: settings.rows_for_accuracy(c) for c in cases},
        "complete": False,
    }
    records: list[dict] = []

    def on_result(record):
        records.append(record)
        if record["status"] == "ok":
            line = (f"{record['case']:<28} {record['provider']:<15} "
                    f"{record['time_ms']:>10.3f} ms {record['bandwidth_gbps']:>8.1f} GB/s")
        else:
            line = f"{record['case']:<28} {record['provider']:<15} {record['status']}"
        if bar is not None:
            bar.set_postfix_str(f"{record['case']} {record['provider']}")
            bar.update(1)
            bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)
        # Partial results survive a run that is cut short (a timeout in gpu_check.sh).
        report.write_results(out_dir, meta, records, make_plots=False)

    run_suite(cases, providers, settings, isolate=isolate, on_result=on_result)
    if bar is not None:
        bar.close()
    elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    meta.update(elapsed_s=round(elapsed, 1), complete=True)
    meta["load_average_1min"]["end"] = _load_average()
    paths = report.write_results(out_dir, meta, records, make_plots=not args.no_plots)
    targets = report.evaluate_targets(records, device)
    print(report.results_table(records))
    print()
    print(report.targets_table(targets))
    print(f"\n{len(records)} measurements in {elapsed:.0f} s; written: "
          + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.static:
        return run_static(args)
    if args.linear:
        return linear.run_from_cli(args)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
