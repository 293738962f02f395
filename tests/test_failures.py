"""Ordinary failures on real processes (issue 10, trainers of issue 15): kill -9 of a node's MAIN pid
(never its group, as the OOM killer does), of a stage's only replica, of one of two trainers and of
the last trainer; a dead bootstrap, a port already taken, configs that can never train, and exports of
stages at different steps."""
import ast
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from node.lifeline import descendants
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.export import MixedSteps, check_one_step, common_step
from swarm.stage_worker import StageWorker
from swarm_helpers import Nodes, wait_until

pytestmark = pytest.mark.swarm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "64", "--layers", "3", "--heads", "2", "--ratio", "16", "--seq-len", "32",
        "--batch-size", "4", "--microbatches", "2"]
STEP_LINE = re.compile(r"\] (\d+)/\d+ loss")
SAVED = re.compile(r"checkpoint written: (\S+) \(step [1-9]\d*\)")  # of a step trained, not the initial -1
FROM_STEP = re.compile(r"training \d+ steps from step (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def nodes(tmp_path):
    n = Nodes(tmp_path)
    yield n
    orphans = n.orphans()  # before stop_all, which would SIGKILL them by group
    n.stop_all()
    assert orphans == [], f"helpers of nodes killed -9 outlived them: {orphans}"


def bootstrap(nodes: Nodes, *extra: str) -> list[str]:
    nodes.start("bootstrap", "bootstrap", *TINY, "--run-id", "fail", "--addr-file", str(nodes.dir / "boot.addr"),
                *extra)
    nodes.wait_for("bootstrap", "is up", 60)
    return (nodes.dir / "boot.addr").read_text().split()


def join_argv(nodes: Nodes, name: str, stage: int, peers: list[str], *extra: str) -> list[str]:
    return ["join", "--stage", str(stage), "--initial-peers", *peers, "--run-id", "fail", "--host", "127.0.0.1",
            "--identity", str(nodes.dir / f"{name}.id"), "--checkpoint-dir", str(nodes.dir / "ckpt"),
            "--threads", "1", *extra]


def start_trainer(nodes: Nodes, name: str, peers: list[str], *extra: str) -> None:
    """A trainer (`join --stage 0`) training until stopped, its summary in <name>.json."""
    nodes.start(name, *join_argv(nodes, name, 0, peers, "--steps", "100000", "--eval-every", "0",
                                 "--json-out", str(nodes.dir / f"{name}.json"), *extra))


def training_swarm(nodes: Nodes, *trainer_extra: str, last_extra=(), trainers=("trainer",)) -> list[str]:
    """bootstrap, one replica each of stages 1 and 2, and trainers training until stopped."""
    peers = bootstrap(nodes, "--stages", "3")
    nodes.start("s1", *join_argv(nodes, "s1", 1, peers))
    nodes.start("s2", *join_argv(nodes, "s2", 2, peers, *last_extra))
    nodes.wait_for("s1", "serving")
    nodes.wait_for("s2", "serving")
    for name in trainers:
        start_trainer(nodes, name, peers, *trainer_extra)
    return peers


def swarm_status(peers: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-m", "node.cli", "status", "--initial-peers", *peers, "--run-id",
                          "fail", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=90)
    return json.loads(res.stdout) if res.returncode in (0, 1) and res.stdout else {}


def replicas_of(status: dict, stage: int) -> list[dict]:
    return next((s["replicas"] for s in status.get("stages", []) if s["stage"] == stage), [])


def trainer_tokens_per_s(peers: list[str]) -> float:
    def rate():
        trainers = replicas_of(swarm_status(peers), 0)
        return trainers and trainers[0]["tokens_per_s"]
    return wait_until(rate, 60, "the trainer's record to show its tokens/s", step=3)


def trained_steps(text: str) -> int:
    return max((int(m) for m in STEP_LINE.findall(text)), default=0)


def stop_trainer(nodes: Nodes, name: str) -> dict:
    """SIGTERM a trainer; its run summary."""
    nodes.procs[name].send_signal(signal.SIGTERM)
    assert nodes.procs[name].wait(timeout=90) == 130, nodes.log(name)[-3000:]
    return json.loads((nodes.dir / f"{name}.json").read_text())


# --- the last replica of a stage ---------------------------------------------------------------------


def test_only_replica_of_last_stage_killed_trainer_pauses_restart_resumes(nodes):
    peers = training_swarm(nodes, last_extra=("--port", str(free_port()), "--metrics-port", str(free_port())))
    wait_until(lambda: trained_steps(nodes.log("trainer")) >= 3, 180, "3 training steps")
    assert trainer_tokens_per_s(peers) > 0  # the trainer advertises the rate it trains at

    helpers = nodes.kill9("s2")
    assert len(helpers) >= 2, helpers  # its DHT process and p2pd at least
    killed_at, trainer_mark, s1_mark = time.monotonic(), len(nodes.log("trainer")), len(nodes.log("s1"))
    wait_until(lambda: not any(alive(p) for p in helpers), 10, f"the helpers {helpers} of the killed node to exit")

    # the trainer says so at once: stage 1 answers "no usable replica of stage 2" within seconds
    nodes.wait_for("trainer", "paused (", 90, since=trainer_mark)
    paused_after = time.monotonic() - killed_at
    pause = nodes.log("trainer")[trainer_mark:]
    assert "replica of stage 2" in pause or "replica of stage(s) 2" in pause, pause[-3000:]
    assert paused_after < 20, (paused_after, pause[-3000:])
    time.sleep(max(0.0, 20 - (time.monotonic() - killed_at)))
    outage = nodes.log("trainer")[trainer_mark:]
    calls = nodes.log("s1")[s1_mark:].count("stage 2 replica")  # stage 1 calls stage 2: one warning per failure
    assert nodes.procs["trainer"].poll() is None and nodes.procs["s1"].poll() is None, outage[-3000:]
    assert "Traceback" not in outage + nodes.log("s1")[s1_mark:] and "OverflowError" not in outage, outage[-3000:]
    assert 1 <= calls < 50, f"{calls} calls to the dead replica in 20 s:\n{nodes.log('s1')[-3000:]}"

    s2_mark = len(nodes.log("s2"))
    stopped_at = trained_steps(nodes.log("trainer"))
    restarted_at = time.monotonic()
    nodes.restart("s2")  # same identity, port and metrics port, right away
    nodes.wait_for("s2", "serving", 120, since=s2_mark)
    serving_after = time.monotonic() - restarted_at
    wait_until(lambda: trained_steps(nodes.log("trainer")) > stopped_at, 180, "training to resume")
    print(f"\nlast replica killed: paused after {paused_after:.1f}s, {calls} calls to it in 20 s; restarted "
          f"replica serving after {serving_after:.1f}s, training resumed after {time.monotonic() - restarted_at:.1f}s")
    wait_until(lambda: trained_steps(nodes.log("trainer")) > stopped_at + 2, 180, "training to go on")

    # Paused again, the trainer still honours SIGTERM.
    helpers = nodes.kill9("s2")
    trainer_mark = len(nodes.log("trainer"))
    nodes.wait_for("trainer", "paused (", 90, since=trainer_mark)
    assert stop_trainer(nodes, "trainer")["stopped_by"] == "signal"
    wait_until(lambda: not any(alive(p) for p in helpers), 10, "the helpers of the killed node to exit")


def test_store_refusals_warn_only_when_the_record_cannot_be_read_back():
    from node.announce import Announcer
    from node.dht import start_dht
    from node.runtime import SocketJanitor
    from protocol.signing import Ed25519RecordValidator
    janitor, dht = SocketJanitor(), start_dht("fail")

    async def go():
        ann = Announcer(dht, "fail", "QmMe", Ed25519RecordValidator())
        assert await ann.publish(1, "fp", 1.0, 0, 3, ttl=300) and await ann.readable(1)
        # A value with an older expiration than the stored one is refused, and the DHT keeps the previous
        # value: that newest record is then really not readable (the announcer warns). (Announcer.publish
        # itself never makes this mistake: it keeps expirations increasing.)
        from hivemind.utils import get_dht_time
        from protocol.records import stage_key, stage_record
        value = stage_record(stage=1, peer_id="QmMe", throughput=1.0, queue=0, fingerprint="fp", step=4,
                             serving=True, started=float(ann.started), updated=float(get_dht_time()))
        assert not await dht.store(stage_key("fail", 1), value, get_dht_time() + 1, subkey=ann.subkey,
                                   return_future=True)
        ann.last_updated = value["updated"]
        assert not await ann.readable(1)
    try:
        asyncio.run(go())
    finally:
        dht.shutdown()
        janitor.sweep()


def test_same_command_restart_right_after_kill9(nodes):
    peers = bootstrap(nodes, "--stages", "2")
    nodes.start("s1", *join_argv(nodes, "s1", 1, peers, "--port", str(free_port()),
                                 "--metrics-port", str(free_port())))
    nodes.wait_for("s1", "serving")
    helpers = nodes.kill9("s1")
    mark = len(nodes.log("s1"))
    nodes.restart("s1")  # no pause at all: same identity, port and metrics port
    nodes.wait_for("s1", "serving", 120, since=mark)
    restarted = nodes.log("s1")[mark:]
    assert "already taken" not in restarted and "already in use" not in restarted, restarted
    assert not any(alive(p) for p in helpers), helpers


# --- trainers ------------------------------------------------------------------------------------------


def stage_steps(peers: list[str]) -> dict[int, int]:
    """Steps the replicas of stages 1 and 2 advertise, once two reads a few seconds apart agree (the
    records are refreshed every few seconds)."""
    def read():
        status = swarm_status(peers)
        return {k: max((r["step"] for r in replicas_of(status, k)), default=None) for k in (1, 2)}

    def settled():
        first = read()
        time.sleep(3)
        return first if None not in first.values() and read() == first else None
    return wait_until(settled, 90, "the stages' advertised steps to settle", step=1)


def test_last_trainer_killed_stages_wait_and_a_restart_resumes_from_their_step(nodes):
    # the stages' steps are read from their records (stage_steps): refreshed every 2 s here, not 15
    nodes.env["RESBM_ANNOUNCE_PERIOD"] = "2"
    peers = training_swarm(nodes, "--save-every-min", "0.05")  # a trainer checkpoint every 3 s
    wait_until(lambda: SAVED.search(nodes.log("trainer")), 240, "a periodic trainer checkpoint of a trained step")
    helpers = nodes.kill9("trainer")  # mid-step, most likely: the stages hold its gradients
    # Nobody trains now: the stages keep serving and stay at the step they applied.
    paused = stage_steps(peers)
    time.sleep(5)
    assert stage_steps(peers) == paused and max(paused.values()) >= 1, paused
    assert nodes.procs["s1"].poll() is None and nodes.procs["s2"].poll() is None
    mark = len(nodes.log("trainer"))
    restarted_at = time.monotonic()
    nodes.restart("trainer")  # the same command
    nodes.wait_for("trainer", "resumed from checkpoint", 60, since=mark)
    wait_until(lambda: trained_steps(nodes.log("trainer")[mark:]) > 0, 120, "the restarted trainer to train")
    print(f"\nrestarted trainer training again after {time.monotonic() - restarted_at:.1f}s, stages at {paused}")
    assert not any(alive(p) for p in helpers), helpers
    wait_until(lambda: trained_steps(nodes.log("trainer")[mark:]) >= 5, 120, "5 more steps")
    log = nodes.log("trainer")[mark:]
    resumed = int(re.search(r"resumed from checkpoint \S+ at step (\d+)", log).group(1))
    assert 1 <= resumed <= max(paused.values()), (resumed, paused)
    # its stage 0 goes on from its own checkpoint: no step of anyone else's to catch up with
    assert int(FROM_STEP.search(log).group(1)) == resumed + 1, (resumed, log[-3000:])
    assert "Traceback" not in log, log[-3000:]


def test_one_of_two_trainers_killed_the_other_trains_on(nodes):
    """Nothing waits on a swarm-wide barrier: a trainer killed -9 costs only its own microbatches in
    flight; the other one's progress goes on without a pause or an error."""
    names = ("t0", "t1")
    training_swarm(nodes, trainers=names)
    wait_until(lambda: min(trained_steps(nodes.log(n)) for n in names) >= 3, 240, "both trainers to train 3 steps")
    nodes.kill9("t0")
    mark = len(nodes.log("t1"))
    wait_until(lambda: trained_steps(nodes.log("t1")[mark:]) > 0, 120, "a progress line of t1 after the kill")
    after_kill = trained_steps(nodes.log("t1")[mark:])
    wait_until(lambda: trained_steps(nodes.log("t1")) >= after_kill + 5, 180,
               f"t1 to train 5 more steps:\n{nodes.log('t1')[-3000:]}")
    summary = stop_trainer(nodes, "t1")
    log = nodes.log("t1")[mark:]
    assert "Traceback" not in log and "paused" not in log, log[-3000:]
    assert summary["steps_completed"] >= after_kill + 5 and summary["skipped_microbatches"] == 0, summary
    wait_until(lambda: not nodes.orphans(), 30, f"the killed trainer's helpers to exit: {nodes.orphans()}")


# --- a dead bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_killed_config_survives_and_peers_admit_joiners(tmp_path):
    ttl = 6.0  # RESBM_CONFIG_TTL_S (the hidden --config-ttl-s): the default is 120 s; the same path, only shorter
    nodes = Nodes(tmp_path, env={"RESBM_CONFIG_TTL_S": str(ttl)})
    try:
        peers = bootstrap(nodes, "--stages", "2")
        nodes.start("s1", *join_argv(nodes, "s1", 1, peers))
        nodes.wait_for("s1", "serving")
        via = nodes.own_addr("s1")
        assert via not in peers
        helpers = nodes.kill9("bootstrap")
        wait_until(lambda: not any(alive(p) for p in helpers), 10, "the bootstrap's helpers to exit")
        time.sleep(2 * ttl)  # every record the bootstrap stored has expired by now
        nodes.start("s1b", *join_argv(nodes, "s1b", 1, [via]))  # no --config
        nodes.wait_for("s1b", "serving", 120)
        status = subprocess.run([sys.executable, "-m", "node.cli", "status", "--initial-peers", via, "--run-id",
                                 "fail"], cwd=ROOT, capture_output=True, text=True, timeout=90, env=nodes.env)
        fingerprint = re.search(r"fingerprint (\w+)", nodes.log("s1")).group(1)
        assert f"fingerprint {fingerprint}" in status.stdout + status.stderr, status.stdout + status.stderr
    finally:
        nodes.stop_all()


# --- refusals ------------------------------------------------------------------------------------------


def test_second_node_on_a_held_port_is_refused(nodes):
    port = free_port()
    bootstrap(nodes, "--stages", "2", "--port", str(port))
    res = subprocess.run([sys.executable, "-m", "node.cli", "bootstrap", *TINY, "--stages", "2", "--run-id", "fail",
                          "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in res.stderr, res.stderr
    assert nodes.procs["bootstrap"].poll() is None


def test_local_with_zero_replicas_is_refused(tmp_path):
    res = subprocess.run([sys.executable, "-m", "node.cli", "local", "--stages", "3", "--replicas", "0", *TINY,
                          "--run-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "--replicas 0 can never train" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "node.cli", "local", "--stages", "3", "--trainers", "0", *TINY,
                          "--run-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "--trainers 0 can never train" in res.stderr, res.stderr


def test_nodes_of_local_exit_when_local_is_killed(tmp_path):
    """Replicas that average (an averager process each, maybe a round in flight) must exit too."""
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "local", "--stages", "2", "--replicas", "2",
                             "--average-every", "1", "--steps", "100000", *TINY, "--run-dir", str(tmp_path / "run")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "local.log", "w"),
                            start_new_session=True)
    try:
        wait_until(lambda: trained_steps((tmp_path / "local.log").read_text(errors="replace")) >= 3, 240,
                   "the local swarm to train and average")
        tree = descendants(proc.pid)
        assert len(tree) >= 10, tree  # bootstrap, 2 stage-1 replicas, the trainer, their DHT processes, p2pds, averagers
        proc.kill()  # the main pid only
        proc.wait()
        wait_until(lambda: not any(alive(p) for p in tree), 60, "every process of the killed `local` to exit")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- export of stages at different steps -----------------------------------------------------------------


def test_common_step_and_mixed_step_message():
    assert common_step({0: {5, 6}, 1: {6, 7}, 2: {4, 6}}) == 6
    assert common_step({0: {5}, 1: {6}}) is None
    check_one_step({0: 3, 1: 3})
    with pytest.raises(MixedSteps, match=r"stage\(s\) 0 \(step 56\), 1 \(step 57\) behind step 58"):
        check_one_step({0: 56, 1: 57, 2: 58, 3: 58})


def _checkpoint(run, stage: int, step: int, path):
    worker = StageWorker(run, stage)
    worker.applied_step = step
    torch.save(worker.state_dict(), path)


def test_export_refuses_mixed_steps_unless_allowed(tmp_path):
    run = RunConfig(model=ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=16, n_stages=2, ratio=16),
                    train=TrainConfig(batch_size=4, microbatches=2), run_id="mix")
    mixed, common = tmp_path / "mixed", tmp_path / "common"
    mixed.mkdir(), common.mkdir()
    _checkpoint(run, 0, 56, mixed / "a.pt")
    _checkpoint(run, 1, 58, mixed / "b.pt")

    def export(src, *extra):
        return subprocess.run([sys.executable, "-m", "node.cli", "export", "--checkpoints", str(src), "--out",
                               str(tmp_path / "m.st"), *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)

    res = export(mixed)
    assert res.returncode != 0 and "stage(s) 0 (step 56) behind step 58" in res.stderr, res.stderr
    assert not (tmp_path / "m.st").exists()
    res = export(mixed, "--allow-mixed-steps")
    assert res.returncode == 0 and "{0: 56, 1: 58}" in res.stderr, res.stderr
    for name, stage, step in (("a", 0, 57), ("b", 1, 57), ("c", 1, 58)):  # stage 1 also has a newer file
        _checkpoint(run, stage, step, common / f"{name}.pt")
    res = export(common)
    assert res.returncode == 0 and "{0: 57, 1: 57}" in res.stderr, res.stderr


def test_live_export_of_a_training_swarm_takes_every_stage_at_one_step(nodes):
    peers = training_swarm(nodes, "--save-every-min", "0.05")
    wait_until(lambda: trained_steps(nodes.log("trainer")) >= 3, 180, "3 training steps")
    # the trainer checkpoints periodically too (not only on exit), atomically, labelled with its weights' step
    ckpt = wait_until(lambda: SAVED.search(nodes.log("trainer")), 60, "a trainer checkpoint").group(1)
    assert "fail-stage0-" in ckpt
    state = torch.load(ckpt, weights_only=True)
    assert state["stage"] == 0 and state["step"] >= 1
    assert nodes.procs["trainer"].poll() is None
    res = subprocess.run([sys.executable, "-m", "node.cli", "export", "--initial-peers", *peers, "--run-id", "fail",
                          "--out", str(nodes.dir / "m.st")], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = ast.literal_eval(re.search(r"\(steps (\{.*?\})\)", res.stderr).group(1))
    assert len(steps) == 3 and len(set(steps.values())) == 1 and min(steps.values()) >= 2, res.stderr
