"""Throughput of a real swarm on rate-limited links: ResBM vs uncompressed vs the compute-bound limit.

    python -m bench.bandwidth [--quick | --scale] [--rates 1 10 100 0] [--variants ...]

Every node (bootstrap, the trainer = stage 0, each later stage) runs in its own network namespace,
joined through veth pairs to a bridge; every link is shaped with `tc tbf` to R Mbit/s in both
directions (0 = unshaped). netem is not available on these machines, so latency is NOT emulated:
links are rate-limited only, with sub-millisecond delay. Codes walk the route neighbour to
neighbour (trainer -> stage 1 -> ... -> tail, gradients back the same way), so a middle stage's
link carries the most: codes and gradients both ways. Needs root.

For each variant and rate it measures steady-state tokens/s (the first steps are warm-up), the
wire bytes per token, and the compute-bound limit (the same staged model in one process, no
network). This CPU is ~100x slower than a GPU on these models, so a link of R Mbit/s here loads
the network like R x 100 Mbit/s would next to GPUs (the factor is printed and configurable).
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.netns import CONGESTION, NetnsLab, measure_throughput_mbit, prepare
from bench.plotting import line_plot, machine_info, markdown_table, steady_tokens_per_s, write_json
from node.runtime import identity_peer_id
from node.local_swarm import Swarm, tail
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.local_trainer import LocalTrainer, wire_stats

VARIANTS = {  # name -> (boundary, codec)
    "resbm-128x": ("resbm", "bf16"),
    "resbm-128x+int8": ("resbm", "int8"),
    "int8-full": ("int8", "bf16"),
    "none": ("none", "bf16"),
}
SIZES = {
    "quick": dict(d=64, ratio=16, layers=3, heads=2, seq=32, batch=4, micro=2, stages=3, steps=6, warmup=2,
                  budget=40, rates=[10.0], variants=["resbm-128x", "none"]),
    "default": dict(d=256, ratio=128, layers=3, heads=4, seq=64, batch=8, micro=4, stages=3, steps=30, warmup=3,
                    budget=60, rates=[1.0, 10.0, 100.0, 0.0], variants=list(VARIANTS)),
    "scale": dict(d=1024, ratio=128, layers=6, heads=16, seq=256, batch=16, micro=4, stages=3, steps=40, warmup=3,
                  budget=240, rates=[1.0, 10.0, 100.0, 1000.0, 0.0], variants=list(VARIANTS)),
}


def run_config(size: dict, variant: str) -> RunConfig:
    boundary, codec = VARIANTS[variant]
    model = ModelConfig(d_model=size["d"], n_layers=size["layers"], n_heads=size["heads"], seq_len=size["seq"],
                        n_stages=size["stages"], ratio=size["ratio"], boundary=boundary, codec=codec)
    return RunConfig(model=model, train=TrainConfig(batch_size=size["batch"], microbatches=size["micro"]),
                     run_id=f"bw-{variant}")


def compute_bound(run: RunConfig, corpus, steps: int, warmup: int) -> float:
    """Best tokens/s of the staged model in one process, with 1 thread or all cores (on a busy
    machine OpenMP's spinning threads can make 'all cores' the slower one)."""
    best = 0.0
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        trainer = LocalTrainer(run, corpus)
        for _ in range(warmup):
            trainer.train_step()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        best = max(best, steps * run.train.batch_size * run.model.seq_len / (time.perf_counter() - t0))
    torch.set_num_threads(default_threads)
    return best


def lab_hosts(n_stages: int, per_stage: int) -> list[tuple[str, int]]:
    """(node name, stage) for every namespace after the bootstrap's (host 0): trainers, then stages."""
    return [(f"trainer{r}", 0) for r in range(per_stage)] + \
        [(f"stage{k}-{r}", k) for k in range(1, n_stages) for r in range(per_stage)]


def swarm_in_lab(run: RunConfig, rate: float, workdir: Path, steps: int, budget: float, per_stage: int = 1,
                 node_args: tuple = (), rtt_ms: float = 0.0, queue_ms: float = 50.0,
                 congestion: str | None = CONGESTION) -> dict:
    """One swarm on the route, every node (bootstrap, `per_stage` trainers, `per_stage` replicas of every
    later stage) in its own namespace; trains `steps` steps or until the time budget; `node_args` go to
    every join; `rtt_ms` > 0 adds that round-trip time between every two nodes (NetnsLab's delay line);
    `queue_ms`: how many ms of its rate each tbf queues (NetnsLab's latency_ms); `congestion`: the
    hosts' TCP congestion control (NetnsLab's).
    Returns the trainers' summaries, each node's peer id, its link's bytes while training
    (`iface`) and the machine's CPU busy share meanwhile (`cpu_busy`), or `error`."""
    hosts = lab_hosts(run.model.n_stages, per_stage)
    run_dir = workdir / f"{run.run_id}-{rate:g}-{per_stage}"
    run_dir.mkdir(parents=True)
    ids = {name: identity_peer_id(str(run_dir / f"{name}.id")) for name, _ in hosts}
    run = replace(run, train=replace(run.train, trainers=tuple(ids[f"trainer{r}"] for r in range(per_stage))))
    with NetnsLab(len(hosts) + 1, rate_mbit=rate or None, rtt_ms=rtt_ms, latency_ms=queue_ms, count_peers=True,
                   congestion=congestion) as lab:
        swarm = Swarm(run_dir, threads=1, run=run)
        wrap = lambda i: (lambda cmd: lab.exec_argv(i, cmd))  # noqa: E731
        try:
            peers = swarm.start_bootstrap(host=lab.hosts[0].ip, wrap=wrap(0))
            for i, (name, stage) in enumerate(hosts, 1):
                if stage:
                    swarm.start_stage(name, stage, peers, host=lab.hosts[i].ip, wrap=wrap(i),
                                      extra=["--checkpoint-dir", "", *node_args])
            for name, stage in hosts:
                if stage:
                    swarm.wait_for_line(name, "serving", 180)
            trainers = [swarm.start_trainer(r, peers, steps, host=lab.hosts[r + 1].ip, wrap=wrap(r + 1),
                                            extra=["--eval-every", "0", "--checkpoint-dir", "", *node_args])
                        for r in range(per_stage)]
            for r in range(per_stage):
                swarm.wait_for_line(f"trainer{r}", "training", 180)
            before, cpu_before, peers_before = _link_counters(lab), cpu_jiffies(), _peer_counters(lab)
            _train_until(trainers, budget)
            after, cpu_after, peers_after = _link_counters(lab), cpu_jiffies(), _peer_counters(lab)
        except RuntimeError as e:  # a node failed to start: report it, go on with the next run
            return {"error": str(e)[-2000:]}
        finally:
            swarm.stop()
    summaries = [json.loads(f.read_text()) for r in range(per_stage) if (f := run_dir / f"trainer{r}.json").exists()]
    if not summaries:
        return {"error": "no trainer wrote a summary:\n" + tail(run_dir / "trainer0.log")}
    iface = {ids[name]: after[i] - before[i] for i, (name, _) in enumerate(hosts, 1)}
    busy, total = (a - b for a, b in zip(cpu_after, cpu_before))
    names = ["bootstrap"] + [name for name, _ in hosts]
    return {"summaries": summaries, "names": {v: k for k, v in ids.items()}, "iface": iface,
            "cpu_busy": busy / total if total else 0.0,
            "peer_bytes": {names[i]: {names[j]: {k: c[k] - peers_before[i][j][k] for k in c}
                                      for j, c in peers_after[i].items()} for i in range(len(names))},
            "stage_of": dict(hosts)}


def _link_counters(lab: NetnsLab) -> list[int]:
    return [lab.link_bytes(i) for i in range(len(lab.hosts))]


def _peer_counters(lab: NetnsLab) -> list[dict]:
    """Every host's bytes sent to and received from each other host so far."""
    return [lab.peer_bytes(i) for i in range(len(lab.hosts))]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far (/proc/stat): a lab run whose cores were
    nearly always busy was bound by them, whatever its links allowed."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _train_until(trainers: list, budget: float) -> None:
    """Wait for the trainers to finish; past the budget, SIGTERM them (finish the step, write the summary).
    Not SIGINT: a node started from a background job inherits SIGINT ignored (bench/churn.py likewise)."""
    deadline = time.monotonic() + budget
    while any(p.poll() is None for p in trainers) and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in trainers:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in trainers:
        try:
            p.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pass


def parse_bench_args(p: argparse.ArgumentParser, argv, sizes: dict):
    """(args, size name, size); size None (after saying why) when no shaped lab can be built here."""
    args = p.parse_args(argv)
    reason = prepare()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return args, None, None
    name = "quick" if args.quick else "scale" if args.scale else "default"
    return args, name, sizes[name]


def measure(size: dict, rates: list[float], variants: list[str], keep: str | None) -> tuple[list, dict, dict]:
    """Every (variant, rate) swarm in the lab: (result rows, compute-bound tokens/s per variant,
    measured TCP goodput per shaped rate)."""
    corpus = ByteCorpus()
    results, limits, shaping = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for rate in rates:
            if rate:
                with NetnsLab(2, rate_mbit=rate) as lab:
                    shaping[rate] = measure_throughput_mbit(lab, 0, 1, seconds=2.0)
        for variant in variants:
            run = run_config(size, variant)
            limits[variant] = compute_bound(run, corpus, steps=max(3, size["steps"] // 3), warmup=2)
            for rate in rates:
                label = f"{rate:g} Mbit/s" if rate else "unshaped"
                print(f"[{variant} @ {label}]", file=sys.stderr, flush=True)
                res = swarm_in_lab(run, rate, Path(keep or tmp), size["steps"], size["budget"])
                results.append(result_row(variant, rate, run, size, res["summaries"][0] if "summaries" in res else res))
    return results, limits, shaping


def result_row(variant: str, rate: float, run: RunConfig, size: dict, summary: dict) -> dict:
    """One swarm's figures from its trainer's summary (or its error)."""
    ws = wire_stats(run.model)
    row = {"variant": variant, "rate_mbit": rate, "compression_vs_bf16": ws["compression_vs_bf16"]}
    if summary.get("error"):
        print(f"  FAILED: {summary['error']}", file=sys.stderr)
        return {**row, "steps": 0, "tokens_per_s": 0.0, "wire_bytes_per_token_fwd": 0.0,
                "wire_bytes_per_token_bwd": 0.0, "skipped_microbatches": 0, "error": summary["error"]}
    return {**row, "steps": summary["steps_completed"],
            "tokens_per_s": steady_tokens_per_s(summary["step_times"], size["warmup"], size["batch"] * size["seq"]),
            **{k: summary[f"measured_{k}"] for k in ("wire_bytes_per_token_fwd", "wire_bytes_per_token_bwd",
                                                      "code_bytes_per_token_fwd", "code_bytes_per_token_bwd")},
            "skipped_microbatches": summary["skipped_microbatches"]}


def tables(results: list, limits: dict, shaping: dict, gpu_factor: float) -> tuple[str, str, str]:
    """(throughput table, compute-bound table, shaping check table), markdown."""
    by = {(r["variant"], r["rate_mbit"]): r for r in results}
    rows = []
    for r in results:
        unl = by.get((r["variant"], 0.0))
        rows.append([r["variant"], f"{r['rate_mbit']:g}" if r["rate_mbit"] else "unshaped",
                     f"{r['rate_mbit'] * gpu_factor:g}" if r["rate_mbit"] else "-",
                     f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / limits[r['variant']]:.2f}",
                     f"{r['tokens_per_s'] / unl['tokens_per_s']:.2f}" if unl and unl["tokens_per_s"] else "-",
                     f"{r['wire_bytes_per_token_fwd'] + r['wire_bytes_per_token_bwd']:.1f}",
                     f"{r['compression_vs_bf16']:.0f}x", r["steps"]])
    table = markdown_table(["variant", "link Mbit/s", f"~GPU-equiv. Mbit/s (x{gpu_factor:g})", "tokens/s",
                            "vs compute-bound", "vs unshaped", "wire B/token/hop (fwd+bwd)", "vs bf16 width d",
                            "steps"], rows)
    limit_table = markdown_table(["variant", "compute-bound tokens/s (1 process, no network)"],
                                 [[v, f"{t:.0f}"] for v, t in limits.items()])
    shaping_table = markdown_table(["requested Mbit/s", "measured TCP goodput Mbit/s"],
                                   [[f"{r:g}", f"{m:.2f}"] for r, m in shaping.items()])
    return table, limit_table, shaping_table


def verdicts(results: list, rates: list[float]) -> list[str]:
    by = {(r["variant"], r["rate_mbit"]): r for r in results}
    verdict = []
    low = min(r for r in rates if r) if any(rates) else None
    res10, unl = by.get(("resbm-128x", 10.0)), by.get(("resbm-128x", 0.0))
    if res10 and unl and unl["tokens_per_s"]:
        keep = res10["tokens_per_s"] / unl["tokens_per_s"]
        verdict.append(f"- ResBM-128x at 10 Mbit/s keeps {keep:.0%} of its unshaped throughput (goal >= 90%): "
                       f"{'met' if keep >= 0.9 else 'MISSED'}")
    rl, nl = by.get(("resbm-128x", low)), by.get(("none", low))
    if rl and nl:
        speedup = rl["tokens_per_s"] / nl["tokens_per_s"] if nl["tokens_per_s"] else float("inf")
        verdict.append(f"- ResBM-128x vs none at {low:g} Mbit/s: {speedup:.1f}x faster (goal >= 10x): "
                       f"{'met' if speedup >= 10 else 'MISSED'}")
    return verdict


def plot(path: str, results: list, limits: dict, rates: list[float], variants: list[str]) -> None:
    by = {(r["variant"], r["rate_mbit"]): r for r in results}
    shaped = sorted(r for r in rates if r)
    xs = shaped + ([max(shaped) * 10] if 0.0 in rates and shaped else [])  # unshaped drawn one decade up
    if not xs:
        return
    series = []
    for v in variants:
        ys = [by[(v, r)]["tokens_per_s"] for r in shaped] + ([by[(v, 0.0)]["tokens_per_s"]] if 0.0 in rates else [])
        series.append({"label": v, "x": xs[:len(ys)], "y": ys, "style": {"marker": "o"}})
        series.append({"label": f"{v} compute-bound", "x": [xs[0], xs[-1]], "y": [limits[v]] * 2,
                       "style": {"ls": ":", "lw": 0.8}})
    line_plot(path, [{"title": "throughput vs link rate (rightmost point: unshaped)",
                      "xlabel": "link rate, Mbit/s (log)", "ylabel": "tokens/s", "logx": True,
                      "logy": True, "series": series}])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="one rate, two variants, a few steps (CI)")
    g.add_argument("--scale", action="store_true", help="GPU-sized model (d=1024) for bigger machines")
    p.add_argument("--rates", type=float, nargs="+", default=None, help="link rates in Mbit/s; 0 = unshaped")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    p.add_argument("--gpu-factor", type=float, default=100.0,
                   help="assumed GPU/CPU compute speed ratio used to map link rates to a GPU deployment")
    p.add_argument("--keep", default=None, help="keep the nodes' logs in this folder")
    p.add_argument("--json-out", default="bench/results/bandwidth.json")
    p.add_argument("--png-out", default="bench/results/bandwidth.png")
    args, name, size = parse_bench_args(p, argv, SIZES)
    if size is None:
        return 2
    rates = args.rates or size["rates"]
    variants = args.variants or size["variants"]
    results, limits, shaping = measure(size, rates, variants, args.keep)
    table, limit_table, shaping_table = tables(results, limits, shaping, args.gpu_factor)
    verdict = verdicts(results, rates)
    print(f"\n{name} size: d={size['d']}, {size['layers']} layers, {size['stages']} stages, batch {size['batch']}x"
          f"{size['seq']}; links shaped with tc tbf both ways; NO latency emulation (netem unavailable)\n")
    print(table + "\n\n" + limit_table + "\n\n" + shaping_table + "\n\n" + "\n".join(verdict))
    write_json(args.json_out, {"size": name, "rates": rates, "variants": variants, "results": results,
                               "compute_bound": limits, "shaping_check": shaping, "gpu_factor": args.gpu_factor,
                               "machine": machine_info(), "table": table, "verdict": verdict,
                               "latency_emulated": False,
                               "command": " ".join(["python -m bench.bandwidth", *(argv or sys.argv[1:])])})
    plot(args.png_out, results, limits, rates, variants)
    print(f"\nwrote {args.json_out} and {args.png_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
