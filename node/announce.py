"""Stage records in the DHT: publish our own, read everyone's."""
from __future__ import annotations

import asyncio
import logging
import random
import time

from hivemind import DHT
from hivemind.utils import get_dht_time

from node.dht import HOLDERS_WALK, QUICK_READ, subkey_items
from node.record_store import RecordRefresher
from node.run_config import load_config_file
from node.settings import RecordSettings, ServeSettings
from protocol import ARRIVING, PROTOCOL_VERSION, NodeState
from protocol.fingerprint import describe_diff
from protocol.records import StageRecord, config_key, stage_key, stage_record
from protocol.signing import KEY_MARKER, Ed25519RecordValidator
from swarm.config import RunConfig

log = logging.getLogger(__name__)

MAX_RECORD_AGE_S = 300.0  # not refreshed for this long: stale (owners refresh every --announce-period)
MAX_CLOCK_SKEW_S = 30.0   # a record dated further in the future than this is ignored


def owned_by_its_peer(subkey, peer_id: str) -> bool:
    """The subkey is "<peer id>[ed25519:<public key>]": signed by that key (the DHT's Ed25519RecordValidator,
    protocol/signing.py, checks the signature) and naming the peer id the record claims. Unsigned subkeys
    (and RSA-signed ones of older releases) are refused."""
    return isinstance(subkey, bytes) and subkey.startswith(peer_id.encode() + KEY_MARKER) and subkey.endswith(b"]")


def owner_subkey(peer_id: str, validator: Ed25519RecordValidator) -> bytes:
    # The owner's public key in the subkey makes the DHT accept only values signed by the owner.
    return peer_id.encode() + validator.local_public_key


class Announcer:
    def __init__(self, dht: DHT, run_id: str, peer_id: str, validator: Ed25519RecordValidator,
                 settings: RecordSettings = RecordSettings(), relayed: bool | None = None):
        self.dht, self.run_id, self.peer_id, self.settings = dht, run_id, peer_id, settings
        # Behind NAT, others reach us through a relay (node/dht.py's OwnedDHT.reachability): routers penalise that.
        self.relayed = relayed if relayed is not None else getattr(dht, "reachability", None) == "private"
        self.subkey = owner_subkey(peer_id, validator)
        self.started = get_dht_time()
        self.expires: dict[int, float] = {}  # per stage key, of our last record: the DHT keeps the latest-expiring
        self.last_updated = None
        self.refresher = RecordRefresher(dht)  # refreshes go to the holders the last walk found

    async def publish(self, stage: int, fingerprint: str, throughput: float, queue: int, step: int,
                      serving: bool = True, ttl: float | None = None, state: str | None = None,
                      distance: float | None = None) -> bool:
        value = stage_record(stage=stage, peer_id=self.peer_id, throughput=float(throughput), queue=int(queue),
                             fingerprint=fingerprint, step=int(step), serving=serving, started=float(self.started),
                             updated=float(get_dht_time()),
                             state=state or (NodeState.SERVING if serving else NodeState.DRAINING).value,
                             relayed=self.relayed, distance=distance)
        ttl = ttl if ttl is not None else self.settings.ttl_s
        # A newer record with an earlier expiration would be ignored: never expire before the last one.
        expires = self.expires[stage] = max(get_dht_time() + ttl, self.expires.get(stage, 0.0) + 1e-3)
        self.last_updated = value["updated"]
        return await self.refresher.store(stage_key(self.run_id, stage), self.subkey, value, expires)

    async def readable(self, stage: int) -> bool:
        """Whether our newest record can be read back. hivemind's store() reports the answer of the
        last replica that responded, so one peer holding a stale copy (or a dying one) makes it
        say False while the record is stored fine elsewhere: only a record nobody serves matters."""
        found = await self.dht.get(stage_key(self.run_id, stage), latest=True, return_future=True)
        item = subkey_items(found).get(self.subkey)
        return item is not None and isinstance(item.value, dict) and item.value.get("updated") == self.last_updated

    async def run(self, stage: int, fingerprint: str, server, state: str = NodeState.SERVING.value) -> None:
        """Refresh our record every period until cancelled."""
        while True:
            try:
                ok = await self.publish(stage, fingerprint, server.throughput, server.inflight,
                                        server.worker.applied_step, serving=state == NodeState.SERVING.value,
                                        state=state, distance=server.replica_distance)
                if not ok and not await self.readable(stage):
                    log.warning("DHT refused our stage record and it cannot be read back (is the clock or the key "
                                "wrong?)")
            except Exception as e:
                log.warning("could not publish the stage record: %s", e)
            await asyncio.sleep(self.settings.announce_period)


async def stage_items(dht: DHT, run_id: str, stages, fresh: bool = True) -> list[tuple[int, object, object]]:
    """(stage, subkey, ValueWithExpiration) of every record under the keys of `stages`, one get each.
    `fresh`: walk the DHT for the newest copy of each key, asking every holder (each answers with every
    record of the key). Otherwise any holder's copy will do, our own first: none of our traffic where
    we hold the key (in a small swarm most peers do), else the first holder's answer (start_dht keeps
    no caches: a cached copy of an earlier answer missed later records). A walk per key every few
    seconds was half of an idle node's link traffic (README, bench.scaling)."""
    async def one(k):
        found = await dht.get(stage_key(run_id, k), latest=fresh, return_future=True, **({} if fresh else QUICK_READ))
        return [(k, sub, item) for sub, item in subkey_items(found).items()]
    return [row for rows in await asyncio.gather(*(one(k) for k in stages)) for row in rows]


async def read_stage_records(dht: DHT, run, include_idle: bool = False, fresh: bool = True,
                             stages=None) -> dict[int, list[dict]]:
    """Live stage records of `run` (a RunConfig) by stage. Records of another protocol version or run
    fingerprint, not serving, not signed by an owner key under the peer id they claim, filed under
    another stage's key, or stale (not refreshed for MAX_RECORD_AGE_S, or dated in the future) are
    left out. One record per peer id (the newest). `include_idle` keeps records with serving=False
    (nodes leaving or about to start serving: the balancer counts them, the router must not).
    `fresh`: see stage_items; periodic reads pass False, reads after a failure True. `stages`: only
    these (default: every stage of the run; each key read costs a DHT find where we do not hold it)."""
    out: dict[int, list[dict]] = {}
    kept = []
    now = get_dht_time()
    stages = range(run.model.n_stages) if stages is None else stages
    for stage, subkey, item in await stage_items(dht, run.run_id, stages, fresh):
        rec, why = classify(subkey, item.value, now, run.fingerprint, PROTOCOL_VERSION, stage)
        if why and not (include_idle and why.startswith(NOT_SERVING)):
            if rec is not None:
                log.debug("ignoring the record of %s: %s", rec["peer_id"], why)
            continue
        kept.append(rec)
    for rec in newest_per_peer(kept).values():
        out.setdefault(rec["stage"], []).append(rec)
    return out


def newest_per_peer(records) -> dict[str, dict]:
    """One record per peer id: its newest (`updated`; the first seen on a tie)."""
    newest: dict[str, dict] = {}
    for rec in records:
        if rec["peer_id"] not in newest or rec["updated"] > newest[rec["peer_id"]]["updated"]:
            newest[rec["peer_id"]] = rec
    return newest


NOT_SERVING = "not serving"


def classify(subkey, value, now: float, fingerprint: str | None, version: int | None,
             stage: int | None = None) -> tuple[dict | None, str]:
    """(the record as a dict, or None when malformed; "" when it is a live replica's, else why it is
    ignored): signed by an owner key under the peer id it claims, of this protocol version and run
    fingerprint, filed under its own stage's key, neither stale (not refreshed for MAX_RECORD_AGE_S)
    nor dated in the future, and serving. The one record filter of routers, balancers and `status`."""
    try:
        rec = StageRecord(**value).dict()
    except Exception:
        return None, "malformed"
    rec["age_s"] = round(max(0.0, now - rec["updated"]), 3)
    if not owned_by_its_peer(subkey, rec["peer_id"]):
        return rec, "unsigned or foreign-owned"
    if version is not None and rec["version"] != version:
        return rec, f"protocol version {rec['version']}"
    if fingerprint and rec["fingerprint"] != fingerprint:
        return rec, "other run fingerprint"
    if stage is not None and rec["stage"] != stage:
        return rec, f"filed under stage {stage}'s key"
    if now - rec["updated"] > MAX_RECORD_AGE_S or rec["updated"] > now + MAX_CLOCK_SKEW_S:
        return rec, "stale"
    if not rec["serving"]:
        return rec, f"{NOT_SERVING} ({rec['state']})"
    return rec, ""


class RecordView:
    """Every stage's live records as this node last read them: the one copy its router (node/route.py),
    its server's check of who may call it (node/stage_server.py) and its trainer's pauses share.
    Periodic refreshes run in the background, at most once per `settings.read_s` (a slow DHT peer must
    not slow every call); `refresh(force=True)` (after a failure, while waiting) waits for fresh records."""

    def __init__(self, dht: DHT, run, settings: RecordSettings = RecordSettings(), metrics=None):
        self.dht, self.run, self.settings, self.metrics = dht, run, settings, metrics
        self.records: dict[int, list[dict]] = {}
        self.last_read = 0.0     # monotonic time of the last read
        self.reads = 0           # reads so far: a user of the view sees when it changed
        self._refreshing: asyncio.Task | None = None

    async def refresh(self, force: bool = False) -> None:
        if force:
            await self._read(fresh=True)
        elif time.monotonic() - self.last_read >= self.settings.read_s and \
                (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self.read_quietly(fresh=False))

    async def read_quietly(self, fresh: bool) -> None:
        try:
            await self._read(fresh)
        except Exception as e:  # the next refresh tries again; a failing call forces one
            log.warning("could not refresh the stage records from the DHT: %s", e)

    async def _read(self, fresh: bool) -> None:
        self.last_read = time.monotonic()
        self.records = await read_stage_records(self.dht, self.run, fresh=fresh)
        self.reads += 1
        if self.metrics is not None:
            for k, n in self.replica_counts().items():
                self.metrics.replicas.labels(str(k)).set(n)

    def peers(self, stage: int) -> set[str]:
        return {r["peer_id"] for r in self.records.get(stage, [])}

    def replica_counts(self) -> dict[int, int]:
        return {k: len(self.records.get(k, [])) for k in range(self.run.model.n_stages)}

    def missing_stages(self, first: int = 1) -> list[int]:
        """Stages from `first` on without any replica."""
        return [k for k in range(first, self.run.model.n_stages) if not self.records.get(k)]


async def publish_config(dht: DHT, run_id: str, wire: dict, fingerprint: str, validator: Ed25519RecordValidator,
                         ttl: float = RecordSettings.config_ttl_s, refresher: RecordRefresher | None = None) -> bool:
    """Store our signed copy of the run config; a keeper passes its `refresher` (its holders are kept)."""
    value = {"version": PROTOCOL_VERSION, "fingerprint": fingerprint, "config": wire, "updated": get_dht_time()}
    key, subkey, expires = config_key(run_id), validator.local_public_key, get_dht_time() + ttl
    if refresher is not None:
        return await refresher.store(key, subkey, value, expires)
    return await dht.store(key, value, expires, subkey=subkey, return_future=True, **HOLDERS_WALK)


CONFIG_KEEPERS = 3  # nodes that keep the run config record alive (each signs its own copy)


async def keep_config_alive(dht: DHT, run, validator: Ed25519RecordValidator, ttl_s: float) -> None:
    """Keep the run config this node verified alive in the DHT, signed by this node, when this node is
    one of its CONFIG_KEEPERS keepers (`is_config_keeper`), checked every quarter of its lifetime `ttl_s`
    until cancelled: the config then lives as long as any node of the swarm does, not only as long as
    the bootstrap. Why not every node: a read of the key answers with every copy (about 1 kB each), and
    every node refreshing its own made each config read O(swarm size): 4-7 kB at 7 nodes, 100 kB at 100."""
    period, refresher = ttl_s / 4, RecordRefresher(dht)
    while True:
        try:
            found = await dht.get(config_key(run.run_id), latest=False, return_future=True, **QUICK_READ)
            expiring = {sub: item.expiration_time for sub, item in subkey_items(found).items()
                        if isinstance(item.value, dict) and item.value.get("fingerprint") == run.fingerprint}
            if is_config_keeper(validator.local_public_key, expiring, get_dht_time() + 1.5 * period):
                if not await publish_config(dht, run.run_id, run.wire_dict(), run.fingerprint, validator, ttl_s,
                                            refresher):
                    log.warning("could not refresh the run config record")
        except Exception as e:
            log.warning("could not publish the run config record: %s", e)
        await asyncio.sleep(period * random.uniform(0.8, 1.2))  # keepers do not all check at once


def is_config_keeper(mine, expiring: dict, until: float, keepers: int = CONFIG_KEEPERS) -> bool:
    """Whether the node whose subkey is `mine` should (re)publish its copy of the config, given the
    copies' expiration times by subkey: it is among the first `keepers` subkeys of the copies alive at
    `until` (the next check, with a margin) plus its own, or fewer than `keepers` copies will be alive
    then. Every node ranks alike, so extra keepers (nodes that started together) let their copies expire
    and a dead keeper's place is taken before its copy expires."""
    lasting = sorted(sub for sub, expires in expiring.items() if expires > until and sub != mine)
    if mine in expiring:
        return mine in sorted([*lasting, mine])[:keepers]
    return len(lasting) < keepers


async def fetch_config(dht: DHT, run_id: str) -> dict | None:
    """The run config published by the most peers (each signs its own copy; ties: the newest), or None."""
    found = await dht.get(config_key(run_id), latest=True, return_future=True)
    records = [item.value for item in subkey_items(found).values() if isinstance(item.value, dict)]
    votes: dict[str, int] = {}
    for r in records:
        votes[r.get("fingerprint")] = votes.get(r.get("fingerprint"), 0) + 1
    if len(votes) > 1:
        log.warning("peers of run %s publish different configs %s; using the most published", run_id, votes)
    return max(records, key=lambda r: (votes[r.get("fingerprint")], r.get("updated", 0.0)), default=None)


async def wait_for_config(dht: DHT, run_id: str, timeout_s: float, poll_s: float = 0.5) -> dict | None:
    """fetch_config, asked again every `poll_s` until it finds one or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    published = await fetch_config(dht, run_id)
    while published is None and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
        published = await fetch_config(dht, run_id)
    return published


async def watch_swarm(dht: DHT, run, stage: int, joining, period_s: float) -> None:
    """Tell `joining` (a callable) every `period_s` which peers are joining stage `stage` (their state
    downloads go first: node/admission.py)."""
    while True:
        try:
            # our own stage only: reading every stage's key here was ~1 point of an idle node's 1 Mbit/s
            # link at 2 replicas per stage and ~5 at 10 nodes (bench.idle_traffic)
            records = await read_stage_records(dht, run, include_idle=True, fresh=False, stages=[stage])
            joining({r["peer_id"] for r in records.get(stage, []) if r["state"] in ARRIVING})
        except Exception as e:
            log.debug("could not read the swarm's records: %s", e)
        await asyncio.sleep(period_s)


async def resolve_run_config(dht, run_id: str, config_path: str | None = None,
                             timeout_s: float = ServeSettings.config_timeout_s) -> RunConfig:
    """The published run config, waiting up to `timeout_s` for it; a --config file must match it
    exactly (fingerprint)."""
    local = load_config_file(config_path) if config_path else None
    published = await wait_for_config(dht, run_id, timeout_s, poll_s=1.0)
    if published is None:
        if local is None:
            raise SystemExit(f"error: no run config for run {run_id!r} found in the DHT after {timeout_s:.0f}s; "
                             f"is the bootstrap of this run up, or pass --config")
        logging.getLogger("resbm.config").warning("no published config for run %s; using --config %s (fingerprint %s)", run_id, config_path,
                    local.fingerprint)
        return local
    if published.get("version") != PROTOCOL_VERSION:
        raise SystemExit(f"error: the swarm speaks protocol version {published.get('version')}, this node "
                         f"{PROTOCOL_VERSION}; install the matching resbm-swarm release")
    run = RunConfig.from_wire_dict(published["config"])
    if run.fingerprint != published.get("fingerprint"):
        raise SystemExit("error: the published run config does not match its own fingerprint (corrupt record)")
    if local is not None and local.fingerprint != run.fingerprint:
        diff = describe_diff(local.wire_dict(), run.wire_dict())
        raise SystemExit(f"error: --config {config_path} (fingerprint {local.fingerprint}) differs from the swarm's "
                         f"run config ({run.fingerprint}): " + "; ".join(diff))
    return run
