"""Training through churn: replicas crash (SIGKILL of their whole process group) and newcomers join.

    python -m bench.churn [--quick | --scale] [--duration S] [--kill-every S] [--restart-after S]

A local swarm with 2 replicas of every served stage trains for a fixed wall time twice: once
undisturbed, once while every `kill-every` seconds a random live replica is killed and a fresh one
(new identity: it must fetch the live state) starts `restart-after` seconds later. Reports completed
optimizer steps of both runs, lost microbatches (must be 0), recomputed microbatches, retries, the
longest stall (longest step), and the loss curves (PNG + JSON).
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.plotting import line_plot, machine_info, markdown_table, smooth, write_json
from node.args import parse_run_config
from node.local import Swarm

SIZES = {
    "quick": dict(argv=["--d-model", "64", "--layers", "3", "--heads", "2", "--ratio", "16", "--seq-len", "32",
                        "--batch-size", "8", "--microbatches", "4", "--stages", "3"],
                  duration=45, kill_every=12, restart_after=6),
    "default": dict(argv=["--d-model", "128", "--layers", "3", "--heads", "4", "--ratio", "32", "--seq-len", "64",
                          "--batch-size", "16", "--microbatches", "4", "--stages", "3"],
                    duration=240, kill_every=20, restart_after=10),
    "scale": dict(argv=["--d-model", "1024", "--layers", "8", "--heads", "16", "--ratio", "128", "--seq-len", "256",
                        "--batch-size", "32", "--microbatches", "8", "--stages", "5"],
                  duration=900, kill_every=20, restart_after=10),
}


def one_run(size: dict, duration: float, churn: bool, kill_every: float, restart_after: float, seed: int,
            workdir: Path, replicas: int = 2) -> dict:
    run = parse_run_config([*size["argv"], "--average-every", "5"], run_id="churn" if churn else "steady")
    stages = run.model.n_stages
    run_dir = workdir / ("churn" if churn else "steady")
    run_dir.mkdir(parents=True)
    swarm = Swarm(run_dir, threads=1, run=run)
    rng = random.Random(seed)
    events = []
    try:
        peers = swarm.start_bootstrap()
        live = []
        for stage in range(1, stages):
            for r in range(replicas):
                name = f"stage{stage}-r{r}"
                swarm.start_stage(name, stage, peers, extra=["--checkpoint-dir", ""])
                live.append((name, stage))
        for name, _ in live:
            swarm.wait_for_line(name, "serving", 180)
        head = swarm.start_head(peers, 10 ** 9, run_dir / "head.json", extra=["--eval-every", "0"])
        swarm.wait_for_line("head", "training", 120)
        t0 = time.monotonic()
        next_kill, pending, spawned = t0 + kill_every, [], 0
        while time.monotonic() - t0 < duration:
            now = time.monotonic()
            if churn and now >= next_kill and live:
                name, stage = live.pop(rng.randrange(len(live)))
                swarm.kill(name)
                events.append({"t": round(now - t0, 1), "event": "kill", "node": name, "stage": stage})
                pending.append((now + restart_after, stage))
                next_kill += kill_every
            for due, stage in [p for p in pending if p[0] <= now]:
                pending.remove((due, stage))
                spawned += 1
                name = f"stage{stage}-n{spawned}"
                swarm.start_stage(name, stage, peers, extra=["--checkpoint-dir", ""])
                live.append((name, stage))
                events.append({"t": round(now - t0, 1), "event": "start", "node": name, "stage": stage})
            if head.poll() is not None:
                raise RuntimeError(f"the head exited early:\n{(run_dir / 'head.log').read_text()[-3000:]}")
            time.sleep(0.2)
        head.send_signal(signal.SIGINT)  # the head finishes its step and writes its summary
        head.wait(timeout=180)
    finally:
        swarm.stop()
    summary = json.loads((run_dir / "head.json").read_text())
    summary["events"] = events
    for e in events:  # did the newcomers load the live state?
        if e["event"] == "start":
            log = (run_dir / f"{e['node']}.log").read_text(errors="replace")
            e["state"] = "live replica" if "from live replica" in log else "init" if "initialisation" in log else "?"
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny and short (CI)")
    g.add_argument("--scale", action="store_true", help="GPU-sized model, 15 minutes per run")
    p.add_argument("--duration", type=float, default=None, help="seconds of training per run")
    p.add_argument("--kill-every", type=float, default=None)
    p.add_argument("--restart-after", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep the runs' logs in this folder")
    p.add_argument("--json-out", default="bench/results/churn.json")
    p.add_argument("--png-out", default="bench/results/churn.png")
    args = p.parse_args(argv)
    name = "quick" if args.quick else "scale" if args.scale else "default"
    size = SIZES[name]
    duration = args.duration or size["duration"]
    kill_every = args.kill_every or size["kill_every"]
    restart_after = args.restart_after or size["restart_after"]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        for churn in (False, True):
            label = "churn" if churn else "no churn"
            print(f"[{label}] {duration:.0f}s of training" + (f", kill every {kill_every:.0f}s, restart after "
                                                              f"{restart_after:.0f}s" if churn else ""), file=sys.stderr)
            runs[label] = one_run(size, duration, churn, kill_every, restart_after, args.seed, Path(tmp))
    steady, churned = runs["no churn"], runs["churn"]
    ratio = churned["steps_completed"] / max(1, steady["steps_completed"])
    rows = []
    for label, r in runs.items():
        times = r["step_times"]
        rows.append([label, r["steps_completed"], f"{r['steps_completed'] / max(1, steady['steps_completed']):.2f}",
                     r["lost_microbatches"], r["recomputed_microbatches"], r["crashed_unaveraged_microbatches"],
                     r["retries"],
                     f"{max(times):.1f}" if times else "-", f"{r['loss_curve'][0]:.3f}",
                     f"{sum(r['loss_curve'][-10:]) / len(r['loss_curve'][-10:]):.3f}"])
    table = markdown_table(["run", "steps", "vs no churn", "lost microbatches", "recomputed",
                            "updates lost with crashed replicas", "retries",
                            "longest step s", "first loss", "last-10 loss"], rows)
    kills = sum(e["event"] == "kill" for e in churned["events"])
    handoffs = sum(e.get("state") == "live replica" for e in churned["events"])
    starts = sum(e["event"] == "start" for e in churned["events"])
    falling = sum(churned["loss_curve"][-10:]) / 10 < sum(churned["loss_curve"][:10]) / 10
    verdict = [f"- steps with churn vs without: {ratio:.0%} (goal >= 80%): {'met' if ratio >= 0.8 else 'MISSED'}",
               f"- lost microbatches: {churned['lost_microbatches']} (goal 0): "
               f"{'met' if churned['lost_microbatches'] == 0 else 'MISSED'}",
               f"- loss keeps falling under churn: {'yes' if falling else 'NO'}",
               f"- {kills} replicas killed, {starts} started; {handoffs} newcomers loaded the live state"]
    print(f"\n{duration:.0f}s per run, 2 replicas per served stage, {name} size\n")
    print(table + "\n\n" + "\n".join(verdict))
    write_json(args.json_out, {"size": name, "duration_s": duration, "kill_every_s": kill_every,
                               "restart_after_s": restart_after, "machine": machine_info(), "runs": runs,
                               "steps_ratio": ratio, "table": table, "verdict": verdict,
                               "command": " ".join(["python -m bench.churn", *(argv or sys.argv[1:])])})
    series = [{"label": label, "x": list(range(1, len(r["loss_curve"]) + 1)), "y": smooth(r["loss_curve"], 5)}
              for label, r in runs.items()]
    line_plot(args.png_out, [{"title": "training loss (5-step mean)", "xlabel": "optimizer step",
                              "ylabel": "loss (nats/byte)", "series": series}],
              title=f"churn: kill a replica every {kill_every:.0f}s, restart after {restart_after:.0f}s")
    print(f"\nwrote {args.json_out} and {args.png_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
