"""Per-stage optimizers: AdamW, or Muon for the 2-D hidden matrices with AdamW for the rest.

Every stage owns its optimizer, so the swarm and the reference trainer run the same update.
torch.optim.Muon orthogonalises in bfloat16, which is emulated (~15x slower) on CPUs; on a CPU we
use `Muon32`, the same update with the Newton-Schulz iteration in float32.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from swarm.config import TrainConfig

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon32(torch.optim.Optimizer):
    """Muon with a float32 Newton-Schulz; lr adjusted as torch's adjust_lr_fn="match_rms_adamw"."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                lr = group["lr"] * 0.2 * max(p.shape) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(orthogonalize(update), alpha=-lr)


def muon_class(device: torch.device) -> type:
    """torch's Muon (bf16 Newton-Schulz) where bf16 matmuls are native, i.e. on a GPU; Muon32 elsewhere.
    Chosen from the device the parameters really sit on, so build the stage on its device first."""
    return torch.optim.Muon if torch.device(device).type == "cuda" else Muon32


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr over warmup_steps; then constant, or a cosine/linear decay that reaches
    min_lr at step decay_steps - 1 and stays there."""
    if step < cfg.warmup_steps or cfg.lr_schedule == "constant":
        return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    done = min(1.0, (step + 1 - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps))
    left = 0.5 * (1 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1 - done
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * left


class StageOptimizer:
    """One object per stage: step / zero_grad / state_dict over its (one or two) torch optimizers."""

    def __init__(self, module: nn.Module, cfg: TrainConfig):
        self.module, self.cfg = module, cfg
        params = [p for p in module.parameters() if p.requires_grad]
        if cfg.optimizer == "muon":
            # Hidden matrices (blocks, boundary MLPs) get Muon; embedding, head and norms get AdamW.
            hidden = [p for n, p in module.named_parameters()
                      if p.requires_grad and p.ndim == 2 and not n.startswith(("embed", "lm_head"))]
            hidden_ids = {id(p) for p in hidden}
            rest = [p for p in params if id(p) not in hidden_ids]
            devices = {p.device for p in hidden}
            if len(devices) > 1:
                raise ValueError(f"a stage's parameters must sit on one device, not {sorted(map(str, devices))}")
            muon_cls = muon_class(devices.pop()) if hidden else Muon32
            kw = {"adjust_lr_fn": "match_rms_adamw"} if muon_cls is torch.optim.Muon else {}
            self.opts = [muon_cls(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)] if hidden else []
            self.opts += [torch.optim.AdamW(rest, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))] if rest else []
        else:
            self.opts = [torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))]

    def lr_at(self, step: int) -> float:
        return lr_at(self.cfg, step)

    def step(self, step: int) -> float:
        """Clip this stage's gradient, step at the scheduled lr; returns the pre-clip grad norm."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip) if params else torch.tensor(0.0)
        lr = self.lr_at(step)
        for opt in self.opts:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        if hasattr(self.module, "project_to_subspace"):
            self.module.project_to_subspace()
        return float(norm)

    def zero_grad(self):
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)

    def state_dict(self):
        return [opt.state_dict() for opt in self.opts]

    def load_state_dict(self, states):
        if len(states) != len(self.opts):
            raise ValueError(f"optimizer state has {len(states)} parts, this optimizer has {len(self.opts)}")
        for opt, st in zip(self.opts, states):
            opt.load_state_dict(st)
