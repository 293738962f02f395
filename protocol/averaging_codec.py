"""How replica averaging's tensor parts travel: 8-bit blocks, half the bytes of fp16.

A part's values go in blocks of BLOCK; each block is protocol.codec's "int8" (one bf16 scale,
absmax / 127 rounded up, per block as if it were a token): 1 + 2/BLOCK bytes per value, and every
value within absmax/254 of its block. hivemind's all-reduce uses it both ways: the parameter parts a
sender ships and the deltas a reducer returns (robust mean - the sender's decoded copy, which the
sender adds to its fp32 parameters). So the group's mean is kept exactly and a replica ends a round
off it by its own rounding only, which does not accumulate: the next round starts from fp32 again.

hivemind finds a part's decoder by the enum in its protobuf (`compression`) and has none of its own
for 8-bit blocks without bitsandbytes (not a dependency here), so this codec takes the
BLOCKWISE_8BIT slot of hivemind's table in every process that imports it. Only replicas of our own
averaging groups send it; its layout is ours, not bitsandbytes'.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.compression import serialization
from hivemind.proto import runtime_pb2

from protocol.codec import decode, encode, message_nbytes

BLOCK = 256           # values per scale: 256 values of a weight matrix span a few sigma at most
CODEC = "int8"


def bytes_per_value() -> float:
    """Wire bytes per averaged value (scales included)."""
    return message_nbytes(CODEC, [1, BLOCK]) / BLOCK


class Blockwise8Bit(CompressionBase):
    """A float tensor as int8 blocks of BLOCK values with a bf16 scale each (the last block zero-padded)."""
    compression_type = runtime_pb2.BLOCKWISE_8BIT

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().float().reshape(-1)
        blocks = F.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
        msg = encode(blocks, CODEC)  # refuses NaN and inf: a replica never ships them
        return runtime_pb2.Tensor(compression=self.compression_type, buffer=msg["data"] + msg["scale"],
                                  size=tensor.shape, dtype=str(tensor.dtype).replace("torch.", ""),
                                  requires_grad=tensor.requires_grad)

    def extract(self, serialized: runtime_pb2.Tensor) -> torch.Tensor:
        shape = tuple(serialized.size)
        count = math.prod(shape)
        blocks = -(-count // BLOCK)
        buffer = serialized.buffer
        dtype = getattr(torch, serialized.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"an averaging part must be a float tensor, got dtype {serialized.dtype!r}")
        # decode checks both lengths and the scales' values before anything is allocated
        values = decode({"codec": CODEC, "shape": [blocks, BLOCK], "data": buffer[:blocks * BLOCK],
                         "scale": buffer[blocks * BLOCK:]}, max_elems=1 << 28)
        return values.reshape(-1)[:count].reshape(shape).to(dtype)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return bytes_per_value() * 8 / torch.finfo(info.descriptor.dtype).bits


AVERAGING_COMPRESSION = Blockwise8Bit()
# the decoder hivemind looks up for a received part (and the encoder a reducer uses for its deltas)
serialization._BASE_COMPRESSION_TYPES[runtime_pb2.CompressionType.Name(Blockwise8Bit.compression_type)] = \
    AVERAGING_COMPRESSION
