"""Where a stage's parameters come from when a node starts, and where they go while it runs.

A joiner never serves a freshly initialised stage into a running swarm: it downloads the current
parameters and optimizer state from a live replica of its stage (the one furthest ahead) before it
announces itself, from a snapshot the replica takes for that download (however many steps happen
meanwhile), and tries again, saying why, for as long as live replicas exist. With no live replica
it resumes from its own newest checkpoint, else it starts from initialisation, and it says which.
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


async def download_state(p2p, run, stage: int, peer_id: str, timeout: float = 60.0, retries: int = 5) -> dict:
    """A replica's state, chunk by chunk, from one snapshot: the replica serializes its state once when
    the download starts and serves that snapshot by offset, however many steps it applies meanwhile, so
    the download may take as long as the link needs. A later chunk that fails (timeout, busy replica) is
    asked for again at the same offset; a snapshot the replica no longer holds starts the download over. A
    replica without snapshots (an older version) is read live: a step in between (another step label
    or size) starts over, as chunks of two steps would make a state that never existed."""
    client = StageClient(p2p, run)
    chunks, offset, total, step, snap = [], 0, None, None, ""
    started, failures = time.monotonic(), 0
    while total is None or offset < total:
        try:
            reply, _, _ = await client.call(peer_id, stage, "state", offset=offset, timeout=timeout,
                                            **({"snapshot": snap} if snap else {}))
        except (PeerUnavailable, RemoteError) as e:
            transient = isinstance(e, PeerUnavailable) or e.reason in ("busy", "unavailable")
            if not transient or failures >= retries or not snap:  # (a first call that fails: the caller decides)
                raise
            failures += 1
            if isinstance(e, RemoteError) and e.reason == "unavailable":  # our snapshot is gone
                chunks, offset, total, step, snap = [], 0, None, None, ""
            log.info("state download of stage %d from %s: %s; %s at byte %d", stage, peer_id[-8:], e,
                     "resuming" if offset else "starting again", offset)
            await asyncio.sleep(min(2.0 ** failures, 15.0))
            continue
        if total is not None and (reply["snapshot"] != snap or
                                  (not snap and (reply["total"] != total or reply.get("step") != step))):
            if failures >= retries:
                raise RemoteError("state", "the replica kept stepping during the state transfer")
            failures += 1
            chunks, offset, total, step, snap = [], 0, None, None, ""
            continue
        total, step, snap = reply["total"], reply.get("step"), reply["snapshot"]
        chunks.append(reply["data"])
        offset += len(reply["data"])
        if not reply["data"] and offset < total:
            raise RemoteError("malformed", "state transfer stalled")
    seconds = time.monotonic() - started
    if seconds > 10:
        log.info("downloaded stage %d at step %s from %s: %d bytes in %.0f s", stage, step, peer_id[-8:], total, seconds)
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


async def load_from_replicas(p2p, worker, peers, load, newer_than: int | None = None,
                             errors: list | None = None) -> str | None:
    """Download `worker`'s stage from the first of `peers` (best first) that hands over a state (newer
    than step `newer_than`, if given) that `load` (async) accepts; that peer's id, or None (then
    `errors`, if given, says why for each peer)."""
    for peer in peers:
        try:
            state = await download_state(p2p, worker.run, worker.index, peer)
            if newer_than is None or state["step"] > newer_than:
                await load(state)
                return peer
        except (PeerUnavailable, RemoteError, ValueError, RuntimeError) as e:
            log.warning("could not fetch stage %d from %s: %s", worker.index, peer, e)
            if errors is not None:
                errors.append(f"{peer[-8:]}: {e}")
    return None


class StateUnavailable(ConnectionError):
    """Stopped while live replicas of the stage exist but none has handed over its state yet."""


async def initial_state(dht, p2p, worker, checkpoint: Path | None, own_peer_id: str, export: str | None = None,
                        retry_s: float = 10.0, stop: asyncio.Event | None = None) -> str:
    """Load the best available state into `worker` (live replica, else own checkpoint, else the
    weights of an export file, else initialisation); returns a sentence saying where it came from.
    While live replicas of the stage exist, only they will do: a download that fails is tried again
    (every `retry_s`, growing to 60 s), saying why, and the node never serves a checkpoint or freshly
    initialised weights beside replicas that have trained on. `stop` (set: the node is asked to stop)
    ends that wait with StateUnavailable."""
    run = worker.run

    async def accept(state):  # (not `load`: that is the checkpoint reader below)
        worker.load_state_dict(state)
    attempt = 0
    while True:
        records = await _replicas_of_stage(dht, run, worker.index, own_peer_id)
        if not records:
            break
        errors = []
        peer = await load_from_replicas(p2p, worker, [r["peer_id"] for r in sorted(records, key=lambda r: -r["step"])],
                                        accept, errors=errors)
        if peer is not None:
            return f"loaded stage {worker.index} at step {worker.applied_step} from live replica {peer}"
        attempt += 1
        wait = min(retry_s * attempt, 60.0)
        # (worded without "serving": scripts and tests wait for a node's "-> serving" line)
        log.warning("stage %d has %d live replica(s), but none handed over its state (%s); waiting for them rather "
                    "than starting from a checkpoint or initialised weights: retrying in %.0f s", worker.index, len(records),
                    "; ".join(errors) or "no answer", wait)
        try:
            await asyncio.wait_for((stop or asyncio.Event()).wait(), wait)
        except asyncio.TimeoutError:
            continue
        raise StateUnavailable(f"stopped while waiting for the state of stage {worker.index} from its "
                               f"{len(records)} live replica(s): {'; '.join(errors) or 'no answer'}")
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
