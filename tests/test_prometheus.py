"""A real Prometheus server scrapes a running `resbm-node local` swarm of two trainers and two stages;
its HTTP API then shows non-zero throughput and wire-byte series for every node, each boundary's
bytes counted by the node on either side of it, and the trainers' loss.

Needs the `prometheus` binary (Debian package `prometheus`; .ci/run installs it). Without it the
test is skipped and says why. Everything runs on 127.0.0.1 with free ports and temp dirs, and every
process the test starts is stopped by its own process group."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.swarm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = Path(ROOT) / "deploy"
TINY = ["--d-model", "64", "--layers", "3", "--heads", "2", "--ratio", "16", "--seq-len", "32",
        "--batch-size", "4", "--microbatches", "2"]
STAGES = 3      # stage 0 (the trainers) + 2 served stages
TRAINERS = 2    # metrics ports P+0, P+1; the stages P+2 (stage 1), P+3 (stage 2)


def prometheus_binary():
    return shutil.which("prometheus") or (os.path.exists("/usr/bin/prometheus") and "/usr/bin/prometheus") or None


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block(n: int) -> int:
    """A base port P with P..P+n-1 all free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free block of ports")


def query(prom: str, promql: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def by_instance(result: list[dict]) -> dict[str, float]:
    return {r["metric"].get("instance"): float(r["value"][1]) for r in result}


def dashboard_exprs(title: str | None = None) -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "resbm-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] if title in (None, p["title"]) for t in p.get("targets", [])]


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def assert_boundary_sides(series: list[dict], trainers: set, stage1: set, stage2: set) -> None:
    """Boundary k's messages are counted by the caller (stage k's node: a trainer for k = 0) and by
    the server (stage k+1's node), each message once on each side: codes sent forward and the
    gradient received back by the caller, the reverse by the server."""
    seen: dict[tuple, set] = {}
    for r in series:
        m = r["metric"]
        seen.setdefault((m["boundary"], m["direction"], m["pass"]), set()).add(m["instance"])
    for k, caller, server in (("0", trainers, stage1), ("1", stage1, stage2)):
        assert seen.get((k, "sent", "forward")) == caller and seen.get((k, "received", "backward")) == caller, seen
        assert seen.get((k, "received", "forward")) == server and seen.get((k, "sent", "backward")) == server, seen
    assert {key[0] for key in seen} == {"0", "1"}, seen


def test_real_prometheus_scrapes_every_node(tmp_path):
    prom_bin = prometheus_binary()
    if prom_bin is None:
        reason = ("prometheus binary not found (install the Debian package: apt-get install -y prometheus); "
                  "skipping the real-Prometheus scrape test")
        print(f"\nSKIP: {reason}", file=sys.__stderr__, flush=True)
        pytest.skip(reason)

    n_nodes = TRAINERS + STAGES - 1
    base = free_port_block(n_nodes)
    prom_port = free_port_block(1)
    while base <= prom_port < base + n_nodes:
        prom_port = free_port_block(1)
    targets = [f"127.0.0.1:{base + i}" for i in range(n_nodes)]
    # deploy/prometheus.yml itself, with 1 s intervals, and its local target list pointing at our ports.
    config = (DEPLOY / "prometheus.yml").read_text()
    for old, new in (("scrape_interval: 5s", "scrape_interval: 1s"), ("scrape_timeout: 4s", "scrape_timeout: 900ms"),
                     ("evaluation_interval: 5s", "evaluation_interval: 1s"), ("refresh_interval: 5s", "refresh_interval: 1s")):
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "prometheus.yml").write_text(config)
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "local.json").write_text(json.dumps([{"targets": targets, "labels": {"swarm": "test"}}]))

    swarm_log = open(tmp_path / "local.log", "w")
    swarm = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "local", "--stages", str(STAGES), "--trainers", str(TRAINERS), "--steps",
         "100000", "--eval-every", "0", *TINY, "--metrics-port", str(base), "--run-dir", str(tmp_path / "run"),
         "--run-id", "prom-test", "--json-out", str(tmp_path / "local.json")],
        cwd=ROOT, stdout=swarm_log, stderr=subprocess.STDOUT, start_new_session=True)
    prom_log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen(
        [prom_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        cwd=tmp_path, stdout=prom_log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{prom_port}"
    nodes: list[int] = []
    tokens = wire = rate = {}
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            assert swarm.poll() is None, f"the swarm exited early:\n{(tmp_path / 'local.log').read_text()[-3000:]}"
            assert prom.poll() is None, f"prometheus exited:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}"
            nodes = sorted(set(nodes) | set(children(swarm.pid)))
            time.sleep(1.0)
            try:
                tokens = by_instance(query(url, "resbm_tokens_total > 0"))
                wire = by_instance(query(url, "sum by (instance) (resbm_wire_bytes_total) > 0"))
                rate = by_instance(query(url, "sum by (instance) (rate(resbm_tokens_total[10s])) > 0"))
            except OSError:
                continue  # prometheus still starting
            if all(t in tokens and t in wire and t in rate for t in targets):
                break
        up = by_instance(query(url, "up"))
        info = query(url, "resbm_node_info")
        compression = query(url, "resbm_compression_ratio")
        ratio = by_instance(query(url, "sum by (instance) (resbm_full_width_bytes_total) "
                                       "/ sum by (instance) (resbm_wire_bytes_total)"))
        nominal = query(url, "resbm_nominal_compression_ratio")
        bwd_codes = by_instance(query(url, "sum by (instance) (resbm_code_bytes_total{pass='backward'}) "
                                           "/ sum by (instance) (resbm_full_width_bytes_total{pass='backward'})"))
        losses = query(url, "resbm_train_loss")
        phases = query(url, "sum by (instance, phase) (resbm_step_phase_seconds_count) > 0")
        sides = query(url, "sum by (instance, boundary, direction, pass) (resbm_wire_bytes_total) > 0")
        jobs = {r["metric"]["job"] for r in query(url, "up")}
        dashboard = {}
        for expr in dashboard_exprs():  # every query of the Grafana dashboard is valid PromQL here
            dashboard[expr] = query(url, expr.replace("$__rate_interval", "10s"))
    finally:
        nodes = sorted(set(nodes) | set(children(swarm.pid)))
        stop_group(swarm, grace=60)
        for pid in nodes:  # the nodes are their own process groups; `local` stops them, this is the backstop
            if group_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        stop_group(prom, grace=20)
        swarm_log.close()
        prom_log.close()

    log_tail = (tmp_path / "local.log").read_text()[-2000:]
    for t in targets:
        assert up.get(t) == 1.0, (t, up, log_tail)
        assert tokens.get(t, 0) > 0, (t, tokens, log_tail)
        assert rate.get(t, 0) > 0, (t, rate)
        assert wire.get(t, 0) > 0, (t, wire)
        # b = 64/16 = 4 values in bf16 per token instead of 64: gradients' codec bytes are exactly 16x fewer
        # than full width; whole messages (metadata, framing; targets forward) make the measured ratio lower
        assert bwd_codes[t] == 1 / 16, (t, bwd_codes)
        assert 8.0 < ratio[t] < 16.0, (t, ratio)
    measured = [float(r["value"][1]) for r in compression]
    assert measured and all(8.0 < v < 16.0 for v in measured), compression
    assert {r["metric"]["code_width"] for r in nominal} == {"4"} and {float(r["value"][1]) for r in nominal} == {16.0}
    trainers, stage1, stage2 = set(targets[:TRAINERS]), {targets[TRAINERS]}, {targets[TRAINERS + 1]}
    assert {r["metric"]["instance"] for r in losses} == trainers, losses  # only the trainers compute a loss
    assert {(r["metric"]["instance"], r["metric"]["phase"]) for r in phases} == {
        (t, phase) for t in trainers for phase in ("route", "close")}, phases  # trainers time their steps
    assert_boundary_sides(sides, trainers, stage1, stage2)
    assert sorted(int(r["metric"]["stage"]) for r in info) == [0] * TRAINERS + list(range(1, STAGES))
    assert {r["metric"]["fingerprint"] for r in info} and all(r["metric"]["peer_id"] for r in info)
    assert jobs == {"resbm-local"}
    for key in ("Training throughput", "Compression vs bf16 at width d", "Replicas per stage", "Train loss"):
        expr = next(iter(dashboard_exprs(key)))
        assert dashboard[expr], f"dashboard panel {key!r} shows nothing: {expr}"
    assert swarm.returncode == 130, f"`local` should stop on SIGTERM with 130, got {swarm.returncode}:\n{log_tail}"
    ports = json.loads((tmp_path / "local.json").read_text())["metrics_ports"]
    assert ports == {"trainer0": base, "trainer1": base + 1, "stage1-0": base + 2, "stage2-0": base + 3}, ports
    for pid in [swarm.pid, prom.pid, *nodes]:
        assert not group_alive(pid), f"process group {pid} survived"


def test_deploy_files_are_consistent(tmp_path):
    """Quick checks of deploy/ without Docker or systemd: every node command parses with our CLI,
    the compose targets are the compose nodes, the dashboard is complete, promtool and
    systemd-analyze (where installed) accept the configs."""
    import shlex

    import yaml

    from node.cli import build_parser

    parser = build_parser()
    addr = "/ip4/172.28.0.10/tcp/31337/p2p/12D3KooWQHG9ULL71vgzh7wvboQEidrSXkQWsSU4rc3k2hUHSkmk"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    nodes = {}
    for name, svc in services.items():
        if svc.get("image") != "resbm-swarm:latest" or name == "status":
            continue
        cmd = svc["command"]
        if svc.get("entrypoint") == ["/bin/sh", "-c"]:
            line = cmd[0].split("exec resbm-node ", 1)[1].replace("$$(cat /shared/bootstrap.addr)", addr)
            cmd = shlex.split(line)
        args = parser.parse_args(cmd)
        nodes[name] = args
    assert sorted(nodes) == ["bootstrap", "stage1a", "stage1b", "stage2", "trainer0"]
    assert {a.stage for n, a in nodes.items() if n != "bootstrap"} == {0, 1, 2}
    targets = json.loads((DEPLOY / "compose" / "targets.json").read_text())[0]["targets"]
    for t in targets:
        host, port = t.split(":")
        assert nodes[host].metrics_port == int(port) and nodes[host].metrics_host == "0.0.0.0", t
    assert len(targets) == len(nodes) - 1  # every node but the bootstrap
    mounts = services["prometheus"]["volumes"]
    assert "./compose/targets.json:/etc/prometheus/targets/swarm-compose.json:ro" in mounts
    assert {a.run_id for a in nodes.values()} == {"compose"}

    env = dict(line.split("=", 1) for line in (DEPLOY / "resbm-node.env").read_text().splitlines()
               if line and not line.startswith("#"))
    unit = (DEPLOY / "resbm-node.service").read_text()
    exec_start = unit.split("ExecStart=", 1)[1].split("\nKillSignal", 1)[0].replace("\\\n", " ")
    for key, value in env.items():
        exec_start = exec_start.replace("${%s}" % key, value).replace("$%s" % key, value)
    argv = shlex.split(exec_start)[1:]
    args = parser.parse_args(argv)
    assert args.stage == 1 and args.metrics_port == 9400 and args.identity.startswith("/var/lib/resbm")

    dash = json.loads((DEPLOY / "grafana" / "resbm-dashboard.json").read_text())
    titles = {p["title"] for p in dash["panels"]}
    for needed in ("Throughput", "Loss", "Wire bandwidth per boundary (stage side)", "Compression ratio per node",
                   "Replicas per stage", "Failures and refusals (per minute)", "Rejected payloads by reason (per minute)"):
        assert needed in titles, needed
    assert all(p.get("targets") for p in dash["panels"] if p["type"] != "row")
    for p in json.loads((DEPLOY / "targets" / "swarm.json.example").read_text()):
        assert p["targets"] and all(":" in t for t in p["targets"])

    if shutil.which("promtool"):
        res = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True,
                             text=True)
        assert res.returncode == 0 and "SUCCESS" in res.stdout + res.stderr, res.stdout + res.stderr
    if shutil.which("systemd-analyze"):
        local_unit = tmp_path / "resbm-node.service"
        local_unit.write_text(unit.replace("/opt/resbm/.venv/bin/resbm-node", shutil.which("resbm-node") or
                                           os.path.join(os.path.dirname(sys.executable), "resbm-node")))
        res = subprocess.run(["systemd-analyze", "verify", str(local_unit)], capture_output=True, text=True)
        assert res.returncode == 0 and not res.stderr.strip(), res.stderr
