"""Per-stage optimizers: AdamW, or Muon for the 2-D hidden matrices with AdamW for the rest.

Every stage owns its optimizer, so the swarm and the reference trainer run the same update. CPU and
GPU replicas of a stage hand their state to each other (a joiner downloads it, a checkpoint may be
resumed on another device), so both run one class, `Muon`: torch.optim.Muon's hyperparameters and
state, with the Newton-Schulz precision picked by the parameters' device (bfloat16 on a GPU, as
torch does; float32 elsewhere, where bf16 matmuls are emulated ~15x slower). The precision is not
part of the state, so a state moves between devices unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from swarm.config import TrainConfig

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic)
NS_STEPS, NS_EPS = 5, 1e-7


def ns_dtype(device) -> torch.dtype:
    """Newton-Schulz precision on a device: torch's bf16 where bf16 matmuls are native (a GPU)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def orthogonalize(g: torch.Tensor, dtype: torch.dtype = torch.float32, coeffs=NS_COEFFS,
                  steps: int = NS_STEPS, eps: float = NS_EPS) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz iteration, op for op, in `dtype` (so in bf16 it is torch's)."""
    a, b, c = coeffs
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def complete_muon_groups(state: dict, defaults: dict) -> dict:
    """A Muon state with every hyperparameter torch.optim.Muon reads. States saved by the old CPU-only
    `Muon32` (checkpoints, older peers) lack ns_coefficients, eps, ns_steps and adjust_lr_fn, and
    torch.optim.Muon then fails with KeyError at its first step; their values were these defaults."""
    groups = [{**defaults, **g} for g in state["param_groups"]]
    return {**state, "param_groups": groups}


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same param_groups and state, interchangeable with it) with the Newton-Schulz
    run in `ns_dtype(device)` unless `precision` is given; lr adjusted as "match_rms_adamw"."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, precision: torch.dtype | None = None, **kw):
        kw.setdefault("adjust_lr_fn", "match_rms_adamw")
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kw)
        self.precision = precision

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(complete_muon_groups(state_dict, self.defaults))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon here takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        """torch's _single_tensor_muon for one parameter."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        ortho = orthogonalize(update, self.precision or ns_dtype(p.device), group["ns_coefficients"],
                              group["ns_steps"], group["eps"])
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(ortho, alpha=-_adjusted_lr(lr, group["adjust_lr_fn"], p.shape))


def _adjusted_lr(lr: float, fn: str | None, shape) -> float:
    a, b = shape[:2]
    if fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    return lr * math.sqrt(max(1, a / b)) if fn in (None, "original") else lr


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr over warmup_steps; then constant, or a cosine/linear decay that reaches
    min_lr at step decay_steps - 1 and stays there."""
    if step < cfg.warmup_steps or cfg.lr_schedule == "constant":
        return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    done = min(1.0, (step + 1 - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps))
    left = 0.5 * (1 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1 - done
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * left


def muon_split(module: nn.Module) -> tuple[list, list]:
    """(parameters Muon updates, the rest for AdamW): hidden matrices (blocks, boundary MLPs) get Muon;
    embedding, head and norms get AdamW."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    hidden = [p for n, p in params if p.ndim == 2 and not n.startswith(("embed", "lm_head"))]
    devices = {p.device for p in hidden}
    if len(devices) > 1:
        raise ValueError(f"a stage's parameters must sit on one device, not {sorted(map(str, devices))}")
    hidden_ids = {id(p) for p in hidden}
    return hidden, [p for _, p in params if id(p) not in hidden_ids]


class StageOptimizer:
    """One object per stage: step / zero_grad / state_dict over its (one or two) torch optimizers."""

    def __init__(self, module: nn.Module, cfg: TrainConfig):
        self.module, self.cfg = module, cfg
        params = [p for p in module.parameters() if p.requires_grad]
        if cfg.optimizer == "muon":
            hidden, rest = muon_split(module)
            self.opts = [Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay)] if hidden else []
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
