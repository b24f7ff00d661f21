"""The fast encoders give bitsandbytes' bytes exactly: random, adversarial and non-finite inputs, any chunking."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from hf_offload.engine import nf4_encode  # noqa: E402
from hf_offload.engine.nf4_encode import encode_int8, encode_nf4  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def reference(weight):
    packed, state = F.quantize_4bit(weight.reshape(-1), blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed.reshape(-1), state.absmax, state.state2.absmax, float(state.offset)


def assert_same_bits(ours, theirs):
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bitwise: NaN payloads and -0.0 included
    a, b = torch.tensor(ours[3]), torch.tensor(theirs[3])
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture(params=[1, 2], ids=["inline", "pool"])
def small_chunks(request, monkeypatch):
    """Chunks of 256 values, so even small tensors cross many chunk boundaries (and threads when workers=2)."""
    monkeypatch.setattr(nf4_encode, "CHUNK", 256)
    return request.param


def bound_neighbours(dtype):
    """Every nf4 bound times a few absmax values, with its 3 nearest neighbours each way in `dtype`, in blocks of 64
    that each start with the absmax itself (so the block's scale is the one the values were built for)."""
    _, _, bounds = nf4_encode._tables()
    blocks = []
    for absmax in (1.0, 0.37, 3.1e-3, 117.0):
        values = [(bounds * absmax).to(dtype)]
        for direction in (float("inf"), float("-inf")):
            v = values[0]
            for _ in range(3):
                v = torch.nextafter(v, torch.full_like(v, direction))
                values.append(v)
        payload = torch.cat(values)
        payload = torch.cat([payload, torch.zeros((-payload.numel()) % 63, dtype=dtype)]).view(-1, 63)
        head = torch.full((payload.shape[0], 1), absmax, dtype=dtype)
        blocks.append(torch.cat([head, payload], dim=1).reshape(-1))
    return torch.cat(blocks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_weights_match_bitsandbytes(dtype, small_chunks):
    torch.manual_seed(0)
    weight = (torch.randn(96, 160) * 0.02).to(dtype)
    assert_same_bits(encode_nf4(weight, workers=small_chunks), reference(weight))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_at_code_boundaries_match(dtype, small_chunks):
    weight = bound_neighbours(dtype)
    assert_same_bits(encode_nf4(weight, workers=small_chunks), reference(weight))


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_blocks_match(dtype, small_chunks):
    tiny = torch.finfo(dtype).tiny
    blocks = [
        torch.zeros(64),  # absmax 0: bitsandbytes scales by 1 / 1e-38
        -torch.zeros(64),
        torch.full((64,), 0.25),  # every value equal to the absmax
        torch.full((64,), -3.0),
        torch.cat([torch.full((32,), 2.0), torch.full((32,), -2.0)]),
        torch.full((64,), tiny) * torch.linspace(-1, 1, 64),  # subnormal values, absmax below 1e-38 for float32
        torch.linspace(-1, 1, 64) * torch.finfo(dtype).max,  # the largest finite values
    ]
    weight = torch.cat([b.to(dtype) for b in blocks])
    assert_same_bits(encode_nf4(weight, workers=small_chunks), reference(weight))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_give_bitsandbytes_bytes(bad, small_chunks):
    torch.manual_seed(1)
    weight = torch.randn(1024)
    weight[300] = bad
    assert_same_bits(encode_nf4(weight, workers=small_chunks), reference(weight))


def test_tables_give_bucketize_counts_for_every_prefix():
    """The proof in Note: [nf4 codes from a table], checked: both ends and random interior points of every
    16-bit prefix interval of finite float32 values give bucketize's count."""
    below, inside, bounds = nf4_encode._tables()
    torch.manual_seed(2)
    top = torch.arange(1 << 16, dtype=torch.int64)
    ends = [torch.zeros_like(top), torch.full_like(top, 0xFFFF)]
    lows = ends + [torch.randint(0, 1 << 16, top.shape) for _ in range(6)]
    bits = torch.cat([(top << 16) | low for low in lows]).to(torch.int32)
    values = bits.view(torch.float32)
    values = values[values.isfinite()]
    prefix = torch.bitwise_right_shift(values.view(torch.int32), 16).bitwise_and_(0xFFFF).long()
    codes = below[prefix].long() + (values > inside[prefix]).long()
    assert torch.equal(codes, torch.bucketize(values.clamp(-1, 1), bounds))


def test_workers_do_not_change_the_bytes():
    torch.manual_seed(3)
    weight = torch.randn(nf4_encode.CHUNK * 2 + 640, dtype=torch.bfloat16)
    one, two = encode_nf4(weight, workers=1), encode_nf4(weight, workers=2)
    assert_same_bits(one, two)
    assert_same_bits(two, reference(weight))


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of 64"):
        encode_nf4(torch.zeros(100))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        encode_nf4(torch.zeros(64, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_matches_bitsandbytes(dtype, small_chunks):
    torch.manual_seed(4)
    weight = (torch.randn(37, 64) * 0.02).to(dtype)
    weight[5] = 0.0  # a zero row decodes to zeros whatever its codes
    codes, absmax = encode_int8(weight, workers=small_chunks)
    ref_codes, ref_absmax, _ = F.int8_vectorwise_quant(weight.contiguous(), threshold=0.0)
    nonzero = ref_absmax != 0
    assert torch.equal(codes[nonzero], ref_codes[nonzero])
    assert torch.equal(absmax, ref_absmax)
