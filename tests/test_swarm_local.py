"""Multi-process swarms on loopback, started the way users start them."""
import asyncio
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from protocol.codec import bytes_per_token
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from bench.inproc import InprocSwarm
from swarm_helpers import session_members

pytestmark = pytest.mark.swarm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "64", "--layers", "4", "--heads", "2", "--ratio", "16", "--seq-len", "32",
        "--batch-size", "4", "--microbatches", "2"]


def held_socket_paths() -> set[str]:
    """Paths of the unix sockets bound by live processes, in every network namespace on this machine."""
    namespaces, held = set(), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.readlink(f"/proc/{pid}/ns/net")
            if ns not in namespaces:
                with open(f"/proc/{pid}/net/unix") as f:
                    held |= {line.split()[-1] for line in f.readlines()[1:] if len(line.split()) >= 8}
                namespaces.add(ns)
        except OSError:
            continue
    return held


def stale_sockets(before: set) -> list[str]:
    """hivemind socket files created since `before` that no live process holds any more (other people's
    nodes on this machine create and hold theirs meanwhile, some in network namespaces of their own)."""
    new = set(glob.glob("/tmp/hivemind-*.sock")) - before
    held = held_socket_paths()
    return [p for p in new if os.path.exists(p) and p not in held]


def cli(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "node.cli", *argv], cwd=ROOT, capture_output=True, text=True, **kw)


def local_run(tmp_path, *argv, timeout=600) -> dict:
    """`resbm-node local` to the end; its summary, after checking every node exited cleanly and left
    nothing behind."""
    before_sockets = set(glob.glob("/tmp/hivemind-*.sock"))
    out = tmp_path / "run.json"
    res = cli("local", "--eval-every", "0", "--lr", "0.01", *TINY, *argv, "--json-out", str(out),
              "--run-dir", str(tmp_path / "run"), timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(out.read_text())
    assert set(s["exit_codes"].values()) == {0}, s["exit_codes"]
    assert session_members(s["pids"].values()) == []
    assert stale_sockets(before_sockets) == []
    assert sum(s["loss_curve"][-5:]) / 5 < s["loss_curve"][0] - 1.0
    return s


def test_local_swarm_trains_sends_only_codes_and_cleans_up(tmp_path):
    s = local_run(tmp_path, "--stages", "4", "--steps", "30")
    assert s["steps_completed"] == 30
    # Codec bytes per token per hop are exactly the codec's: b=4 values in bf16 = 8 bytes, both ways;
    # every hop's request also carries the targets (1 byte per token) on to the tail.
    expected = bytes_per_token("bf16", 64 // 16)
    assert s["wire_bytes_per_token_fwd"] == expected
    assert s["measured_code_bytes_per_token_fwd"] == pytest.approx(expected + 1)
    assert s["measured_code_bytes_per_token_bwd"] == expected
    # Whole messages add metadata and framing: bounded per message (64 tokens per microbatch here). A
    # request also names its owner, a reply its route (the 3 replicas after the trainer): ~50 bytes a peer id.
    for pass_, bound in (("fwd", 160 + 55), ("bwd", 160 + 3 * 55)):
        overhead = s[f"measured_wire_bytes_per_token_{pass_}"] - s[f"measured_code_bytes_per_token_{pass_}"]
        assert 0 < overhead * 64 < bound, (pass_, overhead * 64)
    assert 8.0 < s["measured_compression_vs_bf16"] < 16.0
    assert [n["role"] for n in s["nodes"]] == ["trainer", "middle", "middle", "tail"], s["nodes"]
    # the trainer drains its window at the end: every stage computed the same microbatches, at
    # least the 30 steps' (a partial step's worth more may have been in flight)
    tokens = s["nodes"][0]["tokens"]
    assert 30 * 4 * 32 <= tokens <= 31 * 4 * 32, s["nodes"]
    for n in s["nodes"]:
        assert n["tokens"] == tokens and n["bytes_sent"] > 0 and n["bytes_received"] > 0, n
        if n["stage"]:  # every payload a stage received or sent had width b: nothing of width d crossed
            assert n["payload_received"] == tokens * (expected + 1), n  # x and the targets
            assert n["payload_sent"] == tokens * expected, n            # the gradient
    assert s["trainers"][0]["skipped_microbatches"] == 0


def test_local_swarm_with_two_trainers(tmp_path):
    s = local_run(tmp_path, "--stages", "3", "--trainers", "2", "--steps", "20")
    assert [t["steps_completed"] for t in s["trainers"]] == [20, 20], s["trainers"]
    trainers = [n for n in s["nodes"] if n["stage"] == 0]
    assert sorted(n["role"] for n in trainers) == ["trainer", "trainer"], s["nodes"]
    assert {n["peer_id"] for n in trainers} == {t["peer_id"] for t in s["trainers"]}
    assert all(n["tokens"] > 0 for n in s["nodes"]), s["nodes"]
    # a trainer sends codes across one boundary; a middle stage receives and sends on: per token, a
    # trainer moves no more bytes than a middle stage (there are no control calls any more)
    per_token = lambda n: (n["bytes_sent"] + n["bytes_received"]) / n["tokens"]  # noqa: E731
    middle = next(n for n in s["nodes"] if n["role"] == "middle")
    figures = [(n["role"], per_token(n)) for n in s["nodes"]]
    assert all(per_token(n) <= per_token(middle) for n in trainers), figures
    # the middle stage served both trainers: more than the one whose summary read it (the other trainer's
    # own figure is from its own, later, end), never more than both
    reader = next(n for n in trainers if n["peer_id"] == s["peer_id"])
    assert reader["tokens"] < middle["tokens"] <= sum(n["tokens"] for n in trainers), s["nodes"]


def test_sigterm_to_local_stops_every_node(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "local", "--stages", "2", "--steps", "100000",
                             *TINY, "--run-dir", str(tmp_path / "run"), "--json-out", str(tmp_path / "s.json")],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        for line in proc.stderr:
            if "/100000" in line or time.time() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=90)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["steps_completed"] >= 1 and s["stopped_by"] == "signal"
    assert session_members(s["pids"].values()) == []


def test_join_with_other_config_is_refused(tmp_path):
    addr = tmp_path / "addr"
    boot = subprocess.Popen([sys.executable, "-m", "node.cli", "bootstrap", *TINY, "--stages", "2",
                             "--addr-file", str(addr), "--save-config", str(tmp_path / "cfg.json")],
                            cwd=ROOT, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(200):
            if addr.exists():
                break
            time.sleep(0.1)
        cfg = json.loads((tmp_path / "cfg.json").read_text())
        cfg["model.ratio"] = 8
        (tmp_path / "other.json").write_text(json.dumps(cfg))
        res = cli("join", "--stage", "1", "--initial-peers", addr.read_text().split()[0], "--host", "127.0.0.1",
                  "--config", str(tmp_path / "other.json"), timeout=90)
        assert res.returncode != 0
        assert "differs from the swarm's run config" in res.stderr and "model.ratio: ours 8, theirs 16" in res.stderr
        bad = cli("join", "--stage", "1", "--initial-peers", "/ip4/127.0.0.1/tcp/9", timeout=30)
        assert bad.returncode == 2 and "lacks the /p2p/<peer id> part" in bad.stderr
        gone = addr.read_text().split()[0].rsplit("/tcp/", 1)[0] + "/tcp/9/p2p/" + addr.read_text().split("/p2p/")[1]
        res = cli("join", "--stage", "1", "--initial-peers", gone.strip(), "--host", "127.0.0.1", timeout=60)
        assert res.returncode == 2 and "could not start the DHT peer" in res.stderr
    finally:
        boot.send_signal(signal.SIGTERM)
        try:
            boot.wait(timeout=30)
        finally:
            os.killpg(boot.pid, signal.SIGKILL) if boot.poll() is None else None


def test_two_replicas_share_traffic_and_average_in_the_background():
    """Two replicas of stage 1 share the trainer's microbatches and average after each of their own
    steps while training goes on, and every round came back complete; a round with no training
    meanwhile ends them at one anchor, each within its residual of it (error feedback), and their
    parameters sum to what they summed to before the round."""
    corpus = ByteCorpus(max_bytes=1 << 20)
    model = ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=32, n_stages=3, ratio=16)
    run = RunConfig(model=model, train=TrainConfig(batch_size=16, microbatches=8, average_every=1), run_id="avg")

    async def go():
        async with InprocSwarm(run, corpus, replicas={1: 2}, averaging=True) as sw:
            await sw.train(8)
            reps = sw.servers[1]
            background = [r.averager._round for r in reps]
            await asyncio.gather(*(t for t in background if t is not None), return_exceptions=True)
            rounds = [r.averager.figures()["rounds"] for r in reps]
            def trained(r):  # what the averager averages, in its order
                return {n: p.detach().clone() for n, p in r.worker.stage.named_parameters() if p.requires_grad}
            before = [trained(r) for r in reps]
            anchors_before = [t.clone() for t in reps[0].averager.averager.anchors]
            quiet = await asyncio.gather(*(r.averager.average(99, r.in_worker) for r in reps))
            distance = [r.averager.metrics.registry.get_sample_value("resbm_replica_distance") for r in reps]
            partial = [r.averager.figures()["partial"] for r in reps]
            received = [r.averager.metrics.registry.get_sample_value("resbm_averaging_received_fraction")
                        for r in reps]
            figures = [r.averager.figures() for r in reps]
            anchors = [([t.clone() for t in r.averager.averager.anchors], r.averager.averager.report[3].item())
                       for r in reps]
            return (rounds, quiet, distance, partial, received, [r.tokens_done for r in reps], before,
                    [trained(r) for r in reps], figures, anchors, anchors_before)

    rounds, quiet, distance, partial, received, tokens, (a0, b0), (a, b), figures, anchors, anchors0 = \
        asyncio.run(go())
    # every round that ran was a pair, the quiet one included, and none is left running
    assert [f["groups"] for f in figures] == [{"2": r + 1} for r in rounds], figures
    assert not any(f["in_flight"] for f in figures), figures
    # the replicas start from the run's initial weights, so their anchors agree: rounds are anchored
    # (2-bit changes since the anchor), unless one came back partial (its next round is full)
    assert all(f["kinds"].get("anchored", 0) >= 1 and sum(f["kinds"].values()) == r + 1
               for f, r in zip(figures, rounds)), figures
    assert all(t > 0 for t in tokens), tokens  # both replicas got microbatches
    assert all(r >= 1 for r in rounds), rounds  # rounds ran while the trainer trained
    assert quiet == [True, True]
    # they had drifted apart since the last background round, by about the same amount from their
    # mean (each keeps its own residual of the 2-bit rounding: not exactly the same)
    assert all(0 < d < 0.5 for d in distance) and distance[0] == pytest.approx(distance[1], rel=0.3), distance
    assert partial == [0, 0] and received == [1.0, 1.0], (partial, received)
    (anchors_a, kind_a), (anchors_b, kind_b) = anchors
    assert kind_a == kind_b == 1  # the quiet round was anchored
    assert all(torch.equal(x, y) for x, y in zip(anchors_a, anchors_b))  # the same bytes, the same anchor
    # one fragment at this size: the round carried every tensor, in the averager's order
    assert all(f["fragments"] == 1 for f in figures), figures
    # each ends within its residual of the new anchor: what its own change lost to the 2 bits (at most
    # half a level, a third of its block's largest change), or, on the parts it reduced, both
    # contributors' share of what the mean lost (at most a level). A block may straddle tensors, so the
    # bound takes the largest change of all. Not "no further apart" than before: replicas that had
    # drifted less than a level apart can end a little further apart, holding that for their next round
    change = max(max((x[n] - anchor).abs().max().item() for x in (a0, b0)) for n, anchor in zip(a, anchors0))
    for n, anchor in zip(a, anchors_a):
        # what the 2 bits lost stays in the replicas: their sum is the one they had, up to float rounding
        bad = (a[n] + b[n] - a0[n] - b0[n]).abs() > 1e-6 * (1 + a0[n].abs() + b0[n].abs())
        assert not bad.any(), (n, int(bad.sum()), a[n].numel())
        assert max((x[n] - anchor).abs().max().item() for x in (a, b)) <= 2 / 3 * change * 1.02, (n, change)


def test_wire_figure_matches_the_kernels_count_of_the_trainers_sockets(tmp_path):
    """The trainer's own count of message bytes (boundary 0 and the step's control calls), against the
    kernel's TCP counters of its p2p daemon's sockets (sampled with `ss` while it runs): the difference
    is libp2p (TLS, yamux), DHT and protobuf framing overhead, which must stay bounded."""
    import shutil
    from bench.wirecount import SocketCounter, find_pids
    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed")
    run_dir = tmp_path / "run"
    identity = str(run_dir / "trainer0.id")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "local", "--stages", "3", "--steps", "40",
                             "--eval-every", "0", *TINY, "--run-dir", str(run_dir), "--json-out",
                             str(tmp_path / "s.json")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with SocketCounter(lambda: [p for p in find_pids(identity) if "p2pd" in open(f"/proc/{p}/cmdline").read()]) \
                as counter:
            proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    s = json.loads((tmp_path / "s.json").read_text())
    trainer = next(n for n in s["nodes"] if n["peer_id"] == s["peer_id"])
    assert trainer["role"] == "trainer"
    ours = trainer["bytes_sent"] + trainer["bytes_received"]
    outside = counter.sent + counter.received
    assert s["steps_completed"] == 40 and ours > 0
    # The kernel saw everything we counted, plus overhead: TLS records, yamux frames, the p2p daemons'
    # call framing and the DHT traffic (record refreshes every 5 s). With this tiny model a message
    # carries only 512 bytes of codes, so the overhead is large (about 3x here); at the default size
    # (README, "What the swarm costs") it is about 0.7x.
    assert ours < outside < 5 * ours, (ours, outside, counter.seen)
