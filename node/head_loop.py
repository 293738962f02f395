"""The head's training loop: steps, validation, live status line, checkpoint and run summary."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from node.head import Head, StageMissing, Stopped
from node.progress import Progress, human_bytes
from swarm.data import ByteCorpus
from swarm.trainer import param_overhead, wire_stats

log = logging.getLogger("resbm.head")


async def train(args, run, worker, dht, p2p, metrics, stop: asyncio.Event, peer_id: str, server=None) -> int:
    """Train; `server` is the head's own StageServer (its executor runs stage 0's work, and the rate
    measured here is what the head's DHT record, hence `status`, advertises)."""
    executor = server.executor if server is not None else None
    cfg, t = run.model, run.train
    corpus = ByteCorpus(args.data)
    bar = Progress(args.steps)
    losses, val_curve, step_times, replies = [], [], [], []
    head = Head(worker, corpus, dht, p2p, metrics, stall_timeout=args.stall_timeout, stop=stop,
                status=lambda text: bar.update(len(losses), {"status": text}, force=True), executor=executor)
    ws = wire_stats(cfg, t.microbatch_size * cfg.seq_len)  # one message carries one microbatch
    tokens_per_step = t.batch_size * cfg.seq_len
    stopped, error = None, None
    started = time.perf_counter()
    try:
        await head.wait_for_stages()
        log.info("all %d stages have replicas %s; training %d steps (fingerprint %s)", cfg.n_stages,
                 head.replica_counts(), args.steps, run.fingerprint)
        # Continue after the furthest step anyone applied (a restarted head may be behind its stages).
        # worker.applied_step stays the step of the head's own weights, so its checkpoints say the truth.
        step = max([worker.applied_step] + [r.step for k in range(1, cfg.n_stages)
                                            for r in head.router.replicas(k)]) + 1
        # (gradients a previous run of this head left on replicas are dropped by the stages themselves:
        # this run has another session, see Head.session)
        while len(losses) < args.steps:
            if stop.is_set():
                stopped = "signal"
                break
            t0 = time.perf_counter()
            bytes_before = head.payload["fwd"] + head.payload["bwd"]
            result = await head.train_step(step)
            dt = time.perf_counter() - t0
            if server is not None:
                server.compute.add(dt, tokens_per_step)
            losses.append(result["loss"])
            step_times.append(dt)
            replies.append(result["replies"])
            step += 1
            if args.eval_every and step % args.eval_every == 0:
                val_curve.append((step, await head.evaluate()))
            recent = step_times[-10:]
            tps = tokens_per_step * len(recent) / sum(recent)
            metrics.train_tokens_per_second.set(tps)
            moved = head.payload["fwd"] + head.payload["bwd"] - bytes_before
            ratio = _measured_ratio(head, cfg)
            bar.update(len(losses), {"loss": f"{losses[-1]:.3f}",
                                     "val": f"{val_curve[-1][1]:.3f}" if val_curve else "-",
                                     "tok/s": f"{tps:.0f}", "wire": f"{human_bytes(moved / dt)}/s",
                                     "x": f"{ratio:.0f}", "replicas": _fmt_counts(head.replica_counts())})
    except StageMissing as e:
        error = str(e)
        log.error("training stopped: %s", e)
    except Stopped:
        stopped = "signal"
    finally:
        bar.close()
    val = await _final_eval(head) if losses and not error else None
    nodes = [{"stage": 0, "peer_id": peer_id, "role": "head", "bytes_sent": head.bytes["sent"],
              "bytes_received": head.bytes["received"]}]
    for info in await head.node_info():
        nodes.append({"stage": info.get("stage"), "peer_id": info.get("peer_id"), "role": "stage",
                      "bytes_sent": info.get("bytes_sent"), "bytes_received": info.get("bytes_received"),
                      "payload_sent": info.get("payload_sent"), "payload_received": info.get("payload_received"),
                      "tokens": info.get("tokens"), "step": info.get("step"), "error": info.get("error")})
    summary = {
        "command": "join", "role": "head", "config": run.wire_dict(), "fingerprint": run.fingerprint,
        "steps_completed": len(losses), "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None, "val_loss": val,
        "tokens_per_s": tokens_per_step * len(step_times) / sum(step_times) if step_times else 0.0,
        "wall_s": time.perf_counter() - started, **ws, "param_overhead": param_overhead(cfg),
        "measured_wire_bytes_per_token_fwd": _per_token(head, "fwd"),
        "measured_wire_bytes_per_token_bwd": _per_token(head, "bwd"),
        "measured_code_bytes_per_token_fwd": _per_token(head, "fwd", head.codes),
        "measured_code_bytes_per_token_bwd": _per_token(head, "bwd", head.codes),
        "measured_compression_vs_bf16": _measured_ratio(head, cfg),
        "retries": head.retries, "recomputed_microbatches": head.recomputed, "lost_microbatches": head.lost,
        "crashed_unaveraged_microbatches": head.crashed_progress,
        "nodes": nodes, "loss_curve": losses, "val_curve": val_curve,
        "step_times": step_times,
        "step_replies": replies[-3:], "stopped_by": stopped, "error": error,
    }
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    if losses:
        log.info("done: %d steps, loss %.3f -> %.3f, val %s, %.0f tokens/s, wire %.2f B/token per hop (%.0fx vs bf16)",
                 len(losses), losses[0], losses[-1], f"{val:.4f}" if val is not None else "-",
                 summary["tokens_per_s"], summary["measured_wire_bytes_per_token_fwd"],
                 summary["measured_compression_vs_bf16"])
    return 1 if error else (130 if stopped else 0)


async def _final_eval(head: Head) -> float | None:
    try:
        return await head.evaluate()
    except (Stopped, StageMissing) as e:  # a stage vanished and a signal came while waiting for it
        log.warning("no final validation: %s", e)
        return None


def _per_token(head: Head, pass_: str, counts: dict | None = None) -> float:
    """Bytes per token per boundary hop, measured from the real messages at the head: whole messages
    (metadata and protobuf framing included), or with `head.codes` the codec bytes alone."""
    counts = head.payload if counts is None else counts
    return counts[pass_] / head.payload_tokens[pass_] if head.payload_tokens[pass_] else 0.0


def _measured_ratio(head: Head, cfg) -> float:
    tokens = head.payload_tokens["fwd"] + head.payload_tokens["bwd"]
    sent = head.payload["fwd"] + head.payload["bwd"]
    return 2 * cfg.d_model * tokens / sent if sent else 0.0


def _fmt_counts(counts: dict) -> str:
    return "/".join(str(counts[k]) for k in sorted(counts))
