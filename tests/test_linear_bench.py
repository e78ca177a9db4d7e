"""`fastkd-bench --linear` on its tiny CPU shape: every provider runs and agrees on the loss."""

import importlib.util
import json

from test_linear_peers import import_peer

from fastkd.bench import cli
from fastkd.bench.linear import PROVIDERS


def test_linear_benchmark_cli_on_tiny_shapes(tmp_path):
    # In this process (--no-isolate), with the peers imported first where they are installed.
    installed = {name: importlib.util.find_spec(module) is not None
                 for name, module in (("trl", "trl"), ("liger", "liger_kernel"))}
    if installed["trl"]:
        import_peer("trl.trainer.distillation_trainer")
    status = cli.main(["--device", "cpu", "--linear", "--linear-shapes", "linear-tiny",
                       "--no-isolate", "--cpu-reps", "1", "--out-dir", str(tmp_path)])
    assert status == 0
    (device_dir,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    records = json.loads((device_dir / "linear_results.json").read_text())["records"]
    by_provider = {r["provider"]: r for r in records}
    assert set(by_provider) == set(PROVIDERS)
    for name, record in by_provider.items():
        if not installed.get(name, True):  # a peer that is not installed says so
            assert record["status"] == "skipped" and "not installed" in record["reason"]
            continue
        assert record["status"] == "ok", (name, record["reason"])
        assert record["time_ms"] > 0 and record["peak_mem_bytes"] is not None
    # The same loss as the float64 reference (TRL has no CE term, the GEMM floor no loss).
    for name in ("fastkd_linear", "explicit", "eager", "liger"):
        if installed.get(name, True):
            assert by_provider[name]["loss_rel_err"] < 1e-5, name
    table = (device_dir / "linear_results.md").read_text()
    assert "fastkd_linear" in table and "time / 4 GEMMs" in table
