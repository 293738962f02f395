"""Codecs for boundary codes and their gradients.

A tensor [..., width] is quantized per token (last dim). The same functions serve the reference
trainer (`roundtrip`, pure torch, any device) and the wire (`encode`/`decode`, bytes), so the swarm
and `train-local` compute exactly the same numbers.

    fp32  4 bytes/value
    bf16  2 bytes/value (truncating cast with round-to-nearest-even, as torch does)
    fp16  2 bytes/value (values beyond the fp16 range are refused, not clipped silently)
    int8  1 byte/value + one bf16 scale per token (symmetric absmax / 127)

The int8 scale is bf16, not fp16: gradients of codes are often ~1e-6 and smaller, and their
absmax/127 underflows fp16 (smallest normal 6e-5), which silently zeroes or distorts them. The
scale is rounded UP to bf16, so no value needs clipping and the error stays <= scale / 2.
"""
from __future__ import annotations

import numpy as np
import torch

from protocol import CODECS  # noqa: F401  (re-exported: the codec names are part of this module's API)
from protocol.errors import PayloadError

_FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
_SCALE_BYTES = {"int8": 2}
_FP16_MAX = 65504.0

# Integer tensors (token ids, targets) travel as the narrowest unsigned type that fits the vocab.
INT_CODECS = {"u8": (np.uint8, 255), "u16": (np.uint16, 65535), "i32": (np.int32, 2**31 - 1)}


def check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def bytes_per_token(codec: str, width: int) -> int:
    """Payload bytes for one token's vector of `width` values (scales included)."""
    check_codec(codec)
    return width * _FLOAT_BYTES[codec] + _SCALE_BYTES.get(codec, 0)


def int_codec_for(vocab_size: int) -> str:
    for name, (_, top) in INT_CODECS.items():
        if vocab_size - 1 <= top:
            return name
    raise ValueError(f"vocab_size {vocab_size} too large")


def quantize(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float tensor -> (payload tensor in its wire dtype, per-token scales or None)."""
    check_codec(codec)
    x = x.detach()
    if codec == "fp32":
        return x.float(), None
    if codec == "bf16":
        return x.to(torch.bfloat16), None
    if codec == "fp16":
        if x.numel() and x.abs().max().item() > _FP16_MAX:
            raise ValueError("tensor exceeds the fp16 range; use bf16 or fp32 for this boundary")
        return x.to(torch.float16), None
    absmax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = _round_up_bf16(absmax / 127.0)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(absmax))
    q = torch.round(x.float() / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 >= x, for finite x >= 0 (the next bf16 above a positive one is its bits + 1)."""
    y = x.to(torch.bfloat16)
    bumped = (y.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(y.float() < x, bumped, y)


def dequantize(payload: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return payload.float()
    return payload.float() * scale.float()


def roundtrip(x: torch.Tensor, codec: str) -> torch.Tensor:
    """What the receiver sees after encode -> wire -> decode, computed without bytes."""
    return dequantize(*quantize(x, codec)).to(x.dtype)


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship its 16 bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def encode(x: torch.Tensor, codec: str) -> dict:
    """Float tensor -> msgpack-able dict. Refuses non-finite values instead of shipping them."""
    if not torch.isfinite(x).all():
        raise ValueError("refusing to encode a tensor with NaN or inf values")
    payload, scale = quantize(x, codec)
    msg = {"codec": codec, "shape": list(x.shape), "data": _raw_bytes(payload)}
    if scale is not None:
        msg["scale"] = _raw_bytes(scale)
    return msg


def payload_nbytes(msg: dict) -> int:
    return len(msg["data"]) + len(msg.get("scale", b""))


_NP_DTYPE = {"fp32": np.float32, "bf16": np.int16, "fp16": np.float16, "int8": np.int8}


def _field(msg, key, kind):
    if not isinstance(msg, dict) or key not in msg:
        raise PayloadError("malformed", f"tensor field is missing {key!r}")
    value = msg[key]
    if not isinstance(value, kind):
        raise PayloadError("malformed", f"tensor field {key!r} has type {type(value).__name__}")
    return value


def _shape(msg, max_elems: int | None) -> list[int]:
    shape = _field(msg, "shape", list)
    if not 1 <= len(shape) <= 4 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                           for s in shape):
        raise PayloadError("shape", f"shape must be 1-4 non-negative ints, got {shape!r}")
    n = int(np.prod(shape)) if shape else 0
    if max_elems is not None and n > max_elems:
        raise PayloadError("size", f"{n} values exceed the limit of {max_elems}")
    return shape


def decode(msg: dict, *, expect_codec: str | None = None, width: int | None = None,
           max_elems: int = 1 << 26) -> torch.Tensor:
    """Wire dict -> float32 tensor. Every malformed input raises PayloadError with the reason.
    `width`, if given, is the required last dimension (checked before anything is allocated)."""
    codec = _field(msg, "codec", str)
    if codec not in CODECS:
        raise PayloadError("codec", f"unknown codec {codec!r}")
    if expect_codec is not None and codec != expect_codec:
        raise PayloadError("codec", f"this swarm uses codec {expect_codec!r}, got {codec!r}")
    shape = _shape(msg, max_elems if width is None else None)
    if width is not None and shape[-1] != width:
        raise PayloadError("shape", f"last dimension is {shape[-1]}, this boundary carries {width} values per token")
    _shape(msg, max_elems)
    data = _field(msg, "data", bytes)
    n = int(np.prod(shape))
    if len(data) != n * _FLOAT_BYTES[codec]:
        raise PayloadError("size", f"{len(data)} data bytes for shape {shape} in {codec}, "
                                   f"expected {n * _FLOAT_BYTES[codec]}")
    arr = np.frombuffer(data, dtype=_NP_DTYPE[codec]).reshape(shape)
    payload = torch.from_numpy(arr.copy())
    if codec == "bf16":
        payload = payload.view(torch.bfloat16)
    scale = None
    if codec == "int8":
        raw = _field(msg, "scale", bytes)
        rows = n // shape[-1] if shape[-1] else 0
        if len(raw) != rows * 2:
            raise PayloadError("size", f"{len(raw)} scale bytes, expected {rows * 2} (one bf16 per token)")
        scale = torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16)
        scale = scale.reshape(*shape[:-1], 1)
        if scale.numel() and (not torch.isfinite(scale).all() or (scale < 0).any()):
            raise PayloadError("nonfinite", "int8 scales must be finite and non-negative")
    out = dequantize(payload, scale)
    if not torch.isfinite(out).all():
        raise PayloadError("nonfinite", "tensor contains NaN or inf")
    return out


def encode_ints(x: torch.Tensor, vocab_size: int) -> dict:
    name = int_codec_for(vocab_size)
    arr = x.detach().cpu().numpy().astype(INT_CODECS[name][0])
    return {"codec": name, "shape": list(x.shape), "data": arr.tobytes()}


def decode_ints(msg: dict, vocab_size: int, *, max_elems: int = 1 << 24) -> torch.Tensor:
    codec = _field(msg, "codec", str)
    if codec not in INT_CODECS:
        raise PayloadError("codec", f"unknown integer codec {codec!r}")
    shape = _shape(msg, max_elems)
    data = _field(msg, "data", bytes)
    dtype = INT_CODECS[codec][0]
    n = int(np.prod(shape))
    if len(data) != n * np.dtype(dtype).itemsize:
        raise PayloadError("size", f"{len(data)} bytes for {n} {codec} token ids")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise PayloadError("token_range", f"token ids must be in [0, {vocab_size}), got "
                                          f"[{arr.min()}, {arr.max()}]")
    return torch.from_numpy(arr)
