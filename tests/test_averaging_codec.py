"""Replica averaging's wire format (protocol/averaging_codec.py), through hivemind's own serializers:
8-bit blocks within 1/254 and 2-bit blocks within 1/3 of each block's largest value, 2-bit parts
that re-encode to their own bytes, their sizes as the plan counts them, bad input refused."""
import math

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from protocol.averaging_codec import ANCHORED, BLOCKS, FULL, bytes_per_value
from protocol.errors import PayloadError
from swarm.averaging_plan import ANCHORED_BYTES, FULL_BYTES

KIND = runtime_pb2.CompressionType.BLOCKWISE_8BIT
STEPS = {"int8": 254, "int2": 3}  # the worst error is a block's largest value over this


@pytest.mark.parametrize("codec", [FULL, ANCHORED], ids=lambda c: c.kind)
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 300), (2, 2, 256)])
def test_parts_round_trip_within_their_blocks_rounding(codec, shape):
    block = BLOCKS[codec.kind]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 0.02
    if x.numel() > block:
        x.view(-1)[block:block + 8] = 1.0  # a block of larger values (a LayerNorm's) leaves the others' rounding alone
    wire = codec.compress(x, None)
    assert wire.compression == KIND  # hivemind's table holds our decoder for it: no bitsandbytes needed
    assert len(wire.buffer) == 1 + math.ceil(x.numel() / block) * round(block * bytes_per_value(codec.kind))
    y = deserialize_torch_tensor(wire)  # hivemind's deserializer finds the kind in the first byte
    assert y.shape == x.shape and y.dtype == x.dtype
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    for start in range(0, x.numel(), block):
        part = flat_x[start:start + block]
        err = (flat_y[start:start + block] - part).abs().max()
        assert err <= part.abs().max() / STEPS[codec.kind] * (1 + 2 ** -7) + 1e-12, (start, err)


def test_a_decoded_2_bit_part_encodes_to_the_same_bytes():
    """What error feedback relies on: a sender that sets its change to the decoding of its part knows
    exactly what went on the wire, since the part it then sends is byte for byte the same."""
    g = torch.Generator().manual_seed(1)
    for n in (1, 127, 128, 300, 4096):
        x = torch.randn(n, generator=g) * torch.rand(n, generator=g) * 1e-2
        x[: n // 3] = 0.0  # blocks (or their starts) with no change at all
        wire = ANCHORED.compress(x, None)
        assert ANCHORED.compress(ANCHORED.extract(wire), None).buffer == wire.buffer, n


def test_sizes_are_the_plans_and_anchored_parts_about_a_quarter_of_full():
    assert bytes_per_value("int8") == FULL_BYTES < 1.01 and bytes_per_value("int2") == ANCHORED_BYTES < 0.27
    assert FULL_BYTES / ANCHORED_BYTES > 3.7
    info = CompressionInfo.from_tensor(torch.zeros(10))
    assert FULL.estimate_compression_ratio(info) == pytest.approx(FULL_BYTES / 4)  # how hivemind sizes parts
    assert ANCHORED.estimate_compression_ratio(info) == pytest.approx(ANCHORED_BYTES / 4)


def test_bad_parts_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="NaN or inf"):
        serialize_torch_tensor(torch.tensor([1.0, float("nan")]), KIND)  # a replica never ships NaN
    good = serialize_torch_tensor(torch.ones(300), KIND)
    short = runtime_pb2.Tensor(compression=KIND, buffer=good.buffer[:-3], size=[300], dtype="float32")
    with pytest.raises(PayloadError, match="scale"):
        deserialize_torch_tensor(short)
    wrong_type = runtime_pb2.Tensor(compression=KIND, buffer=good.buffer, size=[300], dtype="int64")
    with pytest.raises(ValueError, match="float tensor"):
        deserialize_torch_tensor(wrong_type)
    huge = runtime_pb2.Tensor(compression=KIND, buffer=good.buffer, size=[1 << 15, 1 << 15], dtype="float32")
    with pytest.raises(PayloadError, match="exceed"):
        deserialize_torch_tensor(huge)
    # no kind, one that does not exist, or protocol 5's int4 (byte 1)
    for buffer in (b"", bytes([7]) + good.buffer[1:], bytes([1]) + good.buffer[1:]):
        with pytest.raises(PayloadError, match="kind"):
            deserialize_torch_tensor(runtime_pb2.Tensor(compression=KIND, buffer=buffer, size=[300], dtype="float32"))
    two_bit = ANCHORED.compress(torch.ones(300), None)
    for buffer, why in ((two_bit.buffer[:-1], "size"), (two_bit.buffer[:-2] + b"\xff\x7f", "finite")):  # a NaN scale
        with pytest.raises(PayloadError, match=why):
            ANCHORED.extract(runtime_pb2.Tensor(compression=KIND, buffer=buffer, size=[300], dtype="float32"))
