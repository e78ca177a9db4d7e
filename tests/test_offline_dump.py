"""fastkd-topk dump on a tiny random GPT-2 saved to disk, and training batches read back."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import fastkd  # noqa: E402
from fastkd.offline import TopKCollator, TopKDataset, check_loss_settings, cli  # noqa: E402
from fastkd.offline import writer as dump_module  # noqa: E402
from fastkd.offline.writer import topk_with_tail  # noqa: E402

SEQ_LEN = 48
VOCAB = 300
K = 16


def corpus_text(chars: int) -> str:
    """Deterministic text: the standard library's json package sources, repeated as needed."""
    src = "".join(p.read_text(encoding="utf-8")
                  for p in sorted(Path(json.__file__).parent.glob("*.py")))
    return (src * (chars // len(src) + 1))[:chars]


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                                pad_token="<eos>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    text = corpus_text(24_000)
    tok = train_tokenizer(text, VOCAB)
    eos = tok.eos_token_id
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1,
                                     n_head=2, bos_token_id=eos, eos_token_id=eos,
                                     pad_token_id=eos)
    teacher = transformers.GPT2LMHeadModel(config).eval()
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    # Ragged documents: paragraphs of the corpus, each its own sequence (cut at SEQ_LEN).
    docs = [d for d in text.split("\n\n") if d.strip()][:60]
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"input_ids": tok(d, add_special_tokens=False)["input_ids"]})
                    + "\n")
    return {"root": root, "teacher_dir": root / "teacher", "teacher": teacher, "tok": tok}


def run_dump(setup, out, data="docs.jsonl", *extra, expect=0):
    argv = ["dump", "--teacher", str(setup["teacher_dir"]), "--data", str(setup["root"] / data),
            "--out", str(out), "--k", str(K), "--seq-len", str(SEQ_LEN), "--shard-tokens", "400",
            "--batch-tokens", "160", "--no-progress", *extra]
    assert cli.main(argv) == expect
    return out


def shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("shard-*"))}


@pytest.fixture(scope="module")
def packed_dump(setup):
    return run_dump(setup, setup["root"] / "packed", "docs.jsonl", "--pack-ids")


def live_rows(teacher, input_ids, k, temperature=1.0):
    """The teacher run on one sequence alone: top-k rows for positions 0 .. L-2."""
    with torch.no_grad():
        logits = teacher(input_ids=input_ids[None]).logits[0, :-1]
    return topk_with_tail(logits, k, temperature), torch.log_softmax(logits.double(), -1)


def assert_rows_match_live(ids, values, tail, live_lp, atol):
    """Stored rows against the teacher's float64 log-probs on the same positions: the ids are a
    top k (up to `atol`: a different batch composition may swap near-ties), the values and the
    tail are the log-probs and the mass outside."""
    ids = ids.long()
    at_ids = live_lp.gather(-1, ids)
    torch.testing.assert_close(values.double(), at_ids, rtol=0, atol=atol)
    outside = live_lp.scatter(-1, ids, float("-inf"))
    assert torch.all(at_ids.min(-1).values >= outside.max(-1).values - 1e-5)
    torch.testing.assert_close(tail.double(), outside.logsumexp(-1), rtol=0, atol=1e-5)


def test_dump_matches_teacher_run_live(setup, packed_dump):
    ds = TopKDataset(packed_dump, setup["tok"])
    m = ds.manifest
    assert (m.k, m.temperature, m.vocab_size, m.id_bits) == (K, 1.0, VOCAB, 9)
    assert m.teacher == str(setup["teacher_dir"]) and m.tokenizer_vocab_size == VOCAB
    assert ds.num_shards > 3 and ds.num_rows == ds.num_tokens - len(ds)
    lengths = ds.lengths
    assert len(set(lengths)) > 5 and max(lengths) == SEQ_LEN  # ragged, windows cut at SEQ_LEN
    for i in range(0, len(ds), 7):
        item = ds[i]
        n = len(item["input_ids"])
        assert item["topk_ids"].shape == (n - 1, K) and item["topk_ids"].dtype == torch.int32
        assert item["topk_values"].dtype == torch.float16 and item["tail_logprob"].shape == (n - 1,)
        if n > 1:
            _, live_lp = live_rows(setup["teacher"], item["input_ids"], K)
            # fp16 rounding of log-probs in [-8, 0]: half a step is 2**-9
            assert_rows_match_live(item["topk_ids"], item["topk_values"], item["tail_logprob"],
                                   live_lp, atol=2e-3)


def test_dataset_in_dataloader_workers(setup, packed_dump):
    import pickle

    ds = TopKDataset(packed_dump, setup["tok"])
    first = ds[0]
    clone = pickle.loads(pickle.dumps(ds))  # as a spawned worker receives it: no open mappings
    assert all(torch.equal(first[key], clone[0][key]) for key in first)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         collate_fn=TopKCollator(setup["tok"].pad_token_id))
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == len(ds)
    assert torch.equal(batches[0]["teacher_topk_ids"][0, : len(first["topk_ids"])],
                       first["topk_ids"])


def test_packed_and_int32_ids_store_the_same_rows(setup, packed_dump):
    plain = run_dump(setup, setup["root"] / "plain", "docs.jsonl")
    a, b = TopKDataset(packed_dump, setup["tok"]), TopKDataset(plain, setup["tok"])
    assert len(a) == len(b) and a.disk_bytes < b.disk_bytes
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert all(torch.equal(x[key], y[key]) for key in x)
    # bytes per row on disk: packed 9-bit ids 18 + values 32 + tail 4 + token 4, plus headers
    assert a.manifest.bytes_per_row == 58 and b.manifest.bytes_per_row == 6 * K + 8
    assert a.disk_bytes / a.num_rows < 58 * 1.1


def test_exact_k_stores_the_rest_as_codes(setup, packed_dump):
    coded = run_dump(setup, setup["root"] / "coded", "docs.jsonl", "--pack-ids", "--exact-k", "4")
    a, b = TopKDataset(coded, setup["tok"]), TopKDataset(packed_dump, setup["tok"])
    assert a.manifest.exact_k == 4 and a.manifest.bytes_per_row == 18 + 2 * 5 + 12 + 8
    assert a.disk_bytes < 0.85 * b.disk_bytes
    for i in range(0, len(a), 5):
        x, y = a[i], b[i]
        assert torch.equal(x["topk_ids"], y["topk_ids"])
        assert torch.equal(x["tail_logprob"], y["tail_logprob"])
        assert x["topk_values"].dtype == torch.float16
        assert torch.equal(x["topk_values"][:, :4], y["topk_values"][:, :4])
        v, ref = x["topk_values"].double(), y["topk_values"].double()
        if len(v):
            span = (ref[:, 3] - ref[:, -1])[:, None]
            # code step / 2, plus fp16 rounding of the decoded value and of the row's floor
            assert torch.all((v - ref).abs() <= span / 508 + 2e-3 * (1 + ref.abs()))
    for bad in (["--k", "4", "--exact-k", "4"], ["--k", str(VOCAB + 1)],
                ["--temperature", "0"], ["--vocab-size", str(VOCAB + 1)]):
        assert cli.main(["dump", "--teacher", str(setup["teacher_dir"]), "--data",
                         str(setup["root"] / "docs.jsonl"), "--out", str(setup["root"] / "bad"),
                         "--no-progress", *bad]) == 2, bad


def test_resume_after_interruption_is_byte_identical(setup, monkeypatch):
    whole = run_dump(setup, setup["root"] / "whole", "corpus.txt")
    real_write = dump_module.write_shard
    calls = []

    def dying_write(path, tensors, metadata):
        calls.append(path.name)
        if len(calls) == 3:  # killed while writing the third shard: a partial temporary file
            (path.parent / f".{path.name}.tmp-{os.getpid()}").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated kill")
        real_write(path, tensors, metadata)

    monkeypatch.setattr(dump_module, "write_shard", dying_write)
    resumed = setup["root"] / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_dump(setup, resumed, "corpus.txt")
    assert len(shard_bytes(resumed)) == 2
    with pytest.raises(ValueError, match="not finished"):
        TopKDataset(resumed, setup["tok"])
    monkeypatch.setattr(dump_module, "write_shard", real_write)
    run_dump(setup, resumed, "corpus.txt")
    done = json.loads((resumed / "done-00000-of-00001.json").read_text())
    assert done["shards_skipped"] == 2 and done["shards_written"] == done["num_shards"] - 2
    assert shard_bytes(resumed) == shard_bytes(whole) and len(shard_bytes(whole)) > 5
    assert (resumed / "manifest.json").read_bytes() == (whole / "manifest.json").read_bytes()
    assert not list(resumed.glob(".*tmp*"))
    TopKDataset(resumed, setup["tok"])


def test_ranks_store_their_own_shards(setup, packed_dump, monkeypatch):
    out = setup["root"] / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run_dump(setup, out, "docs.jsonl", "--pack-ids")
    names = sorted(shard_bytes(out))
    assert names and all(int(n[6:11]) % 2 == 1 for n in names)
    with pytest.raises(ValueError, match="missing"):
        TopKDataset(out, setup["tok"])
    monkeypatch.setenv("RANK", "0")
    run_dump(setup, out, "docs.jsonl", "--pack-ids")
    assert shard_bytes(out) == shard_bytes(packed_dump)
    assert len(TopKDataset(out, setup["tok"])) == len(TopKDataset(packed_dump, setup["tok"]))


def test_mismatches_are_refused(setup, packed_dump, capsys):
    other = train_tokenizer(corpus_text(24_000)[::-1], VOCAB)
    with pytest.raises(ValueError, match="vocabulary hash .* differs"):
        TopKDataset(packed_dump, other)
    TopKDataset(packed_dump, tokenizer=None)  # the check skipped on purpose
    with pytest.raises(ValueError, match="student_vocab_size=299"):
        TopKDataset(packed_dump, setup["tok"], student_vocab_size=VOCAB - 1)
    TopKDataset(packed_dump, setup["tok"], student_vocab_size=VOCAB + 4)  # padded student
    # resuming with other settings
    before = shard_bytes(packed_dump)
    run_dump(setup, packed_dump, "docs.jsonl", "--pack-ids", "--temperature", "2", expect=2)
    assert "other settings" in capsys.readouterr().err and shard_bytes(packed_dump) == before
    m = TopKDataset(packed_dump, setup["tok"]).manifest
    with pytest.raises(ValueError, match="temperature"):
        check_loss_settings(m, temperature=2.0, tail="bucket")
    check_loss_settings(m, temperature=1.0, tail="bucket")
    check_loss_settings(m, temperature=3.0, tail="renormalize")
    with pytest.raises(ValueError, match="tail"):
        check_loss_settings(m, temperature=1.0, tail="zero")


def test_datasets_directory_input_matches_jsonl(setup, packed_dump):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line)["input_ids"]
            for line in (setup["root"] / "docs.jsonl").read_text().splitlines()]
    width = max(map(len, rows))
    # padded rows with an attention mask: only the masked-in tokens are kept
    ds = datasets.Dataset.from_dict({
        "input_ids": [r + [0] * (width - len(r)) for r in rows],
        "attention_mask": [[1] * len(r) + [0] * (width - len(r)) for r in rows]})
    ds.save_to_disk(str(setup["root"] / "saved"))
    out = run_dump(setup, setup["root"] / "from_saved", "saved", "--pack-ids")
    assert shard_bytes(out) == shard_bytes(packed_dump)


def test_collator_aligns_with_student_positions(setup, packed_dump):
    ds = TopKDataset(packed_dump, setup["tok"])
    by_length = {n: i for i, n in enumerate(ds.lengths)}
    picks = sorted(by_length)  # the shortest (1 token: no teacher row), longest, two between
    picks = [picks[0], picks[-1], picks[len(picks) // 3], picks[len(picks) // 2]]
    items = [ds[by_length[n]] for n in picks]
    lengths = [len(it["input_ids"]) for it in items]
    assert len(set(lengths)) == 4 and max(lengths) == SEQ_LEN
    pad = setup["tok"].pad_token_id
    batch = TopKCollator(pad, pad_to_multiple_of=8)(items)
    width = max(lengths) + (-max(lengths)) % 8
    assert tuple(batch) == fastkd.offline.BATCH_KEYS
    assert batch["teacher_topk_ids"].shape == (4, width, K)
    assert batch["teacher_topk_values"].dtype == torch.float16
    assert batch["teacher_tail_logprob"].dtype == torch.float32
    with torch.no_grad():
        logits = setup["teacher"](input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).logits
    live_lp = torch.log_softmax(logits.double(), -1)
    for b, n in enumerate(lengths):
        assert torch.equal(batch["attention_mask"][b], (torch.arange(width) < n).long())
        assert torch.all(batch["labels"][b, n:] == -100)
        assert torch.equal(batch["labels"][b, :n], items[b]["input_ids"])
        assert torch.all(batch["input_ids"][b, n:] == pad)
        # rows 0 .. n-2: the teacher's distribution at the student's positions, like its logits
        assert_rows_match_live(batch["teacher_topk_ids"][b, : n - 1],
                               batch["teacher_topk_values"][b, : n - 1],
                               batch["teacher_tail_logprob"][b, : n - 1], live_lp[b, : n - 1],
                               atol=2e-3)
        # the last token and the padding have no teacher row: padding entries only
        assert torch.all(batch["teacher_topk_values"][b, n - 1 :] == float("-inf"))
        assert torch.all(batch["teacher_tail_logprob"][b, n - 1 :] == float("-inf"))
        assert torch.all(batch["teacher_topk_ids"][b, n - 1 :] == 0)
    # shifted as for the loss, every teacher row with a real label is a stored row
    shifted = batch["labels"][:, 1:]
    stored = torch.isfinite(batch["teacher_topk_values"][:, :-1, 0])
    assert torch.equal(shifted != -100, stored)
    f32 = TopKCollator(pad, values_dtype=torch.float32)(items)
    assert f32["teacher_topk_values"].dtype == torch.float32
    with pytest.raises(ValueError, match="empty"):
        TopKCollator(pad)([])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        TopKCollator(pad)([{"input_ids": it["input_ids"]} for it in items])


MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import fastkd.offline.cli as cli

    cli.TEXT_PIECE_CHARS = 4096  # read and tokenize the text 4 KiB at a time, to show streaming

    def peak_kib():
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    peaks = []
    for argv in json.loads(sys.argv[1]):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        assert cli.main(argv) == 0
        peaks.append(peak_kib() * 1024)
    print(json.dumps(peaks))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_dump_memory_is_bounded(setup, tmp_path):
    """The peak RSS of a dump 8x larger than another (and > 10x its shard size) exceeds the
    smaller one's by far less than the larger dump's output: one shard and one batch are held
    at a time. Both run in one fresh process, the peak reset before each."""
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(fastkd.__file__).parent.parent), env.get("PYTHONPATH", "")])
    runs = []
    for name, chars in (("small", 6_000), ("large", 48_000)):
        (tmp_path / f"{name}.txt").write_text(corpus_text(chars), encoding="utf-8")
        runs.append(["dump", "--teacher", str(setup["teacher_dir"]), "--data",
                     str(tmp_path / f"{name}.txt"), "--out", str(tmp_path / f"out_{name}"),
                     "--k", "256", "--seq-len", "64", "--shard-tokens", "1024",
                     "--batch-tokens", "256", "--no-progress", "--threads", "1"])
    proc = subprocess.run([sys.executable, str(script), json.dumps(runs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_small, peak_large = json.loads(proc.stdout.strip().splitlines()[-1])
    sizes = {name: sum(p.stat().st_size for p in (tmp_path / f"out_{name}").glob("shard-*"))
             for name in ("small", "large")}
    shard = max(p.stat().st_size for p in (tmp_path / "out_large").glob("shard-*"))
    assert sizes["large"] > 10 * shard and sizes["large"] > 7 * sizes["small"]
    assert peak_large - peak_small < 0.2 * sizes["large"], (peak_small, peak_large, sizes)
    mib = {name: size / 2**20 for name, size in sizes.items()}
    print(f"peak RSS {peak_small / 2**20:.1f} MiB (small dump, {mib['small']:.1f} MiB out) "
          f"vs {peak_large / 2**20:.1f} MiB (large, {mib['large']:.1f} MiB out)")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_first_step_loss_from_file_equals_live_teacher(setup, tail):
    out = setup["root"] / f"f32_{tail}"
    temperature = 2.0 if tail == "bucket" else 1.0
    if not out.exists():
        run_dump(setup, out, "docs.jsonl", "--values-dtype", "float32", "--temperature",
                 str(temperature))
    ds = TopKDataset(out, setup["tok"])
    check_loss_settings(ds.manifest, temperature=2.0 if tail == "bucket" else 3.0, tail=tail)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False,
                                         collate_fn=TopKCollator(setup["tok"].pad_token_id))
    batch = next(iter(loader))
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    student = transformers.GPT2LMHeadModel(config)
    loss_temperature = 2.0 if tail == "bucket" else 3.0
    kwargs = dict(temperature=loss_temperature, alpha=0.7, tail=tail)

    def student_logits():
        return student(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits

    logits = student_logits()
    from_file = fastkd.topk_kd_loss(
        logits[:, :-1], batch["teacher_topk_ids"][:, :-1], batch["teacher_topk_values"][:, :-1],
        batch["labels"][:, 1:], teacher_tail_logprob=batch["teacher_tail_logprob"][:, :-1]
        if tail == "bucket" else None, **kwargs)
    from_file.backward()
    grad_file = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    with torch.no_grad():
        t_logits = setup["teacher"](input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits[:, :-1]
    live_ids, live_values = fastkd.teacher_topk(t_logits, K, temperature=temperature)
    live_tail = None
    if tail == "bucket":
        flat = t_logits.reshape(-1, t_logits.shape[-1])
        live_tail = topk_with_tail(flat, K, temperature)[2].reshape(t_logits.shape[:-1])
    logits = student_logits()
    live = fastkd.topk_kd_loss(logits[:, :-1], live_ids, live_values, batch["labels"][:, 1:],
                               teacher_tail_logprob=live_tail, **kwargs)
    live.backward()
    torch.testing.assert_close(from_file, live, rtol=1e-5, atol=1e-6)
    for g_file, p in zip(grad_file, student.parameters(), strict=True):
        torch.testing.assert_close(g_file, p.grad, rtol=1e-4, atol=1e-6)
