"""Replicas of one stage train one model: every `average_every` steps they average parameters
through a hivemind DecentralizedAverager (all-reduce among the replicas found in the DHT).

Averaging runs inside the step barrier (the head waits for every replica's step reply), so no
forward or backward uses parameters while they are being replaced."""
from __future__ import annotations

import asyncio
import logging

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager

log = logging.getLogger(__name__)


class ReplicaAverager:
    def __init__(self, dht: DHT, run_id: str, stage: int, module: torch.nn.Module, every: int,
                 count_replicas, metrics, matchmaking_s: float = 1.0, timeout_s: float = 20.0):
        self.module, self.every, self.count_replicas, self.metrics = module, every, count_replicas, metrics
        self.timeout_s = timeout_s
        self.params = [p for p in module.parameters()]
        self.averager = DecentralizedAverager(
            [p.detach().cpu().clone() for p in self.params], dht=dht, prefix=f"{run_id}_avg_stage{stage}",
            min_group_size=2, min_matchmaking_time=matchmaking_s, request_timeout=max(1.0, matchmaking_s),
            start=True)

    async def maybe_average(self, step: int) -> bool | None:
        """Average after step `step` when it is due and another replica exists; None if not due."""
        if not self.every or (step + 1) % self.every:
            return None
        n = await self.count_replicas()
        if n < 2:
            return None
        ok = await asyncio.get_running_loop().run_in_executor(None, self._average)
        (self.metrics.avg_rounds if ok else self.metrics.avg_failures).inc()
        if not ok:
            log.warning("averaging after step %d with %d replicas failed; continuing with local parameters", step, n)
        return ok

    def _average(self) -> bool:
        with torch.no_grad(), self.averager.get_tensors() as shared:
            for dst, p in zip(shared, self.params):
                dst.copy_(p.detach().cpu())
        try:
            result = self.averager.step(timeout=self.timeout_s, allow_retries=False)
        except Exception as e:
            log.warning("averaging error: %s", e)
            return False
        if result is None:
            return False
        with torch.no_grad(), self.averager.get_tensors() as shared:
            for p, src in zip(self.params, shared):
                p.copy_(src.to(p.device))
        return True

    def shutdown(self) -> None:
        self.averager.shutdown()
