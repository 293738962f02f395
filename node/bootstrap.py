"""`resbm-node bootstrap`: a DHT-only peer whose addresses are the swarm's initial peers, and which
publishes the run config (with its fingerprint) that every joining node checks."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

from node.args import add_run_args, run_config_from_args
from node.dht import AddressError, start_dht, visible_maddrs
from node.join import add_common_peer_args, load_config_file
from node.runtime import SocketJanitor, close_hivemind, setup_logging, stop_event_on_signals

log = logging.getLogger("resbm.bootstrap")


def add_parser(sub) -> None:
    p = sub.add_parser("bootstrap", help="start a DHT-only peer that publishes the run config",
                       description="Start the swarm's meeting point. Prints the multiaddrs to pass as "
                                   "--initial-peers. Use --identity to keep the same address across restarts.")
    add_common_peer_args(p)
    add_run_args(p)
    p.add_argument("--config", default=None, help="run config JSON instead of the model/training flags")
    p.add_argument("--save-config", default=None, help="also write the run config JSON here (for `join --config`)")
    p.add_argument("--addr-file", default=None, help="write the multiaddrs here, one per line, once ready")
    p.set_defaults(func=main)


def main(args) -> int:
    setup_logging(args.verbose)
    run = load_config_file(args.config) if args.config else run_config_from_args(args)
    if args.config and run.run_id != args.run_id:
        args.run_id = run.run_id
    try:
        import uvloop
        return uvloop.run(_main(args, run))
    except (AddressError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


async def _main(args, run) -> int:
    from hivemind.dht.crypto import RSASignatureValidator
    from node.announce import keep_config_alive, publish_config
    validator = RSASignatureValidator()
    janitor = SocketJanitor()
    stop = stop_event_on_signals(asyncio.get_running_loop())
    dht = refresher = None
    try:
        dht = start_dht(run.run_id, args.initial_peers, host=args.host, port=args.port, identity=args.identity,
                        announce=args.announce, public=args.public)
        if not await publish_config(dht, run.run_id, run.wire_dict(), run.fingerprint, validator):
            raise SystemExit("error: the DHT refused the run config record")
        if args.save_config:
            Path(args.save_config).write_text(json.dumps(run.wire_dict(), indent=1))
        addrs = visible_maddrs(dht)
        print(f"bootstrap of run {run.run_id!r} (fingerprint {run.fingerprint}) is up. Others join with:",
              file=sys.stderr)
        for a in addrs:
            print(f"  --initial-peers {a}", file=sys.stderr)
        if args.addr_file:
            tmp = Path(args.addr_file + ".tmp")
            tmp.write_text("\n".join(addrs) + "\n")
            tmp.replace(args.addr_file)
        sys.stderr.flush()
        refresher = asyncio.create_task(keep_config_alive(dht, run, validator))
        await stop.wait()
        return 0
    finally:
        if refresher is not None:
            refresher.cancel()
        await close_hivemind(None, dht)
        janitor.sweep()
