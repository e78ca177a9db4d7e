"""``fastkd-topk``: store a Hugging Face teacher's top-k log-probs for offline distillation.

    fastkd-topk dump --teacher DIR_OR_NAME --data FILE_OR_DIR --out DIR [--k 64] [--temperature 1]
    fastkd-topk info DIR

``--data`` is one of

* a directory written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``; ``--split``),
  with an ``input_ids`` column (``attention_mask`` respected: only its 1s are kept) or a text
  column (``--text-column``, tokenized here);
* a ``.jsonl`` file, one JSON object per line with ``input_ids`` or the text column;
* any other file: plain UTF-8 text, tokenized as one stream in 1 MiB pieces cut at line ends.

Sequences longer than ``--seq-len`` are cut into windows of ``--seq-len`` tokens; the text stream
is cut into such windows, the last one shorter. Under ``torchrun --nproc-per-node N fastkd-topk
dump ...`` each rank stores its own shards (no process group is needed; ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` are read from the environment). Rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .storage import VALUE_DTYPES, Manifest, id_bits, vocab_hash

TEXT_PIECE_CHARS = 1 << 20


def _windows(ids: list[int], seq_len: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), seq_len):
        yield ids[start : start + seq_len]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def iter_text_file(path: Path, tokenizer, seq_len: int) -> Iterator[list[int]]:
    """A text file as one token stream, read and tokenized 1 MiB at a time (cut at line ends),
    in windows of seq_len tokens."""
    buffer: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            text = f.read(TEXT_PIECE_CHARS)
            if not text:
                break
            text += f.readline()
            buffer.extend(_encode(tokenizer, text))
            full = len(buffer) - len(buffer) % seq_len
            yield from _windows(buffer[:full], seq_len)
            del buffer[:full]
    if buffer:
        yield buffer


def _row_ids(row: dict, tokenizer, text_column: str, where: str) -> list[int]:
    if "input_ids" in row:
        ids = list(row["input_ids"])
        mask = row.get("attention_mask")
        if mask is not None:
            ids = [t for t, m in zip(ids, mask, strict=True) if m]
        return ids
    if text_column in row:
        if tokenizer is None:
            raise ValueError(f"{where} has text but no tokenizer was given")
        return _encode(tokenizer, row[text_column])
    raise ValueError(f"{where} has neither 'input_ids' nor the text column {text_column!r} "
                     f"(columns: {sorted(row)})")


def iter_jsonl(path: Path, tokenizer, seq_len: int, text_column: str) -> Iterator[list[int]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                row = json.loads(line)
                yield from _windows(_row_ids(row, tokenizer, text_column,
                                             f"{path}:{line_no}"), seq_len)


def load_saved_dataset(path: Path, split: str):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"--split {split!r} is not in {path} (splits: {list(ds)})")
        ds = ds[split]
    return ds


def iter_dataset(ds, tokenizer, seq_len: int, text_column: str) -> Iterator[list[int]]:
    for i, row in enumerate(ds):
        yield from _windows(_row_ids(row, tokenizer, text_column, f"dataset row {i}"), seq_len)


def open_source(data: str, tokenizer, seq_len: int, text_column: str, split: str):
    """(iterator of token-id lists, description for the manifest)."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or directory")
    desc = {"path": str(path.resolve()), "seq_len": seq_len}
    if path.is_dir():
        ds = load_saved_dataset(path, split)
        desc.update(kind="datasets", split=split, rows=len(ds),
                    fingerprint=getattr(ds, "_fingerprint", None))
        if "input_ids" not in ds.column_names:
            desc["text_column"] = text_column
        return iter_dataset(ds, tokenizer, seq_len, text_column), desc
    desc["bytes"] = path.stat().st_size
    if path.suffix == ".jsonl":
        desc.update(kind="jsonl", text_column=text_column)
        return iter_jsonl(path, tokenizer, seq_len, text_column), desc
    if tokenizer is None:
        raise ValueError("a text file needs a tokenizer")
    desc["kind"] = "text"
    return iter_text_file(path, tokenizer, seq_len), desc


def _output_vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    return int(config.vocab_size)


def _device(name: str, local_rank: int):
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd-topk", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="run a teacher over a corpus and store its top-k",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--teacher", required=True, help="local directory or Hub name "
                   "(AutoModelForCausalLM.from_pretrained)")
    d.add_argument("--revision", default=None, help="teacher revision (Hub branch, tag, commit)")
    d.add_argument("--tokenizer", default=None, help="tokenizer directory or name "
                   "(default: --teacher)")
    d.add_argument("--data", required=True, help="datasets directory, .jsonl, or text file")
    d.add_argument("--out", required=True, type=Path, help="output directory (resumed if it "
                   "holds a dump with the same settings)")
    d.add_argument("--k", type=int, default=64, help="entries stored per token")
    d.add_argument("--temperature", type=float, default=1.0,
                   help="log-probs are log_softmax(logits / T); use T=1 for tail='renormalize' "
                   "(which tempers at the loss) and the loss temperature for tail='bucket'")
    d.add_argument("--seq-len", type=int, default=1024, help="longest stored sequence; longer "
                   "ones are cut into windows")
    d.add_argument("--batch-tokens", type=int, default=4096,
                   help="padded tokens per teacher forward (bounds the logits' memory)")
    d.add_argument("--shard-tokens", type=int, default=1 << 18,
                   help="tokens per shard (bounds the outputs held in memory)")
    d.add_argument("--values-dtype", choices=sorted(VALUE_DTYPES), default="float16",
                   help="dtype of the stored log-probs (float16 has 8x finer steps than "
                   "bfloat16 on [-65504, 0], where log-probs live)")
    d.add_argument("--exact-k", type=int, default=0,
                   help="keep the first E values in --values-dtype and store the other k - E as "
                   "8-bit codes on a per-row log-prob scale (1 byte instead of 2; 0: all exact)")
    d.add_argument("--pack-ids", action="store_true",
                   help="store ids in ceil(log2 V) bits instead of int32")
    d.add_argument("--vocab-size", type=int, default=None,
                   help="keep only the first N logits (a student with a smaller padded "
                   "vocabulary); default: the teacher's output size")
    d.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="teacher weights dtype")
    d.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, "
                   "cuda, ...")
    d.add_argument("--text-column", default="text")
    d.add_argument("--split", default="train", help="split of a saved DatasetDict")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    d.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("info", help="summarise a dump directory")
    i.add_argument("dir", type=Path)
    return p


def run_dump(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .writer import dump

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    from .._spec import check_loss_options

    check_loss_options(temperature=args.temperature, has_labels=None)
    for name in ("seq_len", "batch_tokens", "shard_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not Path(args.data).exists():  # before loading the teacher
        raise FileNotFoundError(f"--data {args.data}: no such file or directory")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device, local_rank)
    dtype = getattr(torch, args.dtype)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(args.teacher, revision=args.revision,
                                                 **{dtype_kw: dtype}).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher,
                                              revision=None if args.tokenizer else args.revision)
    vocab = _output_vocab_size(model)
    if args.vocab_size is not None:
        if not 1 <= args.vocab_size <= vocab:
            raise ValueError(f"--vocab-size must be in [1, {vocab}] (the teacher's output "
                             f"size), got {args.vocab_size}")
        vocab = args.vocab_size
    if args.k > vocab:
        raise ValueError(f"--k {args.k} is larger than the vocabulary ({vocab})")
    if args.exact_k and not 0 < args.exact_k < args.k:
        raise ValueError(f"--exact-k must be 0 or in [1, k), got {args.exact_k}")
    sequences, data_desc = open_source(args.data, tokenizer, args.seq_len, args.text_column,
                                       args.split)
    manifest = Manifest(
        k=args.k, temperature=float(args.temperature), vocab_size=vocab,
        values_dtype=args.values_dtype, id_bits=id_bits(vocab) if args.pack_ids else 0,
        teacher=str(args.teacher),
        teacher_revision=args.revision or getattr(model.config, "_commit_hash", None),
        vocab_hash=vocab_hash(tokenizer), tokenizer_vocab_size=len(tokenizer),
        seq_len=args.seq_len, shard_tokens=args.shard_tokens, batch_tokens=args.batch_tokens,
        data=data_desc, exact_k=args.exact_k,
    )
    stats = dump(model, sequences, args.out, manifest, device=device, rank=rank,
                 world_size=world_size, progress=not args.no_progress)
    summary = {"rank": rank, "world_size": world_size, "num_shards": stats.num_shards,
               "shards_written": stats.shards_written, "shards_skipped": stats.shards_skipped,
               "tokens": stats.tokens, "rows_computed": stats.rows, "seconds": stats.seconds,
               "rows_per_second": stats.rows_per_second}
    print(json.dumps(summary))
    return summary


def run_info(directory: Path) -> dict:
    from .data import TopKDataset

    ds = TopKDataset(directory, tokenizer=None)
    m = ds.manifest
    info = {"k": m.k, "temperature": m.temperature, "vocab_size": m.vocab_size,
            "values_dtype": m.values_dtype, "exact_k": m.exact_k or m.k,
            "id_bits": m.id_bits or 32, "teacher": m.teacher,
            "teacher_revision": m.teacher_revision, "vocab_hash": m.vocab_hash,
            "shards": ds.num_shards, "sequences": len(ds), "tokens": ds.num_tokens,
            "rows": ds.num_rows, "disk_bytes": ds.disk_bytes,
            "bytes_per_row": ds.disk_bytes / max(ds.num_rows, 1)}
    print(json.dumps(info, indent=1))
    return info


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "dump":
            run_dump(args)
        else:
            run_info(args.dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastkd-topk: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
