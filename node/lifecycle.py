"""A node's life as one explicit loop, after Petals' `Server.run` and its `ServerState`:

    joining -> loading -> serving -> draining -> stopped
                  ^                      |
                  +------- moving <------+      (--stage auto: the swarm needs us elsewhere)

joining: DHT up, run config resolved, first stage chosen. loading: the stage is built on its
device and its state comes from a live replica, our checkpoint, an export file or initialisation.
serving: requests are answered (a trainer also trains). draining: no new requests, the ones in flight
finish, the checkpoint is written. moving: the record points at the target stage, and the loop
turns once more in the same process (same peer id, DHT and metrics port). Every transition is
logged ("state a -> b") and published in the node's stage record, so `resbm-node status` shows it.
"""
from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from node.announce import Announcer, keep_config_alive, read_stage_records, resolve_run_config, watch_swarm
from node.averaging import ReplicaAverager
from node.dht import print_own_addrs, start_dht_from_args
from node.metrics import NodeMetrics
from node.run_config import chosen_run_id, load_config_file
from node.runtime import SocketJanitor, close_hivemind, resolve_device, stop_event_on_signals
from node.settings import DeviceSettings, JoinSettings
from node.stage_server import StageServer, measure_throughput, state_chunk_bytes
from node.state_sync import checkpoint_path, initial_state, periodic_checkpoints
from node.training_run import train
from protocol import LEFT, PROTOCOL_VERSION, NodeState
from protocol.signing import Ed25519RecordValidator
from swarm.balance import move_target, pick_stage, quality, stage_totals
from swarm.checkpoint import atomic_write_bytes
from swarm.memory import check_fits
from swarm.model import build_stage
from swarm.robust import default_tau
from swarm.stage_worker import StageWorker

log = logging.getLogger("resbm.node")

# Allowed transitions; any state may also end in STOPPED (a signal or an error).
NEXT = {NodeState.JOINING: {NodeState.LOADING}, NodeState.LOADING: {NodeState.SERVING},
        NodeState.SERVING: {NodeState.DRAINING}, NodeState.DRAINING: {NodeState.MOVING},
        NodeState.MOVING: {NodeState.LOADING}, NodeState.STOPPED: set()}


@dataclass
class Turn:
    """What serving one stage holds; all of it is released when the node leaves the stage."""
    stage: int
    worker: object
    server: object
    averager: object = None
    checkpoint: Path | None = None
    loaded: bool = False  # state loaded: only then may the checkpoint be overwritten
    tasks: list = field(default_factory=list)


class Node:
    def __init__(self, settings: JoinSettings | None):
        self.settings = settings
        self.state: NodeState | None = None
        self.history: list[str] = []
        self.dht = self.p2p = self.metrics = self.announcer = self.run_cfg = self.device = None
        self.peer_id = ""
        self.turn: Turn | None = None
        self.config_task: asyncio.Task | None = None
        self.moved = False              # an auto node that moved dwells before it considers moving again
        self.carried_throughput = 0.0   # announced at the target while loading there, so others do not move too

    # --- the loop --------------------------------------------------------------------------------
    async def run(self) -> int:
        janitor = SocketJanitor()
        self.stop = stop_event_on_signals(asyncio.get_running_loop())
        try:
            self.enter(NodeState.JOINING)
            await self._join()
            stage, exit_code = await self._first_stage(), 0
            while stage is not None:
                await self._load(stage)
                if stage == 0:
                    exit_code, move_to = await self._serve_trainer(), None
                else:
                    move_to = await self._serve()
                await self._drain()
                stage = await self._move(move_to) if move_to is not None else None
            return exit_code
        finally:
            await self._shut_down()
            janitor.sweep()

    def enter(self, state: NodeState, note: str = "") -> None:
        if self.state is not None and state is not NodeState.STOPPED and state not in NEXT[self.state]:
            raise RuntimeError(f"no transition from {self.state.value} to {state.value}")
        log.info("state %s -> %s%s", self.state.value if self.state else "-", state.value, f" ({note})" if note else "")
        self.state = state
        self.history.append(state.value)

    async def publish(self, stage: int, throughput: float = 0.0, step: int = -1) -> None:
        """One record saying where we are; best effort (a node that cannot publish still works)."""
        try:
            # (It replaces our serving record: the announcer makes it expire after that one.)
            await asyncio.wait_for(self.announcer.publish(stage, self.run_cfg.fingerprint, throughput, 0, step,
                                                          serving=False, state=self.state.value), 5.0)
        except Exception as e:
            log.warning("could not publish the %s record: %s", self.state.value, e)

    # --- joining ---------------------------------------------------------------------------------
    async def _join(self) -> None:
        s = self.settings
        run_id = chosen_run_id(s.connect.run_id, load_config_file(s.serve.config) if s.serve.config else None)
        # hivemind forks its helper processes: start them before any CUDA work.
        self.dht = start_dht_from_args(run_id, s.connect)
        self.p2p = await self.dht.replicate_p2p()
        self.peer_id = str(self.dht.peer_id)
        self.run_cfg = await resolve_run_config(self.dht, run_id, s.serve.config, s.serve.config_timeout_s)
        self.device = resolve_device(s.device.device)
        self.metrics = NodeMetrics().serve(s.monitoring.metrics_port, s.monitoring.metrics_host)
        self.metrics.set_nominal(self.run_cfg)
        self.announcer = Announcer(self.dht, run_id, self.peer_id, Ed25519RecordValidator(), s.records)
        print_own_addrs(self.dht, "node")
        # the run config's keepers (any node may become one) re-publish it: joiners find it after the bootstrap is gone
        self.config_task = asyncio.create_task(keep_config_alive(self.dht, self.run_cfg, Ed25519RecordValidator(),
                                                                  s.records.config_ttl_s))

    async def _first_stage(self) -> int:
        n_stages, stage = self.run_cfg.model.n_stages, self.settings.serve.stage
        if stage == "auto":
            if n_stages < 2:
                raise SystemExit("error: --stage auto needs a run with at least 2 stages")
            return await choose_auto_stage(self.dht, self.run_cfg, self.settings.serve.auto_target)
        if not 0 <= stage < n_stages:
            raise SystemExit(f"error: --stage {stage} does not exist; this run has stages 0..{n_stages - 1}")
        return stage

    # --- loading ---------------------------------------------------------------------------------
    async def _load(self, stage: int) -> None:
        self.enter(NodeState.LOADING, f"stage {stage}")
        run, serve = self.run_cfg, self.settings.serve
        worker = build_worker(run, stage, self.device, self.settings.device)
        self.metrics.info.info({"version": str(PROTOCOL_VERSION), "stage": str(stage), "peer_id": self.peer_id,
                                "fingerprint": run.fingerprint, "run_id": run.run_id})
        averager = self._averager(stage, worker)
        server = StageServer(worker, self.metrics, self.peer_id, averager, dht=self.dht, p2p=self.p2p,
                             records=self.settings.records, route=self.settings.route, serve=self.settings.serve,
                             state_chunk=state_chunk_bytes(self.settings.averaging.link_mbit))
        t = self.turn = Turn(stage, worker, server, averager,
                             checkpoint_path(serve.checkpoint_dir, run.run_id, stage, self.peer_id))
        # While loading (a download can take long), the record says so and keeps any throughput carried over.
        placeholder = SimpleNamespace(throughput=self.carried_throughput, inflight=0, worker=worker,
                                      replica_distance=None)  # what Announcer.run reads of a server
        announcing = asyncio.create_task(self.announcer.run(stage, run.fingerprint, placeholder, state="loading"))
        try:
            log.info(await initial_state(self.dht, self.p2p, worker, t.checkpoint, self.peer_id, serve.init_from,
                                         stop=self.stop))
        finally:
            announcing.cancel()
        t.loaded = True

    def _averager(self, stage: int, worker):
        run = self.run_cfg
        if not run.train.average_every:
            return None

        async def count_replicas():
            # a fresh walk (once per due round): a node's own copy of its stage key may hold only its own
            # record, and in the scaling lab one replica of each later stage then skipped every round
            # as if alone while its partner waited for it and failed
            return len((await read_stage_records(self.dht, run, fresh=True, stages=[stage])).get(stage, []))
        return ReplicaAverager(self.dht, run.run_id, stage, worker, run.train.average_every, count_replicas,
                               self.metrics, self.settings.averaging,
                               tau=default_tau(run.train.lr, run.train.average_every))

    # --- serving ---------------------------------------------------------------------------------
    async def _serve(self) -> int | None:
        """Serve until stopped (None) or until the swarm needs us on another stage (its number)."""
        t, run, serve = self.turn, self.run_cfg, self.settings.serve
        measure_throughput(t.server)
        await t.server.add_p2p_handlers(self.p2p)
        self.enter(NodeState.SERVING)
        self._keep_fresh()
        print(f"stage {t.stage} serving: peer {self.peer_id} run {run.run_id} fingerprint {run.fingerprint} "
              f"throughput {t.server.throughput:.1f} microbatches/s", file=sys.stderr, flush=True)
        waits = [asyncio.create_task(self.stop.wait())]
        if serve.stage == "auto":
            waits.append(asyncio.create_task(watch_balance(self.dht, run, t.stage, t.server, serve.rebalance_every,
                                                           self.moved)))
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return None if waits[0] in done else waits[1].result()

    async def _serve_trainer(self) -> int:
        await self.turn.server.add_p2p_handlers(self.p2p)  # a trainer serves its state, for joining trainers
        self.enter(NodeState.SERVING, "training")
        self._keep_fresh()
        return await train(self.settings.trainer, self.run_cfg, self.turn.server, self.stop)

    def _keep_fresh(self) -> None:
        """While the stage serves: its record, its view of who is joining, its checkpoint."""
        t, run = self.turn, self.run_cfg
        t.tasks.append(asyncio.create_task(self.announcer.run(t.stage, run.fingerprint, t.server)))
        t.tasks.append(asyncio.create_task(watch_swarm(self.dht, run, t.stage, t.server.admission.set_joining,
                                                            self.settings.records.read_s)))
        t.tasks += periodic_checkpoints(t.worker, t.checkpoint, self.settings.serve.save_every_min, t.server.executor)

    # --- draining, moving, stopping --------------------------------------------------------------
    async def _drain(self) -> None:
        """Stop taking requests, let the ones in flight finish, write the checkpoint."""
        t, drain_s = self.turn, self.settings.serve.drain_timeout_s
        self.enter(NodeState.DRAINING, f"stage {t.stage}")
        for task in t.tasks:
            task.cancel()
        deadline = time.monotonic() + drain_s  # the whole drain: a stuck step must not keep us
        await self.publish(t.stage, step=t.worker.applied_step)
        try:  # no new requests reach this node; the ones in flight still finish
            await asyncio.wait_for(t.server.remove_p2p_handlers(self.p2p), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("removing the stage's handlers did not finish within the drain time; going on")
        while t.server.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if t.server.inflight:
            log.info("%d request(s) still in flight after %.0fs of draining: abandoned (their callers retry "
                     "elsewhere)", t.server.inflight, drain_s)
        await self._save_checkpoint()

    async def _move(self, target: int) -> int:
        t = self.turn
        self.enter(NodeState.MOVING, f"stage {t.stage} -> {target}")
        self.carried_throughput, self.moved = t.server.throughput, True
        await self.publish(target, throughput=self.carried_throughput)
        self._end_turn()
        return target

    async def _save_checkpoint(self) -> None:
        t = self.turn
        if t is None or t.checkpoint is None or not t.loaded:
            return
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(t.server.executor, t.worker.state_bytes)
        await loop.run_in_executor(None, atomic_write_bytes, data, t.checkpoint)
        log.info("checkpoint written: %s (step %d)", t.checkpoint, t.worker.applied_step)

    def _end_turn(self) -> None:
        t, self.turn = self.turn, None
        for task in t.tasks:
            task.cancel()
        if t.averager is not None:
            t.averager.shutdown()
        t.server.executor.shutdown(wait=False)

    async def _shut_down(self) -> None:
        t = self.turn
        if t is not None:
            if self.state is not NodeState.DRAINING:  # an error mid-turn: keep what was trained
                await _best_effort(self._save_checkpoint(), "writing the checkpoint")
            self.enter(NodeState.STOPPED)
            await _best_effort(self.publish(t.stage), "publishing the stopped record")
            self._end_turn()
        elif self.state is not NodeState.STOPPED:
            self.enter(NodeState.STOPPED)
        if self.config_task is not None:
            self.config_task.cancel()
        if self.metrics is not None:
            self.metrics.close()
        await close_hivemind(self.p2p, self.dht)


async def _best_effort(coro, what: str) -> None:
    try:
        await coro
    except Exception as e:
        log.warning("%s failed: %s", what, e)


def build_worker(run, stage: int, device, settings: DeviceSettings = DeviceSettings()):
    """The stage built with the seeded CPU initialisation, checked against the device's free memory,
    then placed on its device before its optimizer exists (see StageWorker), with the node's own
    precision and activation checkpointing (not part of the run config)."""
    module = build_stage(run.model, stage)
    need = check_fits(run, stage, module, device, settings.precision, settings.activation_checkpointing)
    log.info("stage %d: %d layers, %.1f M parameters on %s; memory ~%.0f MiB weights+gradient+optimizer, ~%.0f MiB "
             "activations", stage, run.model.stage_layers[stage], sum(p.numel() for p in module.parameters()) / 1e6,
             device, need["params_bytes"] / 2**20, need["activations_bytes"] / 2**20)
    return StageWorker(run, stage, device=device, stage=module, precision=settings.precision,
                       activation_checkpointing=settings.activation_checkpointing)


# --- --stage auto ----------------------------------------------------------------------------------
async def choose_auto_stage(dht, run, preferred: int | None) -> int:
    stages = range(1, run.model.n_stages)
    if preferred in stages:
        return preferred
    totals = stage_totals(await read_stage_records(dht, run), stages)
    stage = pick_stage(totals)
    log.info("--stage auto: serving stage %d (stage totals in microbatches/s: %s)", stage,
             {k: round(t, 2) for k, (t, _) in totals.items()})
    return stage


async def watch_balance(dht, run, stage: int, server, every_s: float, just_moved: bool) -> int:
    """Returns the stage to move to once the swarm is badly unbalanced (see swarm/balance.py). Nodes that
    are loading or moving count where they are going; nodes that are leaving do not count at all."""
    if just_moved:  # dwell: a node that just moved stays a while, whatever the numbers say
        await asyncio.sleep(5 * every_s)
    while True:
        await asyncio.sleep(every_s * random.uniform(0.5, 1.5))  # jitter: nodes do not all move at once
        try:
            records = await read_stage_records(dht, run, include_idle=True)
        except Exception as e:  # the DHT hiccuped: look again next time
            log.warning("balance check failed: %s", e)
            continue
        present = {k: [r for r in recs if r["state"] not in LEFT] for k, recs in records.items()}
        totals = stage_totals(present, range(1, run.model.n_stages))
        target = move_target(totals, stage, server.throughput)
        if target is not None:
            log.warning("swarm balance quality %.2f is low: moving from stage %d to stage %d", quality(totals),
                        stage, target)
            return target
