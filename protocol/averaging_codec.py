"""How replica averaging's tensor parts travel: values in blocks, each with one bf16 scale.

Two kinds, named by the first byte of every part:
    int8  blocks of 256: 1 + 2/256 bytes per value, every value within absmax/254 of its block.
          A *full* round ships parameters themselves this way.
    int4  blocks of 128: 1/2 + 2/128 bytes per value, within absmax/14 of its block. An *anchored*
          round ships each replica's change since the stage's shared anchor (the group's last
          mean, identical on every replica): small, evenly spread values, like Streaming DiLoCo's
          4-bit outer gradients. About half the bytes of a full round.
Each block is protocol.codec's per-token codec of that name (absmax / qmax, the scale rounded up),
as if the block were a token. A reducer returns the robust mean of a part in the same kind, as the
same bytes to every sender, so every replica of the group can hold the identical result.

hivemind finds a part's decoder by the enum in its protobuf (`compression`) and has none of its own
for these blocks without bitsandbytes (not a dependency here), so this codec takes the
BLOCKWISE_8BIT slot of hivemind's table in every process that imports it, for both kinds (the first
byte tells them apart). Only replicas of our own averaging groups send it; its layout is ours, not
bitsandbytes'.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.compression import serialization
from hivemind.proto import runtime_pb2

from protocol.codec import decode, encode, message_nbytes
from protocol.errors import PayloadError

KINDS = ("int8", "int4")              # the first byte of a part is its kind's index here
BLOCKS = {"int8": 256, "int4": 128}   # values per scale: a few sigma of a weight matrix, or of its change


def bytes_per_value(kind: str) -> float:
    """Wire bytes per averaged value of `kind` (scales included; the one kind byte per part aside)."""
    return message_nbytes(kind, [1, BLOCKS[kind]]) / BLOCKS[kind]


class BlockCodec(CompressionBase):
    """A float tensor as blocks of `kind` with a bf16 scale each (the last block zero-padded)."""
    compression_type = runtime_pb2.BLOCKWISE_8BIT

    def __init__(self, kind: str):
        self.kind, self.block = kind, BLOCKS[kind]

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().float().reshape(-1)
        blocks = F.pad(flat, (0, -flat.numel() % self.block)).view(-1, self.block)
        msg = encode(blocks, self.kind)  # refuses NaN and inf: a replica never ships them
        return runtime_pb2.Tensor(compression=self.compression_type,
                                  buffer=bytes([KINDS.index(self.kind)]) + msg["data"] + msg["scale"],
                                  size=tensor.shape, dtype=str(tensor.dtype).replace("torch.", ""),
                                  requires_grad=tensor.requires_grad)

    def extract(self, serialized: runtime_pb2.Tensor) -> torch.Tensor:
        shape = tuple(serialized.size)
        count = math.prod(shape)
        buffer = serialized.buffer
        if not buffer or buffer[0] >= len(KINDS):
            raise PayloadError("codec", f"an averaging part must start with its kind, one of {list(range(len(KINDS)))}")
        kind = KINDS[buffer[0]]
        block = BLOCKS[kind]
        blocks = -(-count // block)
        dtype = getattr(torch, serialized.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"an averaging part must be a float tensor, got dtype {serialized.dtype!r}")
        data_bytes = message_nbytes(kind, [blocks, block]) - 2 * blocks
        # decode checks both lengths and the scales' values before anything is allocated
        values = decode({"codec": kind, "shape": [blocks, block], "data": buffer[1:1 + data_bytes],
                         "scale": buffer[1 + data_bytes:]}, max_elems=1 << 28)
        return values.reshape(-1)[:count].reshape(shape).to(dtype)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return bytes_per_value(self.kind) * 8 / torch.finfo(info.descriptor.dtype).bits


FULL, ANCHORED = BlockCodec("int8"), BlockCodec("int4")
# the decoder hivemind looks up for a received part (either kind: extract reads the first byte)
serialization._BASE_COMPRESSION_TYPES[runtime_pb2.CompressionType.Name(BlockCodec.compression_type)] = FULL
