"""The loss-per-byte frontier: which code width b and wire codec buy the lowest loss per wire byte?

Every point trains the same staged ResBM model for the same tokens on the same data and seed with
the reference trainer (`bench.convergence.train_one`, the swarm's math, wire codecs included):

    code width b in `widths`  x  codec in `codecs` (the same codec forward and for the gradients)
    plus `mixed` points: a narrow forward codec with a wider gradient codec (gradients' range differs)
    plus references: none (full width, bf16) and full-width int8 (the `int8` boundary: per-token scales)

then `none` and the two best points within the 128x byte budget (forward bytes <= 2d/128) train
again with another seed, for the spread. Bytes are per token per boundary and exact, scales included (the
per-channel codecs share their scales by the tokens of one microbatch message).

    python -m bench.frontier --jobs 3   # d=256 on a CPU, ~25 min on 2 cores shared with other work
    python -m bench.frontier --quick    # seconds (CI)
    python -m bench.frontier --scale    # GPU size (d=1024, 4 stages)
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.convergence import gap_pct, log, train_one
from bench.plotting import fmt, line_plot, machine_info, markdown_table, write_json
from node.runtime import resolve_device
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.local_trainer import wire_stats

RESULTS = Path(__file__).parent / "results"
GOAL_GAP_PCT = 5.0

PRESETS = {
    "default": {
        "model": dict(d_model=256, n_layers=2, n_heads=4, seq_len=128, n_stages=2),
        "train": dict(batch_size=16, microbatches=4, warmup_steps=20),
        "steps": 100, "eval_every": 0, "eval_batches": 32,
        "widths": [2, 4, 8, 16], "codecs": ["bf16", "int8ch", "int4ch"],
        "mixed": [(8, "int4ch", "bf16"), (8, "int4ch", "int8ch"), (4, "int8ch", "bf16"), (4, "fp8", "bf16"),
                  (8, "fp8", "bf16")],
    },
    "quick": {
        "model": dict(d_model=128, n_layers=2, n_heads=2, seq_len=32, n_stages=2),
        "train": dict(batch_size=4, microbatches=2, warmup_steps=2),
        "steps": 4, "eval_every": 0, "eval_batches": 2,
        "widths": [1, 2], "codecs": ["bf16", "int4ch"], "mixed": [(2, "int4ch", "bf16")],
    },
    "scale": {
        "model": dict(d_model=1024, n_layers=8, n_heads=16, seq_len=512, n_stages=4),
        "train": dict(batch_size=32, microbatches=4, warmup_steps=100),
        "steps": 2000, "eval_every": 500, "eval_batches": 64,
        "widths": [8, 16, 32, 64], "codecs": ["bf16", "int8ch", "int4ch"],
        "mixed": [(64, "int4ch", "bf16"), (64, "int4ch", "int8ch"), (32, "int8ch", "bf16"), (32, "fp8", "bf16")],
    },
}


class FixedValCorpus:
    """The corpus with one validation sample for every seed: repeats with another seed then differ
    in init and data order only, and their val losses compare on the same bytes."""

    def __init__(self, corpus: ByteCorpus, val_seed: int = 0):
        self.inner, self.val_seed, self.name = corpus, val_seed, corpus.name

    def batch(self, split: str, n: int, seq_len: int, seed: int, step: int, micro: int = 0):
        return self.inner.batch(split, n, seq_len, self.val_seed if split == "val" else seed, step, micro)


def point_specs(preset: dict) -> list[dict]:
    """The grid, then the references. `b` is the code width; full-width references have b = d."""
    d = preset["model"]["d_model"]
    grid = [dict(boundary="resbm", b=b, codec_fwd=c, codec_bwd=c) for b in preset["widths"] for c in preset["codecs"]]
    mixed = [dict(boundary="resbm", b=b, codec_fwd=f, codec_bwd=g) for b, f, g in preset["mixed"]]
    narrow = [s for s in grid if s["b"] < max(preset["widths"])]
    specs = [dict(boundary="none", b=d, codec_fwd="bf16", codec_bwd="bf16")] + narrow + mixed
    specs += [s for s in grid if s not in narrow] + [dict(boundary="int8", b=d, codec_fwd="int8", codec_bwd="int8")]
    return [{**s, "name": point_name(s)} for s in specs]


def point_name(spec: dict) -> str:
    codecs = spec["codec_fwd"] if spec["codec_fwd"] == spec["codec_bwd"] else f"{spec['codec_fwd']}/{spec['codec_bwd']}"
    if spec["boundary"] == "resbm":
        return f"resbm b={spec['b']} {codecs}"
    return "none" if codecs == "bf16" else f"full width {codecs}"


def run_config(preset: dict, spec: dict, seed: int, steps: int) -> RunConfig:
    d = preset["model"]["d_model"]
    model = ModelConfig(**preset["model"], boundary=spec["boundary"], ratio=d // spec["b"], codec=spec["codec_fwd"],
                        codec_bwd=spec["codec_bwd"], seed=seed)
    return RunConfig(model=model, train=TrainConfig(**preset["train"], optimizer="adamw", steps=steps),
                     run_id="bench-frontier")


def train_point(preset: dict, spec: dict, seed: int, corpus, device: str, steps: int, eval_every: int) -> dict:
    run = run_config(preset, spec, seed, steps)
    tokens = run.train.microbatch_size * run.model.seq_len  # one message = one microbatch
    wire = wire_stats(run.model, tokens)
    label = f"{spec['name']} seed {seed}"
    res = train_one(run, corpus, device, steps, eval_every, preset["eval_batches"], label)
    return {**spec, "seed": seed, "bytes_fwd": wire["wire_bytes_per_token_fwd"],
            "bytes_bwd": wire["wire_bytes_per_token_bwd"], "val_loss": res["val_loss"], "wire": wire,
            "config": run.wire_dict(), **{k: res[k] for k in ("steps", "tokens", "val_curve", "mean_step_time_s", "wall_s")}}


def add_gaps(points: list[dict]) -> None:
    """gap_vs_none_pct against the `none` run of the same seed."""
    refs = {p["seed"]: p["val_loss"] for p in points if p["boundary"] == "none" and p["codec_fwd"] == "bf16"}
    for p in points:
        p["gap_vs_none_pct"] = gap_pct(p["val_loss"], refs[p["seed"]]) if p["seed"] in refs else None


def pareto_front(points: list[dict]) -> list[dict]:
    """Points that no other point beats on both total bytes (fwd + bwd) and val loss; by bytes."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["bytes_fwd"] + p["bytes_bwd"], p["val_loss"])):
        if p["val_loss"] < best:
            front.append(p)
            best = p["val_loss"]
    return front


def budget_128x(d: int) -> float:
    return d * 2 / 128


def best_within(points: list[dict], max_fwd_bytes: float) -> dict | None:
    fits = [p for p in points if p["bytes_fwd"] <= max_fwd_bytes]
    return min(fits, key=lambda p: p["val_loss"]) if fits else None


def repeat_targets(points: list[dict], d: int) -> list[dict]:
    """The two best points within the 128x byte budget: the ordering the headline rests on."""
    fits = sorted((p for p in points if p["bytes_fwd"] <= budget_128x(d)), key=lambda p: p["val_loss"])
    return fits[:2]


def spread(first: list[dict], again: list[dict]) -> list[dict]:
    rows = []
    for p in again:
        base = next(q for q in first if q["name"] == p["name"])
        rows.append({"name": p["name"], "seeds": [base["seed"], p["seed"]], "val_loss": [base["val_loss"], p["val_loss"]],
                     "gap_vs_none_pct": [base["gap_vs_none_pct"], p["gap_vs_none_pct"]],
                     "spread": abs(p["val_loss"] - base["val_loss"])})
    return rows


def goal(points: list[dict], d: int) -> dict:
    """The issue's goal, judged from the measured points of the first seed."""
    best = best_within(points, budget_128x(d))
    resbm_128 = next((p for p in points if p["boundary"] == "resbm" and p["b"] == d // 128
                      and p["codec_fwd"] == "bf16" and p["codec_bwd"] == "bf16"), None)
    if best is None or best["gap_vs_none_pct"] is None:
        return {"met": None, "detail": "no point within the 128x byte budget was measured"}
    within = best["gap_vs_none_pct"] <= GOAL_GAP_PCT
    better = resbm_128 is not None and best is not resbm_128 and best["val_loss"] < resbm_128["val_loss"]
    vs = (f"ResBM-128x-bf16 (b={d // 128}) {resbm_128['val_loss']:.4f} ({resbm_128['gap_vs_none_pct']:+.2f}%)"
          if resbm_128 else "ResBM-128x-bf16 not measured (d/128 not in the grid)")
    return {"met": within and better, "within_gap": within, "better_than_resbm_128x_bf16": better,
            "detail": f"best <= {budget_128x(d):g} B/token fwd: {best['name']} ({fmt(best['bytes_fwd'], '.3f')} B fwd), "
                      f"val {best['val_loss']:.4f}, {best['gap_vs_none_pct']:+.2f}% vs none (goal <= {GOAL_GAP_PCT:g}%); "
                      f"vs {vs}"}


HEADERS = ["point", "b", "codec fwd/bwd", "seed", "B/token fwd", "B/token bwd", "val loss", "gap vs none (%)",
           "Pareto", "mean step (s)"]


def table_rows(points: list[dict], front: list[dict]) -> list[list]:
    on_front = {id(p) for p in front}
    return [[p["name"], p["b"], f"{p['codec_fwd']}/{p['codec_bwd']}", p["seed"], p["bytes_fwd"], p["bytes_bwd"],
             p["val_loss"], p["gap_vs_none_pct"], id(p) in on_front, p["mean_step_time_s"]] for p in points]


def render(rows: list[list]) -> str:
    return markdown_table(HEADERS, [
        [n, b, c, s, fmt(f, ".3f"), fmt(w, ".3f"), fmt(v, ".4f"), fmt(g, "+.2f"), "*" if pf else "", fmt(t, ".3f")]
        for n, b, c, s, f, w, v, g, pf, t in rows], align="lrlrrrrrcr")


def render_spread(rows: list[dict]) -> str:
    return markdown_table(["point", "seeds", "val loss", "gap vs none (%)", "spread (nats/byte)"], [
        [r["name"], "/".join(map(str, r["seeds"])), " / ".join(fmt(v, ".4f") for v in r["val_loss"]),
         " / ".join(fmt(g, "+.2f") for g in r["gap_vs_none_pct"]), fmt(r["spread"], ".4f")] for r in rows])


CODEC_STYLE = {"bf16": ("C0", "o"), "int8ch": ("C1", "s"), "int4ch": ("C2", "^"), "fp8": ("C3", "v"),
               "int8": ("C4", "D")}


def point_label(p: dict) -> str:
    if p["boundary"] != "resbm":
        return p["name"]
    return f"b={p['b']}" + ("" if p["codec_bwd"] == p["codec_fwd"] else f", grad {p['codec_bwd']}")


def plot(path, points: list[dict], front: list[dict], d: int, title: str) -> None:
    def scatter(xkey):
        series = []
        for codec, (color, marker) in CODEC_STYLE.items():
            pts = [p for p in points if p["codec_fwd"] == codec]
            if pts:
                series.append({"label": codec, "x": [xkey(p) for p in pts], "y": [p["val_loss"] for p in pts],
                               "labels": [point_label(p) for p in pts],
                               "style": {"color": color, "marker": marker, "ls": "", "ms": 6}})
        return series

    def total(p):
        return p["bytes_fwd"] + p["bytes_bwd"]
    none = next((p["val_loss"] for p in points if p["name"] == "none"), None)
    front_series = {"label": "Pareto front", "x": [total(p) for p in front], "y": [p["val_loss"] for p in front],
                    "style": {"color": "k", "lw": 1, "ls": "--", "drawstyle": "steps-post"}}
    panels = [
        {"title": "val loss vs wire bytes (fwd + bwd)", "xlabel": "bytes per token per boundary, fwd + bwd",
         "ylabel": "val loss (nats/byte)", "logx": True, "hline": none, "series": scatter(total) + [front_series]},
        {"title": f"val loss vs forward bytes (128x budget = {budget_128x(d):g} B)",
         "xlabel": "bytes per token per boundary, forward", "ylabel": "val loss (nats/byte)", "logx": True,
         "hline": none, "vline": budget_128x(d), "series": scatter(lambda p: p["bytes_fwd"])},
    ]
    line_plot(path, panels, title=title)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.frontier", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny CI-sized run (seconds)")
    size.add_argument("--scale", action="store_true", help="GPU-sized run (d=1024, 4 stages)")
    p.add_argument("--steps", type=int, default=None, help="steps per point (overrides the preset)")
    p.add_argument("--repeat-seed", type=int, default=1, help="seed of the repeated runs (-1: no repeats)")
    p.add_argument("--jobs", type=int, default=1, help="points trained at once, each in a single-threaded "
                   "worker process (CPU only)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:i] (default: cpu, auto for --scale)")
    p.add_argument("--data", default=None, help="text file or folder (default: Python stdlib sources)")
    p.add_argument("--json-out", default=str(RESULTS / "frontier.json"))
    p.add_argument("--png-out", default=str(RESULTS / "frontier.png"))
    return p.parse_args(argv)


def _train_task(task: tuple) -> dict:
    return train_point(*task)


def _worker_init() -> None:
    """Single-threaded (N such workers share a few cores better than N x all threads), and dies with
    the benchmark: a pool's workers otherwise outlive a killed parent and go on training."""
    torch.set_num_threads(1)
    if sys.platform == "linux":
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_points(tasks: list[tuple], jobs: int) -> list[dict]:
    """Train each (preset, spec, seed, corpus, device, steps, eval_every) task; in `jobs` forked
    single-threaded workers when jobs > 1. Results come back in task order."""
    for i, task in enumerate(tasks):
        log(f"[{i + 1}/{len(tasks)}] {task[1]['name']} seed {task[2]}")
    if jobs <= 1:
        return [_train_task(t) for t in tasks]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
        return list(pool.map(_train_task, tasks))


def measure(preset: dict, corpus, device: str, steps: int, eval_every: int, repeat_seed: int, jobs: int) -> tuple:
    common = (corpus, device, steps, eval_every)
    points = run_points([(preset, spec, 0, *common) for spec in point_specs(preset)], jobs)
    add_gaps(points)
    again = []
    if repeat_seed >= 0:
        d = preset["model"]["d_model"]
        ref = next(s for s in point_specs(preset) if s["name"] == "none")
        specs = [ref] + [{k: p[k] for k in ("boundary", "b", "codec_fwd", "codec_bwd", "name")}
                         for p in repeat_targets(points, d)]
        again = run_points([(preset, spec, repeat_seed, *common) for spec in specs], jobs)
        add_gaps(again)
    return points, again


def main(argv=None) -> int:
    args = parse_args(argv)
    name = "quick" if args.quick else "scale" if args.scale else "default"
    preset = copy.deepcopy(PRESETS[name])
    device = resolve_device(args.device or ("auto" if args.scale else "cpu"))
    steps = args.steps if args.steps is not None else preset["steps"]
    if steps < 1 or args.jobs < 1:
        raise SystemExit("error: --steps and --jobs must be >= 1")
    if device.type == "cuda" and args.jobs > 1:
        raise SystemExit("error: --jobs forks CPU workers; on a GPU run the points one by one (--jobs 1)")
    t0 = time.perf_counter()
    corpus = FixedValCorpus(ByteCorpus(args.data))
    d = preset["model"]["d_model"]
    log(f"bench.frontier ({name}): d={d}, {len(point_specs(preset))} points x {steps} steps, device {device}, "
        f"data {corpus.name}")
    points, again = measure(preset, corpus, str(device), steps, preset["eval_every"], args.repeat_seed, args.jobs)
    wall = time.perf_counter() - t0

    front = pareto_front(points)
    best = best_within(points, budget_128x(d))
    judged = goal(points, d)
    spreads = spread(points, again)
    rows = table_rows(points, front)
    m, t = preset["model"], preset["train"]
    print(f"## Loss-per-byte frontier: d={d}, {m['n_layers']} layers, {m['n_stages']} stages, seq {m['seq_len']}, "
          f"batch {t['batch_size']} ({t['microbatches']} microbatches of {t['batch_size'] // t['microbatches']} "
          f"sequences = one message), AdamW, {steps} steps = {points[0]['tokens']} tokens per point, "
          f"{corpus.name}, device {device}\n")
    print(render(rows) + "\n")
    if spreads:
        print("Repeats with another seed (init and data order change; same validation sample):\n")
        print(render_spread(spreads) + "\n")
    word = {True: "MET", False: "MISSED", None: "NOT JUDGED"}[judged["met"]]
    print(f"- Goal (<= {budget_128x(d):g} B/token fwd, within {GOAL_GAP_PCT:g}% of none, better than "
          f"ResBM-128x-bf16): **{word}** — {judged['detail']}")
    print(f"\nwall time {wall:.0f} s")

    plot(args.png_out, points, front, d, f"bench.frontier ({name}): d={d}, {steps} steps, AdamW")
    keys = ("b", "codec_fwd", "codec_bwd", "bytes_fwd", "bytes_bwd", "val_loss", "gap_vs_none_pct")
    write_json(args.json_out, {
        "benchmark": "frontier", "preset": name,
        "command": shlex.join([sys.executable, "-m", "bench.frontier", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(device), "jobs": args.jobs, "data": corpus.name, "settings": {**preset, "steps": steps},
        "wall_time_s": wall,
        "points": [{k: p[k] for k in keys} | {"name": p["name"], "seed": p["seed"]} for p in points],
        "best_at_128x_bytes": best and {k: best[k] for k in keys} | {"name": best["name"]},
        "pareto_front": [p["name"] for p in front], "repeats": spreads, "goal": judged,
        "runs": points + again, "table": {"headers": HEADERS, "rows": rows, "markdown": render(rows)},
    })
    log(f"wrote {args.json_out} and {args.png_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
