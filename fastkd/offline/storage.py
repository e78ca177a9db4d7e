"""On-disk format of a stored top-k teacher: safetensors shards plus a JSON manifest.

A dump directory holds

* ``manifest.json``: how the values were produced (k, temperature, vocabulary size, teacher name and
  revision, the SHA-256 of the tokenizer's vocabulary, value dtype, id packing, ...);
* ``shard-00000.safetensors``, ``shard-00001.safetensors``, ...: consecutive runs of sequences;
* ``done-<rank>-of-<world>.json``: written by each rank when it has written all of its shards,
  with the total number of shards.

One shard, for S sequences of lengths L_0 .. L_{S-1} (T = Σ L_s tokens, R = T - S rows):

==================  ===============  =====================================================
tensor              shape, dtype     content
==================  ===============  =====================================================
``input_ids``       (T,) int32       the tokens, sequences concatenated
``offsets``         (S + 1,) int64   sequence s is ``input_ids[offsets[s]:offsets[s + 1]]``
``topk_ids``        (R, k) int32     teacher top-k ids, largest first; or, packed,
                    (R, B) uint8     each row's k ids in ceil(log2 V) bits, little-endian
``topk_logprobs``   (R, k) f16/bf16  full-vocabulary log-softmax(logits / T) of those ids
``tail_logprob``    (R,) float32     log(1 - Σ_k p_k), computed in log space (-inf at k = V)
==================  ===============  =====================================================

With ``exact_k = E`` (0 < E < k), ``topk_logprobs`` holds only the first E values, and the other
k - E are 8-bit codes on a per-row linear scale of log-probs (`encode_rest_logprobs`):

==========================  ================  ==============================================
``topk_logprob_codes``      (R, k - E) uint8  c_j = round(254 (hi - v_j) / (hi - lo)), 255: -inf
``topk_logprob_floor``      (R,) values dtype lo, the smallest finite value past the E-th
==========================  ================  ==============================================

with hi = the E-th value as stored: v_j = hi - c_j (hi - lo) / 254, at most (hi - lo) / 508 off.

Row r of sequence s is position i = r - (offsets[s] - s) of that sequence: the teacher's
distribution for the token at position i + 1. The last token of a sequence has no row (nothing in
the sequence follows it), so a sequence of L tokens has L - 1 rows, and the rows of sequence s
start at ``offsets[s] - s``.

Why safetensors: a small, audited format with no code execution on load, a fixed header followed
by raw little-endian arrays, and ``safe_open``, which memory-maps the file and reads only the
slices asked for. A dataset larger than RAM is read row range by row range without loading a
shard. Arrow (through ``datasets``) would also map the file, but stores a row of k ids and k
values as list columns with per-row offsets, and a random row range costs a table slice and a
conversion; here a range is one contiguous block per tensor.

Bytes per stored row: 4k (ids) + 2k (values) + 4 (tail) + ~4 (the token), i.e. 6k + 8; with
packed ids ceil(k·ceil(log2 V)/8) + 2k + 8; with exact_k = E, 2E + (k - E) + 2 bytes of values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

FORMAT = "fastkd-topk"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
DONE_PATTERN = "done-{:05d}-of-{:05d}.json"
SHARD_METADATA_KEY = "fastkd_topk"
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Rows packed or unpacked per numpy call: bounds the (rows, k, bits) uint8 temporary.
PACK_CHUNK_ROWS = 4096


def id_bits(vocab_size: int) -> int:
    """Bits that hold every id in [0, vocab_size): ceil(log2 V), at least 1."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, math.ceil(math.log2(vocab_size)))


def packed_row_bytes(k: int, bits: int) -> int:
    return (k * bits + 7) // 8


def pack_ids(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, k) non-negative ids below 2**bits -> (R, ceil(k·bits/8)) uint8, each row on its own.

    Bit j of id c of a row is bit c·bits + j of the row's little-endian bit string, so a row
    range of the packed tensor decodes without its neighbours.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be 2-D (rows, k), got shape {tuple(ids.shape)}")
    if not 1 <= bits <= 31:
        raise ValueError(f"bits must be in [1, 31], got {bits}")
    src = ids.detach().cpu().numpy()
    if src.size and (src.min() < 0 or src.max() >= (1 << bits)):
        raise ValueError(f"ids must lie in [0, 2**{bits}) to be packed in {bits} bits")
    rows, k = src.shape
    out = np.empty((rows, packed_row_bytes(k, bits)), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.int64)
    for start in range(0, rows, PACK_CHUNK_ROWS):
        chunk = src[start : start + PACK_CHUNK_ROWS].astype(np.int64)
        bit_array = ((chunk[..., None] >> shifts) & 1).astype(np.uint8).reshape(len(chunk), -1)
        out[start : start + len(chunk)] = np.packbits(bit_array, axis=1, bitorder="little")
    return torch.from_numpy(out)


def unpack_ids(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of `pack_ids`: (R, ceil(k·bits/8)) uint8 -> (R, k) int32."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if packed.shape[1] != packed_row_bytes(k, bits):
        raise ValueError(f"packed rows have {packed.shape[1]} bytes, expected "
                         f"{packed_row_bytes(k, bits)} for k={k} and {bits} bits")
    src = packed.numpy()
    rows = len(src)
    out = np.empty((rows, k), dtype=np.int32)
    weights = (1 << np.arange(bits, dtype=np.int32)).astype(np.int32)
    for start in range(0, rows, PACK_CHUNK_ROWS):
        chunk = src[start : start + PACK_CHUNK_ROWS]
        bit_array = np.unpackbits(chunk, axis=1, count=k * bits, bitorder="little")
        out[start : start + len(chunk)] = bit_array.reshape(len(chunk), k, bits) @ weights
    return torch.from_numpy(out)


CODE_LEVELS = 254  # codes 0..254 span [lo, hi]; 255 is -inf (a padding entry)
CODE_NEG_INF = 255


def encode_rest_logprobs(values: torch.Tensor, exact_k: int, dtype: torch.dtype):
    """Sorted (R, k) log-probs -> (exact (R, E) in dtype, codes (R, k - E) uint8, floor (R,)).

    The first E = exact_k values are kept in `dtype`; each later value v_j becomes the 8-bit code
    of its place between hi (the E-th value as stored) and lo (the smallest finite later value,
    stored in `dtype`): c_j = round(254 (hi - v_j) / (hi - lo)); -inf (padding) is code 255.
    Decoding gives v_j to within (hi - lo) / 508, i.e. a relative error of p_j below that.
    """
    if not 0 < exact_k < values.shape[-1]:
        raise ValueError(f"exact_k must be in (0, k={values.shape[-1]}), got {exact_k}")
    v = values.float()
    exact = v[:, :exact_k].to(dtype)
    hi = exact[:, -1].float()
    rest = v[:, exact_k:]
    finite = rest != float("-inf")
    lo = torch.where(finite, rest, float("inf")).amin(dim=1)
    lo = torch.where(torch.isfinite(lo) & torch.isfinite(hi), lo, hi).to(dtype)
    span = hi - lo.float()
    scaled = torch.where(span[:, None] > 0,
                         (hi[:, None] - rest) / span.clamp(min=1e-30)[:, None], 0.0)
    codes = (scaled * CODE_LEVELS).round().clamp(0, CODE_LEVELS).to(torch.uint8)
    codes = torch.where(finite, codes, CODE_NEG_INF).to(torch.uint8)
    return exact, codes, lo


def decode_rest_logprobs(exact: torch.Tensor, codes: torch.Tensor, floor: torch.Tensor,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of `encode_rest_logprobs`: (R, k) log-probs, in `dtype` (default: exact's)."""
    hi = exact[:, -1:].float()
    span = hi - floor.float()[:, None]
    c = codes.float()
    rest = torch.where(codes == CODE_NEG_INF, float("-inf"),
                       hi - c * (span / CODE_LEVELS))
    return torch.cat([exact.float(), rest], dim=1).to(dtype or exact.dtype)


def vocab_hash(tokenizer) -> str:
    """SHA-256 of a tokenizer's token -> id mapping (added tokens included).

    Accepts a `transformers` tokenizer or a `tokenizers.Tokenizer`. Two tokenizers with the same
    hash map every token to the same id, which is what stored top-k ids need; normalisation or
    pre-tokenisation rules are not part of it.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise TypeError(f"tokenizer must have get_vocab() (a transformers or tokenizers "
                        f"tokenizer), got {type(tokenizer).__name__}")
    vocab = get_vocab()
    items = sorted(((str(tok), int(i)) for tok, i in vocab.items()), key=lambda x: (x[1], x[0]))
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a dump holds and how it was produced (``manifest.json``)."""

    k: int
    temperature: float
    vocab_size: int  # teacher logits' last dimension (after --vocab-size slicing): ids < this
    values_dtype: str  # "float16" | "bfloat16" | "float32"
    id_bits: int  # 0: int32 ids; else ids packed in this many bits per id
    teacher: str
    teacher_revision: str | None
    vocab_hash: str
    tokenizer_vocab_size: int
    seq_len: int  # windows / longest stored sequence
    shard_tokens: int  # token budget per shard
    batch_tokens: int  # padded tokens per teacher forward
    data: dict = field(default_factory=dict)
    exact_k: int = 0  # 0: all k values in values_dtype; else the first exact_k, the rest 8-bit
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a fastkd top-k manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"manifest format_version {d.get('format_version')} is not "
                             f"supported (this fastkd reads {FORMAT_VERSION})")
        return cls(**d)

    @property
    def bytes_per_row(self) -> float:
        """Stored bytes per teacher row: ids, values, tail, and the token (shard headers and
        the per-sequence offsets aside)."""
        ids = packed_row_bytes(self.k, self.id_bits) if self.id_bits else 4 * self.k
        size = VALUE_DTYPES[self.values_dtype].itemsize
        values = size * self.k if not self.exact_k else (size * (self.exact_k + 1)
                                                           + self.k - self.exact_k)
        return ids + values + 4 + 4


def read_manifest(directory: str | os.PathLike) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a fastkd-topk dump directory")
    return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a reader
    (or a resumed run) sees either the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Serialise one shard and write it atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({n: t.contiguous() for n, t in tensors.items()}, metadata))


def check_shard_tensors(tensors: dict[str, torch.Tensor], k: int, bits: int,
                        exact_k: int = 0) -> None:
    """Shapes and dtypes of one shard, as the format above defines them."""
    n_tokens = tensors["input_ids"].shape[0]
    n_seq = tensors["offsets"].shape[0] - 1
    rows = n_tokens - n_seq
    ids_shape = (rows, packed_row_bytes(k, bits)) if bits else (rows, k)
    expected = {"input_ids": ((n_tokens,), torch.int32), "offsets": ((n_seq + 1,), torch.int64),
                "topk_ids": (ids_shape, torch.uint8 if bits else torch.int32),
                "topk_logprobs": ((rows, exact_k or k), None),
                "tail_logprob": ((rows,), torch.float32)}
    if exact_k:
        expected["topk_logprob_codes"] = ((rows, k - exact_k), torch.uint8)
        expected["topk_logprob_floor"] = ((rows,), None)
    if set(tensors) != set(expected):
        raise ValueError(f"shard tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
            raise ValueError(f"shard tensor {name}: expected {shape} {dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
