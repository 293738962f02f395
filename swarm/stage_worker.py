"""The training logic of one served stage, free of networking (node/stage_server.py wraps it).

A microbatch crosses a stage in one nested call: `begin` runs the forward and hands back a handle
that lives only in the caller's frame while the downstream hops work; `finish` runs the backward
with the gradient they returned and adds the parameter gradients into the stage's one gradient
buffer. When `microbatches` of them have been added, the replica steps on its own: no barrier, no
coordinator, and gradient memory is one parameter-sized buffer however many microbatches are in
flight.

Staleness: the handle keeps the forward's graph and the weights' version. If the replica stepped
while the microbatch was downstream, the graph is stale (its saved weights were updated in
place), so `finish` recomputes the forward from the kept input (a ResBM code: b numbers per token)
with the current weights and backpropagates the returned gradient through it. Graphs are also the
memory that grows with the microbatches in flight: at most `microbatches` of them are kept (the
oldest in-flight microbatch beyond that keeps only its input and is recomputed), so a stage's
memory is bounded whatever the callers' windows.

At most once: a microbatch is named by a key (its owner, the owner's step and slot). A rerouted
walk reaches the replicas downstream of the failure a second time with the same key; they answer
it (the caller needs the input gradient) but add its parameter gradient only once. The weights a
microbatch's backward uses are then at most a few updates newer than those of its forward; the
count is returned and exported (`staleness`). With one trainer that drains each step before the
next (`--sync`), nothing is ever stale and a step equals train-local's.
"""
from __future__ import annotations

import io
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from swarm.config import RunConfig
from swarm.model import build_stage, lm_loss
from swarm.optim import StageOptimizer
from swarm.precision import LossScaler, autocast, device_autocast_dtype


COUNTED_KEYS = 4096  # remembered microbatch keys: far more than are ever in flight


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """The stage input as a graph leaf; token ids (first stage) take no gradient."""
    return x.detach().requires_grad_(True) if x.is_floating_point() else x


@dataclass
class Handle:
    """A microbatch between its forward and its backward on this stage."""
    x: torch.Tensor              # the input as received (kept to recompute a stale forward)
    tokens: torch.Tensor | None
    leaf: torch.Tensor | None    # the graph of the forward, or None once dropped
    out: torch.Tensor | None
    step: int                    # the last update applied here before the forward
    generation: int              # the weights' generation at the forward (any in-place change moves it)


class StageWorker:
    """One stage and its optimizer on one device. The seeded initialisation runs on the CPU (so GPU and
    CPU replicas start identical), and the stage reaches its device before the optimizer exists; a
    worker never moves afterwards, so every state it loads lands on that device (torch casts optimizer
    state to its parameters' device at load time) and the optimizer variant fits the device.

    Not thread-safe: the stage server runs every call in one worker thread."""

    def __init__(self, run: RunConfig, index: int, device="cpu", stage=None, precision: str = "auto",
                 activation_checkpointing: bool = False):
        self.run, self.index = run, index
        self.device = torch.device(device)
        self.stage = (stage or build_stage(run.model, index)).to(self.device)
        self.stage.activation_checkpointing = activation_checkpointing
        self.amp_dtype = device_autocast_dtype(self.device, precision)  # per node: not in the run config
        self.scaler = LossScaler() if self.amp_dtype == torch.float16 else None
        self.opt = StageOptimizer(self.stage, run.train)
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.applied_step = -1       # local updates so far - 1 (the step number the next update gets: +1)
        self.accumulated = 0         # microbatches whose gradients sit in .grad
        self.recomputed = 0          # backwards that had to recompute a stale forward
        self.generation = 0          # moves on every in-place change of the weights: step, load, average
        self.counted: OrderedDict = OrderedDict()  # keys of the last COUNTED_KEYS microbatches added
        self.duplicates = 0          # backwards of a key already added (a rerouted walk): not added again
        self._state_cache = None     # (generation, serialized state) for joiners
        self._graphs: OrderedDict = OrderedDict()  # id -> weakref of in-flight handles holding a graph

    def _run(self, x, tokens):
        """The stage's forward under the node's autocast (swarm/precision.py); codes leave in fp32."""
        with autocast(self.device, self.amp_dtype):
            out = self.stage(x, tokens)
        return out.float()

    # --- one microbatch ------------------------------------------------------------------------
    def begin(self, x: torch.Tensor, tokens=None) -> tuple[Handle, torch.Tensor]:
        """Forward under autograd: (handle for `finish`, detached output to send on)."""
        leaf = _leaf(x)
        out = self._run(leaf, tokens)
        handle = Handle(x, tokens, leaf, out, self.applied_step, self.generation)
        self._keep_graph(handle)
        return handle, out.detach()

    def _keep_graph(self, handle: Handle) -> None:
        """Hold at most `microbatches` graphs: beyond, the oldest in flight drops its graph (its
        backward recomputes the forward). A handle whose caller gave up is forgotten with it."""
        self._graphs.pop(id(handle), None)  # an id of a forgotten handle may be reused
        self._graphs[id(handle)] = weakref.ref(handle)
        while len(self._graphs) > self.run.train.microbatches:
            _, ref = self._graphs.popitem(last=False)
            old = ref()
            if old is not None:
                old.leaf = old.out = None

    def finish(self, handle: Handle, grad_out: torch.Tensor, key=None) -> tuple[torch.Tensor | None, dict]:
        """Backward of `begin`'s forward: parameter gradients are added to the stage's buffer (unless
        `key` was added already; the replica steps when a step's worth is in), returns (input
        gradient or None for token ids, what happened: staleness, stepped)."""
        staleness = max(0, self.applied_step - handle.step)
        leaf, out = handle.leaf, handle.out
        handle.leaf = handle.out = None  # the graph is freed with this call, whatever happens
        self._graphs.pop(id(handle), None)
        if leaf is None or handle.generation != self.generation:  # dropped, or its weights changed in place
            leaf = _leaf(handle.x)
            out = self._run(leaf, handle.tokens)
            self.recomputed += 1
        grad_in, added = self._accumulate(leaf, [out], [grad_out], key)
        return grad_in, {"staleness": staleness, **self._maybe_step(added)}

    def loss_step(self, x: torch.Tensor, targets: torch.Tensor, tokens=None, key=None):
        """Last stage: forward, loss and backward at once. Returns (loss, input gradient of
        loss / microbatches, what happened)."""
        leaf = _leaf(x)
        loss = lm_loss(self._run(leaf, tokens), targets)
        grad_in, added = self._accumulate(leaf, [loss / self.run.train.microbatches], None, key)
        return loss.item(), grad_in, {"staleness": 0, **self._maybe_step(added)}

    def _accumulate(self, leaf, outputs, grad_outputs, key) -> tuple[torch.Tensor | None, bool]:
        """(input gradient, whether the parameter gradients were added: not for a key seen before)."""
        add = key is None or key not in self.counted
        inputs = ([leaf] if leaf.requires_grad else []) + (self.params if add else [])
        if not inputs:  # a duplicate at the first stage: nothing to compute
            self.duplicates += 1
            return None, False
        if self.scaler is None:
            torch.autograd.backward(outputs, grad_outputs, inputs=inputs)
        else:
            self._scaled_backward(outputs, grad_outputs, inputs)
        if add:
            self.accumulated += 1
            if key is not None:
                self.counted[key] = None
                if len(self.counted) > COUNTED_KEYS:
                    self.counted.popitem(last=False)
        else:
            self.duplicates += 1
        if not leaf.requires_grad:
            return None, add
        grad_in, leaf.grad = leaf.grad, None
        return (torch.zeros_like(leaf) if grad_in is None else grad_in), add  # None: an fp16 overflow

    def _scaled_backward(self, outputs, grad_outputs, inputs) -> None:
        """fp16: the backward of the arriving gradient times S, added / S into .grad. An inf/nan adds
        nothing and sends a zero gradient upstream (the scaler halves S)."""
        seeds = grad_outputs or [torch.ones_like(o) for o in outputs]
        grads = torch.autograd.grad(outputs, inputs, self.scaler.scaled(seeds), allow_unused=True)
        for t, g in zip(inputs, self.scaler.unscale(grads) or []):
            if g is not None:
                t.grad = g if t.grad is None else t.grad.add_(g)

    def _maybe_step(self, added: bool = True) -> dict:
        """Step once a step's worth of microbatches is in: their summed gradients of loss / microbatches
        are exactly train-local's step gradient."""
        if not added or self.accumulated < self.run.train.microbatches:
            return {"stepped": False, "added": added}
        norm = self.opt.step(self.applied_step + 1)
        self.opt.zero_grad()
        self.accumulated = 0
        self.applied_step += 1
        self.generation += 1
        return {"stepped": True, "added": True, "grad_norm": norm}

    @torch.no_grad()
    def evaluate(self, x, tokens=None, targets=None):
        """No graph, nothing held: the output, or the loss at the last stage (with `targets`)."""
        out = self._run(x, tokens)
        return lm_loss(out, targets).item() if targets is not None else out

    @torch.no_grad()
    def change_weights(self, fn) -> None:
        """Change the weights in place outside a step (an averaging round's result): `fn(params)`."""
        fn(self.params)
        self.generation += 1
        self._state_cache = None

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stage": self.index, "step": self.applied_step, "fingerprint": self.run.fingerprint,
                "config": self.run.wire_dict(), "model": self.stage.state_dict(), "optimizer": self.opt.state_dict()}

    def state_bytes(self) -> bytes:
        """The state serialized for a joining replica (cached until the weights change)."""
        cached = self._state_cache
        if cached is None or cached[0] != self.generation:
            buf = io.BytesIO()
            torch.save(self.state_dict(), buf)
            self._state_cache = cached = (self.generation, buf.getvalue())
        return cached[1]

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.run.fingerprint or state.get("stage") != self.index:
            raise ValueError(f"state is for stage {state.get('stage')} of run {state.get('fingerprint')}, "
                             f"not stage {self.index} of {self.run.fingerprint}")
        self.stage.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self._restart(state["step"])

    def load_weights(self, model_state: dict, step: int) -> None:
        """Parameters without optimizer state (from an export file): moments start from zero."""
        self.stage.load_state_dict(model_state)
        self._restart(step)

    def _restart(self, step: int) -> None:
        """New weights: gradients of the old ones are dropped, and every graph in flight is stale."""
        self.opt.zero_grad()
        self.accumulated = 0
        self.applied_step = step
        self.generation += 1
        self._state_cache = None
