"""Smoke test of examples/offline_distill.py: a tiny run end to end, checked on its report."""

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("safetensors")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")  # distill_hf, whose helpers the example imports

import fastkd  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "offline_distill.py"

TINY_ARGS = [
    "--no-progress", "--steps", "4", "--teacher-steps", "4", "--batch-size", "4",
    "--seq-len", "16", "--vocab-size", "384", "--corpus-chars", "150000",
    "--heldout-windows", "16", "--teacher-n-layer", "1", "--teacher-n-embd", "32",
    "--student-n-embd", "32", "--k", "8", "--in-process",
]


def test_offline_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    calls = []
    real = fastkd.topk_kd_loss

    def counting(*args, **kwargs):
        calls.append(kwargs["tail"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fastkd, "topk_kd_loss", counting)
    spec = importlib.util.spec_from_file_location("fastkd_example_offline", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main([*TINY_ARGS, "--out", str(tmp_path / "run")])
    # the offline student's 4 steps, and the first batch scored from the file and live
    assert calls == ["bucket"] * (4 + 2)
    d = report["dump"]
    assert d["rows"] == 4 * 4 * 16  # steps x batch windows, seq_len rows each
    assert d["id_bits"] == 9 and d["k"] == 8 and d["temperature"] == 1.0
    assert d["manifest_bytes_per_row"] == 9 + 16 + 8
    assert d["disk_bytes_per_row"] < 2 * d["manifest_bytes_per_row"]  # headers are small
    for name in ("teacher", "student_offline", "student_online", "student_labels"):
        assert math.isfinite(report["perplexity_heldout"][name])
    for name in ("offline", "online", "labels"):
        assert report["students"][name]["seconds"] > 0
        assert report["students"][name]["peak_rss_mib"] > 0
    # fp16 log-probs from the file against the teacher's live fp32 top-k
    first = report["first_step_loss"]
    assert first["abs_diff"] <= 2e-3 * abs(first["live_topk"])
