"""fastkd.offline storage: id packing, shard round trip, top-k producer against float64, hashes."""

import json
import math

import pytest
import torch

pytest.importorskip("safetensors")

from fastkd.offline import storage  # noqa: E402
from fastkd.offline.storage import (  # noqa: E402
    Manifest,
    id_bits,
    pack_ids,
    packed_row_bytes,
    unpack_ids,
    vocab_hash,
)
from fastkd.offline.writer import topk_with_tail  # noqa: E402


@pytest.mark.parametrize("vocab,k,rows", [(2, 1, 3), (3, 5, 1), (300, 64, 17), (152064, 7, 5),
                                          (128256, 128, 2), (2**31 - 1, 3, 4), (1000, 3, 4099)])
def test_pack_round_trip_exact(vocab, k, rows):
    gen = torch.Generator().manual_seed(vocab + k)
    ids = torch.randint(0, vocab, (rows, k), generator=gen, dtype=torch.int64)
    ids[0, 0] = vocab - 1  # the largest id uses every bit
    bits = id_bits(vocab)
    assert 2 ** (bits - 1) < vocab <= 2**bits or vocab <= 2
    packed = pack_ids(ids, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_row_bytes(k, bits)) == (rows, math.ceil(k * bits / 8))
    out = unpack_ids(packed, k, bits)
    assert out.dtype == torch.int32 and torch.equal(out.long(), ids)
    # each row stands alone: a row range decodes without its neighbours
    a, b = rows // 3, rows // 3 + min(2, rows)
    assert torch.equal(unpack_ids(packed[a:b].clone(), k, bits).long(), ids[a:b])


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="2\\*\\*9"):
        pack_ids(torch.tensor([[512]]), 9)
    with pytest.raises(ValueError, match="2\\*\\*9"):
        pack_ids(torch.tensor([[-1]]), 9)
    with pytest.raises(ValueError, match="2-D"):
        pack_ids(torch.tensor([1, 2]), 9)
    with pytest.raises(ValueError, match="bytes"):
        unpack_ids(torch.zeros(2, 3, dtype=torch.uint8), k=4, bits=9)


@pytest.mark.parametrize("values_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bits", [0, 17])
def test_shard_round_trip_exact(tmp_path, values_dtype, bits):
    from safetensors import safe_open

    gen = torch.Generator().manual_seed(1)
    k, lengths = 6, [5, 1, 9]
    offsets = torch.tensor([0, 5, 6, 15])
    rows = sum(lengths) - len(lengths)
    ids = torch.randint(0, 100000, (rows, k), generator=gen, dtype=torch.int32)
    values = (torch.randn(rows, k, generator=gen) * 5 - 3).to(getattr(torch, values_dtype))
    values[1, 3:] = float("-inf")  # padding entries survive
    tail = torch.randn(rows, generator=gen)
    tail[0] = float("-inf")
    tensors = {"input_ids": torch.randint(0, 100000, (15,), generator=gen, dtype=torch.int32),
               "offsets": offsets, "topk_ids": pack_ids(ids, bits) if bits else ids,
               "topk_logprobs": values, "tail_logprob": tail}
    storage.check_shard_tensors(tensors, k, bits)
    path = tmp_path / "shard-00000.safetensors"
    storage.write_shard(path, tensors, {"shard": "0"})
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"shard": "0"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
        got_ids = f.get_slice("topk_ids")[2:5]
    assert torch.equal(unpack_ids(got_ids, k, bits) if bits else got_ids, ids[2:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("k", [1, 5, 36, 37])
def test_topk_with_tail_against_float64(dtype, temperature, k):
    gen = torch.Generator().manual_seed(k)
    logits = (torch.randn(9, 37, generator=gen) * 4).to(dtype)
    logits[2, :10] = float("-inf")  # masked vocabulary: k > finite entries gives -inf values
    logits[3, 7] += 60.0  # the tail is ~e-60 / T: 1 - Σ p_k cancels to 0 in fp32 and fp64
    ids, lp, tail = topk_with_tail(logits, k, temperature)
    assert ids.dtype == torch.int32 and lp.dtype == tail.dtype == torch.float32
    ref = torch.log_softmax(logits.double() / temperature, -1)
    # the stored ids are a top k of the float64 distribution, largest first
    gathered = ref.gather(-1, ids.long())
    assert torch.all(gathered[:, :-1] >= gathered[:, 1:])
    outside = ref.scatter(-1, ids.long(), float("-inf"))
    assert torch.all(gathered[:, -1] >= outside.max(-1).values)
    finite = torch.isfinite(gathered)
    assert torch.equal(torch.isfinite(lp), finite)  # -inf where the logit was -inf
    torch.testing.assert_close(lp[finite].double(), gathered[finite], rtol=1e-6, atol=2e-6)
    ref_tail = outside.logsumexp(-1)
    if k == 37:
        assert torch.all(tail == float("-inf"))
    else:
        ok = torch.isfinite(ref_tail)
        assert torch.equal(torch.isfinite(tail), ok)
        torch.testing.assert_close(tail[ok].double(), ref_tail[ok], rtol=1e-6, atol=2e-6)
        # row 3: accurate where the complement of the stored mass cancels in fp32
        naive = torch.log1p(-lp[3].exp().sum())
        assert tail[3] < -15 and not torch.isclose(naive, tail[3], rtol=0, atol=1.0)
    # mass adds up: logsumexp over the top k and the tail is 0
    total = torch.logaddexp(lp.double().logsumexp(-1), tail.double())
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=5e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_tail_matches_teacher_topk(temperature):
    import fastkd

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(7)) * 3
    ids, lp, _ = topk_with_tail(logits, 16, temperature)
    ref_ids, ref_lp = fastkd.teacher_topk(logits, 16, temperature=temperature)
    assert torch.equal(ids.long().sort(-1).values, ref_ids.sort(-1).values)
    torch.testing.assert_close(lp, ref_lp.float(), rtol=0, atol=1e-5)


def test_topk_with_tail_nan_and_bad_k():
    logits = torch.randn(2, 8)
    logits[1, 3] = float("nan")
    _, lp, tail = topk_with_tail(logits, 3)
    assert torch.isnan(tail[1]) and torch.isfinite(tail[0])
    assert torch.isfinite(lp[0]).all()
    with pytest.raises(ValueError, match="k must be"):
        topk_with_tail(logits, 9)
    with pytest.raises(ValueError, match="2-D"):
        topk_with_tail(logits[0], 1)


def test_vocab_hash():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"a": 0, "b": 1, "<eos>": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<eos>"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    assert vocab_hash(tok) == vocab_hash(fast)
    swapped = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 1, "b": 0, "<eos>": 2},
                                                               unk_token="<eos>"))
    assert vocab_hash(swapped) != vocab_hash(tok)
    with pytest.raises(TypeError, match="get_vocab"):
        vocab_hash(object())


def test_manifest_json_round_trip(tmp_path):
    m = Manifest(k=8, temperature=2.0, vocab_size=300, values_dtype="float16", id_bits=9,
                 teacher="t", teacher_revision=None, vocab_hash="ab", tokenizer_vocab_size=300,
                 seq_len=64, shard_tokens=1024, batch_tokens=256, data={"kind": "text"})
    (tmp_path / storage.MANIFEST_NAME).write_text(m.to_json())
    assert storage.read_manifest(tmp_path) == m
    assert m.bytes_per_row == 9 + 16 + 8
    bad = json.loads(m.to_json()) | {"format_version": 99}
    (tmp_path / storage.MANIFEST_NAME).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format_version"):
        storage.read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a fastkd-topk dump"):
        storage.read_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rest_codes_round_trip_within_bound(dtype):
    gen = torch.Generator().manual_seed(3)
    k, exact_k = 20, 5
    v = (torch.randn(40, k, generator=gen, dtype=torch.float64) * 3 - 4).sort(-1, True).values
    v[1, 15:] = float("-inf")  # padding past the exact values
    v[2, 3:] = float("-inf")  # padding inside them: everything after is padding
    v[3] = -2.5  # a flat row: hi == lo
    v[4, 5:] = v[4, 4]
    exact, codes, floor = storage.encode_rest_logprobs(v, exact_k, dtype)
    assert exact.dtype == floor.dtype == dtype and codes.dtype == torch.uint8
    assert exact.shape == (40, exact_k) and codes.shape == (40, k - exact_k)
    assert torch.equal(exact, v[:, :exact_k].to(dtype))
    out = storage.decode_rest_logprobs(exact, codes, floor, torch.float64)
    assert torch.equal(out == float("-inf"), v == float("-inf"))
    finite = torch.isfinite(v)
    hi, lo = exact[:, -1].double(), floor.double()
    eps = torch.finfo(dtype).eps
    bound = ((hi - lo).nan_to_num(0) / 508 + eps * (hi.abs() + lo.abs()).nan_to_num(0))[:, None]
    err = torch.where(finite, (out - v).abs(), 0.0)
    assert torch.all(err <= bound.expand_as(err) + 1e-12)
    assert torch.all(torch.where(finite[:, 1:], out[:, 1:] <= out[:, :-1], True))  # still sorted
    with pytest.raises(ValueError, match="exact_k"):
        storage.encode_rest_logprobs(v, k, dtype)


def test_topk_with_tail_refuses_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        topk_with_tail(torch.randn(2, 8), 3, temperature=0.0)
