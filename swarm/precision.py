"""Mixed precision per node: which autocast dtype a device gets, and fp16's per-stage loss scaler.

Weights, gradients and optimizer state stay fp32 everywhere; only the forward's matmuls run in the
autocast dtype. bf16 needs no scaling (fp32's exponent range). fp16 does: its smallest normal is
6e-5, and the gradients of ResBM codes are often ~1e-6 (see ModelConfig.validate on fp8).

In a pipeline each stage sees only the gradient arriving at its output, so each stage scales on its
own: the arriving gradient is multiplied by S before the backward, the parameter gradients and the
gradient sent upstream are divided by S, and a backward with an inf or nan adds nothing and halves S
(it stays a counted microbatch with zero contribution, so every stage keeps stepping every M).
"""
from __future__ import annotations

import contextlib
import math

import torch

from swarm.config import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(device_type: str, bf16_supported: bool, requested: str = "auto") -> torch.dtype | None:
    """The forward's autocast dtype (None: plain fp32) from the device's capabilities. `auto`: bf16
    on a GPU that has it, fp16 on one that does not, fp32 on a CPU (its bf16 matmuls are slow)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device_type != "cuda":
            return None
        return torch.bfloat16 if bf16_supported else torch.float16
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        # a ConfigError: `join` prints it as one line, not a traceback
        raise ConfigError("precision bf16: this GPU has no bf16 support; use --precision fp16 (or auto)")
    return DTYPES[requested]


def native_bf16(device) -> bool:
    """Whether a CUDA device has bf16 in hardware (Ampere and later). torch's default check also says
    yes where bf16 is only emulated (Volta, Turing), which is far slower than fp16 there."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def device_autocast_dtype(device, requested: str = "auto") -> torch.dtype | None:
    """autocast_dtype for a real device (asks CUDA whether it has bf16)."""
    device = torch.device(device)
    return autocast_dtype(device.type, device.type == "cuda" and native_bf16(device), requested)


def autocast(device, dtype: torch.dtype | None):
    """The forward's autocast context (nothing for fp32, or a device without autocast, e.g. meta)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class LossScaler:
    """Dynamic scale S of one stage's backward. Pure bookkeeping on the gradients it is handed:
    `unscale` returns them divided by S, or None when any is inf/nan (then S halves); after
    `growth_interval` clean backwards in a row S doubles."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 1000,
                 min_scale: float = 1.0, max_scale: float = 2.0 ** 24):
        if not (init_scale > 0 and math.isfinite(init_scale)) or growth_interval < 1 or not 0 < min_scale <= max_scale:
            raise ValueError(f"LossScaler needs a finite init_scale > 0, growth_interval >= 1 and 0 < min_scale <= "
                             f"max_scale (got {init_scale}, {growth_interval}, {min_scale}, {max_scale})")
        self.scale = float(init_scale)
        self.growth_interval, self.min_scale, self.max_scale = growth_interval, min_scale, max_scale
        self.clean = 0       # clean backwards since the last change of S
        self.overflows = 0   # backwards skipped for an inf/nan

    def scaled(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients arriving at the stage (or the loss's seed), times S."""
        return [g * self.scale for g in grads]

    def unscale(self, grads) -> list | None:
        """Scaled gradients (None entries allowed) / S, or None if any is not finite; updates S."""
        present = [g for g in grads if g is not None]
        # one device sync for all of them, not one per tensor
        finite = not present or bool(torch.stack([torch.isfinite(g).all() for g in present]).all())
        if not finite:
            self.overflows += 1
            self.clean = 0
            self.scale = max(self.min_scale, self.scale / 2)
            return None
        out = [None if g is None else g / self.scale for g in grads]
        self.clean += 1
        if self.clean >= self.growth_interval:
            self.clean = 0
            self.scale = min(self.max_scale, self.scale * 2)
        return out
