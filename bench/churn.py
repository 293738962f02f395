"""Training through churn: nodes crash (kill -9 of their main process) and come back.

    python -m bench.churn [--quick | --scale] [--duration S] [--kill-every S] [--restart-after S]
                          [--scenario random,last-replica,last-trainer,bootstrap]

A local swarm (bootstrap, 2 trainers, 2 replicas of every later stage, each node its own process)
trains twice: once undisturbed for `duration` seconds, once under churn. The churn run is a sequence
of phases in one swarm:
  random        for `duration` seconds, every `kill-every` s a random node (a trainer among them at
                least once) is killed and restarted with the same command `restart-after` s later;
                its step rate is compared with the undisturbed run's;
  last-replica  both replicas of the last stage die: training pauses (the trainers say "paused (..):
                ... replica of stage ...") until one comes back;
  last-trainer  both trainers die: the stages idle until a trainer rejoins and trains on;
  bootstrap     the bootstrap dies for good: the swarm keeps training, and a replica killed after it
                rejoins through other peers.
Only the main pid is killed: its hivemind helpers and p2pd must die by themselves (node/lifeline.py);
every kill checks that none is left. For each kill: role, time, and the pause (seconds until the
trainers finish a microbatch started after the kill: more than their surviving lanes had in flight.
Not the swarm's highest resbm_optimizer_step: replicas step on their own, the victim may have held
the highest, and the stages still step on the walks in flight at the kill).

What each kill did to the microbatches in flight comes from every node's /metrics, scraped every
tick and once just before each kill (counters of a killed life are kept at their last scrape):
  in flight   the trainers' window lanes at the kill (each lane always holds one microbatch:
              node/trainer.py), and of them the walks past stage 0 (resbm_queue_depth of stage 1);
  at victim   the walks inside the killed node (its resbm_queue_depth; a trainer: its window,
              lost with it: never added on its stage 0, added downstream as far as they got);
  rerouted    calls moved to another replica (resbm_retries_total, every caller);
  skipped     resbm_skipped_microbatches_total of the surviving trainers: walks no route finished;
  completed   in flight - lost - skipped (every lane's microbatch ends completed or skipped);
  duplicates  resbm_duplicate_microbatches_total: a rerouted walk's second visit, answered, not added;
counted from the kill until the surviving trainers together have finished or skipped as many
microbatches as they had in flight (FATE_S at most, never past the next kill); and `recovered s`: seconds from the kill
until the trainers' completed microbatches per second (resbm_samples_total / microbatch size,
summed over trainers) over the next RECOVER_WINDOW_S are back to RECOVERED of the rate in the
RATE_BEFORE_S before it (a kill soon after another one keeps that one's rate); "-": not before the
next kill. (A restarted trainer redraws its stream from its first microbatch under the same keys,
which the stages remember: a replica that added a key refuses it as a duplicate until it passes its
last life.)
Reports the loss (sampled from the trainers' resbm_train_loss) and the replicas' averaging rounds by
kind (resbm_averaging_rounds_total{kind}: a restarted replica's first round is full, 8-bit parameters,
as its anchor is not its partner's; partial rounds apart). Prints tables, writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from bench.plotting import line_plot, machine_info, markdown_table, smooth, write_json
from node.args import parse_run_config
from node.runtime import identity_peer_id
from node.lifeline import descendants
from node.local_swarm import Swarm, tail, terminate

SIZES = {
    "quick": dict(argv=["--d-model", "64", "--layers", "3", "--heads", "2", "--ratio", "16", "--seq-len", "32",
                        "--batch-size", "8", "--microbatches", "4", "--stages", "3"],
                  duration=40, kill_every=10, restart_after=4),
    "default": dict(argv=["--d-model", "128", "--layers", "3", "--heads", "4", "--ratio", "32", "--seq-len", "64",
                          "--batch-size", "16", "--microbatches", "4", "--stages", "3"],
                    duration=150, kill_every=20, restart_after=8),
    "scale": dict(argv=["--d-model", "1024", "--layers", "8", "--heads", "16", "--ratio", "128", "--seq-len", "256",
                        "--batch-size", "32", "--microbatches", "8", "--stages", "5"],
                  duration=900, kill_every=20, restart_after=10),
}
SCENARIOS = ("random", "last-replica", "last-trainer", "bootstrap")
REPLICAS, TRAINERS = 2, 2
_STEP = re.compile(r"^resbm_optimizer_step (\S+)$", re.M)
_LOSS = re.compile(r"^resbm_train_loss (\S+)$", re.M)
_WINDOW = re.compile(r"training \d+ steps from step -?\d+, (\d+) microbatches in flight")
# per-life counters summed over the swarm (a label's lines summed): see the docstring
COUNTERS = {"completed": "resbm_samples_total", "skipped": "resbm_skipped_microbatches_total",
            "rerouted": "resbm_retries_total", "duplicates": "resbm_duplicate_microbatches_total",
            # averaging rounds as each replica counts them (a round of 2: 2): a restarted replica's
            # anchor differs from its partner's, so its next round is full
            "anchored_rounds": 'resbm_averaging_rounds_total{kind="anchored"}',
            "full_rounds": 'resbm_averaging_rounds_total{kind="full"}',
            "partial_rounds": "resbm_averaging_partial_rounds_total"}
FATE_S, RATE_BEFORE_S, RECOVER_WINDOW_S, RECOVERED = 10.0, 10.0, 5.0, 0.8


def metric(text: str, selector: str) -> float:
    """Sum of a metric's samples in a Prometheus text page (0 when absent), over its labels or, for
    `name{label="value"}`, over the samples with that label."""
    name, _, label = selector.partition("{")
    return sum(float(v) for labels, v in re.findall(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M)
               if not label or label.rstrip("}") in labels.split(","))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChurnSwarm:
    """A Swarm whose nodes can be crashed and restarted with their own command (same identity, ports
    and initial peers), each life logging to its own file (name.log, name.2.log, ...)."""

    def __init__(self, size: dict, workdir: Path, run_id: str):
        run = parse_run_config([*size["argv"], "--average-every", "5"], run_id=run_id)
        workdir.mkdir(parents=True)
        ids = tuple(identity_peer_id(str(workdir / f"trainer{i}.id")) for i in range(TRAINERS))
        self.run = replace(run, train=replace(run.train, trainers=ids))
        self.swarm = Swarm(workdir, threads=1, run=self.run)
        self.dir, self.stages = workdir, self.run.model.n_stages
        self.nodes: dict[str, dict] = {}          # name -> stage, argv, peer_id, metrics port, lives, proc
        self.counts: dict[str, dict] = {}         # "name.life" -> its COUNTERS at its last scrape
        self.queues: dict[str, float] = {}        # live node -> resbm_queue_depth at the last scrape

    def start_all(self) -> None:
        self.peers = self.swarm.start_bootstrap()
        for stage in range(1, self.stages):
            for r in range(REPLICAS):
                self.add(f"stage{stage}-{r}", stage)
        for name in list(self.nodes):
            self.swarm.wait_for_line(name, "serving", 180)
        for i in range(TRAINERS):
            self.add(f"trainer{i}", 0, ["--steps", str(10 ** 9), "--eval-every", "0",
                                        "--json-out", str(self.dir / f"trainer{i}.json")])
        for i in range(TRAINERS):
            self.swarm.wait_for_line(f"trainer{i}", "serving", 180)

    def add(self, name: str, stage: int, extra=()) -> None:
        port, metrics = free_port(), free_port()
        pid = identity_peer_id(str(self.dir / f"{name}.id"))
        self.nodes[name] = dict(stage=stage, peer_id=pid, metrics=metrics, lives=0, proc=None, peers=self.peers,
                                extra=["--port", str(port), "--metrics-port", str(metrics), *extra],
                                maddr=f"/ip4/127.0.0.1/tcp/{port}/p2p/{pid}")
        self.restart(name)

    def restart(self, name: str, peers: list[str] | None = None) -> None:
        """The node's own command again; `peers`: other initial peers (the bootstrap is gone)."""
        node = self.nodes[name]
        node["peers"] = peers or node["peers"]
        node["lives"] += 1
        label = name if node["lives"] == 1 else f"{name}.{node['lives']}"
        node["log"] = self.dir / f"{label}.log"
        node["proc"] = self.swarm.start(label, self.swarm.join_argv(name, node["stage"], node["peers"],
                                                                    extra=node["extra"]))

    def logs(self, name: str) -> str:
        """Every life's log of a node."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob(f"{name}*.log")))

    def alive(self, name: str) -> bool:
        proc = self.nodes[name]["proc"]
        return proc is not None and proc.poll() is None

    def role(self, name: str) -> str:
        stage = self.nodes[name]["stage"]
        if stage == 0:
            return "trainer"
        return "tail" if stage == self.stages - 1 else "middle"

    def crash(self, name: str) -> dict:
        """kill -9 of the node's main pid only; then its helpers (DHT process, p2pd) must exit by themselves."""
        proc = self.swarm.procs[0][1] if name == "bootstrap" else self.nodes[name]["proc"]
        helpers = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"helpers": len(helpers), **wait_gone(helpers)}

    def step(self) -> tuple[int, list[float]]:
        """The swarm's step counter (highest applied step of the live nodes) and the trainers' last losses;
        every live node's counters and queue depth are kept (self.counts, self.queues)."""
        steps, losses, self.queues = [], [], {}
        for name, node in self.nodes.items():
            if not self.alive(name):
                continue
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{node['metrics']}/metrics", timeout=2).read().decode()
            except OSError:
                continue
            steps += [float(v) for v in _STEP.findall(text)]
            losses += [v for v in map(float, _LOSS.findall(text)) if v > 0]  # 0: no step yet; nan: none finished
            counts = {k: metric(text, m) for k, m in COUNTERS.items()}
            # a trainer's samples are its finished microbatches (counted after their backward); a stage's: not ours
            counts["completed"] = counts["completed"] / self.run.train.microbatch_size if node["stage"] == 0 else 0.0
            self.counts[f"{name}.{node['lives']}"] = counts
            self.queues[name] = metric(text, "resbm_queue_depth")
        return int(max(steps, default=-1)), losses

    def totals(self) -> dict:
        """COUNTERS summed over every life of every node (a dead life: its last scrape)."""
        return {k: sum(c[k] for c in self.counts.values()) for k in COUNTERS}

    def window(self, name: str) -> int:
        """Microbatches a trainer keeps in flight (its log says so once it trains); 0 before it trains."""
        if self.nodes[name]["stage"] != 0 or not self.alive(name):
            return 0
        found = _WINDOW.search(self.nodes[name]["log"].read_text(errors="replace"))
        return int(found.group(1)) if found else 0

    def stop_trainers(self, timeout: float = 90) -> None:
        """SIGTERM the live trainers: each finishes its step and writes its summary. (Not SIGINT: a node
        started from a background job inherits SIGINT ignored.)"""
        # one that does not stop within `timeout` is ended by the swarm's stop
        terminate([n["proc"] for k, n in self.nodes.items() if n["stage"] == 0 and self.alive(k)], timeout)


def clock() -> str:
    """Local wall-clock time, as the nodes' log lines stamp it (to read a kill's logs)."""
    return time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"


def wait_gone(pids: list[int], timeout: float = 20.0) -> dict:
    """Seconds until every pid is gone; the leftovers (e.g. an orphan p2pd) are named and then killed."""
    t0 = time.monotonic()
    left = pids
    while time.monotonic() - t0 < timeout:
        left = [p for p in pids if _running(p)]
        if not left:
            return {"helpers_gone_s": round(time.monotonic() - t0, 2), "orphans": []}
        time.sleep(0.1)
    orphans = [_cmdline(p) for p in left]
    for p in left:  # ours: started by this benchmark
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"helpers_gone_s": None, "orphans": orphans}


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")[:120]
    except OSError:
        return str(pid)


class Timeline:
    """Samples the swarm's step counter and loss; crashes nodes on schedule and restarts them when due."""

    def __init__(self, cs: ChurnSwarm):
        self.cs, self.t0 = cs, time.monotonic()
        self.samples: list[tuple[float, int, float | None]] = []   # (t, step, mean trainer loss)
        self.flow: list[tuple[float, dict]] = []                    # (t, ChurnSwarm.totals()) per tick
        self.kills: list[dict] = []
        self.due: list[tuple[float, str, list | None]] = []         # (t, node, new initial peers)
        self.down: set[str] = set()                                 # killed and not restarted yet
        self.exits: list[dict] = []                                 # nodes that died without a kill

    def now(self) -> float:
        return time.monotonic() - self.t0

    def tick(self) -> int:
        step, losses = self.cs.step()
        self.samples.append((round(self.now(), 2), step, sum(losses) / len(losses) if losses else None))
        self.flow.append((self.samples[-1][0], self.cs.totals()))
        for due in [d for d in self.due if d[0] <= self.now()]:
            self.due.remove(due)
            self.restart(due[1], due[2])
        self.restart_exited()
        return step

    def restart_exited(self) -> None:
        """A node that exited without being killed is a failure to report; it is restarted like a crashed one."""
        for name, node in self.cs.nodes.items():
            if name not in self.down and not self.cs.alive(name):
                self.exits.append({"t": round(self.now(), 2), "node": name, "code": node["proc"].returncode,
                                   "log": str(node["log"]), "tail": tail(node["log"], 30)})
                print(f"  t={self.now():.0f}s {name} exited by itself (code {node['proc'].returncode})", file=sys.stderr)
                self.restart(name)

    def sleep(self, seconds: float) -> None:
        end = self.now() + seconds
        while self.now() < end:
            self.tick()
            time.sleep(0.4)

    def step_now(self) -> int:
        return max([s for _, s, _ in self.samples[-3:]] + [self.tick()])

    def kill(self, name: str, phase: str, restart_after: float | None = None, peers=None) -> dict:
        step = self.step_now()   # (a fresh scrape: the counters and queues just before the kill)
        cs = self.cs
        windows = {n: cs.window(n) for n in cs.nodes if cs.nodes[n]["stage"] == 0}
        kill = {"phase": phase, "node": name, "role": cs.role(name) if name != "bootstrap" else "bootstrap",
                "t": round(self.now(), 2), "clock": clock(), "step": step, "flow_at": len(self.flow) - 1,
                "in_flight": sum(windows.values()),
                "beyond_stage0": int(sum(q for n, q in cs.queues.items() if cs.nodes[n]["stage"] == 1)),
                "at_victim": windows[name] if name in windows else int(cs.queues.get(name, 0)),
                "lost": windows.get(name, 0),
                "trainers_training": sorted(n for n, w in windows.items() if w and n != name)}
        kill.update(self.cs.crash(name))
        self.kills.append(kill)
        self.down.add(name)
        if restart_after is not None:
            self.due.append((self.now() + restart_after, name, peers))
        print(f"  t={kill['t']:.0f}s kill -9 {name} ({kill['role']}) at step {step}", file=sys.stderr)
        return kill

    def restart(self, name: str, peers=None) -> None:
        self.cs.restart(name, peers)
        self.down.discard(name)
        for k in reversed(self.kills):
            if k["node"] == name and "restarted_t" not in k:
                k["restarted_t"], k["restarted_clock"] = round(self.now(), 2), clock()
                break

    def wait_moves(self, beyond: int, timeout: float) -> bool:
        end = self.now() + timeout
        while self.now() < end:
            if self.tick() > beyond:
                return True
            time.sleep(0.4)
        return False

    def wait_trained(self, beyond: float, timeout: float) -> bool:
        """Until the trainers have finished more than `beyond` microbatches in all (the step counter
        alone can move while no trainer is up: the stages still finish the dead trainers' walks)."""
        end = self.now() + timeout
        while self.now() < end:
            self.tick()
            if self.flow[-1][1]["completed"] > beyond:
                return True
            time.sleep(0.4)
        return False

    def fates(self) -> None:
        """Per kill, what became of the microbatches in flight, and when the trainers' rate recovered."""
        flow, kills = self.flow, self.kills
        base = None
        for i, k in enumerate(kills):
            at = k["flow_at"]
            t0, c0 = flow[at]
            nxt = kills[i + 1]["t"] if i + 1 < len(kills) else float("inf")
            before = [(t, c) for t, c in flow if t0 - RATE_BEFORE_S <= t <= t0]
            if base is None or (i and kills[i - 1]["t"] < t0 - RATE_BEFORE_S):
                base = _rate(before) if len(before) > 1 and before[-1][0] - before[0][0] >= RATE_BEFORE_S / 2 \
                    else base
            end = at
            need = k["in_flight"] - k["lost"]          # resolutions the surviving lanes owe
            for j in range(at + 1, len(flow)):
                t, c = flow[j]
                if t > min(t0 + FATE_S, nxt):
                    break
                end = j
                if c["completed"] + c["skipped"] - c0["completed"] - c0["skipped"] >= need:
                    break
            c1 = flow[end][1]
            delta = {key: int(round(c1[key] - c0[key])) for key in ("skipped", "rerouted", "duplicates")}
            k.update(delta, fate_s=round(flow[end][0] - t0, 2),
                     completed=need - delta["skipped"] if need >= delta["skipped"] else None,
                     base_rate=round(base, 2) if base else None,
                     recovered_s=_recovered([f for f in flow[at:] if f[0] <= nxt], base * RECOVERED if base else None))

    def rate(self, start: float, end: float) -> float:
        """Steps per second between two times of this timeline."""
        inside = [(t, s) for t, s, _ in self.samples if start <= t <= end]
        return (inside[-1][1] - inside[0][1]) / max(1e-9, inside[-1][0] - inside[0][0]) if len(inside) > 1 else 0.0

    def pauses(self) -> None:
        """Seconds from each kill until the trainers finished a microbatch started after it: more than
        the surviving lanes had in flight at the kill."""
        for k in self.kills:
            done0, owed = self.flow[k["flow_at"]][1]["completed"], k["in_flight"] - k["lost"]
            moved = next((t for t, c in self.flow if t > k["t"] and c["completed"] - done0 > owed), None)
            k["pause_s"] = round(moved - k["t"], 2) if moved is not None else None
            if moved is not None and k.get("restarted_t", moved) < moved:  # the pause lasted until it was back
                k["after_restart_s"] = round(moved - k["restarted_t"], 2)


def _rate(flow) -> float:
    """The trainers' finished microbatches per second over a stretch of the flow."""
    (ta, a), (tb, b) = flow[0], flow[-1]
    return (b["completed"] - a["completed"]) / max(1e-9, tb - ta)


def _recovered(flow, target: float | None) -> float | None:
    """Seconds from the first entry (the kill) to the start of the first RECOVER_WINDOW_S whose rate is
    at least `target`; None when it never was before the flow ends (the next kill), or no rate before
    the kill to compare with."""
    if not target:
        return None
    for i, (t, _) in enumerate(flow):
        j = next((j for j in range(i + 1, len(flow)) if flow[j][0] >= t + RECOVER_WINDOW_S), None)
        if j is None:
            return None
        if _rate([flow[i], flow[j]]) >= target:
            return round(t - flow[0][0], 2)
    return None


def up(cs: ChurnSwarm, name: str) -> bool:
    return cs.alive(name) and "serving" in cs.nodes[name]["log"].read_text(errors="replace")


def pick_victim(cs: ChurnSwarm, rng: random.Random, wanted: list[str]) -> str | None:
    """A node whose stage keeps another replica up; the roles in `wanted` come first."""
    safe = [n for n in cs.nodes if up(cs, n) and any(up(cs, m) for m in cs.nodes
                                                       if m != n and cs.nodes[m]["stage"] == cs.nodes[n]["stage"])]
    for role in wanted:
        match = [n for n in safe if cs.role(n) == role]
        if match:
            wanted.remove(role)
            return match[0]
    return rng.choice(safe) if safe else None


def random_phase(tl: Timeline, duration: float, kill_every: float, restart_after: float, rng) -> tuple[float, float]:
    start, wanted = tl.now(), ["trainer"]
    while tl.now() - start < duration:
        tl.sleep(min(kill_every, duration - (tl.now() - start)))
        if tl.now() - start < duration - restart_after:
            victim = pick_victim(tl.cs, rng, wanted)
            if victim:
                tl.kill(victim, "random", restart_after)
    return start, tl.now()


def settle(tl: Timeline, timeout: float = 240) -> None:
    """Until every restart is done and every node serves again: each scenario starts from a whole swarm."""
    end = tl.now() + timeout
    while tl.now() < end and (tl.due or not all(up(tl.cs, n) for n in tl.cs.nodes)):
        tl.sleep(1)


def last_of_group(tl: Timeline, phase: str, names: list[str], hold: float, settle_s: float) -> None:
    """Kill every node of one group (the last one last), keep them down `hold` s, restart all."""
    settle(tl)
    for name in names:
        tl.kill(name, phase)
        tl.sleep(2)
    tl.sleep(hold)
    for name in reversed(names):
        tl.restart(name)
    # trained again: a step's worth of microbatches finished since the restarts (the walks in flight at the
    # kills were resolved during the hold)
    tl.wait_trained(tl.flow[-1][1]["completed"] + tl.cs.run.train.microbatches, 240)
    tl.sleep(settle_s)


def bootstrap_phase(tl: Timeline, kill_every: float, restart_after: float) -> None:
    """The bootstrap dies for good; later a replica dies and rejoins through the live peers."""
    cs = tl.cs
    settle(tl)
    tl.kill("bootstrap", "bootstrap")
    tl.sleep(kill_every)
    name = "stage1-0"
    peers = [n["maddr"] for k, n in cs.nodes.items() if k != name and cs.alive(k)]
    tl.kill(name, "bootstrap", restart_after, peers)
    tl.sleep(restart_after + 1)
    deadline = tl.now() + 180
    while tl.now() < deadline and not up(cs, name):
        tl.sleep(1)
    tl.sleep(kill_every)


def evidence(cs: ChurnSwarm) -> dict:
    """What the nodes' own logs say about the pauses and resumptions."""
    last = cs.stages - 1
    trainer_logs = "".join(cs.logs(f"trainer{i}") for i in range(TRAINERS))
    resumed = re.findall(r"training \d+ steps from step (\d+)", trainer_logs)
    # the trainers pause once the dead replicas' DHT records expire; before that their routes fail there
    return {"paused_for_last_stage": len(re.findall(rf"paused \(\d+s\): waiting for a replica of stage\(s\) {last}\b",
                                                    trainer_logs)),
            "no_replica_of_last_stage": trainer_logs.count(f"no usable replica of stage {last}"),
            "trainers_resumed_from_steps": [int(s) for s in resumed],
            "rejoined_without_bootstrap": "serving" in cs.nodes["stage1-0"]["log"].read_text(errors="replace")}


def one_run(size: dict, workdir: Path, duration: float, churn: bool, kill_every: float, restart_after: float,
            scenarios: list[str], seed: int) -> dict:
    cs = ChurnSwarm(size, workdir / ("churn" if churn else "steady"), "churn" if churn else "steady")
    try:
        cs.start_all()
        tl = Timeline(cs)
        tl.wait_moves(0, 240)                      # the first step closed: timing starts here
        window, phases = (tl.now(), tl.now() + duration), {}
        if not churn or "random" not in scenarios:
            tl.sleep(duration)
        else:
            window = random_phase(tl, duration, kill_every, restart_after, random.Random(seed))
        phases["random" if churn else "steady"] = window
        if churn and "last-replica" in scenarios:
            last = cs.stages - 1
            phases["last-replica"] = run_phase(tl, lambda: last_of_group(
                tl, "last-replica", [f"stage{last}-{r}" for r in range(REPLICAS)], 2 * restart_after, kill_every))
        if churn and "last-trainer" in scenarios:
            order = [f"trainer{i}" for i in range(TRAINERS)]
            phases["last-trainer"] = run_phase(tl, lambda: last_of_group(tl, "last-trainer", order, 2 * restart_after,
                                                                         kill_every))
        if churn and "bootstrap" in scenarios:
            phases["bootstrap"] = run_phase(tl, lambda: bootstrap_phase(tl, kill_every, restart_after))
        cs.stop_trainers()
        tl.pauses()
        tl.fates()
        counted = cs.totals()
        out = {"phases": phases, "samples": tl.samples, "kills": tl.kills, "exits": tl.exits, "rate": tl.rate(*window),
               "trainer_rate": _rate([f for f in tl.flow if window[0] <= f[0] <= window[1]] or [(0, counted)] * 2),
               "flow": [(t, round(c["completed"], 1)) for t, c in tl.flow],
               "counted": {k: int(round(v)) for k, v in counted.items()},
               "evidence": evidence(cs) if churn else {}}
    finally:
        cs.swarm.stop()
    return {**out, **totals(cs)}


def run_phase(tl: Timeline, body) -> tuple[float, float]:
    start = tl.now()
    body()
    return start, tl.now()


def totals(cs: ChurnSwarm) -> dict:
    """Sums over the trainers' summaries (their last lives: a killed life writes none)."""
    found = [json.loads(p.read_text()) for p in sorted(cs.dir.glob("trainer*.json"))]
    return {"summaries": found, "skipped_last_lives": sum(s["skipped_microbatches"] for s in found),
            "recomputed": sum(s["recomputed_microbatches"] for s in found)}


def loss_by_step(samples) -> list[tuple[int, float]]:
    seen: dict[int, float] = {}
    for _, step, loss in samples:
        if loss is not None and step >= 0:
            seen[step] = loss
    return sorted(seen.items())


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def report(runs: dict, steady_rate: float) -> tuple[str, str, list[str]]:
    churned = runs["churn"]
    kill_rows = [[i + 1, k["phase"], k["node"], k["role"], f"{k['t']:.0f}", k["step"],
                  "-" if k.get("pause_s") is None else f"{k['pause_s']:.1f}",
                  "-" if k.get("after_restart_s") is None else f"{k['after_restart_s']:.1f}",
                  "-" if k["helpers_gone_s"] is None else f"{k['helpers_gone_s']:.1f}", len(k["orphans"])]
                 for i, k in enumerate(churned["kills"])]
    kills = markdown_table(["#", "phase", "node", "role", "t s", "step", "pause s", "after restart s",
                            "helpers gone s", "orphans"], kill_rows)
    fate_rows = [[i + 1, k["node"], k["role"], k["in_flight"], k["beyond_stage0"], k["at_victim"], k["lost"],
                  k["rerouted"], k["skipped"], dash(k["completed"]), k["duplicates"], f"{k['fate_s']:.1f}",
                  dash(k["base_rate"], "{:.1f}"), dash(k["recovered_s"], "{:.1f}")]
                 for i, k in enumerate(churned["kills"])]
    kills += "\n\n" + markdown_table(["#", "node", "role", "in flight", "past stage 0", "at victim", "lost with it",
                                       "rerouted", "skipped", "completed", "duplicates refused", "counted over s",
                                       "mb/s before", "recovered s"], fate_rows)
    run_rows = []
    for label, r in runs.items():
        curve = [loss for _, loss in loss_by_step(r["samples"])]
        run_rows.append([label, f"{r['rate']:.3f}", f"{r['rate'] / steady_rate:.2f}" if steady_rate else "-",
                         r["counted"]["skipped"], r["recomputed"],
                         f"{r['counted']['anchored_rounds']} / {r['counted']['full_rounds']} / "
                         f"{r['counted']['partial_rounds']}",
                         len(r["exits"]),
                         f"{mean(curve[:5]):.3f}", f"{mean(curve[-5:]):.3f}"])
    runs_md = markdown_table(["run", "steps/s", "vs no churn", "lost in flight (skipped)", "recomputed (stale)",
                              "averaging anchored / full / partial (per replica)",
                              "exited unkilled", "first-5 loss", "last-5 loss"], run_rows)
    return runs_md, kills, verdict(churned, steady_rate, runs["no churn"]["trainer_rate"])


def dash(v, fmt="{}") -> str:
    return "-" if v is None else fmt.format(v)


def verdict(churned: dict, steady_rate: float, steady_trainer_rate: float = 0.0) -> list[str]:
    ratio = churned["rate"] / steady_rate if steady_rate else 0.0
    trained = churned["trainer_rate"] / steady_trainer_rate if steady_trainer_rate else 0.0
    curve = [loss for _, loss in loss_by_step(churned["samples"])]
    roles = {k["role"] for k in churned["kills"]}
    orphans = sum(len(k["orphans"]) for k in churned["kills"])
    ev = churned["evidence"]
    return [f"- step rate under random churn vs none: {ratio:.0%} (goal >= 80%): {'met' if ratio >= 0.8 else 'MISSED'}",
            f"- the trainers' finished microbatches per second under random churn vs none: {trained:.0%} "
            f"({churned['trainer_rate']:.2f} vs {steady_trainer_rate:.2f}; the step counter is the highest replica's)",
            f"- microbatches in flight lost to the kills (skipped by their trainers; each counted on the stages "
            f"it had crossed): {churned['counted']['skipped']} (every life's resbm_skipped_microbatches_total), "
            f"plus {sum(k['lost'] for k in churned['kills'])} with the killed trainers; "
            f"{churned['counted']['rerouted']} calls rerouted, {churned['counted']['duplicates']} duplicates refused",
            f"- trainers' rate back to {RECOVERED:.0%} of the rate before the kill within "
            f"{RECOVER_WINDOW_S:.0f} s windows: after "
            + ", ".join(dash(k['recovered_s'], '{:.0f}') for k in churned['kills']) + " s (per kill)",
            f"- loss falls under churn: {'yes' if mean(curve[-5:]) < mean(curve[:5]) else 'NO'} "
            f"({mean(curve[:5]):.3f} -> {mean(curve[-5:]):.3f})",
            f"- kills: {len(churned['kills'])}, roles {sorted(roles)}; a trainer killed: "
            f"{'yes' if 'trainer' in roles else 'NO'}; orphaned helpers: {orphans}; "
            f"nodes that exited by themselves: {len(churned['exits'])}",
            f"- logs: {ev.get('paused_for_last_stage', 0)} 'waiting for a replica' and "
            f"{ev.get('no_replica_of_last_stage', 0)} 'no usable replica' lines for the last stage; "
            f"trainers (re)started at steps {ev.get('trainers_resumed_from_steps')}; "
            f"rejoined without the bootstrap: "
            f"{ev.get('rejoined_without_bootstrap')}"]


def plot(path: str, runs: dict, title: str) -> None:
    panels = [{"title": "training loss (5-sample mean)", "xlabel": "optimizer step", "ylabel": "loss",
               "series": [{"label": label, "x": [s for s, _ in loss_by_step(r["samples"])],
                           "y": smooth([v for _, v in loss_by_step(r["samples"])], 5)} for label, r in runs.items()]},
              {"title": "swarm step counter (x: kills)", "xlabel": "seconds", "ylabel": "step",
               "series": [{"label": label, "x": [t for t, _, _ in r["samples"]], "y": [s for _, s, _ in r["samples"]]}
                          for label, r in runs.items()]
               + [{"label": "kill", "x": [k["t"] for k in runs["churn"]["kills"]],
                   "y": [k["step"] for k in runs["churn"]["kills"]],
                   "style": {"marker": "x", "linestyle": "none", "color": "red"}}]},
              {"title": f"trainers' finished microbatches/s ({RECOVER_WINDOW_S:.0f} s windows; x: kills)",
               "xlabel": "seconds", "ylabel": "microbatches/s",
               "series": [{"label": label, **flow_rate(r["flow"])} for label, r in runs.items()]
               + [{"label": "kill", "x": [k["t"] for k in runs["churn"]["kills"]], "y": [0] * len(runs["churn"]["kills"]),
                   "style": {"marker": "x", "linestyle": "none", "color": "red"}}]}]
    line_plot(path, panels, title=title)


def flow_rate(flow) -> dict:
    """The trainers' finished microbatches per second over the RECOVER_WINDOW_S after each sample."""
    xs, ys = [], []
    for i, (t, c) in enumerate(flow):
        j = next((j for j in range(i + 1, len(flow)) if flow[j][0] >= t + RECOVER_WINDOW_S), None)
        if j is None:
            break
        xs.append(t)
        ys.append((flow[j][1] - c) / (flow[j][0] - t))
    return {"x": xs, "y": ys}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny and short (CI)")
    g.add_argument("--scale", action="store_true", help="GPU-sized model, 15 minutes of random churn")
    p.add_argument("--duration", type=float, default=None, help="seconds of the steady run and of random churn")
    p.add_argument("--kill-every", type=float, default=None)
    p.add_argument("--restart-after", type=float, default=None)
    p.add_argument("--scenario", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep the runs' logs in this folder")
    p.add_argument("--json-out", default="bench/results/churn.json")
    p.add_argument("--png-out", default="bench/results/churn.png")
    args = p.parse_args(argv)
    scenarios = [s for s in args.scenario.split(",") if s]
    if set(scenarios) - set(SCENARIOS):
        p.error(f"unknown scenario(s) {sorted(set(scenarios) - set(SCENARIOS))}")
    name = "quick" if args.quick else "scale" if args.scale else "default"
    size = SIZES[name]
    duration = args.duration or size["duration"]
    kill_every = args.kill_every or size["kill_every"]
    restart_after = args.restart_after or size["restart_after"]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        for churn in (False, True):
            label = "churn" if churn else "no churn"
            print(f"[{label}] {duration:.0f}s" + (f", scenarios {scenarios}" if churn else ""), file=sys.stderr)
            runs[label] = one_run(size, work, duration, churn, kill_every, restart_after, scenarios, args.seed)
    steady_rate = runs["no churn"]["rate"]
    runs_md, kills_md, lines = report(runs, steady_rate)
    print(f"\n{TRAINERS} trainers, {REPLICAS} replicas of every later stage, {name} size, random churn "
          f"{duration:.0f}s (kill every {kill_every:.0f}s, restart after {restart_after:.0f}s)\n")
    print(runs_md + "\n\n" + kills_md + "\n\n" + "\n".join(lines))
    write_json(args.json_out, {"size": name, "duration_s": duration, "kill_every_s": kill_every,
                               "restart_after_s": restart_after, "scenarios": scenarios, "machine": machine_info(),
                               "runs": runs, "kills": runs["churn"]["kills"],
                               "rate_ratio": runs["churn"]["rate"] / steady_rate if steady_rate else 0.0,
                               "tables": {"runs": runs_md, "kills": kills_md}, "verdict": lines,
                               "command": " ".join(["python -m bench.churn", *(argv or sys.argv[1:])])})
    plot(args.png_out, runs, f"churn: {TRAINERS} trainers, {REPLICAS} replicas/stage; kill -9 every "
                             f"{kill_every:.0f}s, restart after {restart_after:.0f}s; then {', '.join(scenarios[1:])}")
    print(f"\nwrote {args.json_out} and {args.png_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
