"""What the swarm costs over the single-process reference, on this machine.

    python -m bench.swarm_overhead [--quick | --scale] [--steps N]

1. tokens/s of `train-local` (one process, all stages) vs `resbm-node local` (S processes on
   loopback, 1 replica each) for the same model, steady state (the first steps are warm-up);
2. the per-hop RPC overhead: round-trip time of an `info` call, and a stage `forward` over
   libp2p minus the same forward computed locally;
3. bytes on boundary 0 (the trainer is stage 0; its only data hop is trainer -> stage 1, one nested
   `train` call per microbatch carrying the code out and its gradient back): codec bytes and whole
   messages per token as the trainer counts them, and the kernel's count of the trainer's p2pd TCP
   sockets (TLS, yamux, p2p daemon framing, DHT traffic and the step's control calls included).
Writes a markdown table, JSON and a PNG (tokens/s per step, both runs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.plotting import line_plot, machine_info, markdown_table, steady_part, steady_tokens_per_s, write_json
from bench.wirecount import SocketCounter, find_pids
from bench.inproc import InprocSwarm
from protocol.codec import encode, payload_nbytes
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.local_trainer import LocalTrainer

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "quick": dict(d_model=64, ratio=16, n_layers=4, n_heads=2, seq_len=32, batch=4, micro=2, steps=12, warmup=4),
    "default": dict(d_model=256, ratio=128, n_layers=4, n_heads=4, seq_len=128, batch=16, micro=4, steps=60, warmup=10),
    "scale": dict(d_model=1024, ratio=128, n_layers=8, n_heads=16, seq_len=512, batch=32, micro=8, steps=100, warmup=10),
}


def run_config(size: dict, stages: int) -> RunConfig:
    model = ModelConfig(d_model=size["d_model"], n_layers=size["n_layers"], n_heads=size["n_heads"],
                        seq_len=size["seq_len"], n_stages=stages, ratio=size["ratio"])
    return RunConfig(model=model, train=TrainConfig(batch_size=size["batch"], microbatches=size["micro"]))


def reference(run: RunConfig, steps: int, corpus) -> list[float]:
    trainer = LocalTrainer(run, corpus)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return times


def local_swarm(size: dict, stages: int, steps: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.json"
        argv = [sys.executable, "-m", "node.cli", "local", "--stages", str(stages), "--steps", str(steps),
                "--d-model", str(size["d_model"]), "--ratio", str(size["ratio"]), "--layers", str(size["n_layers"]), "--heads", str(size["n_heads"]),
                "--seq-len", str(size["seq_len"]), "--batch-size", str(size["batch"]),
                "--microbatches", str(size["micro"]), "--eval-every", "0", "--run-dir", str(Path(tmp) / "run"),
                "--json-out", str(out)]
        identity = str(Path(tmp) / "run" / "trainer0.id")
        trainer_p2pd = lambda: [p for p in find_pids(identity) if _is_p2pd(p)]  # noqa: E731
        with SocketCounter(trainer_p2pd) as kernel:
            res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"local swarm failed:\n{res.stderr[-3000:]}")
        return {**json.loads(out.read_text()), "trainer_kernel_bytes": kernel.sent + kernel.received}


def _is_p2pd(pid: int) -> bool:
    try:
        return "p2pd" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return False


def wire_table(swarm: dict) -> tuple[str, dict]:
    trainer = next(n for n in swarm["nodes"] if n["peer_id"] == swarm["peer_id"])
    ours = trainer["bytes_sent"] + trainer["bytes_received"]
    figures = {"code_fwd": swarm["measured_code_bytes_per_token_fwd"], "code_bwd": swarm["measured_code_bytes_per_token_bwd"],
               "wire_fwd": swarm["measured_wire_bytes_per_token_fwd"], "wire_bwd": swarm["measured_wire_bytes_per_token_bwd"],
               "trainer_message_bytes": ours, "trainer_kernel_bytes": swarm["trainer_kernel_bytes"],
               "kernel_over_messages": swarm["trainer_kernel_bytes"] / ours if ours else 0.0,
               "compression_vs_bf16": swarm["measured_compression_vs_bf16"]}
    table = markdown_table(["bytes (trainer side, boundary 0)", "value"], [
        ["codec bytes per token per hop, fwd / bwd", f"{figures['code_fwd']:.2f} / {figures['code_bwd']:.2f}"],
        ["whole messages per token per hop, fwd / bwd", f"{figures['wire_fwd']:.2f} / {figures['wire_bwd']:.2f}"],
        ["measured compression vs bf16 at width d (messages)", f"{figures['compression_vs_bf16']:.0f}x"],
        ["trainer's TCP bytes (kernel) / its message bytes", f"{figures['kernel_over_messages']:.2f}"],
    ])
    return table, figures


async def hop_overhead(run: RunConfig, corpus, repeats: int) -> dict:
    """RTT of `info`, and forward-over-libp2p minus local forward, on a middle stage."""
    async with InprocSwarm(run, corpus) as sw:
        server = sw.servers[1][0]
        client, peer = sw.trainers[0].hop.client, server.peer_id
        info_rtt = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            await client.info(peer, 1, timeout=30)
            info_rtt.append(time.perf_counter() - t0)
        b, t = run.train.microbatch_size, run.model.seq_len
        x = torch.randn(b, t, run.model.code_width)
        msg = encode(x, run.model.wire_codec)
        remote, local = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            await client.call(peer, 1, "forward", x=msg, timeout=60)
            remote.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            server.worker.evaluate(x)
            local.append(time.perf_counter() - t0)
    med = statistics.median
    return {"info_rtt_ms": 1e3 * med(info_rtt), "forward_remote_ms": 1e3 * med(remote),
            "forward_local_ms": 1e3 * med(local), "forward_overhead_ms": 1e3 * (med(remote) - med(local)),
            "code_bytes": payload_nbytes(msg)}


def hop_markdown(hop: dict) -> str:
    return markdown_table(["per-hop measure", "ms"],
                          [["info round trip (rpc_info)", f"{hop['info_rtt_ms']:.2f}"],
                           ["stage forward over libp2p", f"{hop['forward_remote_ms']:.2f}"],
                           ["same forward computed locally", f"{hop['forward_local_ms']:.2f}"],
                           ["overhead per hop (difference)", f"{hop['forward_overhead_ms']:.2f}"]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny model, seconds (CI)")
    g.add_argument("--scale", action="store_true", help="GPU-sized model (d=1024, 8 layers) for bigger machines")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", default="bench/results/swarm_overhead.json")
    p.add_argument("--png-out", default="bench/results/swarm_overhead.png")
    args = p.parse_args(argv)
    name = "quick" if args.quick else "scale" if args.scale else "default"
    size = dict(SIZES[name])
    steps = args.steps or size["steps"]
    run = run_config(size, args.stages)
    corpus = ByteCorpus()
    tokens_per_step = size["batch"] * size["seq_len"]
    threads = torch.get_num_threads()

    print(f"[1/3] train-local, {steps} steps ({threads} torch threads)", file=sys.stderr)
    ref_times = reference(run, steps, corpus)
    print(f"[2/3] resbm-node local, {args.stages} stages x 1 replica, {steps} steps", file=sys.stderr)
    swarm = local_swarm(size, args.stages, steps, args.device)
    print("[3/3] per-hop RPC overhead", file=sys.stderr)
    hop = asyncio.run(hop_overhead(run, corpus, repeats=20 if args.quick else 50))

    ref_tps = steady_tokens_per_s(ref_times, size["warmup"], tokens_per_step)
    swarm_tps = steady_tokens_per_s(swarm["step_times"], size["warmup"], tokens_per_step)
    hops_per_step = (args.stages - 1) * size["micro"]  # one nested `train` call (code out, gradient back) per boundary
    rows = [["train-local (1 process)", f"{ref_tps:.0f}", "1.00",
             f"{statistics.median(steady_part(ref_times, size['warmup'])):.3f}"],
            [f"local swarm ({args.stages} processes)", f"{swarm_tps:.0f}", f"{swarm_tps / ref_tps:.2f}",
             f"{statistics.median(steady_part(swarm['step_times'], size['warmup'])):.3f}"]]
    table = markdown_table(["run", "tokens/s (steady)", "vs train-local", "median step s"], rows)
    hop_table = hop_markdown(hop)
    cfg = run.model
    print(f"\nModel d={cfg.d_model}, {cfg.n_layers} layers, {args.stages} stages, batch {size['batch']}x{cfg.seq_len} "
          f"in {size['micro']} microbatches, boundary resbm b={cfg.code_width}, {os.cpu_count()} CPU cores, "
          f"{hops_per_step} RPC hops per step\n")
    bytes_table, wire = wire_table(swarm)
    print(table + "\n\n" + hop_table + "\n\n" + bytes_table)
    result = {"size": name, "steps": steps, "stages": args.stages, "config": run.wire_dict(),
              "machine": machine_info(args.device), "train_local": {"tokens_per_s": ref_tps, "step_times": ref_times},
              "local_swarm": {"tokens_per_s": swarm_tps, "step_times": swarm["step_times"],
                              "measured_wire_bytes_per_token_fwd": swarm["measured_wire_bytes_per_token_fwd"],
                              "nodes": swarm["nodes"]},
              "ratio": swarm_tps / ref_tps, "hop": hop, "hops_per_step": hops_per_step, "wire": wire,
              "table": table, "hop_table": hop_table, "bytes_table": bytes_table,
              "command": " ".join(["python -m bench.swarm_overhead", *(argv or sys.argv[1:])])}
    write_json(args.json_out, result)
    line_plot(args.png_out, [{
        "title": "tokens/s per step", "xlabel": "step", "ylabel": "tokens/s",
        "series": [{"label": "train-local", "x": list(range(1, steps + 1)), "y": [tokens_per_step / t for t in ref_times]},
                   {"label": f"local swarm ({args.stages} proc.)", "x": list(range(1, len(swarm["step_times"]) + 1)),
                    "y": [tokens_per_step / t for t in swarm["step_times"]]}]}])
    print(f"\nwrote {args.json_out} and {args.png_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
