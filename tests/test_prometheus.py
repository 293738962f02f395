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
import subprocess
import sys
import time

import pytest

from swarm_helpers import (DEPLOY, ROOT, dashboard_exprs, free_port_block, group_alive, query, require_prometheus,
                           start_prometheus, stop_group)

pytestmark = pytest.mark.swarm
TINY = ["--d-model", "64", "--layers", "3", "--heads", "2", "--ratio", "16", "--seq-len", "32",
        "--batch-size", "4", "--microbatches", "2"]
STAGES = 3      # stage 0 (the trainers) + 2 served stages
TRAINERS = 2    # metrics ports P+0, P+1; the stages P+2 (stage 1), P+3 (stage 2)


def by_instance(result: list[dict]) -> dict[str, float]:
    return {r["metric"].get("instance"): float(r["value"][1]) for r in result}


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


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


KEY_PANELS = ("Training throughput", "Compression vs bf16 at width d", "Replicas per stage", "Train loss")


def panels_shown(url: str, patience_s: float = 30.0) -> dict[str, list]:
    """Every query of the Grafana dashboard, run as Grafana would (valid PromQL here, or `query`
    raises). Asked again, as a dashboard refreshes, until the key panels show something or
    `patience_s` passes: on a loaded 2-core machine a 1 s scrape can time out a few times in a row,
    and a rate then has too few samples for a moment. $__rate_interval is 4 scrapes at the least in
    Grafana; 10 s here."""
    deadline = time.monotonic() + patience_s
    while True:
        shown = {expr: query(url, expr.replace("$__rate_interval", "10s")) for expr in dashboard_exprs()}
        if all(shown[dashboard_exprs(key)[0]] for key in KEY_PANELS) or time.monotonic() > deadline:
            return shown
        time.sleep(1.0)


def test_real_prometheus_scrapes_every_node(tmp_path):
    prom_bin = require_prometheus()
    n_nodes = TRAINERS + STAGES - 1
    base = free_port_block(n_nodes)
    targets = [f"127.0.0.1:{base + i}" for i in range(n_nodes)]
    swarm_log = open(tmp_path / "local.log", "w")
    swarm = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "local", "--stages", str(STAGES), "--trainers", str(TRAINERS), "--steps",
         "100000", "--eval-every", "0", *TINY, "--metrics-port", str(base), "--run-dir", str(tmp_path / "run"),
         "--run-id", "prom-test", "--json-out", str(tmp_path / "local.json")],
        cwd=ROOT, stdout=swarm_log, stderr=subprocess.STDOUT, start_new_session=True)
    prom, url = start_prometheus(prom_bin, tmp_path, {"local.json": targets})
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
        staleness = query(url, "sum by (instance) (resbm_staleness_updates_count) > 0")
        sides = query(url, "sum by (instance, boundary, direction, pass) (resbm_wire_bytes_total) > 0")
        calls = query(url, "resbm_next_hop_calls_total > 0")
        jobs = {r["metric"]["job"] for r in query(url, "up")}
        dashboard = panels_shown(url)
        scrapes = by_instance(query(url, "count_over_time(up[30s])"))  # for a failure message: missed scrapes
    finally:
        nodes = sorted(set(nodes) | set(children(swarm.pid)))
        stop_group(swarm, grace=60)
        for pid in nodes:  # the nodes are their own process groups; `local` stops them, this is the backstop
            if group_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        stop_group(prom, grace=20)
        swarm_log.close()

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
    # every node that runs backwards says how stale their forwards were
    assert {r["metric"]["instance"] for r in staleness} == set(targets), staleness
    assert_boundary_sides(sides, trainers, stage1, stage2)
    # every node with a next stage counts its calls by the replica that answered (here, the only one)
    assert {r["metric"]["instance"] for r in calls} == trainers | stage1, calls
    replicas = {int(r["metric"]["stage"]): r["metric"]["peer_id"] for r in info}
    assert {r["metric"]["replica"] for r in calls} == {replicas[1], replicas[2]}, (calls, replicas)
    assert sorted(int(r["metric"]["stage"]) for r in info) == [0] * TRAINERS + list(range(1, STAGES))
    assert {r["metric"]["fingerprint"] for r in info} and all(r["metric"]["peer_id"] for r in info)
    assert jobs == {"resbm-local"}
    for key in KEY_PANELS:
        expr = next(iter(dashboard_exprs(key)))
        assert dashboard[expr], f"dashboard panel {key!r} shows nothing: {expr}; scrapes in the last 30 s: {scrapes}"
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

    from node.cli import parse_args

    addr = "/ip4/172.28.0.10/tcp/31337/p2p/12D3KooWQHG9ULL71vgzh7wvboQEidrSXkQWsSU4rc3k2hUHSkmk"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    nodes = {}
    for name, svc in services.items():
        if svc.get("image") != "resbm-swarm:latest" or name in ("status", "monitor"):
            continue
        cmd, env = svc["command"], dict(svc.get("environment") or {})
        if svc.get("entrypoint") == ["/bin/sh", "-c"]:
            assert 'export RESBM_INITIAL_PEERS="$$(cat /shared/bootstrap.addr)"' in cmd[0], cmd
            env["RESBM_INITIAL_PEERS"] = addr
            cmd = shlex.split(cmd[0].split("exec resbm-node ", 1)[1])
        args = parse_args(cmd, environ=env)
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
    # the monitor: a `monitor` command Prometheus scrapes through its own job (targets/monitor*.json)
    line = services["monitor"]["command"][0].split("exec resbm-node ", 1)[1]
    monitor = parse_args(shlex.split(line.replace("$$(cat /shared/bootstrap.addr)", addr)),
                         environ=services["monitor"]["environment"])
    assert monitor.command == "monitor" and monitor.run_id == "compose" and monitor.metrics_host == "0.0.0.0"
    assert "./compose/monitor.json:/etc/prometheus/targets/monitor-compose.json:ro" in mounts
    monitor_targets = json.loads((DEPLOY / "compose" / "monitor.json").read_text())[0]["targets"]
    assert monitor_targets == [f"monitor:{monitor.metrics_port}"], monitor_targets
    assert json.loads((DEPLOY / "targets" / "monitor.json").read_text())[0]["targets"] == ["127.0.0.1:9500"]
    assert {a.run_id for a in nodes.values()} == {"compose"}

    unit = (DEPLOY / "resbm-node.service").read_text()
    env = {}  # as systemd sets it: Environment= lines, then the EnvironmentFile (which wins)
    for line in unit.splitlines():
        if line.startswith("Environment="):
            env.update(word.split("=", 1) for word in shlex.split(line[len("Environment="):]))
    env.update(line.split("=", 1) for line in (DEPLOY / "resbm-node.env").read_text().splitlines()
               if line and not line.startswith("#"))
    exec_start = unit.split("ExecStart=", 1)[1].split("\nKillSignal", 1)[0].replace("\\\n", " ")
    assert "$" not in exec_start, exec_start  # no flags spliced from variables: the node reads RESBM_* itself
    argv = shlex.split(exec_start)[1:]
    args = parse_args(argv, environ=env)
    assert args.stage == 1 and args.metrics_port == 9400 and args.identity.startswith("/var/lib/resbm")

    dash = json.loads((DEPLOY / "grafana" / "resbm-dashboard.json").read_text())
    titles = {p["title"] for p in dash["panels"]}
    for needed in ("Throughput", "Loss", "Wire bandwidth per boundary (stage side)", "Compression ratio per node",
                   "Replicas per stage", "Failures and refusals (per minute)", "Rejected payloads by reason (per minute)",
                   "Live replicas per stage (monitor)", "Slowest stage", "Run configs and versions"):
        assert needed in titles, needed
    assert all(p.get("targets") for p in dash["panels"] if p["type"] != "row")
    cells = [(x, y) for p in dash["panels"] for g in [p["gridPos"]]
             for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
    assert len(cells) == len(set(cells)), "dashboard panels overlap"
    assert {p["labels"]["role"] for p in json.loads((DEPLOY / "targets" / "swarm.json.example").read_text())} <= {
        "trainer", "stage"}  # the roles nodes have (no "head")
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
