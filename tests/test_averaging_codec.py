"""Replica averaging's wire format (protocol/averaging_codec.py), through hivemind's own serializers:
8-bit blocks, within 1/254 of each block's largest value, half the bytes of fp16, bad input refused."""
import math

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from protocol.averaging_codec import AVERAGING_COMPRESSION, BLOCK, bytes_per_value
from protocol.errors import PayloadError
from swarm.averaging_plan import WIRE_BYTES

KIND = runtime_pb2.CompressionType.BLOCKWISE_8BIT


@pytest.mark.parametrize("shape", [(0,), (5,), (3, 300), (2, 2, BLOCK)])
def test_parts_round_trip_within_their_blocks_rounding(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 0.02
    if x.numel() > BLOCK:
        x.view(-1)[BLOCK:BLOCK + 8] = 1.0  # a block of larger values (a LayerNorm's) leaves the others' rounding alone
    wire = serialize_torch_tensor(x, KIND)  # hivemind's table now holds our codec: no bitsandbytes needed
    assert len(wire.buffer) == math.ceil(x.numel() / BLOCK) * (BLOCK + 2)
    y = deserialize_torch_tensor(wire)
    assert y.shape == x.shape and y.dtype == x.dtype
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    for start in range(0, x.numel(), BLOCK):
        block = flat_x[start:start + BLOCK]
        err = (flat_y[start:start + BLOCK] - block).abs().max()
        assert err <= block.abs().max() / 254 * (1 + 2 ** -7) + 1e-12, (start, err)


def test_half_the_bytes_of_fp16_and_the_plan_counts_them():
    assert bytes_per_value() == WIRE_BYTES < 1.01
    info = CompressionInfo.from_tensor(torch.zeros(10))
    assert AVERAGING_COMPRESSION.estimate_compression_ratio(info) == pytest.approx(WIRE_BYTES / 4)  # how hivemind sizes parts


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
