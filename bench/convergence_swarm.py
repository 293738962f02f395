"""bench.convergence's swarm row: does the barrier-free swarm, with replicas averaging in the
background, train as well as train-local on the same tokens?

The swarm is `resbm-node local` (real processes, real hivemind DHT and averaging, on loopback):
`trainers` trainers and as many replicas of every later stage, each trainer `steps` steps of the
preset's batch, the default window and averaging cadence. Every replica then took about `steps`
optimizer steps on batches of that size, and the swarm saw trainers x steps x batch tokens. The
reference is train-local with the same model and optimizer, `steps` steps of trainers x batch: the
same tokens and the same number of updates (data-parallel with a synchronous all-reduce, which is
what averaging approximates).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from swarm.config import ModelConfig, RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def run_flags(run: RunConfig, fields: dict) -> list[str]:
    """The generated run flags (`--field-name value`) for the preset's model and train fields."""
    out = []
    for name in fields:
        value = getattr(run.model, name, None)
        value = getattr(run.train, name) if value is None else value
        out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def run_swarm(run: RunConfig, fields: dict, steps: int, eval_every: int, trainers: int, timeout_s: float) -> dict:
    """Train with `resbm-node local`; its summary (val loss of trainer 0 at the end, every trainer's figures)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        argv = [sys.executable, "-m", "node.cli", "local", "--trainers", str(trainers), "--replicas", str(trainers),
                "--steps", str(steps), "--eval-every", str(eval_every), "--run-dir", str(Path(tmp) / "run"),
                "--json-out", str(out), *run_flags(run, fields)]
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        if not out.exists():
            return {"error": f"local swarm exited {proc.returncode} without a summary: {proc.stderr[-1500:]}"}
        summary = json.loads(out.read_text())
        summary["wall_s"] = time.perf_counter() - started
        return summary


def swarm_row(preset: dict, corpus, device: str, steps: int, eval_every: int, trainers: int, train_one) -> dict:
    """The swarm and its train-local reference at equal tokens; `train_one` is bench.convergence's."""
    fields = {**preset["model"], **preset["train"]}
    run = RunConfig(model=ModelConfig(**preset["model"]), train=TrainConfig(**preset["train"], steps=steps),
                    run_id="bench-convergence-swarm")
    swarm = run_swarm(run, fields, steps, eval_every, trainers, timeout_s=preset.get("swarm_timeout_s", 3600))
    ref_run = replace(run, train=replace(run.train, batch_size=run.train.batch_size * trainers,
                                         microbatches=run.train.microbatches * trainers))
    ref = train_one(ref_run, corpus, device, steps, eval_every, preset["eval_batches"], "train-local, same tokens")
    row = {"trainers": trainers, "replicas_per_stage": trainers, "steps": steps,
           "tokens": steps * run.train.batch_size * run.model.seq_len * trainers,
           "average_every": run.train.average_every, "reference_val_loss": ref["val_loss"],
           "reference_batch_size": ref_run.train.batch_size, "reference_wall_s": ref["wall_s"]}
    if swarm.get("error"):
        return {**row, "error": swarm["error"]}
    nodes = [n for n in swarm.get("nodes", []) if n.get("averaging")]
    rounds = [n["averaging"] for n in nodes]
    row.update(val_loss=swarm["val_loss"], gap_pct=100.0 * (swarm["val_loss"] - ref["val_loss"]) / ref["val_loss"],
               swarm_tokens_per_s=swarm.get("swarm_tokens_per_s"), wall_s=swarm["wall_s"],
               averaging_rounds=sum(r["rounds"] or 0 for r in rounds),
               averaging_partial_rounds=sum(r["partial"] or 0 for r in rounds),
               averaging_kinds={k: sum((r.get("kinds") or {}).get(k, 0) for r in rounds) for k in ("anchored", "full")},
               replica_distance_max=max((r["distance_max"] or 0.0 for r in rounds), default=None),
               skipped_microbatches=sum(t.get("skipped_microbatches") or 0 for t in swarm.get("trainers", [])))
    return row


def render(row: dict, goal_pct: float) -> str:
    if row.get("error"):
        return f"swarm row failed: {row['error']}"
    ok = row["gap_pct"] <= goal_pct  # lower loss is better: the goal is "no more than goal_pct worse"
    return (f"| swarm ({row['trainers']} trainers, {row['replicas_per_stage']} replicas per stage, averaging every "
            f"{row['average_every']}) | train-local (batch {row['reference_batch_size']}) | gap (%) | averaging "
            f"rounds (partial) | replicas apart at most |\n| --: | --: | --: | --: | --: |\n"
            f"| {row['val_loss']:.4f} | {row['reference_val_loss']:.4f} | {row['gap_pct']:+.2f} | "
            f"{row['averaging_rounds']:.0f} ({row['averaging_partial_rounds']:.0f}) | "
            f"{100 * (row['replica_distance_max'] or 0):.2f}% |\n\n"
            f"- swarm vs train-local at equal tokens ({row['tokens']}): {row['gap_pct']:+.2f}% "
            f"(goal: at most {goal_pct:g}% worse): {'met' if ok else 'MISSED'}")
