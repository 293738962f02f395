"""`resbm-node join --stage N`: become one replica of stage N (N = 0: the head, which trains)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import logging
import sys
import time
from pathlib import Path

import torch

from node.args import resolve_device
from node.dht import AddressError, start_dht
from node.metrics import NodeMetrics
from node.runtime import SocketJanitor, close_hivemind, setup_logging, stop_event_on_signals
from protocol import PROTOCOL_VERSION
from protocol.fingerprint import describe_diff
from swarm.config import ConfigError, RunConfig

log = logging.getLogger("resbm.join")


def add_common_peer_args(p) -> None:
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR",
                   help="multiaddrs of running peers, e.g. the bootstrap's /ip4/.../tcp/.../p2p/...")
    p.add_argument("--run-id", default="resbm", help="run to join (DHT namespace)")
    p.add_argument("--identity", default=None, help="libp2p identity file; created if missing, keeps the peer id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a public node)")
    p.add_argument("--port", type=int, default=0, help="TCP port to listen on (0: any free port)")
    p.add_argument("--announce", nargs="*", default=None, metavar="MULTIADDR",
                   help="addresses others should dial (e.g. your public IP) if not the listen address")
    p.add_argument("--public", action="store_true",
                   help="enable hivemind NAT traversal (AutoNAT, UPnP, relays) for a node behind NAT")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address for /metrics (0.0.0.0 to let a Prometheus on another host scrape it)")
    p.add_argument("--verbose", "-v", action="store_true")


def add_parser(sub) -> None:
    p = sub.add_parser("join", help="serve one pipeline stage (stage 0 = the head, which trains)",
                       description="Join a swarm as one replica of a stage. The run config comes from the DHT "
                                   "(published by the bootstrap) or from --config, which must match it.")
    p.add_argument("--stage", type=_stage_arg, required=True,
                   help="stage to serve (0 is the head: data + training), or 'auto': the stage that needs "
                        "throughput most; an auto node also moves later if the swarm becomes badly unbalanced")
    p.add_argument("--rebalance-every", type=float, default=60.0, help="auto nodes: seconds between balance checks")
    p.add_argument("--auto-target", type=int, default=None, help=argparse.SUPPRESS)  # set when an auto node moves
    add_common_peer_args(p)
    p.add_argument("--config", default=None, help="run config JSON (as written by `bootstrap --save-config`)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--checkpoint-dir", default=str(Path.home() / ".cache" / "resbm-swarm"),
                   help="where this node keeps its stage checkpoint ('' to disable); with the same --identity a "
                        "restarted node resumes from it when no live replica can hand over the state")
    p.add_argument("--save-every-min", type=float, default=10.0, help="checkpoint every N minutes (and on exit)")
    g = p.add_argument_group("head only (--stage 0)")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps to train")
    g.add_argument("--data", default=None, help="text file or folder (default: Python stdlib sources)")
    g.add_argument("--eval-every", type=int, default=25, help="validation every N steps (0: only at the end)")
    g.add_argument("--json-out", default=None, help="write the run summary JSON here")
    g.add_argument("--stall-timeout", type=float, default=600.0,
                   help="give up after a stage has had no working replica this long (seconds)")
    p.set_defaults(func=main)


def _stage_arg(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a stage number or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("stage numbers start at 0")
    return value


async def choose_auto_stage(dht, run: RunConfig, preferred: int | None) -> int:
    from node.announce import read_stage_records
    from swarm.balance import pick_stage, stage_totals
    stages = range(1, run.model.n_stages)
    if preferred in stages:
        return preferred
    totals = stage_totals(await read_stage_records(dht, run.run_id, run.fingerprint), stages)
    stage = pick_stage(totals)
    log.info("--stage auto: serving stage %d (stage totals in microbatches/s: %s)", stage,
             {k: round(t, 2) for k, (t, _) in totals.items()})
    return stage


async def watch_balance(dht, run: RunConfig, stage: int, server, every_s: float, stop: asyncio.Event,
                        decision: dict, just_moved: bool) -> None:
    """Auto nodes: move to another stage when the swarm is badly unbalanced (see swarm/balance.py)."""
    import random
    from node.announce import read_stage_records
    from swarm.balance import move_target, quality, stage_totals
    if just_moved:  # dwell: a node that just moved stays a while, whatever the numbers say
        await asyncio.sleep(5 * every_s)
    while not stop.is_set():
        await asyncio.sleep(every_s * random.uniform(0.5, 1.5))  # jitter: nodes do not all move at once
        records = await read_stage_records(dht, run.run_id, run.fingerprint, include_idle=True)
        totals = stage_totals(records, range(1, run.model.n_stages))
        target = move_target(totals, stage, server.throughput)
        if target is not None:
            log.warning("swarm balance quality %.2f is low: moving from stage %d to stage %d", quality(totals),
                        stage, target)
            decision["move_to"] = target
            stop.set()


def load_config_file(path: str) -> RunConfig:
    try:
        return RunConfig.from_wire_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, ConfigError) as e:
        raise SystemExit(f"error: cannot use config file {path}: {e}")


async def resolve_run_config(dht, args, timeout_s: float = 30.0) -> RunConfig:
    """The published run config; a --config file must match it exactly (fingerprint)."""
    from node.announce import fetch_config
    local = load_config_file(args.config) if args.config else None
    deadline = time.monotonic() + timeout_s
    published = None
    while published is None and time.monotonic() < deadline:
        published = await fetch_config(dht, args.run_id)
        if published is None:
            await asyncio.sleep(1.0)
    if published is None:
        if local is None:
            raise SystemExit(f"error: no run config for run {args.run_id!r} found in the DHT after {timeout_s:.0f}s; "
                             f"is the bootstrap of this run up, or pass --config")
        log.warning("no published config for run %s; using --config %s (fingerprint %s)",
                    args.run_id, args.config, local.fingerprint)
        return local
    if published.get("version") != PROTOCOL_VERSION:
        raise SystemExit(f"error: the swarm speaks protocol version {published.get('version')}, this node "
                         f"{PROTOCOL_VERSION}; install the matching resbm-swarm release")
    run = RunConfig.from_wire_dict(published["config"])
    if run.fingerprint != published.get("fingerprint"):
        raise SystemExit("error: the published run config does not match its own fingerprint (corrupt record)")
    if local is not None and local.fingerprint != run.fingerprint:
        diff = describe_diff(local.wire_dict(), run.wire_dict())
        raise SystemExit(f"error: --config {args.config} (fingerprint {local.fingerprint}) differs from the swarm's "
                         f"run config ({run.fingerprint}): " + "; ".join(diff))
    return run


def main(args) -> int:
    setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import uvloop
        code = uvloop.run(_main(args))
    except (AddressError, ConnectionError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = getattr(args, "decision", {}).get("move_to")
    if target is not None:  # restart in place as an auto node of the new stage: same pid, identity, group
        argv = [a for a in sys.argv[1:]]
        if "--auto-target" in argv:
            i = argv.index("--auto-target")
            del argv[i:i + 2]
        os.execv(sys.executable, [sys.executable, "-m", "node.cli", *argv, "--auto-target", str(target)])
    return code


async def _main(args) -> int:
    from hivemind.dht.crypto import RSASignatureValidator
    from node.announce import Announcer, read_stage_records
    from node.averaging import ReplicaAverager
    from node.rpc import serve
    from node.stage_server import StageServer, measure_throughput
    from node.announce import keep_config_alive
    from node.dht import print_own_addrs
    from node.state_sync import checkpoint_path, initial_state, periodic_checkpoints
    from swarm.checkpoint import atomic_write_bytes
    from swarm.memory import check_fits
    from swarm.robust import default_tau
    from swarm.stage_worker import StageWorker

    janitor = SocketJanitor()
    stop = stop_event_on_signals(asyncio.get_running_loop())
    dht = p2p = averager = metrics = None
    tasks = []
    decision = args.decision = {}
    try:
        # hivemind forks its helper processes: start them before any CUDA work.
        dht = start_dht(args.run_id, args.initial_peers, host=args.host, port=args.port, identity=args.identity,
                        announce=args.announce, public=args.public)
        p2p = await dht.replicate_p2p()
        peer_id = str(dht.peer_id)
        run = await resolve_run_config(dht, args)
        cfg = run.model
        auto = args.stage == "auto"
        if auto:
            if cfg.n_stages < 2:
                raise SystemExit("error: --stage auto needs a run with at least 2 stages")
            args.stage = await choose_auto_stage(dht, run, args.auto_target)
        if not 0 <= args.stage < cfg.n_stages:
            raise SystemExit(f"error: --stage {args.stage} does not exist; this run has stages 0..{cfg.n_stages - 1}")
        print_own_addrs(dht, f"stage {args.stage} node")
        tasks.append(asyncio.create_task(keep_config_alive(dht, run, RSASignatureValidator())))
        device = resolve_device(args.device)
        worker = StageWorker(run, args.stage, device="cpu")
        need = check_fits(run, args.stage, worker.stage, device)
        log.info("stage %d: %d layers, %.1f M parameters; memory ~%.0f MiB params+optimizer, ~%.0f MiB activations",
                 args.stage, cfg.stage_layers[args.stage], sum(p.numel() for p in worker.stage.parameters()) / 1e6,
                 need["params_bytes"] / 2**20, need["activations_bytes"] / 2**20)
        metrics = NodeMetrics().serve(args.metrics_port, args.metrics_host)
        metrics.info.info({"version": str(PROTOCOL_VERSION), "stage": str(args.stage), "peer_id": peer_id,
                           "fingerprint": run.fingerprint, "run_id": run.run_id})

        async def count_replicas():
            return len((await read_stage_records(dht, run.run_id, run.fingerprint)).get(args.stage, []))

        if args.stage > 0 and run.train.average_every:
            averager = ReplicaAverager(dht, run.run_id, args.stage, worker.stage, run.train.average_every,
                                       count_replicas, metrics,
                                       tau=default_tau(run.train.lr, run.train.average_every))
        ckpt = checkpoint_path(args.checkpoint_dir, run.run_id, args.stage, peer_id)
        log.info(await initial_state(dht, p2p, worker, ckpt, peer_id))
        worker.stage.to(device)
        worker.device = device
        announcer = Announcer(dht, run.run_id, peer_id, RSASignatureValidator())
        if args.stage == 0:
            from node.head_loop import train
            # The head answers `info` and `state` (for `resbm-node export`) and shows up in `status`.
            server = StageServer(worker, metrics, peer_id, methods=("info", "state"))
            await serve(p2p, server, max_frame=server.max_frame)
            tasks.append(asyncio.create_task(announcer.run(0, run.fingerprint, server)))
            tasks += periodic_checkpoints(worker, ckpt, args.save_every_min, server.executor)
            try:
                return await train(args, run, worker, dht, p2p, metrics, stop, peer_id, server)
            finally:
                if ckpt is not None:
                    atomic_write_bytes(worker.state_bytes(), ckpt)
                    log.info("checkpoint written: %s (step %d)", ckpt, worker.applied_step)

        server = StageServer(worker, metrics, peer_id, averager)
        measure_throughput(server)
        await serve(p2p, server, max_frame=server.max_frame)
        tasks.append(asyncio.create_task(announcer.run(args.stage, run.fingerprint, server)))
        tasks += periodic_checkpoints(worker, ckpt, args.save_every_min, server.executor)
        print(f"stage {args.stage} serving: peer {peer_id} run {run.run_id} fingerprint {run.fingerprint} "
              f"throughput {server.throughput:.1f} microbatches/s", file=sys.stderr, flush=True)
        if auto:
            tasks.append(asyncio.create_task(watch_balance(dht, run, args.stage, server, args.rebalance_every,
                                                           stop, decision, args.auto_target is not None)))
        await stop.wait()
        # Replace our record (an earlier expiration would be ignored by the DHT, so outlive the old one):
        # leaving, it says "stage k, not serving, no throughput"; moving, it announces the target stage
        # with our throughput, so other auto nodes count us there and do not move too.
        moving = decision.get("move_to")
        log.info("stopping: %s", "withdrawing the stage record" if moving is None else f"moving to stage {moving}")
        try:
            await asyncio.wait_for(announcer.publish(args.stage if moving is None else moving, run.fingerprint,
                                                     0.0 if moving is None else server.throughput, 0,
                                                     worker.applied_step, serving=False,
                                                     ttl=3 * announcer.period_s + 5), 5.0)
        except Exception:
            pass
        if ckpt is not None:
            data = await asyncio.get_running_loop().run_in_executor(server.executor, worker.state_bytes)
            atomic_write_bytes(data, ckpt)
            log.info("checkpoint written: %s (step %d)", ckpt, worker.applied_step)
        return 0
    finally:
        for t in tasks:
            t.cancel()
        if metrics is not None:
            metrics.close()
        await close_hivemind(p2p, dht, averager)
        janitor.sweep()
