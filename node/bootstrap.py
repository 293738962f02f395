"""`resbm-node bootstrap`: a DHT-only peer whose addresses are the swarm's initial peers, and which
publishes the run config (with its fingerprint) that every joining node checks."""
from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from node.args import add_connect_args, add_monitoring_args, add_run_args, add_setting_flags, run_config_from_args
from node.run_config import chosen_run_id, load_config_file, save_config_file
from node.runtime import SocketJanitor, close_hivemind, run_command, setup_logging, stop_event_on_signals
from node.settings import RecordSettings

log = logging.getLogger("resbm.bootstrap")


def add_parser(sub) -> None:
    p = sub.add_parser("bootstrap", help="start a DHT-only peer that publishes the run config",
                       description="Start the swarm's meeting point. Prints the multiaddrs to pass as "
                                   "--initial-peers. Use --identity to keep the same address across restarts.")
    add_connect_args(p, "bootstrap")
    g = p.add_argument_group("the run")
    g.add_argument("--config", default=None, help="run config JSON instead of the model/training flags")
    g.add_argument("--save-config", default=None, help="also write the run config JSON here (for `join --config`)")
    g.add_argument("--addr-file", default=None, help="write the multiaddrs here, one per line, once ready")
    add_monitoring_args(p, "bootstrap")
    add_setting_flags(p, [RecordSettings], ["config_ttl_s"], "bootstrap")
    add_run_args(p, command="bootstrap")
    p.set_defaults(func=main)


def main(args) -> int:
    setup_logging(args.verbose)
    if args.config:
        run = load_config_file(args.config)
        chosen_run_id(args.run_id, run)  # refuses a --run-id that contradicts the file
    else:
        run = run_config_from_args(args, chosen_run_id(args.run_id, None))
    return run_command(_main(args, run))


async def _main(args, run) -> int:
    from protocol.signing import Ed25519RecordValidator  # (hivemind: not while building --help)
    from node.announce import keep_config_alive, publish_config
    from node.dht import start_dht_from_args, visible_maddrs
    validator = Ed25519RecordValidator()
    janitor = SocketJanitor()
    stop = stop_event_on_signals(asyncio.get_running_loop())
    dht = refresher = None
    try:
        dht = start_dht_from_args(run.run_id, args)
        if not await publish_config(dht, run.run_id, run.wire_dict(), run.fingerprint, validator, args.config_ttl_s):
            raise SystemExit("error: the DHT refused the run config record")
        if args.save_config:
            save_config_file(run, args.save_config)
        addrs = visible_maddrs(dht)
        if args.addr_file:  # before the "is up" line: whoever waits for that line reads this file next
            tmp = Path(args.addr_file + ".tmp")
            tmp.write_text("\n".join(addrs) + "\n")
            tmp.replace(args.addr_file)
        print(f"bootstrap of run {run.run_id!r} (fingerprint {run.fingerprint}) is up. Others join with:",
              file=sys.stderr)
        for a in addrs:
            print(f"  --initial-peers {a}", file=sys.stderr)
        sys.stderr.flush()
        refresher = asyncio.create_task(keep_config_alive(dht, run, validator, args.config_ttl_s))
        await stop.wait()
        return 0
    finally:
        if refresher is not None:
            refresher.cancel()
        await close_hivemind(None, dht)
        janitor.sweep()
