"""Small helpers shared by the tests that start a swarm of real processes around its trainers."""
import os
from pathlib import Path

from swarm.config import ModelConfig, RunConfig, TrainConfig


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
