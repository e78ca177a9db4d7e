"""Read a stored top-k teacher back as training batches aligned with the student's logits."""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import torch

from .._spec import check_loss_options
from .storage import (
    DONE_PATTERN,
    SHARD_PATTERN,
    decode_rest_logprobs,
    read_manifest,
    unpack_ids,
    vocab_hash,
)

ITEM_KEYS = ("input_ids", "topk_ids", "topk_values", "tail_logprob")
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "teacher_topk_ids",
              "teacher_topk_values", "teacher_tail_logprob")


def _done_shard_count(directory: Path) -> int | None:
    counts = set()
    for path in directory.glob(DONE_PATTERN.replace("{:05d}", "*")):
        counts.add(json.loads(path.read_text(encoding="utf-8"))["num_shards"])
    if len(counts) > 1:
        raise ValueError(f"{directory}: the ranks' done files disagree on the number of shards "
                         f"({sorted(counts)})")
    return counts.pop() if counts else None


class TopKDataset(torch.utils.data.Dataset):
    """The sequences of a ``fastkd-topk dump`` directory, one item per sequence.

    ``tokenizer`` is the student's tokenizer: its vocabulary hash must equal the one the dump
    recorded, or a ValueError is raised (the stored ids would index other tokens). Pass
    ``tokenizer=None`` to skip that check deliberately. ``student_vocab_size``, when given, must
    cover every stored id (``>= manifest.vocab_size``).

    Item i is a dict of CPU tensors, for a sequence of L tokens:

    * ``input_ids`` (L,) int64;
    * ``topk_ids`` (L - 1, k) int32, ``topk_values`` (L - 1, k) in the stored dtype (log-probs
      at ``manifest.temperature``, largest first), ``tail_logprob`` (L - 1,) float32: row i is
      the teacher's distribution for token i + 1.

    Shards are opened with ``safetensors.safe_open`` (memory-mapped) once per process and only
    the requested rows are read, so the dump can be larger than RAM; DataLoader workers open
    their own handles.
    """

    def __init__(self, directory: str | os.PathLike, tokenizer, *,
                 student_vocab_size: int | None = None, allow_incomplete: bool = False):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        if tokenizer is not None:
            got = vocab_hash(tokenizer)
            if got != m.vocab_hash:
                raise ValueError(
                    f"tokenizer vocabulary hash {got[:16]}... differs from the one the dump in "
                    f"{self.directory} was made with ({m.vocab_hash[:16]}..., teacher "
                    f"{m.teacher!r}): the stored ids would index other tokens. Use the "
                    f"teacher's tokenizer (or one with the same token -> id mapping)")
        if student_vocab_size is not None and student_vocab_size < m.vocab_size:
            raise ValueError(f"student_vocab_size={student_vocab_size} is smaller than the "
                             f"stored ids' range (vocab_size={m.vocab_size}); dump with "
                             f"--vocab-size {student_vocab_size}")
        paths = sorted(self.directory.glob(SHARD_PATTERN.replace("{:05d}", "[0-9]*")))
        expected = _done_shard_count(self.directory)
        indices = [int(p.name[len("shard-"):].split(".")[0]) for p in paths]
        if not allow_incomplete:
            if expected is None:
                raise ValueError(f"{self.directory}: the dump has not finished (no done file); "
                                 f"rerun the same fastkd-topk dump command to complete it, or "
                                 f"pass allow_incomplete=True")
            missing = sorted(set(range(expected)) - set(indices))
            if missing or len(indices) != expected:
                raise ValueError(f"{self.directory}: {len(missing)} of {expected} shards are "
                                 f"missing (first: {missing[:5]}); rerun the dump (every rank) "
                                 f"to complete it, or pass allow_incomplete=True")
        self._paths = [str(p) for p in paths]
        self._offsets: list[torch.Tensor] = []
        starts = [0]
        for p in self._paths:
            with safe_open(p, framework="pt") as f:
                self._offsets.append(f.get_tensor("offsets"))
            starts.append(starts[-1] + len(self._offsets[-1]) - 1)
        self._starts = starts
        self._handles: dict = {}
        self._pid = None
        self.disk_bytes = sum(os.path.getsize(p) for p in self._paths)

    @property
    def num_shards(self) -> int:
        return len(self._paths)

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def lengths(self) -> list[int]:
        """Tokens per sequence (e.g. for length-grouped sampling)."""
        return [n for off in self._offsets for n in off.diff().tolist()]

    @property
    def num_tokens(self) -> int:
        return sum(int(off[-1]) for off in self._offsets)

    @property
    def num_rows(self) -> int:
        return self.num_tokens - len(self)

    def __getstate__(self):  # DataLoader workers started by spawn get no open mappings
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def _handle(self, shard: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked DataLoader worker: open its own mappings
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(self._paths[shard], framework="pt")
        return h

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences")
        index %= len(self)
        shard = bisect.bisect_right(self._starts, index) - 1
        s = index - self._starts[shard]
        a, b = (int(x) for x in self._offsets[shard][s : s + 2])
        ra, rb = a - s, b - s - 1  # rows of sequence s
        f = self._handle(shard)
        ids = f.get_slice("topk_ids")[ra:rb]
        m = self.manifest
        if m.id_bits:
            ids = unpack_ids(ids, m.k, m.id_bits)
        values = f.get_slice("topk_logprobs")[ra:rb]
        if m.exact_k:
            values = decode_rest_logprobs(values, f.get_slice("topk_logprob_codes")[ra:rb],
                                          f.get_slice("topk_logprob_floor")[ra:rb])
        return {"input_ids": f.get_slice("input_ids")[a:b].long(), "topk_ids": ids,
                "topk_values": values, "tail_logprob": f.get_slice("tail_logprob")[ra:rb]}


class TopKCollator:
    """Pads `TopKDataset` items into a batch aligned with the student's logits.

    For B sequences padded (on the right) to length L (the longest, or a multiple of
    ``pad_to_multiple_of``), the batch holds

    =========================  ==============  ===============================================
    key                        shape, dtype    content
    =========================  ==============  ===============================================
    ``input_ids``              (B, L) int64    tokens; ``pad_token_id`` on padding
    ``attention_mask``         (B, L) int64    1 on tokens, 0 on padding
    ``labels``                 (B, L) int64    ``input_ids``, ``ignore_index`` on padding
                                               (unshifted, as Hugging Face causal LMs take them)
    ``teacher_topk_ids``       (B, L, k) int32 row i: the teacher's top-k for token i + 1
    ``teacher_topk_values``    (B, L, k)       their log-probs (stored dtype, or ``values_dtype``)
    ``teacher_tail_logprob``   (B, L) float32  log(1 - Σ_k p_k) of that row
    =========================  ==============  ===============================================

    The teacher tensors line up with the student's logits (B, L, V) like dense teacher logits do:
    shift both and the labels together, as in

        logits = student(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
        loss = fastkd.topk_kd_loss(
            logits[:, :-1], batch["teacher_topk_ids"][:, :-1],
            batch["teacher_topk_values"][:, :-1], batch["labels"][:, 1:],
            temperature=T, alpha=alpha, tail="bucket",
            teacher_tail_logprob=batch["teacher_tail_logprob"][:, :-1])

    The last token of each sequence and the padding positions have no teacher row: their values
    are all -inf (padding entries of the top-k loss, ids 0 and never read) and their tail is
    -inf; the shifted labels of those positions are ``ignore_index``, so they are ignored rows.
    Pass the labels also for pure distillation (alpha=1): they are what marks those rows.
    """

    def __init__(self, pad_token_id: int = 0, *, ignore_index: int = -100,
                 pad_to_multiple_of: int | None = None, values_dtype: torch.dtype | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.ignore_index = int(ignore_index)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.values_dtype = values_dtype

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        missing = [key for key in ITEM_KEYS if key not in items[0]]
        if missing:
            raise ValueError(
                f"items lack {missing} (got {sorted(items[0])}); they must come from "
                f"TopKDataset. transformers.Trainer drops item keys that model.forward does not "
                f"take unless TrainingArguments(remove_unused_columns=False)")
        lengths = [len(it["input_ids"]) for it in items]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        k = items[0]["topk_ids"].shape[-1]
        dtype = self.values_dtype or items[0]["topk_values"].dtype
        b = len(items)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        ids = torch.zeros(b, width, k, dtype=torch.int32)
        values = torch.full((b, width, k), float("-inf"), dtype=dtype)
        tail = torch.full((b, width), float("-inf"), dtype=torch.float32)
        for i, (it, n) in enumerate(zip(items, lengths, strict=True)):
            input_ids[i, :n] = it["input_ids"]
            mask[i, :n] = 1
            ids[i, : n - 1] = it["topk_ids"]
            values[i, : n - 1] = it["topk_values"].to(dtype)
            tail[i, : n - 1] = it["tail_logprob"]
        labels = input_ids.masked_fill(mask == 0, self.ignore_index)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "teacher_topk_ids": ids, "teacher_topk_values": values,
                "teacher_tail_logprob": tail}


def check_loss_settings(manifest, *, temperature: float, tail: str) -> None:
    """Refuse a loss configuration the stored values do not support.

    ``tail="bucket"`` uses the values as log-probs at the loss temperature: the dump must have
    been made at that temperature. ``tail="renormalize"`` divides the values by the loss
    temperature: a dump at T != 1 would be tempered twice.
    """
    temperature = check_loss_options(temperature=temperature, has_labels=None).temperature
    stored = manifest.temperature
    if tail == "bucket":
        if float(temperature) != stored:
            raise ValueError(f"tail='bucket' needs the stored log-probs at the loss temperature:"
                             f" the dump has temperature={stored}, the loss {temperature}")
    elif tail == "renormalize":
        if stored != 1.0:
            raise ValueError(f"tail='renormalize' tempers the stored values by the loss "
                             f"temperature; the dump was made at temperature={stored}, which "
                             f"would temper them twice (dump at --temperature 1)")
    else:
        raise ValueError(f"tail must be 'renormalize' or 'bucket', got {tail!r}")
