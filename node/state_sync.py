"""Where a stage's parameters come from when a node starts, and where they go while it runs.

A joiner never serves a freshly initialised stage into a running swarm: it downloads the current
parameters and optimizer state from a live replica of its stage (the one furthest ahead) before it
announces itself. With no live replica it resumes from its own newest checkpoint, else it starts
from initialisation, and it says which.
"""
from __future__ import annotations

import asyncio
import io
import logging
import time
from pathlib import Path

import torch

from node.announce import read_stage_records
from node.client import PeerUnavailable, RemoteError, StageClient
from swarm.checkpoint import atomic_write_bytes, load

log = logging.getLogger("resbm.state")


async def download_state(p2p, run, stage: int, peer_id: str, timeout: float = 60.0, restarts: int = 5) -> dict:
    """A replica's state, chunk by chunk. If it applies a step meanwhile (another step label or size),
    start over: chunks of two steps would make a state that never existed."""
    client = StageClient(p2p, run)
    chunks, offset, total, step = [], 0, None, None
    while total is None or offset < total:
        reply, _, _ = await client.call(peer_id, stage, "state", offset=offset, timeout=timeout)
        if total is not None and (reply["total"] != total or reply.get("step") != step):
            if restarts == 0:
                raise RemoteError("state", "the replica kept stepping during the state transfer")
            restarts -= 1
            chunks, offset, total, step = [], 0, None, None
            continue
        total, step = reply["total"], reply.get("step")
        chunks.append(reply["data"])
        offset += len(reply["data"])
        if not reply["data"] and offset < total:
            raise RemoteError("malformed", "state transfer stalled")
    return torch.load(io.BytesIO(b"".join(chunks)), map_location="cpu", weights_only=True)


async def _replicas_of_stage(dht, run, stage: int, own_peer_id: str, patience_s: float = 20.0) -> list[dict]:
    """Live replicas of `stage`. A fresh DHT peer can miss records for a while (they may have been
    stored on peers that just left, until their owners refresh them), so while the swarm is clearly
    training (other stages report applied steps) but ours shows nobody, look again before concluding.
    Unless our own previous record is visible (a restart of this identity after a crash): then the
    stage's records are readable, and nobody else serves it."""
    deadline = time.monotonic() + patience_s
    while True:
        records = await read_stage_records(dht, run)
        mine = [r for r in records.get(stage, []) if r["peer_id"] != own_peer_id]
        running = any(r["step"] >= 0 for k, recs in records.items() if k != stage for r in recs)
        restarted = any(r["peer_id"] == own_peer_id for r in records.get(stage, []))
        if mine or not running or restarted or time.monotonic() > deadline:
            return mine
        await asyncio.sleep(2.0)


async def load_from_replicas(p2p, worker, peers, load, newer_than: int | None = None) -> str | None:
    """Download `worker`'s stage from the first of `peers` (best first) that hands over a state (newer
    than step `newer_than`, if given) that `load` (async) accepts; that peer's id, or None."""
    for peer in peers:
        try:
            state = await download_state(p2p, worker.run, worker.index, peer)
            if newer_than is None or state["step"] > newer_than:
                await load(state)
                return peer
        except (PeerUnavailable, RemoteError, ValueError, RuntimeError) as e:
            log.warning("could not fetch stage %d from %s: %s", worker.index, peer, e)
    return None


async def initial_state(dht, p2p, worker, checkpoint: Path | None, own_peer_id: str, export: str | None = None) -> str:
    """Load the best available state into `worker` (live replica, else own checkpoint, else the
    weights of an export file, else initialisation); returns a sentence saying where it came from."""
    run = worker.run
    records = await _replicas_of_stage(dht, run, worker.index, own_peer_id)

    async def accept(state):  # (not `load`: that is the checkpoint reader below)
        worker.load_state_dict(state)
    peer = await load_from_replicas(p2p, worker, [r["peer_id"] for r in sorted(records, key=lambda r: -r["step"])],
                                    accept)
    if peer is not None:
        return f"loaded stage {worker.index} at step {worker.applied_step} from live replica {peer}"
    if checkpoint is not None and checkpoint.exists():
        try:
            worker.load_state_dict(load(checkpoint))
            return f"no live replica of stage {worker.index}; resumed from checkpoint {checkpoint} " \
                   f"at step {worker.applied_step}"
        except ValueError as e:
            log.warning("ignoring checkpoint %s: %s", checkpoint, e)
    if export:
        from swarm.export import stage_weights
        try:
            worker.load_weights(*stage_weights(export, run, worker.index))
            return f"no live replica of stage {worker.index} and no checkpoint; weights from export {export} " \
                   f"at step {worker.applied_step} (fresh optimizer state)"
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("ignoring export file %s: %s", export, e)
    return f"no live replica of stage {worker.index} and no usable checkpoint: starting from initialisation"


async def save_periodically(worker, path: Path, every_s: float, executor) -> None:
    """Write the stage checkpoint every `every_s` seconds when a step was applied since the last one.
    The state is serialized on the worker's own executor, between requests, so the file holds the
    weights of exactly the step it is labelled with; the write is atomic (temp file + rename)."""
    loop = asyncio.get_running_loop()
    saved = None
    while True:
        await asyncio.sleep(every_s)
        step, data = await loop.run_in_executor(executor, _labelled_state, worker)
        if step == saved:
            continue
        await loop.run_in_executor(None, atomic_write_bytes, data, path)
        saved = step
        log.info("checkpoint written: %s (step %d)", path, step)


def _labelled_state(worker) -> tuple[int, bytes]:
    return worker.applied_step, worker.state_bytes()


def periodic_checkpoints(worker, path: Path | None, every_min: float, executor) -> list[asyncio.Task]:
    """The periodic checkpoint task of a node of any role (stage 0 included); none if disabled."""
    if path is None or every_min <= 0:
        return []
    return [asyncio.create_task(save_periodically(worker, path, 60 * every_min, executor))]


def checkpoint_path(directory: str | None, run_id: str, stage: int, peer_id: str) -> Path | None:
    if not directory:
        return None
    return Path(directory) / f"{run_id}-stage{stage}-{peer_id[-12:]}.pt"
