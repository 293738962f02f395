"""What happens to the hidden state at a stage boundary.

Each boundary kind is a (Sender, Receiver) pair: the sender lives at the end of stage k and maps
the hidden state h [B, T, d] to the code [B, T, width]; the receiver starts stage k+1 and maps the
code back to [B, T, d]. Only the code (through the wire codec) crosses the network.

    resbm       code = Enc(Norm(h)) + h[..., :b]         h' = pad_d(code) + Dec(code)
    bottleneck  code = W_c Norm(h)                       h' = W_e code          (SWARM, no identity)
    subspace    code = U^T (h - E[tok])                  h' = U code + E[tok]   (fixed U, E)
    none, int8  code = h                                 h' = code              (full width)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from protocol.codec import roundtrip
from swarm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _mlp(d_in: int, hidden: int, d_out: int, std: float, out_std: float) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, d_out, bias=False))
    nn.init.normal_(mlp[0].weight, std=std)
    nn.init.normal_(mlp[2].weight, std=out_std)
    return mlp


class ResBMSender(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.b = cfg.code_width
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Output layer starts near zero: the boundary begins as the identity path h[..., :b].
        self.enc = _mlp(cfg.d_model, cfg.enc_hidden, self.b, cfg.init_std, cfg.init_std * 0.1)

    def forward(self, h, tokens=None):
        return self.enc(self.norm(h)) + h[..., : self.b]


class ResBMReceiver(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d = cfg.d_model
        self.dec = _mlp(cfg.code_width, cfg.enc_hidden, cfg.d_model, cfg.init_std, cfg.init_std * 0.1)

    def forward(self, code, tokens=None):
        return F.pad(code, (0, self.d - code.shape[-1])) + self.dec(code)


class BottleneckSender(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(cfg.d_model, cfg.code_width, bias=False)

    def forward(self, h, tokens=None):
        return self.proj(self.norm(h))


class BottleneckReceiver(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.code_width, cfg.d_model, bias=False)

    def forward(self, code, tokens=None):
        return self.proj(code)


class Identity(nn.Module):
    def forward(self, x, tokens=None):
        return x


def subspace_basis(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed orthonormal U [d, b] and token embeddings E [vocab, d], identical on every peer."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17)
    u, _ = torch.linalg.qr(torch.randn(cfg.d_model, cfg.code_width, generator=gen))
    emb = torch.randn(cfg.vocab_size, cfg.d_model, generator=gen) * cfg.init_std * 10
    return u, emb


class SubspaceCodec(nn.Module):
    """Holds the fixed (U, E) pair; used as sender and as receiver (direction by flag)."""

    def __init__(self, cfg: ModelConfig, send: bool):
        super().__init__()
        self.send = send
        u, emb = subspace_basis(cfg)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("emb", emb, persistent=False)

    def forward(self, x, tokens=None):
        if tokens is None:
            raise ValueError("the subspace boundary needs the token ids of the microbatch")
        base = F.embedding(tokens, self.emb)
        return (x - base) @ self.u if self.send else x @ self.u.T + base


def make_sender(cfg: ModelConfig) -> nn.Module:
    if cfg.boundary == "resbm":
        return ResBMSender(cfg)
    if cfg.boundary == "bottleneck":
        return BottleneckSender(cfg)
    if cfg.boundary == "subspace":
        return SubspaceCodec(cfg, send=True)
    return Identity()


def make_receiver(cfg: ModelConfig) -> nn.Module:
    if cfg.boundary == "resbm":
        return ResBMReceiver(cfg)
    if cfg.boundary == "bottleneck":
        return BottleneckReceiver(cfg)
    if cfg.boundary == "subspace":
        return SubspaceCodec(cfg, send=False)
    return Identity()


class _WireRoundtrip(torch.autograd.Function):
    """Forward: the code as the receiver decodes it. Backward: the gradient as the sender decodes it
    (straight-through: the quantizer's own derivative is taken as 1)."""

    @staticmethod
    def forward(ctx, x, codec, codec_bwd):
        ctx.codec_bwd = codec_bwd
        return roundtrip(x, codec)

    @staticmethod
    def backward(ctx, grad):
        return roundtrip(grad, ctx.codec_bwd), None, None


def wire(x: torch.Tensor, codec: str, codec_bwd: str | None = None) -> torch.Tensor:
    """Apply the wire codecs exactly as the swarm does over the network: `codec` to the code going
    forward, `codec_bwd` (default: the same) to its gradient coming back. One call = one message,
    so per-channel scales are shared by the tokens of x, as they are on the wire."""
    codec_bwd = codec_bwd or codec
    if codec == "fp32" and codec_bwd == "fp32":
        return x
    return _WireRoundtrip.apply(x, codec, codec_bwd)
