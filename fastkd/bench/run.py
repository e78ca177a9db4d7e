"""Running a sweep: in this process (GPU) or one fresh process per provider (CPU memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .cases import Case, minimal_bytes
from .measure import ReferenceStore, Settings, base_record, copy_bandwidth, measure

OnResult = Callable[[dict], None]


def run_suite(cases: list[Case], providers: list[str], settings: Settings, *, isolate: bool,
              on_result: OnResult | None = None,
              reference_dir: Path | None = None) -> list[dict]:
    """Measure every provider on every case; a provider that cannot run a case gets a record
    saying why. With isolate=True each provider runs in a fresh Python process, so that its peak
    RSS is its own (the CPU memory figures need this). float64 references are cached in
    reference_dir when given (kept across calls), else in a temporary folder."""
    records: list[dict] = []
    apply_threads(settings)

    def emit(record: dict) -> None:
        records.append(record)
        if on_result is not None:
            on_result(record)

    if not isolate:
        references = ReferenceStore(settings.device, settings.seed)
        built: dict = {}
        for case in cases:
            for name in providers:
                emit(measure(case, name, settings, references, built))
        return records

    with tempfile.TemporaryDirectory(prefix="fastkd-bench-") as tmp:
        folder = Path(tmp)
        ref_folder = reference_dir if reference_dir is not None else folder / "references"
        # float64 references once, here; the workers load them instead of recomputing.
        references = ReferenceStore(settings.device, settings.seed, ref_folder)
        for case in cases:
            references.get(case, settings.rows_for_accuracy(case))
            settings.copy_bandwidth[case.name] = copy_bandwidth(minimal_bytes(case), settings)
        for name in providers:
            _run_worker(name, cases, settings, folder, ref_folder, emit)
    return records


def apply_threads(settings: Settings) -> None:
    if settings.device == "cpu" and settings.cpu_threads:
        import torch

        torch.set_num_threads(settings.cpu_threads)


def _run_worker(provider: str, cases: list[Case], settings: Settings, folder: Path,
                ref_folder: Path, emit: OnResult) -> None:
    request = folder / f"request-{provider}.json"
    request.write_text(json.dumps({
        "provider": provider,
        "cases": [case.to_dict() for case in cases],
        "settings": asdict(settings),
        "references": str(ref_folder),
    }))
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    done: set[str] = set()
    with subprocess.Popen([sys.executable, "-m", "fastkd.bench.worker", str(request)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                record = json.loads(line)
                done.add(record["case"])
                emit(record)
        stderr = proc.stderr.read() if proc.stderr is not None else ""
    if proc.returncode != 0 or len(done) < len(cases):
        tail = " | ".join(stderr.strip().splitlines()[-3:])[-400:]
        why = f"worker exited with {proc.returncode}: {tail}"
        for case in cases:
            if case.name not in done:
                record = base_record(case, provider, settings)
                # SIGKILL with nothing on stderr is what the kernel's OOM killer leaves.
                out_of_memory = "memory" in tail.lower() or proc.returncode == -9
                record.update(status="oom" if out_of_memory else "error", reason=why)
                emit(record)
