"""Small helpers shared by the tests that start a swarm of real processes around its trainers, and
by the tests that watch one with a real Prometheus."""
import json
import os
import re
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

from node.lifeline import descendants
from node.local_swarm import stop_processes
from swarm.config import ModelConfig, RunConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = Path(ROOT) / "deploy"


def tiny_run(run_id: str, trainers=()) -> RunConfig:
    """3 stages of a d=64 model: a swarm that trains a step in well under a second on 2 cores."""
    model = ModelConfig(d_model=64, n_layers=3, n_heads=2, ratio=16, seq_len=32, n_stages=3)
    return RunConfig(model=model, train=TrainConfig(batch_size=4, microbatches=2, trainers=tuple(trainers)),
                     run_id=run_id)


def trainer_steps(log: Path, total: int = 100000) -> int:
    """Steps a trainer's progress line reports (e.g. '12/100000')."""
    text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""
    found = [int(w.split("/")[0]) for w in text.split() if w.endswith(f"/{total}") and w.split("/")[0].isdigit()]
    return max(found, default=0)


def session_members(leaders) -> list[str]:
    """Processes (p2pd, hivemind helpers, ...) still alive in the sessions of the given node pids: the
    orphans a node that died or was stopped would leave behind."""
    leaders = {int(p) for p in leaders}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) in leaders and fields[0] != "Z":  # field 6 of stat: session id
                found.append(stat.split(")")[0])
    return found


# --- nodes started as users start them -----------------------------------------------------------
def wait_until(cond, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Nodes:
    """Processes started as users start them; each in its own session so the test can clean up by group."""

    def __init__(self, tmp_path, env=None):
        self.dir, self.env = tmp_path, dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv: dict[str, list[str]] = {}
        self.killed: list[int] = []  # main pids killed -9: their sessions must empty by themselves

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        self.argv[name] = list(argv)
        log = open(self.dir / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "node.cli", *argv], cwd=ROOT, env=self.env,
                                            stdout=log, stderr=log, start_new_session=True)
        return self.procs[name]

    def restart(self, name: str) -> subprocess.Popen:
        return self.start(name, *self.argv[name])

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float = 120.0, since: int = 0) -> None:
        def seen():
            if self.procs[name].poll() is not None and text not in self.log(name)[since:]:
                raise AssertionError(f"{name} exited ({self.procs[name].returncode}):\n{self.log(name)[-3000:]}")
            return text in self.log(name)[since:]
        wait_until(seen, timeout, f"{text!r} in {name}'s log:\n{self.log(name)[-2000:]}")

    def own_addr(self, name: str) -> str:
        self.wait_for(name, "--initial-peers /")
        return re.search(r"--initial-peers (/\S+)", self.log(name)).group(1)

    def kill9(self, name: str) -> list[int]:
        """SIGKILL only the node's main pid; returns the pids of the helpers it had (DHT, p2pd, averager)."""
        proc = self.procs[name]
        helpers = descendants(proc.pid)
        proc.kill()
        proc.wait()
        self.killed.append(proc.pid)
        return helpers

    def orphans(self) -> list[str]:
        """What is left in the sessions of the nodes killed -9 (their p2pd, DHT or averager processes)."""
        return session_members(self.killed)

    def stop_all(self) -> None:
        stop_processes(list(self.procs.values()), grace=30.0)


# --- a real Prometheus, configured by deploy/prometheus.yml ----------------------------------------
def prometheus_binary():
    return shutil.which("prometheus") or (os.path.exists("/usr/bin/prometheus") and "/usr/bin/prometheus") or None


def require_prometheus() -> str:
    """The prometheus binary, or skip the test saying why (on stderr too: a skip is easy to miss)."""
    found = prometheus_binary()
    if found is None:
        reason = ("prometheus binary not found (install the Debian package: apt-get install -y prometheus); "
                  "skipping the real-Prometheus test")
        print(f"\nSKIP: {reason}", file=sys.__stderr__, flush=True)
        pytest.skip(reason)
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block(n: int, avoid=()) -> int:
    """A base port P with P..P+n-1 all free on 127.0.0.1 (and none of them in `avoid`)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_free(base + i) and base + i not in avoid for i in range(n)):
            return base
    raise RuntimeError("no free block of ports")


def start_prometheus(binary: str, workdir: Path, targets: dict) -> tuple[subprocess.Popen, str]:
    """deploy/prometheus.yml itself with 1 s intervals, scraping `targets` ({file under targets/, e.g.
    "local.json": [host:port, ...]}); returns the process (its own session) and its URL."""
    config = (DEPLOY / "prometheus.yml").read_text()
    for old, new in (("scrape_interval: 5s", "scrape_interval: 1s"), ("scrape_timeout: 4s", "scrape_timeout: 900ms"),
                     ("evaluation_interval: 5s", "evaluation_interval: 1s"), ("refresh_interval: 5s", "refresh_interval: 1s")):
        assert old in config, old
        config = config.replace(old, new)
    (workdir / "prometheus.yml").write_text(config)
    (workdir / "targets").mkdir(exist_ok=True)
    for name, hosts in targets.items():
        (workdir / "targets" / name).write_text(json.dumps([{"targets": hosts, "labels": {"swarm": "test"}}]))
    port = free_port_block(1, avoid={int(h.rsplit(":", 1)[1]) for hosts in targets.values() for h in hosts})
    log = open(workdir / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()  # the child has its own copy
    return proc, f"http://127.0.0.1:{port}"


def query(prom: str, promql: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def dashboard_exprs(title: str | None = None) -> list[str]:
    """The PromQL of the Grafana dashboard's panels (of the one titled `title`, if given)."""
    dash = json.loads((DEPLOY / "grafana" / "resbm-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] if title in (None, p["title"]) for t in p.get("targets", [])]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process, then SIGKILL its process group if anything of it is left after `grace`."""
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
