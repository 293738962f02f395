"""`resbm-node status` against a real DHT holding good, stale, foreign-version, unsigned and
not-serving stage records, with two trainers (stage 0); and the record filtering the trainers and
stages rely on (signed, fresh, one per peer)."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.utils import get_dht_time

from node.announce import Announcer, owner_subkey, publish_config, read_stage_records
from node.dht import start_dht, visible_maddrs
from node.runtime import SocketJanitor
from protocol import PROTOCOL_VERSION
from protocol.records import stage_key, stage_record
from protocol.signing import Ed25519RecordValidator
from swarm.config import ModelConfig, RunConfig, TrainConfig

pytestmark = pytest.mark.swarm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = RunConfig(model=ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=32, n_stages=3, ratio=16),
                train=TrainConfig(batch_size=8, microbatches=2), run_id="statustest")


@pytest.fixture(scope="module")
def swarm_dht():
    janitor = SocketJanitor()
    dht = start_dht(RUN.run_id)
    validator = Ed25519RecordValidator()
    now = get_dht_time()

    async def setup():
        # nobody refreshes these records: they must outlive the module on a loaded machine (minutes)
        assert await publish_config(dht, RUN.run_id, RUN.wire_dict(), RUN.fingerprint, validator, ttl=600)
        for peer, stage, tput, queue in (("QmReplicaA", 1, 12.5, 1), ("QmReplicaB", 1, 20.0, 0),
                                         ("QmTrainerZ", 0, 0.0, 0), ("QmTrainerB", 0, 0.0, 0)):
            ann = Announcer(dht, RUN.run_id, peer, validator, relayed=peer == "QmReplicaB")  # behind NAT
            assert await ann.publish(stage, RUN.fingerprint, tput, queue, 41, ttl=300)
        assert await Announcer(dht, RUN.run_id, "QmLeaving", validator).publish(1, RUN.fingerprint, 5.0, 0, 41,
                                                                                serving=False, ttl=300)
        key = stage_key(RUN.run_id, 1)

        def rec(peer, **kw):
            fields = dict(stage=1, peer_id=peer, throughput=1.0, queue=0, fingerprint=RUN.fingerprint, step=3,
                          serving=True, started=now - 2000, updated=now)
            fields.update(kw)
            return stage_record(**fields)

        stale = rec("QmStale", updated=now - 1000)  # its owner stopped refreshing long ago (but set a long TTL)
        assert await dht.store(key, stale, now + 300, subkey=owner_subkey("QmStale", validator), return_future=True)
        old = rec("QmOldVersion", version=99)
        assert await dht.store(key, old, now + 300, subkey=owner_subkey("QmOldVersion", validator),
                               return_future=True)
        # Unprotected subkey (no owner key): the DHT stores it, readers must ignore it.
        assert await dht.store(key, rec("QmUnsigned", stage=2), now + 300, subkey=b"QmUnsigned", return_future=True)
        # Overwriting another owner's record: the DHT itself refuses (cannot sign for that key).
        other = Ed25519RecordValidator(Ed25519PrivateKey.generate())
        forged = rec("QmReplicaA", throughput=1e9)
        refused = not await dht.store(key, forged, now + 300, subkey=owner_subkey("QmReplicaA", other),
                                      return_future=True)
        schema_refused = not await dht.store(key, {"stage": "one", "peer_id": 5}, now + 300,
                                             subkey=owner_subkey("QmBadSchema", validator), return_future=True)
        local = RunConfig(model=RUN.model, train=RUN.train, run_id="resbm-local")  # `local`'s default run id
        assert await publish_config(dht, local.run_id, local.wire_dict(), local.fingerprint, validator, ttl=600)
        return refused, schema_refused, await read_stage_records(dht, RUN)

    refused, schema_refused, records = asyncio.run(setup())
    yield dht, refused, schema_refused, records
    dht.shutdown()
    janitor.sweep()


def status(dht, *extra, timeout=90):
    return subprocess.run([sys.executable, "-m", "node.cli", "status", "--initial-peers", *visible_maddrs(dht),
                           "--run-id", RUN.run_id, *extra], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_nodes_see_only_signed_fresh_serving_records(swarm_dht):
    _, refused, schema_refused, records = swarm_dht
    assert refused, "the DHT accepted a record signed by someone else than its owner"
    assert schema_refused, "the DHT accepted a record that breaks the schema"
    assert sorted(r["peer_id"] for r in records.get(1, [])) == ["QmReplicaA", "QmReplicaB"]
    assert sorted(r["peer_id"] for r in records.get(0, [])) == ["QmTrainerB", "QmTrainerZ"]
    assert 2 not in records  # the unsigned stage-2 record is not a replica
    assert all(r["throughput"] < 1e6 for r in records[1])


def test_status_json_lists_stages_replicas_and_flags_missing(swarm_dht):
    dht = swarm_dht[0]
    res = status(dht, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["run_id"] == RUN.run_id and doc["fingerprint"] == RUN.fingerprint and doc["n_stages"] == 3
    stages = {s["stage"]: s for s in doc["stages"]}
    assert sorted(stages) == [0, 1, 2]
    reps = {r["peer_id"]: r for r in stages[1]["replicas"]}
    assert sorted(reps) == ["QmReplicaA", "QmReplicaB"]
    a = reps["QmReplicaA"]
    assert a["throughput"] == 12.5 and a["queue"] == 1 and a["version"] == PROTOCOL_VERSION and a["step"] == 41
    assert a["tokens_per_s"] == 12.5 * 4 * 32  # microbatch of 4 sequences x 32 tokens
    assert 0 <= a["age_s"] < 120
    assert (a["relayed"], reps["QmReplicaB"]["relayed"]) == (False, True)
    assert stages[2]["missing"] is True and stages[2]["replicas"] == []
    assert stages[1]["missing"] is False and stages[0]["missing"] is False
    assert [s["role"] for s in doc["stages"]] == ["trainer", "middle", "tail"]
    # trainers are listed like any stage's replicas, sorted by peer id
    assert [(r["peer_id"], r["role"]) for r in stages[0]["replicas"]] == [("QmTrainerB", "trainer"),
                                                                           ("QmTrainerZ", "trainer")]
    assert {r["role"] for r in stages[1]["replicas"]} == {"middle"}
    assert doc["missing_stages"] == [2] and doc["ok"] is False and doc["error"] is None
    why = {r["peer_id"]: r["reason"] for r in doc["ignored_records"]}
    assert why["QmStale"] == "stale"
    assert why["QmOldVersion"] == "protocol version 99"
    assert why["QmUnsigned"] == "unsigned or foreign-owned"
    assert why["QmLeaving"].startswith("not serving")


def test_status_table_and_unknown_run(swarm_dht):
    dht = swarm_dht[0]
    res = status(dht)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "STAGE" in out and "QUEUE" in out and "AGE" in out
    assert "NO REPLICA" in out and "MISSING: stage(s) 2" in out and "NO TRAINER" not in out
    rows = [line.split() for line in out.splitlines() if line.startswith("0 ")]
    assert [(r[1], r[2]) for r in rows] == [("trainer", "QmTrainerB"), ("trainer", "QmTrainerZ")], out
    via = {r[2]: r[-1] for r in (line.split() for line in out.splitlines() if line.startswith("1 "))}
    assert via == {"QmReplicaA": "direct", "QmReplicaB": "relay"}, out
    assert "ignored records:" in out and "1 stale" in out
    missing = status(dht, "--run-id", "no-such-run", "--json", "--timeout", "1")
    assert missing.returncode == 1
    assert "no run config for run 'no-such-run'" in json.loads(missing.stdout)["error"]


def test_status_watch_refreshes_until_stopped(swarm_dht):
    dht = swarm_dht[0]
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "status", "--initial-peers", *visible_maddrs(dht),
                             "--run-id", RUN.run_id, "--json", "--watch", "0.5"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        docs = []
        deadline = time.monotonic() + 60
        while len(docs) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            docs.append(json.loads(line))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert len(docs) == 3, proc.stderr.read()[-2000:]
    assert docs[-1]["dht_time"] > docs[0]["dht_time"]
    assert all(d["missing_stages"] == [2] for d in docs), [d["missing_stages"] for d in docs]
    assert proc.returncode == 0


def test_status_finds_the_default_run_ids_without_run_id(swarm_dht):
    dht = swarm_dht[0]
    res = subprocess.run([sys.executable, "-m", "node.cli", "status", "--initial-peers", *visible_maddrs(dht), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["run_id"] == "resbm-local" and doc["n_stages"] == 3 and doc["missing_stages"] == [0, 1, 2]


def test_status_flags_a_swarm_without_trainers(swarm_dht):
    """Stage 0 is a stage like the others: no trainer is a missing stage, with the command that fixes it."""
    res = status(swarm_dht[0], "--run-id", "resbm-local")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "!! NO TRAINER: start one with `resbm-node join --stage 0 ...`" in res.stdout
    assert "MISSING: stage(s) 0, 1, 2" in res.stdout
