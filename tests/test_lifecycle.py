"""`join` processes through every lifecycle transition: fresh, from a live replica, from its own
checkpoint, and an auto node moving to another stage in the same process. Each node's states come
from its log ("state a -> b") and, independently, from its signed stage records in the DHT, polled
by this test while the nodes run."""
import asyncio
import re
import signal
import threading
import time

import pytest

from node.announce import read_stage_records
from node.args import parse_run_config
from node.runtime import identity_peer_id
from node.dht import start_dht
from node.local_swarm import Swarm

pytestmark = pytest.mark.swarm
TINY = ["--d-model", "64", "--layers", "3", "--heads", "2", "--ratio", "16", "--seq-len", "32",
        "--batch-size", "4", "--microbatches", "2", "--stages", "3"]
RUN_ID = "life"
FIRST_TURN = ["joining", "loading", "serving"]
LEAVE = ["draining", "stopped"]


class RecordWatcher(threading.Thread):
    """Polls the stage records (serving or not) and keeps each peer's (stage, state) changes in order.

    Its DHT calls and the test's node spawns never overlap (`spawn` holds the same lock): once, while
    this thread's DHT was mid-call, a Popen's exec-status pipe ended up held open by the DHT process,
    and Popen waited for it forever (a CI rehearsal hung here for good)."""

    def __init__(self, peers, run):
        super().__init__(daemon=True)
        self.peers, self.run_config, self.seen, self.done = peers, run, {}, threading.Event()
        self.lock = threading.Lock()

    def spawn(self, swarm) -> None:
        """Make `swarm` start its nodes only while no DHT call of ours is in flight."""
        start = swarm.start

        def locked_start(*args, **kwargs):
            with self.lock:
                return start(*args, **kwargs)
        swarm.start = locked_start

    def run(self):
        with self.lock:
            dht = start_dht(RUN_ID, self.peers)
        try:
            while not self.done.is_set():
                with self.lock:
                    records = asyncio.run(read_stage_records(dht, self.run_config, include_idle=True))
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


def log_of(swarm, name) -> str:
    return (swarm.run_dir / f"{name}.log").read_text(errors="replace")


def states_of(swarm, *names) -> list[str]:
    return [m.group(1) for n in names for m in re.finditer(r"state \S+ -> (\w+)", log_of(swarm, n))]


def stop(swarm, name, timeout=60.0) -> None:
    """SIGTERM one node and expect a clean exit."""
    _, proc, _ = next(p for p in swarm.procs if p[0] == name)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=timeout) == 0, log_of(swarm, name)[-3000:]


def subsequence(short, long) -> bool:
    it = iter(long)
    return all(x in it for x in short)


def test_join_walks_every_lifecycle_transition(tmp_path):
    swarm = Swarm(tmp_path, 1, parse_run_config(TINY, run_id=RUN_ID))
    watcher = None
    peer = {n: identity_peer_id(str(tmp_path / f"{n}.id")) for n in ("a", "b", "c")}
    serving = "state loading -> serving"
    try:
        peers = swarm.start_bootstrap()
        watcher = RecordWatcher(peers, swarm.run)
        watcher.spawn(swarm)
        watcher.start()
        # fresh: nobody serves stage 1 and there is no checkpoint; then b takes a's live state
        for n in "ab":
            swarm.start_stage(n, 1, peers)
            swarm.wait_for_line(n, serving, 120)
            watcher.wait_seen(peer[n], (1, "serving"))
        stop(swarm, "b")
        stop(swarm, "a")
        # a again (same identity) resumes from its checkpoint, c takes a's live state; both are auto nodes
        # told to start on stage 1. Stage 2 has nobody, so one of them moves there, in the same process.
        auto = ["--auto-target", "1", "--rebalance-every", "2"]
        swarm.start_stage("a2", "auto", peers, extra=[*auto, "--identity", str(tmp_path / "a.id")])
        swarm.wait_for_line("a2", serving, 120)
        swarm.start_stage("c", "auto", peers, extra=auto)
        swarm.wait_for_line("c", serving, 120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("moving" in states_of(swarm, n) for n in ("a2", "c")):
            time.sleep(0.5)
        mover = next((n for n in ("a2", "c") if "moving" in states_of(swarm, n)), None)
        assert mover, log_of(swarm, "a2")[-3000:]
        stayer = "c" if mover == "a2" else "a2"
        swarm.wait_for_line(mover, "stage 2 serving:", 120)
        watcher.wait_seen(peer[mover[0]], (2, "serving"))
        watcher.wait_seen(peer[stayer[0]], (1, "serving"))
        stop(swarm, stayer)
        stop(swarm, mover)
        time.sleep(1)
    finally:
        swarm.stop()
        if watcher is not None:
            watcher.done.set()
            watcher.join(timeout=30)

    assert "starting from initialisation" in log_of(swarm, "a") and "resumed from checkpoint" in log_of(swarm, "a2")
    assert "from live replica" in log_of(swarm, "b") and "from live replica" in log_of(swarm, "c")
    assert (log_of(swarm, "a2") + log_of(swarm, "c")).count("moving from stage 1 to stage 2") == 1  # one is enough
    assert "DHT refused" not in log_of(swarm, "a2")  # a restart's records replace the previous run's at once
    once = FIRST_TURN + LEAVE
    moved = FIRST_TURN + ["draining", "moving", "loading", "serving"] + LEAVE
    assert states_of(swarm, "a") == states_of(swarm, "b") == states_of(swarm, stayer) == once
    assert states_of(swarm, mover) == moved

    # The records tell the same story, as far as polling catches it (loading may be too quick to see).
    for n, runs in (("a", ("a", "a2")), ("b", ("b",)), ("c", ("c",))):
        seen = watcher.states(peer[n])
        assert subsequence(seen, states_of(swarm, *runs)), (n, watcher.seen.get(peer[n]))
        assert "serving" in seen and seen[-1] == "stopped", (n, watcher.seen.get(peer[n]))
    seen = watcher.seen[peer[mover[0]]]
    assert seen.index((1, "serving")) < seen.index((2, "serving")) and seen[-1] == (2, "stopped"), seen


def test_only_the_lifecycle_transitions_are_allowed():
    from node.lifecycle import Node, NodeState as S
    node = Node(settings=None)
    for state in (S.JOINING, S.LOADING, S.SERVING, S.DRAINING, S.MOVING, S.LOADING, S.SERVING, S.DRAINING):
        node.enter(state)
    with pytest.raises(RuntimeError, match="no transition from draining to serving"):
        node.enter(S.SERVING)
    node.enter(S.STOPPED)
    with pytest.raises(RuntimeError):
        node.enter(S.LOADING)
    skipping = Node(settings=None)
    skipping.enter(S.JOINING)
    with pytest.raises(RuntimeError, match="joining to serving"):
        skipping.enter(S.SERVING)  # never serve a stage that was not loaded
    skipping.enter(S.STOPPED)  # a signal or an error stops a node in any state
    assert node.history[-1] == "stopped" and skipping.history == ["joining", "stopped"]
