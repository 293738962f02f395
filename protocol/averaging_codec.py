"""How replica averaging's tensor parts travel: values in blocks, each with one bf16 scale.

Two kinds, named by the first byte of every part:
    int8  (byte 0) blocks of 256: 1 + 2/256 bytes per value, every value within absmax/254 of its
          block. A *full* round ships parameters themselves this way (protocol.codec's int8, as if
          the block were a token).
    int2  (byte 2) blocks of 128: 1/4 + 2/128 bytes per value, four levels (-1.5, -0.5, 0.5, 1.5)
          times the block's scale absmax/1.5, so every value is within absmax/3 of its block. An
          *anchored* round ships each replica's change since the stage's shared anchor this way:
          about a quarter of a full round's bytes. What the levels lose a replica keeps and sends
          with its next change (error feedback, node/averaging.py), as SparseLoCo and DeMo keep what
          their 2-bit or top-k compression left out.
    (byte 1 was protocol 5's int4 changes: refused.)
Re-encoding a decoded int2 part gives the same bytes (the scale is rounded up to bf16, and a
block's largest value stays in its outer level), so a sender can quantize its changes before they
go and know exactly what it sent (int8 has no such guarantee: its largest code can come back as
126). A reducer returns the robust mean of a part in the same kind, as the same bytes to every
sender, so every replica of the group can hold the identical result.

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

from protocol.codec import decode, encode, message_nbytes, round_up_bf16
from protocol.errors import PayloadError

KINDS = {"int8": 0, "int2": 2}       # the first byte of a part names its kind
BLOCKS = {"int8": 256, "int2": 128}  # values per scale: a few sigma of a weight matrix, or of its change
_LEVELS = 1.5                        # int2 codes 0..3 stand for (code - 1.5) * scale


def bytes_per_value(kind: str) -> float:
    """Wire bytes per averaged value of `kind` (scales included; the one kind byte per part aside)."""
    block = BLOCKS[kind]
    return (message_nbytes(kind, [1, block]) if kind == "int8" else _int2_nbytes(1)) / block


def _int2_nbytes(blocks: int) -> int:
    """Packed codes (a quarter byte per value), then a bf16 scale per block."""
    return blocks * (BLOCKS["int2"] // 4 + 2)


def _encode_int2(blocks: torch.Tensor) -> bytes:
    """[n, 128] floats -> packed codes (four per byte, lowest bits first), then the n bf16 scales."""
    scale = round_up_bf16(blocks.abs().amax(dim=1, keepdim=True) / _LEVELS)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.floor(blocks / safe + 2).clamp_(0, 3).to(torch.uint8).view(-1, 4)
    packed = codes[:, 0] | codes[:, 1] << 2 | codes[:, 2] << 4 | codes[:, 3] << 6
    return packed.numpy().tobytes() + scale.view(torch.int16).numpy().tobytes()


def _decode_int2(payload: bytes, blocks: int) -> torch.Tensor:
    if len(payload) != _int2_nbytes(blocks):
        raise PayloadError("size", f"{len(payload)} bytes for {blocks} int2 blocks, expected {_int2_nbytes(blocks)}")
    data_bytes = blocks * BLOCKS["int2"] // 4
    if not blocks:
        return torch.zeros(0, BLOCKS["int2"])
    packed = torch.frombuffer(bytearray(payload[:data_bytes]), dtype=torch.uint8)
    scale = torch.frombuffer(bytearray(payload[data_bytes:]), dtype=torch.int16).view(torch.bfloat16).float()
    if not torch.isfinite(scale).all() or (scale < 0).any():
        raise PayloadError("nonfinite", "int2 scales must be finite and non-negative")
    codes = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).view(blocks, -1)
    return (codes.float() - _LEVELS) * scale.view(-1, 1)


class BlockCodec(CompressionBase):
    """A float tensor as blocks of `kind` with a bf16 scale each (the last block zero-padded)."""
    compression_type = runtime_pb2.BLOCKWISE_8BIT

    def __init__(self, kind: str):
        self.kind, self.block = kind, BLOCKS[kind]

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().float().reshape(-1).cpu()
        blocks = F.pad(flat, (0, -flat.numel() % self.block)).view(-1, self.block)
        if not torch.isfinite(blocks).all():
            raise ValueError("refusing to encode a tensor with NaN or inf values")  # a replica never ships them
        if self.kind == "int2":
            payload = _encode_int2(blocks)
        else:
            msg = encode(blocks, self.kind)
            payload = msg["data"] + msg["scale"]
        return runtime_pb2.Tensor(compression=self.compression_type, buffer=bytes([KINDS[self.kind]]) + payload,
                                  size=tensor.shape, dtype=str(tensor.dtype).replace("torch.", ""),
                                  requires_grad=tensor.requires_grad)

    def extract(self, serialized: runtime_pb2.Tensor) -> torch.Tensor:
        shape = tuple(serialized.size)
        count = math.prod(shape)
        buffer = serialized.buffer
        kind = next((k for k, byte in KINDS.items() if buffer[:1] == bytes([byte])), None)
        if kind is None:
            raise PayloadError("codec", f"an averaging part must start with its kind, one of {sorted(KINDS.values())}"
                                        f" (byte 1, protocol 5's int4, is no longer sent)")
        block = BLOCKS[kind]
        blocks = -(-count // block)
        dtype = getattr(torch, serialized.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"an averaging part must be a float tensor, got dtype {serialized.dtype!r}")
        if count > 1 << 28:
            raise PayloadError("size", f"{count} values exceed the limit of {1 << 28}")
        if kind == "int2":
            values = _decode_int2(buffer[1:], blocks)
        else:
            data_bytes = message_nbytes(kind, [blocks, block]) - 2 * blocks
            # decode checks both lengths and the scales' values before anything is allocated
            values = decode({"codec": kind, "shape": [blocks, block], "data": buffer[1:1 + data_bytes],
                             "scale": buffer[1 + data_bytes:]}, max_elems=1 << 28)
        return values.reshape(-1)[:count].reshape(shape).to(dtype)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return bytes_per_value(self.kind) * 8 / torch.finfo(info.descriptor.dtype).bits


FULL, ANCHORED = BlockCodec("int8"), BlockCodec("int2")
# the decoder hivemind looks up for a received part (either kind: extract reads the first byte)
serialization._BASE_COMPRESSION_TYPES[runtime_pb2.CompressionType.Name(BlockCodec.compression_type)] = FULL
