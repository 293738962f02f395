"""Throughput of a real swarm on rate-limited links: ResBM vs uncompressed vs the compute-bound limit.

    python -m bench.bandwidth [--quick | --scale] [--rates 1 10 100 0] [--variants ...]

Every node (bootstrap, head, each stage) runs in its own network namespace, joined through veth
pairs to a bridge; every link is shaped with `tc tbf` to R Mbit/s in both directions (0 = unshaped).
netem is not available on these machines, so latency is NOT emulated: links are rate-limited
only, with sub-millisecond delay. Traffic is head-centric (every code goes head -> stage -> head),
so the head's link carries all of it and is the bottleneck. Needs root.

For each variant and rate it measures steady-state tokens/s (the first steps are warm-up), the
wire bytes per token, and the compute-bound limit (the same staged model in one process, no
network). This CPU is ~100x slower than a GPU on these models, so a link of R Mbit/s here loads
the network like R x 100 Mbit/s would next to GPUs (the factor is printed and configurable).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.netns import NetnsLab, measure_throughput_mbit, prepare
from bench.plotting import line_plot, machine_info, markdown_table, write_json
from node.local import Swarm
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.trainer import LocalTrainer, wire_stats

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


def swarm_in_lab(run: RunConfig, rate: float, size: dict, workdir: Path) -> dict:
    """One swarm, one node per namespace; trains until `steps` or the time budget; returns the head summary."""
    n_hosts = run.model.n_stages + 1  # bootstrap, stages 1.., head
    with NetnsLab(n_hosts, rate_mbit=rate or None) as lab:
        run_dir = workdir / f"{run.run_id}-{rate:g}"
        run_dir.mkdir(parents=True)
        swarm = Swarm(run_dir, threads=1, run=run)
        wrap = lambda i: (lambda cmd: lab.exec_argv(i, cmd))  # noqa: E731
        host = lambda i: lab.hosts[i].ip  # noqa: E731
        try:
            peers = swarm.start_bootstrap(host=host(0), wrap=wrap(0))
            for k in range(1, run.model.n_stages):
                swarm.start_stage(f"stage{k}", k, peers, host=host(k), extra=["--checkpoint-dir", ""], wrap=wrap(k))
            for k in range(1, run.model.n_stages):
                swarm.wait_for_line(f"stage{k}", "serving", 180)
            h = run.model.n_stages
            head = swarm.start_head(peers, size["steps"], run_dir / "head.json", host=host(h), wrap=wrap(h),
                                    extra=["--eval-every", "0", "--checkpoint-dir", ""])
            swarm.wait_for_line("head", "training", 120)
            deadline = time.monotonic() + size["budget"]
            while head.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if head.poll() is None:
                head.send_signal(signal.SIGINT)  # finish the current step, write the summary
                head.wait(timeout=600)
        except RuntimeError as e:  # a node failed to start: report it, go on with the next run
            return {"error": str(e)[-2000:]}
        finally:
            swarm.stop()
        if not (run_dir / "head.json").exists():
            return {"error": "the head wrote no summary:\n" + (run_dir / "head.log").read_text(errors="replace")[-2000:]}
        return json.loads((run_dir / "head.json").read_text())


def steady(summary: dict, warmup: int, tokens_per_step: int) -> float:
    times = summary["step_times"][warmup:] or summary["step_times"]
    return tokens_per_step * len(times) / sum(times) if times else 0.0


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
    args = p.parse_args(argv)
    reason = prepare()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    name = "quick" if args.quick else "scale" if args.scale else "default"
    size = SIZES[name]
    rates = args.rates or size["rates"]
    variants = args.variants or size["variants"]
    corpus = ByteCorpus()
    tokens_per_step = size["batch"] * size["seq"]
    results, limits = [], {}
    shaping = {}
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
                summary = swarm_in_lab(run, rate, size, Path(args.keep or tmp))
                ws = wire_stats(run.model)
                if summary.get("error"):
                    print(f"  FAILED: {summary['error']}", file=sys.stderr)
                    results.append({"variant": variant, "rate_mbit": rate, "steps": 0, "tokens_per_s": 0.0,
                                     "wire_bytes_per_token_fwd": 0.0, "wire_bytes_per_token_bwd": 0.0,
                                     "compression_vs_bf16": ws["compression_vs_bf16"], "lost_microbatches": 0,
                                     "error": summary["error"]})
                    continue
                results.append({"variant": variant, "rate_mbit": rate, "steps": summary["steps_completed"],
                                "tokens_per_s": steady(summary, size["warmup"], tokens_per_step),
                                "wire_bytes_per_token_fwd": summary["measured_wire_bytes_per_token_fwd"],
                                "wire_bytes_per_token_bwd": summary["measured_wire_bytes_per_token_bwd"],
                                "code_bytes_per_token_fwd": summary["measured_code_bytes_per_token_fwd"],
                                "code_bytes_per_token_bwd": summary["measured_code_bytes_per_token_bwd"],
                                "compression_vs_bf16": ws["compression_vs_bf16"],
                                "lost_microbatches": summary["lost_microbatches"]})
    by = {(r["variant"], r["rate_mbit"]): r for r in results}
    rows = []
    for r in results:
        unl = by.get((r["variant"], 0.0))
        rows.append([r["variant"], f"{r['rate_mbit']:g}" if r["rate_mbit"] else "unshaped",
                     f"{r['rate_mbit'] * args.gpu_factor:g}" if r["rate_mbit"] else "-",
                     f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / limits[r['variant']]:.2f}",
                     f"{r['tokens_per_s'] / unl['tokens_per_s']:.2f}" if unl and unl["tokens_per_s"] else "-",
                     f"{r['wire_bytes_per_token_fwd'] + r['wire_bytes_per_token_bwd']:.1f}",
                     f"{r['compression_vs_bf16']:.0f}x", r["steps"]])
    table = markdown_table(["variant", "link Mbit/s", f"~GPU-equiv. Mbit/s (x{args.gpu_factor:g})", "tokens/s",
                            "vs compute-bound", "vs unshaped", "wire B/token/hop (fwd+bwd)", "vs bf16 width d",
                            "steps"], rows)
    limit_table = markdown_table(["variant", "compute-bound tokens/s (1 process, no network)"],
                                 [[v, f"{t:.0f}"] for v, t in limits.items()])
    shaping_table = markdown_table(["requested Mbit/s", "measured TCP goodput Mbit/s"],
                                   [[f"{r:g}", f"{m:.2f}"] for r, m in shaping.items()])
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
    print(f"\n{name} size: d={size['d']}, {size['layers']} layers, {size['stages']} stages, batch {size['batch']}x"
          f"{size['seq']}; links shaped with tc tbf both ways; NO latency emulation (netem unavailable)\n")
    print(table + "\n\n" + limit_table + "\n\n" + shaping_table + "\n\n" + "\n".join(verdict))
    write_json(args.json_out, {"size": name, "rates": rates, "variants": variants, "results": results,
                               "compute_bound": limits, "shaping_check": shaping, "gpu_factor": args.gpu_factor,
                               "machine": machine_info(), "table": table, "verdict": verdict,
                               "latency_emulated": False,
                               "command": " ".join(["python -m bench.bandwidth", *(argv or sys.argv[1:])])})
    shaped = sorted(r for r in rates if r)
    xs = shaped + ([max(shaped) * 10] if 0.0 in rates and shaped else [])  # unshaped drawn one decade up
    series = []
    for v in variants:
        ys = [by[(v, r)]["tokens_per_s"] for r in shaped] + ([by[(v, 0.0)]["tokens_per_s"]] if 0.0 in rates else [])
        series.append({"label": v, "x": xs[:len(ys)], "y": ys, "style": {"marker": "o"}})
        series.append({"label": f"{v} compute-bound", "x": [xs[0], xs[-1]], "y": [limits[v]] * 2,
                       "style": {"ls": ":", "lw": 0.8}})
    if xs:
        line_plot(args.png_out, [{"title": "throughput vs link rate (rightmost point: unshaped)",
                                  "xlabel": "link rate, Mbit/s (log)", "ylabel": "tokens/s", "logx": True,
                                  "logy": True, "series": series}])
    print(f"\nwrote {args.json_out} and {args.png_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
