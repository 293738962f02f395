"""The training logic of one served stage, free of networking (node/stage_server.py wraps it).

Forward keeps the autograd graph of each (step, microbatch) so backward need not recompute it;
a backward normally carries only the gradient; one whose forward ran elsewhere (rerouted after a
failure) recomputes from the input the head re-sends. Gradients of one step accumulate until `apply_step(step)`, which is idempotent:
an update is never applied twice, and a step's late requests are refused once it is applied.
"""
from __future__ import annotations

import io
from collections import OrderedDict

import torch

from swarm.config import RunConfig
from swarm.model import build_stage, lm_loss
from swarm.optim import StageOptimizer


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """The stage input as a graph leaf; token ids (first stage) take no gradient."""
    return x.detach().requires_grad_(True) if x.is_floating_point() else x


class StaleRequest(ValueError):
    """A request for a step that this stage has already applied (or abandoned)."""


class NeedInput(ValueError):
    """A backward without its input, for a microbatch whose forward is not cached here: resend x."""


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
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = 2 * run.train.microbatches + 2
        self.applied_step = -1
        self.grad_step: int | None = None
        self.grad_session: int | None = None   # which run of the head (trainer) the held gradients belong to
        self.grad_inputs: dict[int, torch.Tensor | None] = {}   # micro -> grad sent back (for duplicates)
        self.discarded_steps = 0

    def _run(self, x, tokens):
        """The stage's forward; bf16 autocast on a GPU, codes leave in fp32 for the codec."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.stage(x, tokens)
        return out.float()

    # --- bookkeeping ---------------------------------------------------------------------------
    def _open_step(self, step: int, catchup: bool = False, session: int = 0) -> None:
        if catchup:
            # Microbatches of the step just applied here, whose replica died before applying them:
            # they are recomputed here and applied as one extra update (never lost, never twice).
            if step != self.applied_step:
                raise StaleRequest(f"catch-up is only for the step just applied ({self.applied_step}), not {step}")
            if self.grad_step != step:
                self.opt.zero_grad()
                self.grad_inputs.clear()
            self.grad_step = step
            return
        if step <= self.applied_step:
            raise StaleRequest(f"step {step} is already applied here (last applied {self.applied_step})")
        if self.grad_step is not None and (self.grad_step != step or self.grad_session != session):
            # The head moved on without applying that step, or it restarted (a new session) and does
            # that step again: drop the gradients nobody will apply, never refuse the new run's.
            self.opt.zero_grad()
            self.grad_inputs.clear()
            self.discarded_steps += 1
        self.grad_step, self.grad_session = step, session

    def _graph(self, step: int, micro: int, x: torch.Tensor, tokens):
        cached = self.cache.get((step, micro))
        if cached is not None and (x is None or torch.equal(cached[0].detach(), x)):
            return self.cache.pop((step, micro))
        if x is None:
            raise NeedInput(f"the forward of step {step} microbatch {micro} is not cached here: resend x")
        leaf = _leaf(x)
        return leaf, self._run(leaf, tokens)

    # --- requests ------------------------------------------------------------------------------
    def forward(self, step: int, micro: int, x: torch.Tensor, tokens=None, train: bool = True) -> torch.Tensor:
        if not train:
            with torch.no_grad():
                return self._run(x, tokens)
        if step <= self.applied_step:
            raise StaleRequest(f"step {step} is already applied here (last applied {self.applied_step})")
        leaf = _leaf(x)
        out = self._run(leaf, tokens)
        self.cache[(step, micro)] = (leaf, out)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return out.detach()

    def backward(self, step: int, micro: int, x: torch.Tensor | None, grad_out: torch.Tensor, tokens=None,
                 catchup: bool = False, session: int = 0):
        self._open_step(step, catchup, session)
        if micro in self.grad_inputs:  # a retried call that already counted here: same answer, no re-count
            self.cache.pop((step, micro), None)
            return self.grad_inputs[micro]
        leaf, out = self._graph(step, micro, x, tokens)
        out.backward(grad_out)
        self.grad_inputs[micro] = leaf.grad
        return leaf.grad

    def loss(self, step: int, micro: int, x: torch.Tensor, targets: torch.Tensor, scale: float, tokens=None,
             train: bool = True, catchup: bool = False, session: int = 0):
        """Last stage: (loss value, gradient w.r.t. x of scale*loss) or (loss, None) when not training."""
        if not train:
            with torch.no_grad():
                return lm_loss(self._run(x, tokens), targets).item(), None
        self._open_step(step, catchup, session)
        if micro in self.grad_inputs:
            raise StaleRequest(f"microbatch {micro} of step {step} was already counted here")
        leaf = x.detach().requires_grad_(True)
        loss = lm_loss(self._run(leaf, tokens), targets)
        (loss * scale).backward()
        self.grad_inputs[micro] = leaf.grad
        return loss.item(), leaf.grad

    def held(self, step: int) -> list[int]:
        """Microbatches whose gradients this stage holds for `step`."""
        return sorted(self.grad_inputs) if self.grad_step == step else []

    def discard(self, step: int) -> None:
        """Forget the gradients of `step` (the head will have them recomputed elsewhere)."""
        if self.grad_step == step:
            self.opt.zero_grad()
            self.grad_inputs.clear()
            self.grad_step = None

    def apply_step(self, step: int, expect: list[int] | None = None, catchup: bool = False) -> dict:
        """Apply `step` once. With `expect`, apply only if exactly those microbatches were counted
        here; otherwise drop the gradients (never apply a partial or double-counted update).
        `catchup` applies the extra update of microbatches recomputed for the step just applied."""
        if step < self.applied_step or (step == self.applied_step and not (catchup and self.grad_step == step)):
            return {"applied": False, "grad_norm": 0.0, "micro_count": 0, "duplicate": True}
        held = self.held(step)
        mismatch = expect is not None and sorted(expect) != held
        norm = 0.0
        if held and not mismatch:
            norm = self.opt.step(step)
        self.opt.zero_grad()
        self.applied_step, self.grad_step = step, None
        self.grad_inputs.clear()
        self.cache.clear()
        return {"applied": bool(held) and not mismatch, "grad_norm": norm, "micro_count": 0 if mismatch else len(held),
                "duplicate": False, "mismatch": mismatch, "held": held}

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

    def load_weights(self, model_state: dict, step: int) -> None:
        """Parameters without optimizer state (from an export file): moments start from zero."""
        self.stage.load_state_dict(model_state)
        self.opt.zero_grad()
        self.applied_step = step
