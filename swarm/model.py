"""A Llama-style decoder (RMSNorm, rotary positions, SwiGLU, causal SDPA) cut into pipeline stages.

`Stage(cfg, k)` is one nn.Module with one input tensor and one output tensor (plus the token ids,
which the subspace boundary needs), so it can be served by a remote peer:
    stage 0:      token ids [B, T]  -> code [B, T, width]
    middle k:     code              -> code
    last stage:   code              -> logits [B, T, vocab]
`StagedModel` chains the stages in one process with the wire codec applied at each boundary.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from swarm.boundary import RMSNorm, make_receiver, make_sender, subspace_basis, wire
from swarm.config import ModelConfig


def rotary_tables(cfg: ModelConfig, device=None):
    head_dim = cfg.d_model // cfg.n_heads
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    ang = torch.outer(torch.arange(cfg.seq_len, device=device).float(), inv)
    return ang.cos(), ang.sin()


def apply_rotary(x, cos, sin):
    # x: [B, H, T, hd]; rotate pairs (even, odd) of the head dimension.
    t = x.shape[-2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:t], sin[:t]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal self-attention; with kv_heads < n_heads, grouped-query: each key/value head serves
    n_heads / kv_heads query heads (smaller K/V projections and KV cache). wqkv's output is
    [q heads | k heads | v heads], so kv_heads = n_heads is exactly plain multi-head attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, -1, self.head_dim).transpose(1, 2).split(
            [self.n_heads, self.n_kv, self.n_kv], dim=1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv != self.n_heads:
            k, v = (z.repeat_interleave(self.n_heads // self.n_kv, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)
        self.wo = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.wo(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))

    def output_projections(self):
        return (self.attn.wo.weight, self.mlp.wo.weight)


class Stage(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        if not 0 <= index < cfg.n_stages:
            raise ValueError(f"stage {index} does not exist: this run has stages 0..{cfg.n_stages - 1}")
        self.cfg, self.index = cfg, index
        # Per node, not part of the run (same math): blocks keep only their input for backward and
        # recompute the rest, trading ~1/3 more compute for most of the activation memory.
        self.activation_checkpointing = False
        self.is_first, self.is_last = index == 0, index == cfg.n_stages - 1
        if self.is_first:
            if cfg.boundary == "subspace":  # Subspace models keep the token embedding fixed.
                self.register_buffer("fixed_embedding", subspace_basis(cfg)[1], persistent=False)
            else:
                self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.receiver = make_receiver(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.stage_layers[index]))
        if self.is_last:
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        else:
            self.sender = make_sender(cfg)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Blocks, embedding and head get the same initial weights whatever the boundary kind (whose
        # modules drew random numbers above), so boundary variants differ only by their boundary.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 10_007 + index + 7)
            self._init_weights()
        self.project_to_subspace()

    def _init_weights(self):
        std = self.cfg.init_std
        for blk in self.blocks:
            nn.init.normal_(blk.attn.wqkv.weight, std=std)
            nn.init.normal_(blk.mlp.w13.weight, std=std)
            for w in blk.output_projections():  # GPT-2 style: keep the residual stream's scale flat
                nn.init.normal_(w, std=std / math.sqrt(2 * self.cfg.n_layers))
        if hasattr(self, "embed"):
            nn.init.normal_(self.embed.weight, std=std * 10)
        if self.is_last:
            nn.init.normal_(self.lm_head.weight, std=std)

    @torch.no_grad()
    def project_to_subspace(self):
        """Subspace boundary: keep every residual write inside span(U), so h - E[tok] in span(U).

        Called at init and after every optimizer step (the Subspace Models recipe)."""
        if self.cfg.boundary != "subspace":
            return
        u = subspace_basis(self.cfg)[0].to(self.rope_cos.device)
        for blk in self.blocks:
            for w in blk.output_projections():
                w.copy_(u @ (u.T @ w))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_first:
            tokens = x
            h = F.embedding(x, self.fixed_embedding) if hasattr(self, "fixed_embedding") else self.embed(x)
        else:
            h = self.receiver(x, tokens)
        h = self._blocks(h)
        if self.is_last:
            return self.lm_head(self.norm(h))
        return self.sender(h, tokens)

    def _blocks(self, h: torch.Tensor) -> torch.Tensor:
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            if recompute:
                h = checkpoint(blk, h, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                h = blk(h, self.rope_cos, self.rope_sin)
        return h

    def boundary_parameters(self) -> int:
        mods = [getattr(self, n) for n in ("receiver", "sender") if hasattr(self, n)]
        return sum(p.numel() for m in mods for p in m.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


class StagedModel(nn.Module):
    """All stages in one process, with the wire codec applied exactly where the swarm applies it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.stages = nn.ModuleList(build_stage(cfg, k) for k in range(cfg.n_stages))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for k, stage in enumerate(self.stages):
            if k > 0:
                x = wire(x, self.cfg.wire_codec, self.cfg.wire_codec_bwd)
            x = stage(x, tokens)
        return x


def build_stage(cfg: ModelConfig, index: int) -> Stage:
    """Stage `index`, initialised from its own seed: a peer builds only its stage, and gets the
    same weights that stage has inside StagedModel(cfg)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 10_007 + index)
        return Stage(cfg, index)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
