"""`join` processes through every lifecycle transition: fresh, from a live replica, from its own
checkpoint, and an auto node moving to another stage in the same process. Each node's states come
from its log ("state a -> b") and, independently, from its signed stage records in the DHT, polled
by this test while the nodes run."""
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from node.announce import read_stage_records
from node.args import identity_peer_id
from node.dht import start_dht

pytestmark = pytest.mark.swarm
ROOT = Path(__file__).resolve().parent.parent
TINY = ["--d-model", "64", "--layers", "3", "--heads", "2", "--ratio", "16", "--seq-len", "32",
        "--batch-size", "4", "--microbatches", "2", "--stages", "3"]
RUN_ID = "life"
FIRST_TURN = ["joining", "loading", "serving"]
LEAVE = ["draining", "stopped"]


class RecordWatcher(threading.Thread):
    """Polls the stage records (serving or not) and keeps each peer's (stage, state) changes in order."""

    def __init__(self, peers):
        super().__init__(daemon=True)
        self.peers, self.seen, self.done = peers, {}, threading.Event()

    def run(self):
        dht = start_dht(RUN_ID, self.peers)
        try:
            while not self.done.is_set():
                records = asyncio.run(read_stage_records(dht, RUN_ID, include_idle=True))
                for recs in records.values():
                    for r in recs:
                        seq = self.seen.setdefault(r["peer_id"], [])
                        if not seq or seq[-1] != (r["stage"], r["state"]):
                            seq.append((r["stage"], r["state"]))
                time.sleep(0.2)
        finally:
            dht.shutdown()

    def states(self, peer) -> list[str]:
        return [state for _, state in self.seen.get(peer, [])]

    def wait_seen(self, peer, stage_state, timeout=60.0) -> None:
        deadline = time.monotonic() + timeout
        while stage_state not in self.seen.get(peer, []) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stage_state in self.seen.get(peer, []), (peer, stage_state, self.seen.get(peer))


class Nodes:
    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []

    def start(self, name, argv):
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", *argv], cwd=ROOT, stdout=open(log, "a"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def join(self, name, stage, peers, *extra):
        return self.start(name, ["join", "--stage", str(stage), "--initial-peers", *peers, "--run-id", RUN_ID,
                                 "--identity", str(self.tmp / f"{name}.id"), "--checkpoint-dir",
                                 str(self.tmp / "ckpt"), *extra])

    def log(self, name) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def states(self, name) -> list[str]:
        return [m.group(1) for m in re.finditer(r"state \S+ -> (\w+)", self.log(name))]

    def wait_for(self, name, pattern, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log(name)):
                return
            time.sleep(0.3)
        raise AssertionError(f"{name}: no {pattern!r} in {timeout:.0f}s:\n{self.log(name)[-3000:]}")

    def stop(self, name, timeout=60.0):
        proc = next(p for n, p in self.procs if n == name)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=timeout) == 0, self.log(name)[-3000:]

    def kill_all(self):
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def subsequence(short, long) -> bool:
    it = iter(long)
    return all(x in it for x in short)


def test_join_walks_every_lifecycle_transition(tmp_path):
    nodes = Nodes(tmp_path)
    watcher = None
    peer = {n: identity_peer_id(str(tmp_path / f"{n}.id")) for n in ("a", "b", "c")}
    try:
        addr = tmp_path / "addr"
        nodes.start("boot", ["bootstrap", *TINY, "--run-id", RUN_ID, "--addr-file", str(addr)])
        nodes.wait_for("boot", "is up", 60)
        peers = addr.read_text().split()
        watcher = RecordWatcher(peers)
        watcher.start()
        # fresh: nobody serves stage 1 and there is no checkpoint
        nodes.join("a", 1, peers)
        nodes.wait_for("a", r"state loading -> serving")
        # from a live replica: b takes a's state
        nodes.join("b", 1, peers)
        nodes.wait_for("b", r"state loading -> serving")
        for n in "ab":
            watcher.wait_seen(peer[n], (1, "serving"))
        nodes.stop("b")
        nodes.stop("a")
        # from its checkpoint (a again, same identity), and c from a's live state, both auto nodes told to
        # start on stage 1. Stage 2 has nobody, so one of them moves there, in the same process.
        auto = ["--auto-target", "1", "--rebalance-every", "2"]
        nodes.join("a", "auto", peers, *auto)
        nodes.wait_for("a", r"resumed from checkpoint[\s\S]*state loading -> serving")
        nodes.join("c", "auto", peers, *auto)
        nodes.wait_for("c", r"state loading -> serving")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("moving" in nodes.states(n) for n in "ac"):
            time.sleep(0.5)
        mover = next((n for n in "ac" if "moving" in nodes.states(n)), None)
        assert mover, nodes.log("a")[-3000:]
        nodes.wait_for(mover, r"state moving -> loading \(stage 2\)[\s\S]*state loading -> serving")
        stayer = "c" if mover == "a" else "a"
        watcher.wait_seen(peer[mover], (2, "serving"))
        watcher.wait_seen(peer[stayer], (1, "serving"))
        nodes.stop(stayer)
        nodes.stop(mover)
        time.sleep(1)
    finally:
        nodes.kill_all()
        if watcher is not None:
            watcher.done.set()
            watcher.join(timeout=30)

    runs_a = nodes.log("a").split("state - -> joining")[1:]  # a ran twice
    assert len(runs_a) == 2
    assert "starting from initialisation" in runs_a[0] and "resumed from checkpoint" in runs_a[1]
    assert "from live replica" in nodes.log("b") and "from live replica" in nodes.log("c")
    assert (nodes.log("a") + nodes.log("c")).count("moving from stage 1 to stage 2") == 1  # one move is enough
    assert "DHT refused" not in runs_a[1]  # a restart's records replace the previous run's at once
    once = FIRST_TURN + LEAVE
    moved = FIRST_TURN + ["draining", "moving", "loading", "serving"] + LEAVE
    assert nodes.states("b") == once
    assert nodes.states("a") == once + (moved if mover == "a" else once)
    assert nodes.states("c") == (moved if mover == "c" else once)

    # The records tell the same story, as far as polling catches it (loading may be too quick to see).
    for n in "abc":
        seen = watcher.states(peer[n])
        assert subsequence(seen, nodes.states(n)), (n, watcher.seen.get(peer[n]))
        assert "serving" in seen and seen[-1] == "stopped", (n, watcher.seen.get(peer[n]))
    seen = watcher.seen[peer[mover]]
    assert (1, "serving") in seen and (2, "serving") in seen, seen
    assert seen.index((1, "serving")) < seen.index((2, "serving")) and seen[-1] == (2, "stopped"), seen
