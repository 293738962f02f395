"""A trainer's loop: steps, validation, live status line and run summary."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from node.client import PeerUnavailable, RemoteError
from node.progress import Progress, human_bytes
from node.status import stage_role
from node.trainer import Stopped, Trainer
from swarm.coordination import mark_coordinator
from swarm.data import ByteCorpus
from swarm.trainer import param_overhead, wire_stats

log = logging.getLogger("resbm.trainer")


async def train(args, run, server, p2p, stop: asyncio.Event) -> int:
    """Train `args.steps` steps as one of the swarm's trainers; `server` is our stage-0 StageServer."""
    cfg, t = run.model, run.train
    bar = Progress(args.steps)
    losses, val_curve, step_times, step_phases = [], [], [], []
    trainer = Trainer(server, ByteCorpus(args.data), p2p, stop=stop, barrier_s=args.barrier_timeout,
                      status=lambda text: bar.update(len(losses), {"status": text}, force=True))
    tokens_per_step = t.batch_size * cfg.seq_len
    stopped, error = None, None
    started = time.perf_counter()
    try:
        await trainer.wait_for_stages(args.stall_timeout)
        # Continue after the furthest step anyone applied (a restarted trainer may be behind the stages).
        step = max([server.worker.applied_step] + [r["step"] for recs in trainer.hop.records.values()
                                                    for r in recs]) + 1
        log.info("all %d stages have replicas %s; training %d steps from step %d (fingerprint %s)", cfg.n_stages,
                 trainer.hop.replica_counts(), args.steps, step, run.fingerprint)
        while len(losses) < args.steps:
            if stop.is_set():
                stopped = "signal"
                break
            t0 = time.perf_counter()
            moved_before = server.bytes["sent"] + server.bytes["received"]
            result = await _until_stopped(trainer.train_step(step), stop)
            dt = time.perf_counter() - t0
            step = result["next_step"]
            if not result["closed"]:  # nothing applied (the status line says why): not a step done
                continue
            step_times.append(dt)
            step_phases.append(result["phases"])
            losses.append(result["loss"])
            if args.eval_every and step % args.eval_every == 0:
                val_curve.append((step, await trainer.evaluate()))
            recent = step_times[-10:]
            tps = tokens_per_step * len(recent) / sum(recent)
            server.metrics.train_tokens_per_second.set(tps)
            moved = server.bytes["sent"] + server.bytes["received"] - moved_before
            bar.update(len(losses), {"loss": f"{losses[-1]:.3f}",
                                     "val": f"{val_curve[-1][1]:.3f}" if val_curve else "-",
                                     "tok/s": f"{tps:.0f}", "wire": f"{human_bytes(moved / dt)}/s",
                                     "x": f"{_measured_ratio(trainer.hop, cfg):.0f}", "mine": len(result["slots"]),
                                     "replicas": "/".join(str(n) for n in trainer.hop.replica_counts().values())})
    except Stopped as e:
        stopped = "signal" if stop.is_set() else None
        error = None if stop.is_set() else str(e)
    finally:
        bar.close()
    val = await _final_eval(trainer) if losses and not (error or stopped) else None
    summary = {"steps_completed": len(losses), "train_loss_first": losses[0] if losses else None,
               "train_loss_last": losses[-1] if losses else None, "val_loss": val,
               "tokens_per_s": tokens_per_step * len(step_times) / sum(step_times) if step_times else 0.0,
               "wall_s": time.perf_counter() - started, **await _figures(trainer, run),
               "loss_curve": losses, "val_curve": val_curve, "step_times": step_times,
               "step_phases": step_phases,
               "stopped_by": stopped, "error": error}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    if losses:
        log.info("done: %d steps, loss %.3f -> %.3f, val %s, %.0f tokens/s, wire %.2f B/token per hop (%.0fx vs bf16)",
                 len(losses), losses[0], losses[-1], f"{val:.4f}" if val is not None else "-",
                 summary["tokens_per_s"], summary["measured_wire_bytes_per_token_fwd"],
                 summary["measured_compression_vs_bf16"])
    return 1 if error else (130 if stopped else 0)


async def _until_stopped(coro, stop: asyncio.Event):
    """The coroutine's result, unless a stop signal comes first: then it is cancelled (its microbatches'
    keys are applied nowhere) and Stopped is raised."""
    work, signal = asyncio.ensure_future(coro), asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({work, signal}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:
        work.cancel()
        raise Stopped("stopped by a signal mid-step")
    signal.cancel()
    return work.result()


async def _figures(trainer: Trainer, run) -> dict:
    """What the summary says besides the curves: config, wire figures, failures, every node."""
    cfg = run.model
    return {"command": "join", "role": "trainer", "peer_id": trainer.peer_id, "config": run.wire_dict(),
            "fingerprint": run.fingerprint, **wire_stats(cfg, run.train.microbatch_size * cfg.seq_len),
            "param_overhead": param_overhead(cfg), **_wire_figures(trainer.hop, cfg),
            "retries": trainer.hop.retries, "skipped_microbatches": trainer.skipped,
            "unapplied_microbatches": trainer.unapplied, "coordinator": dict(trainer.coordinator.stats),
            "lost_microbatches": trainer.coordinator.stats["lost"], "nodes": await node_info(trainer)}


async def _final_eval(trainer: Trainer) -> float | None:
    try:
        return await trainer.evaluate()
    except Stopped as e:
        log.warning("no final validation: %s", e)
        return None


def _wire_figures(hop, cfg) -> dict:
    """Bytes per token on our boundary (0), from the real messages: whole messages (metadata and
    protobuf framing included), and the codec bytes alone."""
    per = lambda counts, key: counts[key] / hop.tokens if hop.tokens else 0.0  # noqa: E731
    return {"measured_wire_bytes_per_token_fwd": per(hop.bytes, "fwd"),
            "measured_wire_bytes_per_token_bwd": per(hop.bytes, "bwd"),
            "measured_code_bytes_per_token_fwd": per(hop.codes, "fwd"),
            "measured_code_bytes_per_token_bwd": per(hop.codes, "bwd"),
            "measured_compression_vs_bf16": _measured_ratio(hop, cfg)}


def _measured_ratio(hop, cfg) -> float:
    sent = hop.bytes["fwd"] + hop.bytes["bwd"]
    return 2 * cfg.d_model * 2 * hop.tokens / sent if sent else 0.0


async def node_info(trainer: Trainer) -> list[dict]:
    """Every known node's own figures (bytes of every message it sent or received, tokens whose codes
    it handled), trainers included, for the run summary."""
    records = await trainer.fresh_records()
    peers = sorted({(k, r["peer_id"]) for k, recs in records.items() for r in recs} | {(0, trainer.peer_id)})

    async def one(stage, peer_id):
        entry = {"stage": stage, "peer_id": peer_id, "role": stage_role(stage, trainer.cfg.n_stages)}
        try:
            info = trainer.server.info()["resbm"] if peer_id == trainer.peer_id else \
                await trainer.client.info(peer_id, stage, timeout=10.0)
        except (PeerUnavailable, RemoteError) as e:
            return {**entry, "error": str(e)}
        return {**entry, **{k: info.get(k) for k in (
            "bytes_sent", "bytes_received", "state_bytes_sent", "state_bytes_received", "payload_sent", "payload_received",
            "tokens", "step", "steps_closed") if k in info}}
    return mark_coordinator(list(await asyncio.gather(*(one(k, p) for k, p in peers))))
