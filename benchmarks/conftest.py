"""pytest-benchmark suite over the same cases and providers as `fastkd-bench`.

Options: --fastkd-shapes (default: gpu on CUDA, cpu otherwise), --fastkd-providers,
--fastkd-results (default: ./results, as for fastkd-bench). At the end of the session the
measurements are written to <results>/<device-slug>/ as results.json, results.md and PNG plots,
like the CLI does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fastkd.bench import report
from fastkd.bench.cases import (
    ALPHA,
    IGNORED_FRACTION,
    SHAPE_SETS,
    TEMPERATURE,
    default_shape_set,
    device_name,
    device_slug,
)
from fastkd.bench.cli import environment
from fastkd.bench.measure import ReferenceStore, Settings
from fastkd.bench.providers import PROVIDERS, compile_is_dynamic, default_providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    group = parser.getgroup("fastkd")
    group.addoption("--fastkd-shapes", choices=sorted(SHAPE_SETS),
                    default=default_shape_set(DEVICE), help="shape set to run")
    group.addoption("--fastkd-providers", default=None,
                    help="comma-separated providers out of " + ",".join(sorted(PROVIDERS))
                    + " (default: all that apply to the device)")
    # ./results like fastkd-bench (git-ignored); benchmarks/results holds the committed runs.
    group.addoption("--fastkd-results", type=Path, default=Path("results"),
                    help="results go to <this>/<device-slug>/")


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "case" in metafunc.fixturenames:
        cases = SHAPE_SETS[config.getoption("--fastkd-shapes")]
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])
    if "provider" in metafunc.fixturenames:
        chosen = config.getoption("--fastkd-providers")
        providers = chosen.split(",") if chosen else default_providers(DEVICE)
        unknown = sorted(set(providers) - set(PROVIDERS))
        if unknown:
            raise pytest.UsageError(f"--fastkd-providers: unknown {unknown}")
        metafunc.parametrize("provider", providers)


class BenchState:
    """What the tests of one session share: settings, float64 references, built providers."""

    def __init__(self, reference_dir: Path):
        self.device = DEVICE
        self.settings = Settings(device=DEVICE)
        self.reference_dir = reference_dir
        self.references = ReferenceStore(DEVICE, self.settings.seed, reference_dir)
        self.built: dict = {}
        self.records: list[dict] = []


_STATE: list[BenchState] = []


@pytest.fixture(scope="session")
def bench_state(tmp_path_factory):
    state = BenchState(tmp_path_factory.mktemp("fastkd-references"))
    _STATE.append(state)
    return state


def pytest_sessionfinish(session, exitstatus):
    if not _STATE or not _STATE[0].records:
        return
    state = _STATE[0]
    out_dir = session.config.getoption("--fastkd-results") / device_slug(state.device)
    meta = {
        "device": state.device, "device_name": device_name(state.device),
        "device_slug": device_slug(state.device), "date": "",
        "shapes": session.config.getoption("--fastkd-shapes"),
        "providers": sorted({r["provider"] for r in state.records}),
        "compile_dynamic": compile_is_dynamic(state.device),
        "temperature": TEMPERATURE, "alpha": ALPHA, "ignored_fraction": IGNORED_FRACTION,
        "timing": "fastkd.bench.measure (pytest-benchmark keeps its own statistics)",
        "memory": "fastkd.bench.measure, one process per measurement on CPU",
        "versions": environment(state.device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"start": None, "end": round(os.getloadavg()[0], 2)},
        "runner": "pytest-benchmark suite (benchmarks/)",
    }
    import datetime

    meta["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    paths = report.write_results(out_dir, meta, state.records)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"fastkd results written to {paths['markdown'].parent}/")
