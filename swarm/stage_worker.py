"""The training logic of one served stage, free of networking (node/stage_server.py wraps it).

A microbatch crosses a stage in one nested call: `begin` runs the forward under autograd and hands
back a handle that lives only in the caller's frame while the downstream hops work; `finish` runs
the backward with the gradient they returned. The parameter gradients are kept per microbatch key
(owner trainer, step, micro), never summed on arrival, so the step's apply plan decides exactly
which keys this replica applies: a dead trainer's keys or an abandoned route's are dropped, nothing
else. `apply_step` is idempotent: a step is applied once, and late requests for it are refused.
"""
from __future__ import annotations

import io

import torch

from swarm.config import RunConfig
from swarm.ledger import ApplyPlan, MicroKey, replica_verdict
from swarm.model import build_stage, lm_loss
from swarm.optim import StageOptimizer


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """The stage input as a graph leaf; token ids (first stage) take no gradient."""
    return x.detach().requires_grad_(True) if x.is_floating_point() else x


class StaleRequest(ValueError):
    """A request for a step that this stage has already applied."""


class StageWorker:
    """One stage and its optimizer on one device. The seeded initialisation runs on the CPU (so GPU and
    CPU replicas start identical), and the stage reaches its device before the optimizer exists; a
    worker never moves afterwards, so every state it loads lands on that device (torch casts optimizer
    state to its parameters' device at load time) and the optimizer variant fits the device."""

    def __init__(self, run: RunConfig, index: int, device="cpu", stage=None):
        self.run, self.index = run, index
        self.device = torch.device(device)
        self.stage = (stage or build_stage(run.model, index)).to(self.device)
        self.opt = StageOptimizer(self.stage, run.train)
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.applied_step = -1
        self.grads: dict[MicroKey, list] = {}   # per microbatch key: its parameter gradients
        self.plan: ApplyPlan | None = None      # the plan of the step applied last (a new coordinator adopts it)
        self.discarded = 0                      # keys dropped (not in a plan, or stale)

    def _run(self, x, tokens):
        """The stage's forward; bf16 autocast on a GPU, codes leave in fp32 for the codec."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.stage(x, tokens)
        return out.float()

    def _check_open(self, key: MicroKey) -> None:
        if key.step <= self.applied_step:
            raise StaleRequest(f"step {key.step} is already applied here (last applied {self.applied_step})")

    # --- one microbatch ------------------------------------------------------------------------
    def begin(self, key: MicroKey, x: torch.Tensor, tokens=None):
        """Forward under autograd: (handle for `finish`, detached output to send on)."""
        self._check_open(key)
        leaf = _leaf(x)
        out = self._run(leaf, tokens)
        return (leaf, out), out.detach()

    def finish(self, key: MicroKey, handle, grad_out: torch.Tensor):
        """Backward of `begin`'s graph: keeps the parameter gradients under `key` (a retried key
        replaces its earlier attempt) and returns the input gradient (None for token ids)."""
        self._check_open(key)
        leaf, out = handle
        return self._hold(key, leaf, [out], [grad_out])

    def loss_and_hold(self, key: MicroKey, x: torch.Tensor, targets: torch.Tensor, tokens=None):
        """Last stage: (loss, input gradient of loss / microbatches), parameter gradients kept under `key`."""
        self._check_open(key)
        leaf = _leaf(x)
        loss = lm_loss(self._run(leaf, tokens), targets)
        return loss.item(), self._hold(key, leaf, [loss / self.run.train.microbatches], None)

    def _hold(self, key, leaf, outputs, grad_outputs):
        wrt = ([leaf] if leaf.requires_grad else []) + self.params
        grads = torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True)
        grad_in = grads[0] if leaf.requires_grad else None
        self.grads[key] = [g.detach() if g is not None else None for g in grads[len(wrt) - len(self.params):]]
        return grad_in

    @torch.no_grad()
    def evaluate(self, x, tokens=None, targets=None):
        """No graph, nothing held: the output, or the loss at the last stage (with `targets`)."""
        out = self._run(x, tokens)
        return lm_loss(out, targets).item() if targets is not None else out

    # --- the step ------------------------------------------------------------------------------
    def held(self, step: int) -> list[MicroKey]:
        return sorted(k for k in self.grads if k.step == step)

    def apply_step(self, plan: ApplyPlan, peer_id: str) -> dict:
        """Apply the plan's keys for this replica once: their gradients summed in key order, scaled so
        a full step equals train-local's (loss / microbatches per key) and a step with fewer keys
        is their mean; every other key of that step (and of earlier ones) is dropped."""
        if plan.step <= self.applied_step:
            return {"applied": False, "grad_norm": 0.0, "micro_count": 0, "duplicate": True, "missing": 0}
        verdict = replica_verdict(plan, self.index, peer_id, self.held(plan.step))
        norm = 0.0
        if verdict.apply:
            scale = self.run.train.microbatches / plan.n_total
            for i, p in enumerate(self.params):
                parts = [self.grads[k][i] for k in verdict.apply if self.grads[k][i] is not None]
                p.grad = torch.stack(parts).sum(0) * scale if parts else None
            norm = self.opt.step(plan.step)
        self.opt.zero_grad()
        stale = [k for k in self.grads if k.step <= plan.step]
        self.discarded += len(stale) - len(verdict.apply)
        for k in stale:
            del self.grads[k]
        self.applied_step, self.plan = plan.step, plan
        return {"applied": bool(verdict.apply), "grad_norm": norm, "micro_count": len(verdict.apply),
                "duplicate": False, "missing": len(verdict.missing)}

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stage": self.index, "step": self.applied_step, "fingerprint": self.run.fingerprint,
                "config": self.run.wire_dict(), "model": self.stage.state_dict(), "optimizer": self.opt.state_dict()}

    def state_bytes(self) -> bytes:
        """The state serialized for a joining replica (cached until the next applied step)."""
        cached = getattr(self, "_state_cache", None)
        if cached is None or cached[0] != self.applied_step:
            buf = io.BytesIO()
            torch.save(self.state_dict(), buf)
            self._state_cache = cached = (self.applied_step, buf.getvalue())
        return cached[1]

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.run.fingerprint or state.get("stage") != self.index:
            raise ValueError(f"state is for stage {state.get('stage')} of run {state.get('fingerprint')}, "
                             f"not stage {self.index} of {self.run.fingerprint}")
        self.stage.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.applied_step = state["step"]
        self.grads.clear()

    def load_weights(self, model_state: dict, step: int) -> None:
        """Parameters without optimizer state (from an export file): moments start from zero."""
        self.stage.load_state_dict(model_state)
        self.opt.zero_grad()
        self.applied_step = step
        self.grads.clear()
