"""`resbm-node monitor`: swarm-wide gauges and a status page read from the DHT.

The summary and the page are checked on a hand-made `status` snapshot (a mismatched run config,
a stage nobody serves, a hostile peer id); then a real Prometheus scrapes a monitor of a running
swarm on loopback (a bootstrap and one replica each of stages 1 and 2, no trainer: the replica
gauges need no training), sees stage 2's only replica vanish when it is killed -9, and the monitor
keeps reading after the bootstrap is killed too."""
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.monitor import SwarmView
from swarm_helpers import (ROOT, Nodes, dashboard_exprs, free_port_block, query, require_prometheus,
                           session_members, start_prometheus, stop_group, wait_until)

RUN_FP, OTHER_FP = "aaaa000011112222", "ffff999988887777"
PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # well-formed; nobody there


def replica(peer, step, throughput, relayed=False, distance=None):
    return {"peer_id": peer, "role": "middle", "throughput": throughput, "tokens_per_s": throughput * 128,
            "queue": 0, "age_s": 1.0, "version": 3, "step": step, "state": "serving", "fingerprint": RUN_FP,
            "uptime_s": 10.0, "relayed": relayed, "distance": distance}


def snapshot() -> dict:
    """What status.snapshot returns for a 4-stage run: 1 trainer, stage 1 x2 at different steps,
    stage 2 x1 relayed, stage 3 nobody; records of another config, stale and unsigned ones."""
    stages = [[replica("QmTrainer", 7, 0.0)], [replica("QmA", 7, 10.0, distance=0.002), replica("<script>x</script>", 5, 30.0, distance=0.004)],
              [replica("QmC", 6, 25.0, relayed=True)], []]
    return {"run_id": "mon<unit>", "fingerprint": RUN_FP, "version": 3, "n_stages": 4, "dht_time": time.time(),
            "stages": [{"stage": k, "role": ("trainer", "middle", "middle", "tail")[k], "missing": not reps,
                        "replicas": reps} for k, reps in enumerate(stages)],
            "missing_stages": [3], "replicas_total": 4, "ok": False, "error": None,
            "ignored_records": [
                {"peer_id": "QmOld", "stage": 1, "reason": "other run fingerprint", "state": "serving",
                 "fingerprint": OTHER_FP, "version": 3},
                {"peer_id": "QmGone", "stage": 2, "reason": "stale", "state": "serving",
                 "fingerprint": "stalestalestale0", "version": 2},
                {"peer_id": "QmForged", "stage": 2, "reason": "unsigned or foreign-owned", "state": "serving",
                 "fingerprint": "forgedforged0000", "version": 9}]}


def samples(text: str) -> dict:
    """{(name, sorted label items): value} of a /metrics page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_gauges_export_every_stage_and_show_a_config_mismatch():
    from prometheus_client import generate_latest
    view = SwarmView(period_s=5.0)
    assert generate_latest(view.registry) == b""  # nothing read yet: no made-up zeros
    view.update(snapshot())
    got = samples(generate_latest(view.registry).decode())
    replicas = {dict(k[1])["stage"]: v for k, v in got.items() if k[0] == "resbm_swarm_replicas"}
    assert replicas == {"0": 1, "1": 2, "2": 1, "3": 0}
    assert got[("resbm_swarm_stages_without_replica", ())] == 1 and got[("resbm_swarm_stages", ())] == 4
    assert (got[("resbm_swarm_trainers", ())], got[("resbm_swarm_nodes", ())]) == (1, 4)
    assert got[("resbm_swarm_relayed_nodes", ())] == 1
    assert got[("resbm_swarm_stage_throughput", (("stage", "1"),))] == 40.0
    # stage 3 has nobody: it bounds the pipeline at 0 (stage 0's trainers advertise 0 by design)
    assert got[("resbm_swarm_slowest_stage", ())] == 3
    assert got[("resbm_swarm_slowest_stage_tokens_per_second", ())] == 0
    stage1 = (("stage", "1"),)
    assert (got[("resbm_swarm_step_min", stage1)], got[("resbm_swarm_step_max", stage1)]) == (5, 7)
    assert ("resbm_swarm_step_max", (("stage", "3"),)) not in got  # no replica, no step
    assert got[("resbm_swarm_replica_distance_max", stage1)] == 0.004  # the farther of its two replicas
    assert ("resbm_swarm_replica_distance_max", (("stage", "2"),)) not in got  # it never averaged
    # the other run's node counts; stale and forged records do not
    assert got[("resbm_swarm_fingerprints", ())] == 2 and got[("resbm_swarm_versions", ())] == 1
    assert got[("resbm_swarm_fingerprint_nodes", (("current", "true"), ("fingerprint", RUN_FP)))] == 4
    assert got[("resbm_swarm_fingerprint_nodes", (("current", "false"), ("fingerprint", OTHER_FP)))] == 1
    assert got[("resbm_swarm_ignored_records", (("reason", "stale"),))] == 1
    assert got[("resbm_swarm_run_config_found", ())] == 1 and got[("resbm_swarm_reads_total", ())] == 1
    assert abs(got[("resbm_swarm_last_update_timestamp_seconds", ())] - time.time()) < 60


def test_page_flags_what_needs_a_person_and_escapes_record_text():
    view = SwarmView(period_s=5.0)
    assert "no read of the DHT has finished yet" in view.page()
    view.update(snapshot())
    page = view.page()
    assert "mon&lt;unit&gt;" in page and "&lt;script&gt;x&lt;/script&gt;" in page and "<script>" not in page
    assert "no replica for stage(s) 3" in page and "2 run config fingerprints" in page
    assert "<td>3 tail (slowest)</td>" in page and "<td>5 – 7</td>" in page  # stage 1's steps
    assert "<td>0.40%</td>" in page  # how far a replica was from its group's mean
    assert json.loads(view.json())["summary"]["missing"] == [3]


@pytest.mark.parametrize("argv, message", [
    (["--initial-peers", PEER], "give --metrics-port PORT"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/1", "--metrics-port", "9500"], "lacks the /p2p/<peer id> part"),
    (["--initial-peers", "x", "--metrics-port", "9500", "--period", "0"], "expected a positive number of seconds"),
])
def test_bad_input_gets_a_clear_error(argv, message):
    res = subprocess.run([sys.executable, "-m", "node.cli", "monitor", *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]


def test_a_taken_port_is_refused_before_joining_the_dht():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        res = subprocess.run([sys.executable, "-m", "node.cli", "monitor", "--initial-peers", PEER, "--metrics-port",
                              str(taken.getsockname()[1])], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "cannot serve the monitor on 127.0.0.1:" in res.stderr, res.stderr[-2000:]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def stage_values(prom: str, metric: str) -> dict[int, float]:
    return {int(r["metric"]["stage"]): float(r["value"][1]) for r in query(prom, metric)}


def value(prom: str, promql: str) -> float:
    """The one value a query returns."""
    [result] = query(prom, promql)
    return float(result["value"][1])


def start_swarm(nodes: Nodes) -> list[str]:
    """A bootstrap of a 3-stage run and one replica each of stages 1 and 2, records every second
    (they expire after 3 s, so a killed replica leaves the DHT quickly)."""
    nodes.start("bootstrap", "bootstrap", "--run-id", "montest", "--stages", "3", "--d-model", "64", "--layers", "3",
                "--heads", "2", "--ratio", "16", "--seq-len", "32", "--addr-file", str(nodes.dir / "boot.addr"))
    nodes.wait_for("bootstrap", "is up", 60)
    peers = (nodes.dir / "boot.addr").read_text().split()
    for k in (1, 2):
        nodes.start(f"s{k}", "join", "--stage", str(k), "--run-id", "montest", "--host", "127.0.0.1",
                    "--initial-peers", *peers,
                    "--identity", str(nodes.dir / f"s{k}.id"), "--checkpoint-dir", "", "--threads", "1",
                    "--announce-period", "1")
    return peers


@pytest.mark.swarm
def test_prometheus_sees_a_killed_replica_drop_to_zero(tmp_path):
    prom_bin = require_prometheus()
    nodes = Nodes(tmp_path)
    prom = None
    try:
        peers = start_swarm(nodes)
        port = free_port_block(1)
        monitor = nodes.start("monitor", "monitor", "--run-id", "montest", "--initial-peers", *peers,
                              "--metrics-port", str(port), "--period", "1")
        prom, url = start_prometheus(prom_bin, tmp_path, {"monitor.json": [f"127.0.0.1:{port}"]})
        for name in ("s1", "s2"):
            nodes.wait_for(name, "serving", 120)

        def replicas():
            try:
                return stage_values(url, "resbm_swarm_replicas")
            except OSError:
                return None  # Prometheus still starting
        wait_until(lambda: replicas() == {0: 0, 1: 1, 2: 1}, 60, "Prometheus to see 1 replica of stages 1 and 2")
        for expr in dashboard_exprs():  # every panel's query is valid PromQL (test_prometheus checks the nodes')
            query(url, expr.replace("$__rate_interval", "10s"))
        assert value(url, dashboard_exprs("Slowest stage")[0]) > 0  # both served stages advertise throughput
        missing = dashboard_exprs("Stages without replica")[0]
        assert value(url, missing) == 1  # stage 0: no trainer, counted once
        assert stage_values(url, dashboard_exprs("Live replicas per stage (monitor)")[0]) == {0: 0, 1: 1, 2: 1}
        assert "montest" in http_get(f"http://127.0.0.1:{port}/") and "no replica for stage(s) 0" in \
            http_get(f"http://127.0.0.1:{port}/")

        nodes.kill9("s2")  # its main pid only, as the OOM killer would
        wait_until(lambda: replicas() == {0: 0, 1: 1, 2: 0}, 30, "stage 2's replicas gauge to drop to 0")
        assert value(url, missing) == 2
        assert value(url, "resbm_swarm_slowest_stage") == 2  # nobody serves it: it bounds the pipeline at 0
        assert value(url, "resbm_swarm_slowest_stage_tokens_per_second") == 0

        nodes.kill9("bootstrap")  # the monitor keeps its connection to s1 and reads on
        killed_at = time.time()
        def read_since_kill():
            last = query(url, "max(resbm_swarm_last_update_timestamp_seconds)")
            return last and float(last[0]["value"][1]) > killed_at + 3 and replicas() == {0: 0, 1: 1, 2: 0}
        wait_until(read_since_kill, 30, "reads after the bootstrap died")
        wait_until(lambda: not nodes.orphans(), 20, "the killed nodes' helpers to exit")

        monitor.send_signal(signal.SIGTERM)
        assert monitor.wait(timeout=30) == 0, nodes.log("monitor")[-2000:]
        wait_until(lambda: not session_members([monitor.pid]), 10, "the monitor's p2pd to exit with it")
    finally:
        if prom is not None:
            stop_group(prom, grace=20)
        nodes.stop_all()
