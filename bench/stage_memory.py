"""Does a stage's memory grow with the microbatches in flight? Peak RSS of a middle stage holding
K microbatches between their forward and their backward, at several K.

    python -m bench.stage_memory [--quick | --scale] [--json-out F]

Each K runs in a fresh process (peak RSS is per process): a middle-stage StageWorker (large
parameters, short sequences) takes one full step first, so its optimizer state exists, then runs
K forwards, keeping their handles as the stage server does while the downstream hops work, and then
the K backwards in order. Every `microbatches` backwards the replica steps, so the later handles are
stale and recomputed, as they are in a swarm. Reported: the peak RSS above the after-first-step
baseline. The design goal (issue 20): going from 4 to 16 in flight adds less than 2x the stage's
parameter bytes; the barrier design kept one full gradient copy per microbatch, i.e. K x parameter
bytes, printed beside it for comparison (computed, not run: that code is gone).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from bench.plotting import line_plot, machine_info, markdown_table, write_json

SIZES = {
    "quick": dict(d=256, layers=2, heads=4, seq=32, mb=2, micro=4, inflight=[4, 16]),
    "default": dict(d=1024, layers=4, heads=16, seq=32, mb=2, micro=4, inflight=[4, 8, 16]),
    "scale": dict(d=2048, layers=8, heads=16, seq=64, mb=4, micro=4, inflight=[4, 8, 16, 32]),
}


def rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(size: dict, inflight: int) -> dict:
    """Run in a child process: the peak RSS above the baseline with `inflight` microbatches held."""
    import torch
    from swarm.config import ModelConfig, RunConfig, TrainConfig
    from swarm.stage_worker import StageWorker
    torch.manual_seed(0)
    model = ModelConfig(d_model=size["d"], n_layers=3 * size["layers"], n_heads=size["heads"], seq_len=size["seq"],
                        n_stages=3, ratio=128 if size["d"] >= 1024 else 32)
    run = RunConfig(model=model, train=TrainConfig(batch_size=size["mb"] * size["micro"], microbatches=size["micro"]))
    w = StageWorker(run, 1)
    b = model.code_width
    code = lambda: torch.randn(size["mb"], size["seq"], b)  # noqa: E731
    grad = torch.ones(size["mb"], size["seq"], b)
    for _ in range(size["micro"]):  # one full step: gradient buffer and optimizer state exist from here on
        handle, _ = w.begin(code())
        w.finish(handle, grad)
    baseline = current_rss()
    handles = [w.begin(code())[0] for _ in range(inflight)]
    for h in handles:
        w.finish(h, grad)
    params = sum(p.numel() * p.element_size() for p in w.params)
    return {"inflight": inflight, "peak_above_baseline_bytes": max(0, rss_bytes() - baseline),
            "param_bytes": params, "recomputed": w.recomputed, "steps": w.applied_step + 1}


def measure(size: dict, inflight: int) -> dict:
    code = (f"import json, sys; from bench.stage_memory import one; "
            f"print(json.dumps(one(json.loads(sys.argv[1]), {inflight})))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(size)], capture_output=True, text=True, timeout=900)
    if res.returncode:
        raise RuntimeError(f"K={inflight} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="d=256, K in 4 and 16 (seconds)")
    g.add_argument("--scale", action="store_true", help="d=2048, up to 32 in flight (several GB of RAM)")
    p.add_argument("--json-out", default="bench/results/stage_memory.json")
    p.add_argument("--png-out", default=None, help="default: the JSON's path with .png")
    args = p.parse_args(argv)
    name = "quick" if args.quick else "scale" if args.scale else "default"
    size = SIZES[name]
    rows = [measure(size, k) for k in size["inflight"]]
    params = rows[0]["param_bytes"]
    low, high = rows[0], rows[-1]
    growth = high["peak_above_baseline_bytes"] - low["peak_above_baseline_bytes"]
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    table = markdown_table(["in flight", "peak RSS above baseline MiB", "x stage params", "recomputed", "steps",
                            "barrier design (K grad copies) MiB"],
                           [[r["inflight"], mib(r["peak_above_baseline_bytes"]),
                             f"{r['peak_above_baseline_bytes'] / params:.2f}", r["recomputed"], r["steps"],
                             mib(r["inflight"] * params)] for r in rows])
    ok = growth < 2 * params
    verdict = (f"- {low['inflight']} -> {high['inflight']} in flight adds {mib(growth)} MiB = "
               f"{growth / params:.2f}x the stage's {mib(params)} MiB of parameters (goal < 2x): "
               f"{'met' if ok else 'MISSED'}")
    print(f"\n{name}: middle stage, d={size['d']}, {size['layers']} layers, seq {size['seq']}, microbatch "
          f"{size['mb']}, a step every {size['micro']} microbatches\n\n{table}\n\n{verdict}")
    png = args.png_out or args.json_out.rsplit(".", 1)[0] + ".png"
    write_json(args.json_out, {"size": name, "config": size, "rows": rows, "growth_bytes": growth, "goal_met": ok,
                               "table": table, "verdict": verdict, "machine": machine_info(),
                               "command": " ".join(["python -m bench.stage_memory", *(argv or sys.argv[1:])])})
    ks = [r["inflight"] for r in rows]
    line_plot(png, [{"title": "stage memory vs microbatches in flight", "xlabel": "microbatches in flight",
                     "ylabel": "MiB above baseline", "series": [
                         {"label": "measured (one gradient buffer)", "x": ks,
                          "y": [r["peak_above_baseline_bytes"] / 2**20 for r in rows], "style": {"marker": "o"}},
                         {"label": "barrier design: a gradient copy per microbatch", "x": ks,
                          "y": [k * params / 2**20 for k in ks], "style": {"ls": "--"}}]}])
    print(f"\nwrote {args.json_out} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
