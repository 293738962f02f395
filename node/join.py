"""`resbm-node join --stage N`: become one replica of stage N (N = 0: a trainer).

The node's life (joining, loading, serving, draining, moving) is node/lifecycle.py; this module is
the command line and the few calls that put a stage on the network."""
from __future__ import annotations

import argparse
from pathlib import Path

from node.args import add_connect_args, add_monitoring_args, positive_seconds


def add_parser(sub) -> None:
    p = sub.add_parser("join", help="serve one pipeline stage (stage 0 = a trainer)",
                       description="Join a swarm as one replica of a stage. The run config comes from the DHT "
                                   "(published by the bootstrap) or from --config, which must match it.")
    add_connect_args(p)
    g = p.add_argument_group("what to serve")
    g.add_argument("--stage", type=_stage_arg, required=True,
                   help="stage to serve (0: a trainer, which feeds its own share of the data; any number may run), or 'auto': the stage that needs "
                        "throughput most; an auto node also moves later if the swarm becomes badly unbalanced")
    g.add_argument("--config", default=None, help="run config JSON (as written by `bootstrap --save-config`)")
    g.add_argument("--checkpoint-dir", default=str(Path.home() / ".cache" / "resbm-swarm"),
                   help="where this node keeps its stage checkpoint ('' to disable); with the same --identity a "
                        "restarted node resumes from it when no live replica can hand over the state")
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    add_monitoring_args(p)
    g = p.add_argument_group("advanced")
    g.add_argument("--save-every-min", type=float, default=10.0, help="checkpoint every N minutes (and on exit)")
    g.add_argument("--announce-period", type=positive_seconds, default=5.0, metavar="S",
                   help="re-sign and store this node's stage record every S seconds; it expires after 3 S. Each "
                        "store costs the link ~1 KB per node that holds the key: on slow links a longer period "
                        "frees bandwidth for codes, while routers still drop a dead replica on its first failed call")
    g.add_argument("--init-from", default=None, metavar="EXPORT",
                   help="with no live replica and no checkpoint, start from this `resbm-node export` file's "
                        "weights (same model) instead of initialisation")
    g.add_argument("--rebalance-every", type=float, default=60.0, help="auto nodes: seconds between balance checks")
    g.add_argument("--auto-target", type=int, default=None, help=argparse.SUPPRESS)  # tests: an auto node's start
    g = p.add_argument_group("trainers only (--stage 0)")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps to train")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="where this node keeps the run's data, if not at the run config's path (it must be the same "
                        "files: names and sizes are checked)")
    g.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="where this node keeps the run's tokenizer file, if not at the run config's path (its "
                        "content is checked)")
    g.add_argument("--eval-every", type=int, default=25, help="validation every N steps (0: only at the end)")
    g.add_argument("--json-out", default=None, help="write the run summary JSON here")
    g.add_argument("--stall-timeout", type=float, default=600.0,
                   help="give up after a stage has had no replica at all this long (seconds)")
    g.add_argument("--window", type=int, default=0, metavar="N",
                   help="microbatches this trainer keeps in flight, across step boundaries (0: one step's worth)")
    g.add_argument("--sync", action="store_true",
                   help="start no microbatch of the next step before this step's are in: nothing is ever stale, "
                        "and with one replica per stage a step equals train-local's (slower: the pipeline drains)")
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


def main(args) -> int:
    import torch
    from node.lifecycle import Node
    from node.runtime import run_command, setup_logging
    from swarm.config import ConfigError
    setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_command(Node(args).run(), MemoryError, ConfigError)  # ConfigError: not the run's data


# --- putting a stage on the network (one small function per call, to swap with the transport) ------
def make_server(worker, metrics, peer_id: str, averager, dht, p2p):
    """The stage's request handler (a trainer's serves only its state, to joining trainers)."""
    from node.stage_server import StageServer
    return StageServer(worker, metrics, peer_id, averager, dht=dht, p2p=p2p)


async def start_serving(p2p, server, measure: bool) -> None:
    """Register the stage's handlers (hivemind's ServicerBase, in this process)."""
    from node.stage_server import measure_throughput
    if measure:
        measure_throughput(server)
    await server.add_p2p_handlers(p2p)


async def stop_serving(p2p, server) -> None:
    """No new requests reach this node (the ones in flight still finish)."""
    await server.remove_p2p_handlers(p2p)


async def run_trainer(args, run, server, stop) -> int:
    from node.trainer_loop import train
    return await train(args, run, server, stop)
