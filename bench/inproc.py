"""A real swarm inside one process, for tests and benchmarks (the node itself never uses it): a
hivemind DHT per peer (each with its own p2pd) and real libp2p streams between them, but the workers
are Python objects one can inspect."""
from __future__ import annotations

import asyncio
import contextlib

from node.announce import Announcer, publish_config
from node.dht import start_dht, visible_maddrs
from node.metrics import NodeMetrics
from node.runtime import SocketJanitor
from node.stage_server import StageServer, measure_throughput
from node.settings import TrainerSettings
from node.trainer import Trainer
from protocol.signing import Ed25519RecordValidator
from swarm.stage_worker import StageWorker


class InprocSwarm:
    """`replicas[k]` replicas of every stage k >= 1 and `trainers` stage-0 replicas, each a Trainer;
    trainer i reads data stream i (trainer 0: train-local's data)."""

    def __init__(self, run, corpus, replicas: dict[int, int] | None = None, averaging: bool = False,
                 trainers: int = 1, settings: TrainerSettings = TrainerSettings(sync=True)):
        self.run, self.corpus = run, corpus
        self.replicas = {0: trainers, **(replicas or {})}
        self.averaging, self.settings = averaging, settings
        self.dhts, self.p2ps, self.averagers = [], [], []
        self.servers: dict[int, list[StageServer]] = {}
        self.trainers: list[Trainer] = []
        self.janitor = SocketJanitor()

    async def __aenter__(self):
        run = self.run
        boot = start_dht(run.run_id)
        self.dhts.append(boot)
        self.peers = visible_maddrs(boot)
        validator = Ed25519RecordValidator()
        assert await publish_config(boot, run.run_id, run.wire_dict(), run.fingerprint, validator)
        for k in range(run.model.n_stages):
            self.servers[k] = [await self._serve(k, validator) for _ in range(self.replicas.get(k, 1))]
        for i, server in enumerate(self.servers[0]):
            self.trainers.append(Trainer(server, self.corpus, settings=self.settings,
                                         stream=i))
        for trainer in self.trainers:
            await asyncio.wait_for(trainer.wait_for_stages(), 60)
        return self

    async def _serve(self, k: int, validator) -> StageServer:
        run = self.run
        dht = start_dht(run.run_id, self.peers)
        p2p = await dht.replicate_p2p()
        self.dhts.append(dht)
        self.p2ps.append(p2p)
        worker = StageWorker(run, k)
        averager = None
        if self.averaging:
            from node.averaging import ReplicaAverager
            from node.settings import AveragingSettings
            n = self.replicas.get(k, 1)

            async def count(n=n):
                return n
            averager = ReplicaAverager(dht, run.run_id, k, worker, run.train.average_every, count, NodeMetrics(),
                                       AveragingSettings(gather_s=15.0, matchmaking_s=1.0))  # one quiet host
            self.averagers.append(averager)
        server = StageServer(worker, NodeMetrics(), str(dht.peer_id), averager, dht=dht, p2p=p2p)
        if k:
            measure_throughput(server)
        await server.add_p2p_handlers(p2p)
        ann = Announcer(dht, run.run_id, str(dht.peer_id), validator)
        assert await ann.publish(k, run.fingerprint, server.throughput, 0, -1, ttl=300)
        return server

    async def train(self, steps: int) -> list[list]:
        """Every trainer feeds until its stage 0 applied `steps` more updates; their StepDone lists."""
        async def one(trainer):
            trainer.start(steps)
            try:
                return [await trainer.next_step() for _ in range(steps)]
            finally:
                await trainer.close()
        return list(await asyncio.gather(*(one(t) for t in self.trainers)))

    async def load_joiner(self, worker) -> str:
        """A newcomer's state load (node/state_sync.initial_state) from its own DHT peer; says from where."""
        from node.state_sync import initial_state
        dht = start_dht(self.run.run_id, self.peers)
        try:
            p2p = await dht.replicate_p2p()
            message = await initial_state(dht, p2p, worker, None, str(dht.peer_id))
            await p2p.shutdown()
            return message
        finally:
            dht.shutdown()

    async def __aexit__(self, *exc):
        for p2p in self.p2ps:
            with contextlib.suppress(Exception):
                await p2p.shutdown()
        for a in self.averagers:
            a.shutdown()
        for dht in self.dhts:
            dht.shutdown()
        self.janitor.sweep()
