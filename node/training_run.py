"""A trainer's run (`join --stage 0`): wait for every stage, train --steps updates through node/trainer.py's
Trainer, validation, the live status line and the run summary."""
from __future__ import annotations

import asyncio
import logging
import time

from node.progress import Progress, RunLog, human_bytes, write_summary
from node.settings import TrainerSettings
from node.trainer import Stopped, Trainer
from protocol import stage_role
from protocol.errors import PeerUnavailable, RemoteError
from swarm.data import open_corpus
from swarm.local_trainer import param_overhead, wire_stats

log = logging.getLogger("resbm.trainer")


async def train(settings: TrainerSettings, run, server, stop: asyncio.Event) -> int:
    """Train until our stage 0 applied `settings.steps` updates, as one of the swarm's trainers;
    `server` is our stage-0 StageServer."""
    bar = Progress(settings.steps)
    log_ = RunLog(run.train.batch_size * run.model.seq_len)
    trainer = Trainer(server, open_corpus(run, settings.data, settings.tokenizer), stop=stop, settings=settings,
                      status=lambda text: bar.update(len(log_.losses), {"status": text}, force=True))
    stopped, error = None, None
    started = time.perf_counter()
    try:
        await trainer.wait_for_stages()
        log.info("all %d stages have replicas %s; training %d steps from step %d, %d microbatches in flight%s "
                 "(fingerprint %s)", run.model.n_stages, trainer.view.replica_counts(), settings.steps,
                 server.worker.applied_step + 1, trainer.window, " (sync)" if settings.sync else "", run.fingerprint)
        trainer.start(settings.steps)
        while len(log_.losses) < settings.steps:
            moved_before = server.bytes["sent"] + server.bytes["received"]
            done = await trainer.next_step()
            log_.add(done.loss, done.seconds, done.staleness)
            if settings.eval_every and done.step % settings.eval_every == 0:
                log_.val_curve.append((done.step, await trainer.evaluate()))
            _show(bar, log_, trainer, run, server.bytes["sent"] + server.bytes["received"] - moved_before, done)
    except Stopped as e:
        stopped = "signal" if stop.is_set() and not trainer.error else None
        error = trainer.error or (None if stop.is_set() else str(e))
    finally:
        await trainer.close()
        bar.close()
    val = await _final_eval(trainer) if log_.losses and not (error or stopped) else None
    summary = {**log_.summary(), "val_loss": val, "wall_s": time.perf_counter() - started,
               **await _figures(trainer, run), "stopped_by": stopped, "error": error}
    write_summary(settings.json_out, summary)
    if log_.losses:
        log.info("done: %d steps, loss %.3f -> %.3f, val %s, %.0f tokens/s, wire %.2f B/token per hop (%.0fx vs bf16)",
                 len(log_.losses), log_.losses[0], log_.losses[-1], f"{val:.4f}" if val is not None else "-",
                 summary["tokens_per_s"], summary["measured_wire_bytes_per_token_fwd"],
                 summary["measured_compression_vs_bf16"])
    if error:
        log.error("training stopped: %s", error)
    return 1 if error else (130 if stopped else 0)


def _show(bar: Progress, log_: RunLog, trainer: Trainer, run, moved: int, done) -> None:
    tps = log_.tokens_per_s(last=10)
    trainer.metrics.train_tokens_per_second.set(tps)
    bar.update(len(log_.losses), {"loss": f"{done.loss:.3f}",
                                  "val": f"{log_.val_curve[-1][1]:.3f}" if log_.val_curve else "-",
                                  "tok/s": f"{tps:.0f}", "wire": f"{human_bytes(moved / max(done.seconds, 1e-9))}/s",
                                  "x": f"{_measured_ratio(trainer.hop, run.model):.0f}",
                                  "stale": f"{done.staleness:.1f}",
                                  "replicas": "/".join(str(n) for n in trainer.view.replica_counts().values())})


async def _figures(trainer: Trainer, run) -> dict:
    """What the summary says besides the curves: config, wire figures, failures, every node."""
    cfg = run.model
    return {"command": "join", "role": "trainer", "peer_id": trainer.peer_id, "config": run.wire_dict(),
            "fingerprint": run.fingerprint, **wire_stats(cfg, run.train.microbatch_size * cfg.seq_len),
            "param_overhead": param_overhead(cfg), **_wire_figures(trainer.hop, cfg),
            "retries": trainer.hop.retries, "skipped_microbatches": trainer.skipped,
            "recomputed_microbatches": trainer.worker.recomputed, "data_stream": trainer.stream,
            "window": trainer.window, "nodes": await node_info(trainer)}


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
    await trainer.hop.refresh(force=True)
    records = trainer.view.records
    peers = sorted({(k, r["peer_id"]) for k, recs in records.items() for r in recs} | {(0, trainer.peer_id)})

    async def one(stage, peer_id):
        entry = {"stage": stage, "peer_id": peer_id, "role": stage_role(stage, trainer.cfg.n_stages)}
        try:
            info = trainer.server.info()["resbm"] if peer_id == trainer.peer_id else \
                await trainer.hop.client.info(peer_id, stage, timeout=10.0)
        except (PeerUnavailable, RemoteError) as e:
            return {**entry, "error": str(e)}
        return {**entry, **{k: info.get(k) for k in (
            "bytes_sent", "bytes_received", "state_bytes_sent", "state_bytes_received", "payload_sent", "payload_received",
            "tokens", "step", "averaging", "next_hop_calls") if k in info}}
    return list(await asyncio.gather(*(one(k, p) for k, p in peers)))
