"""Smoke test of examples/distill_hf.py: a real (tiny) offline run, checked on its outputs."""

import importlib.util
import math
import os
import socket
from pathlib import Path

import pytest

# The examples extra is optional for the library; CI installs it, so there the test runs.
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_hf.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TINY_ARGS = [
    "--no-progress", "--teacher-steps", "8",
    "--vocab-size", "384", "--corpus-chars", "150000", "--heldout-windows", "16",
    "--teacher-n-layer", "1", "--teacher-n-embd", "64",
    "--student-n-layer", "1", "--student-n-embd", "32",
    "--eval-every", "4", "--eval-windows", "8",
]
# Student steps and batch shape per backend: Triton's interpreter runs each loss call as Python
# programs, one per row (seconds per call), so its run is shorter.
SHAPES = {"torch": ("8", "4", "32"), "triton": ("3", "2", "16")}


def load_example():
    # examples/ is not a package: import the script by path, as a user would run it.
    spec = importlib.util.spec_from_file_location("fastkd_example_distill_hf", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not hasattr(__import__("fastkd"), "linear_kd_loss"),
                    reason="fastkd.linear_kd_loss is not in this fastkd (the fused student)")
def test_distill_hf_runs_offline_and_both_kd_paths_agree(tmp_path, monkeypatch, backend):
    # `backend` (conftest) runs this once on the PyTorch backend and once on the Triton kernels
    # (in Triton's interpreter without a GPU); the example's tensors live on that device.
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"the example tried to open a network connection: {args}")

    # Offline flags only hold for code that honours them; refusing every socket proves it.
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    import fastkd

    calls = {"linear_kd_loss": 0, "kd_loss": 0}

    def counting(name):
        fn = getattr(fastkd, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(fastkd, name, wrapper)

    # KDTrainer looks both losses up on the fastkd module at each step: counting them proves
    # that each KD student used the path it claims, once per step.
    counting("linear_kd_loss")
    counting("kd_loss")

    example = load_example()
    out = tmp_path / "run"
    # The memory probes run in fresh processes: once (PyTorch backend) is enough.
    on_torch_backend = os.environ["FASTKD_BACKEND"] == "torch"  # set by the fixture
    memory = ["--memory-batch-sizes", "4"] if on_torch_backend else ["--no-memory"]
    steps, batch_size, seq_len = SHAPES[os.environ["FASTKD_BACKEND"]]
    shape = ["--steps", steps, "--batch-size", batch_size, "--seq-len", seq_len]
    report = example.main([*TINY_ARGS, *shape, *memory, "--device", backend, "--out", str(out)])
    steps = int(steps)
    assert calls == {"linear_kd_loss": steps, "kd_loss": steps}
    assert report["environment"]["device"] == backend

    png = out / "curves.png"
    assert png.read_bytes()[: len(PNG_SIGNATURE)] == PNG_SIGNATURE
    assert (out / "tokenizer.json").stat().st_size > 0
    on_disk = (out / "report.json").read_text()
    assert '"perplexity_heldout"' in on_disk

    ppl = report["perplexity_heldout"]
    assert set(ppl) == {"teacher", "student_fused", "student_logits", "student_labels_only"}
    # A uniform guess over the vocabulary has perplexity V: 8 steps must not be worse than ~that.
    vocab = report["corpus"]["vocab_size"]
    for name, value in ppl.items():
        assert math.isfinite(value) and 1.0 < value < 2 * vocab, (name, value)

    curves = report["curves"]["train_loss"]
    for name, values in curves.items():
        assert len(values) == steps and all(math.isfinite(v) for v in values), name
    for name, parts in report["curves"]["kd_components"].items():
        assert len(parts["divergence"]) == len(parts["ce"]) == steps, name
    # Same initialisation, same batches, the same loss up to rounding: the curves coincide.
    gap = max(abs(a - b) for a, b in zip(curves["fused"], curves["logits"], strict=True))
    assert report["max_abs_loss_diff_fused_vs_logits"] == pytest.approx(gap)
    assert gap < 1e-4
    # The first step scores the same weights: only the two loss implementations differ.
    assert report["first_loss_diff_fused_vs_logits"] < 1e-5
    assert abs(ppl["student_fused"] - ppl["student_logits"]) < 1e-2 * ppl["student_logits"]
    # The labels-only student followed another loss, so its curve must differ: if it did not,
    # the comparison above would not show that the KD term was computed at all.
    pairs = zip(curves["fused"], curves["labels_only"], strict=True)
    assert max(abs(a - b) for a, b in pairs) > 1e-2

    memory_report = report["peak_memory"]
    if on_torch_backend:
        assert [entry["path"] for entry in memory_report] == ["fused", "logits"]
        for entry in memory_report:
            assert entry["tokens_per_step"] == 4 * int(seq_len)
            assert entry["peak_bytes"] is None or entry["peak_bytes"] > 0
    else:
        assert memory_report is None

    assert report["corpus"]["heldout_files"] and report["corpus"]["train_files"] > 0
    assert report["runtime_seconds"]["total"] > 0


def test_corpus_split_is_by_file_deterministic_and_disjoint():
    example = load_example()
    first = example.load_stdlib_corpus(max_chars=300_000)
    again = example.load_stdlib_corpus(max_chars=300_000)
    assert first.train_files == again.train_files
    assert first.heldout_files == again.heldout_files
    assert first.heldout_files and first.train_files
    assert not set(first.train_files) & set(first.heldout_files)
    assert all(name.endswith(".py") for name in first.train_files + first.heldout_files)


def test_tokenizer_training_is_deterministic_and_round_trips():
    example = load_example()
    texts = example.load_stdlib_corpus(max_chars=100_000).train_texts
    first = example.train_tokenizer(texts, vocab_size=400)
    again = example.train_tokenizer(texts, vocab_size=400)
    assert first.get_vocab() == again.get_vocab()
    assert first.get_vocab_size() == 400
    sample = texts[0][:2000]
    assert first.decode(first.encode(sample).ids) == sample
