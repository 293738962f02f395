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
from node.inproc import InprocSwarm

pytestmark = pytest.mark.swarm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "64", "--layers", "4", "--heads", "2", "--ratio", "16", "--seq-len", "32",
        "--batch-size", "4", "--microbatches", "2"]


def session_members(leaders) -> list[str]:
    """Processes (p2pd, hivemind helpers, ...) still alive in the sessions of the given node pids."""
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


def cli(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "node.cli", *argv], cwd=ROOT, capture_output=True, text=True, **kw)


def test_local_swarm_trains_sends_only_codes_and_cleans_up(tmp_path):
    before_sockets = set(glob.glob("/tmp/hivemind-*.sock"))
    out = tmp_path / "run.json"
    res = cli("local", "--stages", "4", "--steps", "30", "--eval-every", "0", "--lr", "0.01", *TINY,
              "--json-out", str(out), "--run-dir", str(tmp_path / "run"), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["steps_completed"] == 30
    assert sum(s["loss_curve"][-5:]) / 5 < s["loss_curve"][0] - 1.0
    # Codec bytes per token per hop are exactly the codec's: b=4 values in bf16 = 8 bytes, both ways;
    # the head relays codes, so 4 stages make 5 forward messages per microbatch (to and from each middle
    # stage, then to the tail), and the one to the tail also carries the targets (1 byte per token).
    expected = bytes_per_token("bf16", 64 // 16)
    assert s["wire_bytes_per_token_fwd"] == expected
    assert s["measured_code_bytes_per_token_fwd"] == pytest.approx(expected + 1 / 5)
    assert s["measured_code_bytes_per_token_bwd"] == expected
    # Whole messages add metadata and framing: bounded per message (64 tokens per microbatch here).
    for pass_ in ("fwd", "bwd"):
        overhead = s[f"measured_wire_bytes_per_token_{pass_}"] - s[f"measured_code_bytes_per_token_{pass_}"]
        assert 0 < overhead * 64 < 160, (pass_, overhead)
    assert 8.0 < s["measured_compression_vs_bf16"] < 16.0
    stages = [n for n in s["nodes"] if n["role"] == "stage"]
    assert sorted(n["stage"] for n in stages) == [1, 2, 3]
    tokens = 30 * 4 * 32
    for n in stages:
        assert n["tokens"] == tokens and n["bytes_sent"] > 0 and n["bytes_received"] > 0
        # every payload a stage received or sent had width b: nothing of width d crossed
        hops = 2 if n["stage"] < 3 else 1  # a middle stage gets x and grad_out; the tail x and the targets
        assert n["payload_received"] == hops * tokens * expected + (tokens if n["stage"] == 3 else 0)
        assert n["payload_sent"] == hops * tokens * expected
    assert set(s["exit_codes"].values()) == {0}, s["exit_codes"]
    assert session_members(s["pids"].values()) == []
    assert set(glob.glob("/tmp/hivemind-*.sock")) <= before_sockets


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
        res = cli("join", "--stage", "1", "--initial-peers", addr.read_text().split()[0],
                  "--config", str(tmp_path / "other.json"), timeout=90)
        assert res.returncode != 0
        assert "differs from the swarm's run config" in res.stderr and "model.ratio: ours 8, theirs 16" in res.stderr
        bad = cli("join", "--stage", "1", "--initial-peers", "/ip4/127.0.0.1/tcp/9", timeout=30)
        assert bad.returncode == 2 and "lacks the /p2p/<peer id> part" in bad.stderr
        gone = addr.read_text().split()[0].rsplit("/tcp/", 1)[0] + "/tcp/9/p2p/" + addr.read_text().split("/p2p/")[1]
        res = cli("join", "--stage", "1", "--initial-peers", gone.strip(), timeout=60)
        assert res.returncode == 2 and "could not start the DHT peer" in res.stderr
    finally:
        boot.send_signal(signal.SIGTERM)
        try:
            boot.wait(timeout=30)
        finally:
            os.killpg(boot.pid, signal.SIGKILL) if boot.poll() is None else None


def test_two_replicas_share_traffic_and_agree_after_averaging():
    corpus = ByteCorpus(max_bytes=1 << 20)
    model = ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=32, n_stages=3, ratio=16)
    run = RunConfig(model=model, train=TrainConfig(batch_size=16, microbatches=8, average_every=2), run_id="avg")

    async def go():
        async with InprocSwarm(run, corpus, replicas={1: 2}, averaging=True) as sw:
            replies = [await sw.head.train_step(s) for s in range(4)]
            reps = sw.servers[1]
            return replies, [r.tokens_done for r in reps], [r.worker.stage.state_dict() for r in reps]

    replies, tokens, (a, b) = asyncio.run(go())
    assert all(t > 0 for t in tokens), tokens  # both replicas got microbatches
    averaged = [r.get("averaged") for step in replies for r in step["replies"] if r.get("stage") == 1]
    assert averaged.count(True) == 4, averaged  # steps 1 and 3, both replicas
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)


def test_wire_figure_matches_the_kernels_count_of_the_heads_sockets(tmp_path):
    """The head's own count of message bytes, against the kernel's TCP counters of its p2p daemon's
    sockets (sampled with `ss` while it runs): the difference is libp2p (TLS, yamux), DHT and
    protobuf framing overhead, which must stay bounded."""
    import shutil
    from bench.wirecount import SocketCounter, find_pids
    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed")
    run_dir = tmp_path / "run"
    identity = str(run_dir / "head.id")
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
    head = s["nodes"][0]
    ours = head["bytes_sent"] + head["bytes_received"]
    outside = counter.sent + counter.received
    assert s["steps_completed"] == 40 and ours > 0
    # The kernel saw everything we counted, plus overhead: TLS records, yamux frames, the p2p daemons'
    # call framing and the DHT traffic (record refreshes every 5 s). With this tiny model a message
    # carries only 512 bytes of codes, so the overhead is large (about 3x here); at the default size
    # (README, "What the swarm costs") it is about 0.7x.
    assert ours < outside < 5 * ours, (ours, outside, counter.seen)
