"""Run a teacher over sequences of token ids and store its top-k, shard by shard.

Work is split into shards of consecutive sequences, each filled greedily up to a token budget, so
shard j holds the same sequences whatever ran before it. That gives

* bounded memory: one shard's outputs (rows × (6k + 8) bytes by default) plus one teacher
  forward (``batch_tokens`` × V logits) are held at a time, whatever the corpus size;
* resumption: a shard is written to a temporary file and renamed, so a shard file on disk is
  complete; a rerun skips the shards that exist and recomputes the rest the same way (within a
  shard, batches are formed from the shard's sequences alone, longest first);
* ranks without communication: rank r of W (``RANK`` / ``WORLD_SIZE`` as torchrun sets them)
  computes the shards j with j mod W == r, and every rank scans the whole sequence stream to
  find its shards (cheap next to the teacher).

Per teacher row, with z = logits / T (fp32), m = max(z) and e = exp(z - m):

    ids, top = topk(z, k)                            # largest first
    logprobs = top - (m + log Σ_v e_v)               # as fastkd.teacher_topk returns them
    tail = log Σ_{v ∉ ids} e_v - log Σ_v e_v  = log(1 - Σ_k p_k)

The tail is summed over the entries outside the top k, not taken as log(1 - Σ exp(logprobs)),
which cancels to 0 or below when the top k hold nearly all the mass: at k = V it is exactly -inf.
One pass of exponentials serves both sums. Memory traffic per row: read V logits, write and
read back their exponentials for the two sums, one top-k sweep, scatter k zeros.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._spec import check_loss_options
from .storage import (
    DONE_PATTERN,
    MANIFEST_NAME,
    SHARD_METADATA_KEY,
    SHARD_PATTERN,
    VALUE_DTYPES,
    Manifest,
    atomic_write_bytes,
    check_shard_tensors,
    encode_rest_logprobs,
    pack_ids,
    read_manifest,
    write_shard,
)

# Rows of fp32 (rows, V) temporaries per top-k call: 2^24 elements = 64 MiB for each of the two.
TOPK_CHUNK_ELEMENTS = 1 << 24


def topk_with_tail(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """(N, V) logits -> ids (N, k) int32, logprobs (N, k) fp32, tail (N,) fp32.

    ids and logprobs are what `fastkd.teacher_topk` returns (up to the order of ties): the
    full-vocabulary log-softmax of logits / temperature at the top k, largest first. tail =
    log(1 - Σ exp(logprobs)), computed from the entries outside the top k, never as a difference
    (see the module docstring). In chunks of rows, in fp32, one exponential per entry serving
    both sums:

        z = logits.float() / temperature
        e = (z - z.amax(-1, keepdim=True)).exp()
        top, ids = z.topk(k)
        logprobs = top - z.logsumexp(-1, keepdim=True)
        tail = e.scatter(-1, ids, 0).sum(-1).log() - e.sum(-1).log()
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (rows, V), got shape {tuple(logits.shape)}")
    temperature = check_loss_options(temperature=temperature, has_labels=None).temperature
    n, v = logits.shape
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, V={v}], got {k}")
    ids = torch.empty(n, k, dtype=torch.int32, device=logits.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    tail = torch.empty(n, dtype=torch.float32, device=logits.device)
    step = max(1, TOPK_CHUNK_ELEMENTS // v)
    for a in range(0, n, step):
        z = logits[a : a + step].float()
        if temperature != 1.0:
            z = z / temperature
        # One exponential per entry gives the row's normaliser and the complement's sum.
        m = z.amax(dim=-1, keepdim=True)
        m = torch.where(m == float("-inf"), 0.0, m)  # a fully masked row: no inf - inf
        e = (z - m).exp_()
        log_total = e.sum(dim=-1).log()
        top, idx = z.topk(k, dim=-1)
        lp = top - (m + log_total[:, None])
        ids[a : a + step] = idx
        logprobs[a : a + step] = lp
        # The complement summed directly (entries relative to the row's max, so <= 1): no
        # cancellation; it reaches 0 (tail -inf) only below ~1e-38 of the row's mass.
        tail[a : a + step] = e.scatter_(-1, idx, 0.0).sum(dim=-1).log() - log_total
    return ids, logprobs, tail


@dataclass
class DumpStats:
    shards_written: int = 0
    shards_skipped: int = 0
    num_shards: int = 0
    sequences: int = 0
    tokens: int = 0
    rows: int = 0
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def plan_shards(sequences: Iterable[Sequence[int]], shard_tokens: int
                ) -> Iterator[tuple[int, int, list[Sequence[int]]]]:
    """Greedy shards: (index, first sequence index, sequences) with at most shard_tokens tokens,
    or one sequence when that alone is longer. Empty sequences are dropped."""
    index, first, count, current, tokens = 0, 0, 0, [], 0
    for seq in sequences:
        if len(seq) == 0:
            continue
        if current and tokens + len(seq) > shard_tokens:
            yield index, first, current
            index, first, current, tokens = index + 1, count, [], 0
        current.append(seq)
        tokens += len(seq)
        count += 1
    if current:
        yield index, first, current


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Sequence indices, longest first, grouped so that each padded batch (count × longest)
    stays within batch_tokens (one sequence when it alone is longer)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def compute_shard(model, sequences: list[Sequence[int]], manifest: Manifest,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """The shard tensors (storage.py's layout) for these sequences."""
    k, values_dtype = manifest.k, VALUE_DTYPES[manifest.values_dtype]
    lengths = [len(s) for s in sequences]
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    n_tokens = int(offsets[-1])
    rows = n_tokens - len(sequences)
    input_ids = torch.empty(n_tokens, dtype=torch.int32)
    for s, seq in enumerate(sequences):
        input_ids[offsets[s] : offsets[s + 1]] = torch.as_tensor(seq, dtype=torch.int32)
    ids = torch.empty(rows, k, dtype=torch.int32)
    # fp32 until encoded when the later values become 8-bit codes
    values = torch.empty(rows, k, dtype=torch.float32 if manifest.exact_k else values_dtype)
    tail = torch.empty(rows, dtype=torch.float32)
    for batch in _batches(lengths, manifest.batch_tokens):
        width = lengths[batch[0]]
        x = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, s in enumerate(batch):
            x[b, : lengths[s]] = input_ids[offsets[s] : offsets[s + 1]]
            mask[b, : lengths[s]] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
        if logits.shape[-1] < manifest.vocab_size:
            raise ValueError(f"the teacher returns {logits.shape[-1]} logits per token, fewer "
                             f"than vocab_size={manifest.vocab_size}")
        logits = logits[..., : manifest.vocab_size]
        # Position i predicts token i + 1: the last position of each sequence has no row.
        keep = mask.clone()
        keep[torch.arange(len(batch)), torch.tensor([lengths[s] - 1 for s in batch])] = 0
        b_ids, b_lp, b_tail = topk_with_tail(logits[keep.to(device).bool()], k,
                                             manifest.temperature)
        b_ids, b_lp, b_tail = b_ids.cpu(), b_lp.cpu(), b_tail.cpu()
        start = 0
        for s in batch:
            n = lengths[s] - 1
            dst = slice(int(offsets[s]) - s, int(offsets[s]) - s + n)
            ids[dst] = b_ids[start : start + n]
            values[dst] = b_lp[start : start + n].to(values.dtype)
            tail[dst] = b_tail[start : start + n]
            start += n
    out = {"input_ids": input_ids, "offsets": offsets,
           "topk_ids": pack_ids(ids, manifest.id_bits) if manifest.id_bits else ids,
           "topk_logprobs": values, "tail_logprob": tail}
    if manifest.exact_k:
        out["topk_logprobs"], out["topk_logprob_codes"], out["topk_logprob_floor"] = \
            encode_rest_logprobs(values, manifest.exact_k, values_dtype)
    return out


def _check_or_write_manifest(out: Path, manifest: Manifest) -> None:
    path = out / MANIFEST_NAME
    if path.exists():
        old = read_manifest(out)
        if old != manifest:
            diff = {name: (getattr(old, name), getattr(manifest, name))
                    for name in manifest.__dataclass_fields__
                    if getattr(old, name) != getattr(manifest, name)}
            raise ValueError(f"{out} holds a dump made with other settings; use another --out "
                             f"or the same settings to resume. Differences (stored, now): {diff}")
        return
    atomic_write_bytes(path, manifest.to_json().encode("utf-8"))


def _shard_metadata(manifest: Manifest, index: int, first: int, count: int) -> dict[str, str]:
    # One key holding sorted JSON: safetensors writes a metadata map in hash order, so several
    # keys would make identical shards differ byte for byte between runs.
    info = {"format": manifest.format, "format_version": manifest.format_version,
            "shard": index, "first_sequence": first, "num_sequences": count, "k": manifest.k,
            "id_bits": manifest.id_bits, "vocab_hash": manifest.vocab_hash}
    return {SHARD_METADATA_KEY: json.dumps(info, sort_keys=True)}


def _existing_shard_matches(path: Path, metadata: dict[str, str]) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() == metadata


def dump(model, sequences: Iterable[Sequence[int]], out: str | os.PathLike, manifest: Manifest,
         *, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
         progress: bool = True) -> DumpStats:
    """Store `model`'s top-k over `sequences` (iterables of token ids) in `out`.

    `model` is called as ``model(input_ids=..., attention_mask=...)`` and must return an object
    with ``.logits`` (a Hugging Face causal LM). The manifest says k, the temperature, the value
    dtype, the id packing, the shard and batch token budgets, and what to record about the
    teacher and tokenizer; `out` is created, or resumed if it holds a dump with the same manifest
    (shards already on disk are kept, the rest computed).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_manifest(out, manifest)
    for stale in out.glob(".shard-*.tmp-*"):  # a run of this rank stopped while writing
        index = stale.name[len(".shard-"):].split(".", 1)[0]
        if index.isdigit() and int(index) % world_size == rank:
            stale.unlink(missing_ok=True)
    device = torch.device(device)
    model.eval()
    stats = DumpStats()
    started = time.perf_counter()
    bar = tqdm(desc=f"top-{manifest.k} rank {rank}/{world_size}" if world_size > 1
               else f"top-{manifest.k}", unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    try:
        for index, first, seqs in plan_shards(sequences, manifest.shard_tokens):
            stats.num_shards = index + 1
            if index % world_size != rank:
                continue
            path = out / SHARD_PATTERN.format(index)
            metadata = _shard_metadata(manifest, index, first, len(seqs))
            n_tokens = sum(len(s) for s in seqs)
            if path.exists():
                if not _existing_shard_matches(path, metadata):
                    raise ValueError(f"{path} was written for other sequences than this run "
                                     f"assigns to it (the data changed?); use another --out")
                stats.shards_skipped += 1
            else:
                tensors = compute_shard(model, seqs, manifest, device)
                check_shard_tensors(tensors, manifest.k, manifest.id_bits, manifest.exact_k)
                write_shard(path, tensors, metadata)
                stats.shards_written += 1
                stats.rows += n_tokens - len(seqs)
            stats.sequences += len(seqs)
            stats.tokens += n_tokens
            bar.update(n_tokens)
            bar.set_postfix(shard=index)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - started
    done = {"num_shards": stats.num_shards, "rank": rank, "world_size": world_size,
            "shards_written": stats.shards_written, "shards_skipped": stats.shards_skipped,
            "sequences": stats.sequences, "tokens": stats.tokens,
            "rows_computed": stats.rows, "seconds": stats.seconds}
    atomic_write_bytes(out / DONE_PATTERN.format(rank, world_size),
                       (json.dumps(done, indent=1) + "\n").encode("utf-8"))
    return stats
