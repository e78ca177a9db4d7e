"""The benchmark harness itself: its byte count and a whole CLI run on tiny CPU shapes."""

import json

import pytest

from fastkd.bench import cli
from fastkd.bench.cases import IGNORE_INDEX, Case, make_labels, minimal_bytes


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_minimal_bytes_is_the_hand_count(mode):
    case = Case(n_rows=64, vocab=1000, dtype="bf16", mode=mode)
    counted = int((make_labels(case) != IGNORE_INDEX).sum())
    assert 0 < counted < 64  # the harness ignores some rows, as training batches do
    reads = 2 * counted * 1000 * 2  # student + teacher, bf16, counted rows only
    write = 64 * 1000 * 2 if mode == "fwd_bwd" else 0  # the student gradient, every row
    assert minimal_bytes(case) == reads + write + 64 * 8  # + int64 labels


def test_cli_runs_tiny_cases_and_writes_every_artifact(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    status = cli.main(["--device", "cpu", "--shapes", "tiny", "--providers", "fastkd", "eager",
                       "--no-isolate", "--cpu-reps", "1", "--no-progress",
                       "--out-dir", str(tmp_path)])
    assert status == 0
    (device_dir,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    results = json.loads((device_dir / "results.json").read_text())
    measured = [r for r in results["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in measured} == {"fastkd", "eager"}
    assert len(measured) == 2 * 4  # 2 providers x (2 vocabularies x 2 modes)
    for record in measured:
        assert record["time_ms"] > 0
        # Both are checked against a float64 reference on the same inputs.
        assert record["loss_abs_err"] < 1e-4
        if record["mode"] == "fwd_bwd":
            assert record["grad_abs_err"] < 1e-5
        assert record["bytes"] == minimal_bytes(Case(64, record["vocab"], "fp32", record["mode"]))
    # Every target is evaluated and reported, met or not (tiny shapes are not the CPU targets').
    assert results["targets"] and all("passed" in target for target in results["targets"])
    assert (device_dir / "results.md").read_text().count("|") > 10
    for plot in ("time_vs_V.png", "bandwidth_vs_V.png"):
        assert (device_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
