"""A stage served on CUDA next to a CPU replica of the same stage: gradient parity, Muon state handed
over both ways, tokens/s, and peak GPU memory against swarm/memory.py's estimate.

    python -m bench.gpu_check [--size tiny|default] [--json-out bench/results/gpu_check.json]

For each CUDA precision (fp32, bf16 where the GPU has it, fp16 with its loss scaler, bf16 with
activation checkpointing) one middle-stage microbatch's parameter gradients are compared with the
CPU fp32 replica's (relative L2 error of the worst tensor, against TOLERANCE), then the stage's
tokens/s (forward + backward + a step every M) and its peak memory while it holds M + 1 forward
graphs. A CPU replica's state (after a step) is loaded on the GPU and the reverse, both step on the
same microbatches, and their weights are compared. Without CUDA it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import io
import sys
import time

import torch

from bench.plotting import fmt, machine_info, markdown_table, write_json
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.memory import stage_memory_bytes
from swarm.precision import DTYPES, native_bf16
from swarm.stage_worker import StageWorker

SIZES = {
    "tiny": dict(d=64, layers=2, heads=2, seq=32, mb=2, micro=2, timed=4),
    "default": dict(d=1024, layers=4, heads=16, seq=256, mb=4, micro=4, timed=16),
}
# Worst tensor's ||g - g_cpu|| / ||g_cpu|| for one microbatch. bf16/fp16 keep 8/11 mantissa bits
# (rounding ~4e-3/5e-4 per op), compounded over a few layers' matmuls and the backward.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 2e-2}
# After the handover both replicas hold the same weights and take one step on the same microbatches:
# ||w_dst - w_src|| / ||the step's update||, from bf16 autocast and bf16 Newton-Schulz on the GPU side.
HANDOVER_TOLERANCE = 0.1


def make_run(size: dict) -> RunConfig:
    model = ModelConfig(d_model=size["d"], n_layers=3 * size["layers"], n_heads=size["heads"], seq_len=size["seq"],
                        n_stages=3, ratio=32 if size["d"] >= 256 else 8)
    return RunConfig(model=model, train=TrainConfig(batch_size=size["mb"] * size["micro"],
                                                    microbatches=size["micro"], optimizer="muon"))


def microbatch(run: RunConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A middle stage's input code and the gradient arriving at its output (CPU, seeded)."""
    g = torch.Generator().manual_seed(seed)
    shape = (run.train.microbatch_size, run.model.seq_len, run.model.code_width)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 1e-3


def walk(worker: StageWorker, x: torch.Tensor, grad: torch.Tensor):
    handle, _ = worker.begin(x.to(worker.device))
    return worker.finish(handle, grad.to(worker.device))[0]


def gradients(worker: StageWorker, run: RunConfig) -> list[torch.Tensor]:
    """Parameter gradients and input gradient of microbatch 0, on the CPU in fp32."""
    grad_in = walk(worker, *microbatch(run, 0))
    return [t.float().cpu().clone() for t in [*(p.grad for p in worker.params), grad_in]]  # clone: .cpu() may alias


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(got, want))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def tokens_per_s(worker: StageWorker, run: RunConfig, n: int) -> float:
    walk(worker, *microbatch(run, 1))  # warm-up: kernels, allocator
    sync(worker.device)
    t0 = time.perf_counter()
    for i in range(n):
        walk(worker, *microbatch(run, 2 + i))
    sync(worker.device)
    return n * run.train.microbatch_size * run.model.seq_len / (time.perf_counter() - t0)


def peak_bytes(worker: StageWorker, run: RunConfig, base: int) -> int:
    """Peak CUDA memory above `base` (before the worker existed) while M + 1 forwards are held, then
    their backwards (the stage server's worst case)."""
    torch.cuda.reset_peak_memory_stats(worker.device)
    n = run.train.microbatches + 1
    handles = [worker.begin(microbatch(run, 100 + i)[0].to(worker.device))[0] for i in range(n)]
    for i, h in enumerate(handles):
        worker.finish(h, microbatch(run, 100 + i)[1].to(worker.device))
    return torch.cuda.max_memory_allocated(worker.device) - base


def variants(device) -> list[tuple[str, bool]]:
    """(precision, activation checkpointing) pairs to check on the device."""
    if device.type != "cuda":  # a dry run of the script's own logic (tests/test_gpu_paths.py)
        return [("fp32", False), ("fp32", True)]
    bf16 = [("bf16", False), ("bf16", True)] if native_bf16(device) else []
    return [("fp32", False)] + bf16 + [("fp16", False), ("fp16", True)]


def check_variant(run: RunConfig, size: dict, device, precision: str, ckpt: bool, reference) -> dict:
    cuda = device.type == "cuda"
    gc.collect()  # the previous variant's worker is gone before this one is measured
    base = torch.cuda.memory_allocated(device) if cuda else 0
    worker = StageWorker(run, 1, device=device, precision=precision, activation_checkpointing=ckpt)
    err = rel_error(gradients(worker, run), reference)
    row = {"device": str(device), "precision": precision, "checkpointing": ckpt, "grad_rel_error": err,
           "tolerance": TOLERANCE[precision], "ok": err <= TOLERANCE[precision],
           "tokens_per_s": tokens_per_s(worker, run, size["timed"])}
    if cuda:
        est = stage_memory_bytes(run, 1, worker.stage, DTYPES[precision], ckpt)["total_bytes"]
        row.update(peak_bytes=peak_bytes(worker, run, base), estimate_bytes=est)
        row["peak_over_estimate"] = row["peak_bytes"] / est
    return row


def handover(run: RunConfig, src_device, dst_device) -> dict:
    """src takes a step, dst loads its state (as a joiner does), both step on the same microbatches."""
    src, dst = StageWorker(run, 1, device=src_device), StageWorker(run, 1, device=dst_device)
    for i in range(run.train.microbatches):
        walk(src, *microbatch(run, 200 + i))
    dst.load_state_dict(torch.load(io.BytesIO(src.state_bytes()), weights_only=True))
    before = [p.detach().float().cpu().clone() for p in src.params]
    loaded = all(torch.equal(x, y.detach().float().cpu()) for x, y in zip(before, dst.params))
    for w in (src, dst):
        for i in range(run.train.microbatches):
            walk(w, *microbatch(run, 300 + i))
    a, b = ([p.detach().float().cpu() for p in w.params] for w in (src, dst))
    change = max(float((x - y).norm() / (y - z).norm().clamp(min=1e-30)) for x, y, z in zip(b, a, before))
    stepped = dst.applied_step == src.applied_step == 1
    return {"from": str(src_device), "to": str(dst_device), "loaded_equal": loaded, "stepped": stepped,
            "update_rel_diff": change, "tolerance": HANDOVER_TOLERANCE,
            "ok": loaded and stepped and change <= HANDOVER_TOLERANCE}


def check(size_name: str, device) -> dict:
    size = SIZES[size_name]
    run = make_run(size)
    cpu = StageWorker(run, 1)
    reference = gradients(cpu, run)
    rows = [{"device": "cpu", "precision": "fp32", "checkpointing": False, "grad_rel_error": 0.0,
             "tolerance": TOLERANCE["fp32"], "ok": True,
             "tokens_per_s": tokens_per_s(cpu, run, max(2, size["timed"] // 4))}]
    rows += [check_variant(run, size, device, p, ckpt, reference) for p, ckpt in variants(device)]
    moves = [handover(run, torch.device("cpu"), device), handover(run, device, torch.device("cpu"))]
    return {"size": size_name, "config": size, "machine": machine_info(device), "rows": rows, "handover": moves,
            "ok": all(r["ok"] for r in rows + moves)}


def report(result: dict) -> str:
    rows = [[r["device"], r["precision"] + (" +ckpt" if r["checkpointing"] else ""), fmt(r["grad_rel_error"], ".2e"),
             fmt(r["tolerance"], ".0e"), "yes" if r["ok"] else "NO", fmt(r["tokens_per_s"], ".0f"),
             fmt(r.get("peak_bytes", 0) / 2**20 or None, ".0f"), fmt(r.get("estimate_bytes", 0) / 2**20 or None, ".0f")]
            for r in result["rows"]]
    table = markdown_table(["device", "precision", "grad rel err vs CPU", "tolerance", "ok", "tokens/s",
                            "peak MiB", "estimate MiB"], rows)
    moves = markdown_table(["Muon state from", "to", "update rel diff", "tolerance", "ok"],
                           [[m["from"], m["to"], fmt(m["update_rel_diff"], ".2e"), fmt(m["tolerance"], ".0e"),
                             "yes" if m["ok"] else "NO"] for m in result["handover"]])
    return table + "\n\n" + moves


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--device", default="cuda", help="the GPU to check (cuda or cuda:i)")
    p.add_argument("--json-out", default="bench/results/gpu_check.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA (bench.gpu_check compares a CUDA stage with a CPU replica)")
        return 0
    result = check(args.size, torch.device(args.device))
    print(report(result))
    write_json(args.json_out, result)
    print(f"wrote {args.json_out}; all within tolerance: {result['ok']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
