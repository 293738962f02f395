"""--stage auto: newcomers fill the weakest stage; an unbalanced swarm moves one node, and only one."""
import ast
import asyncio
import os
import re
import subprocess
import sys
import time

import pytest

from node.announce import read_stage_records
from node.dht import start_dht
from node.local_swarm import stop_processes

pytestmark = pytest.mark.swarm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "64", "--layers", "3", "--heads", "2", "--ratio", "16", "--seq-len", "32",
        "--batch-size", "4", "--microbatches", "2", "--stages", "3"]


def _start(argv, log):
    return subprocess.Popen([sys.executable, "-m", "node.cli", *argv], cwd=ROOT, stdout=log, stderr=log,
                            start_new_session=True)


def _records(peers, run_id):
    async def get():
        dht = start_dht(run_id, peers)
        try:
            from node.announce import fetch_config
            from swarm.config import RunConfig
            published = await fetch_config(dht, run_id)
            return await read_stage_records(dht, RunConfig.from_wire_dict(published["config"]))
        finally:
            dht.shutdown()
    return asyncio.run(get())


def _counts(peers, run_id):
    recs = _records(peers, run_id)
    return {k: len(v) for k, v in recs.items()}


def test_auto_nodes_fill_and_rebalance(tmp_path):
    procs = []
    try:
        addr = tmp_path / "addr"
        procs.append(_start(["bootstrap", *TINY, "--run-id", "auto", "--addr-file", str(addr)],
                            open(tmp_path / "boot.log", "w")))
        for _ in range(300):
            if addr.exists():
                break
            time.sleep(0.1)
        peers = addr.read_text().split()
        common = ["join", "--stage", "auto", "--initial-peers", *peers, "--run-id", "auto", "--checkpoint-dir", "",
                  "--host", "127.0.0.1", "--rebalance-every", "3"]
        # three auto nodes all forced onto stage 1 (as if just moved there): stage 2 has nobody
        for i in range(3):
            procs.append(_start([*common, "--identity", str(tmp_path / f"n{i}.id"), "--auto-target", "1"],
                                open(tmp_path / f"n{i}.log", "w")))
        deadline = time.time() + 90
        counts = {}
        while time.time() < deadline:
            time.sleep(3)
            counts = _counts(peers, "auto")
            if counts.get(2, 0) >= 1 and counts.get(1, 0) >= 1 and sum(counts.values()) == 3:
                break
        assert counts.get(1, 0) >= 1 and counts.get(2, 0) >= 1 and sum(counts.values()) == 3, counts
        time.sleep(8)  # hysteresis: once both stages are served the nodes stay put, no flapping
        assert _counts(peers, "auto") == counts
        logs = [(tmp_path / f"n{i}.log").read_text() for i in range(3)]
        assert sum(log.count("moving from stage") for log in logs) == counts[2]  # only the moves needed
        # a newcomer without a target takes the stage with the lowest total throughput it saw
        procs.append(_start([*common[:-2], "--rebalance-every", "600", "--identity", str(tmp_path / "new.id")],
                            open(tmp_path / "new.log", "w")))
        deadline = time.time() + 60
        while time.time() < deadline and "serving:" not in (tmp_path / "new.log").read_text():
            time.sleep(0.5)
        log = (tmp_path / "new.log").read_text()
        chosen = re.search(r"--stage auto: serving stage (\d) \(stage totals in microbatches/s: (\{.*\})\)", log)
        totals = ast.literal_eval(chosen.group(2))
        assert int(chosen.group(1)) == min(totals, key=totals.get)
        assert f"stage {chosen.group(1)} serving:" in log
    finally:
        stop_processes(procs, grace=30.0)
