"""`resbm-node join --stage N`: become one replica of stage N (N = 0: a trainer).

The flags are generated from node/settings.py (JoinSettings); the node's life (joining, loading,
serving, draining, moving) is node/lifecycle.py, which gets the settings, never this namespace."""
from __future__ import annotations

import dataclasses

from node.args import add_config_file_arg, add_settings_args
from node.runtime import run_command, setup_logging
from node.settings import (ADVANCED, CONNECT, DEVICE, JOIN_COMPONENTS, MONITORING, SERVE, TRAINERS, JoinSettings,
                           default_identity)
from node.run_config import chosen_run_id, load_config_file
from swarm.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("join", help="serve one pipeline stage (stage 0 = a trainer)",
                       description="Join a swarm as one replica of a stage. The run config comes from the DHT "
                                   "(published by the bootstrap) or from --config, which must match it. Every flag "
                                   "can also be set as RESBM_<FLAG> (e.g. RESBM_INITIAL_PEERS) or in --config-file.")
    add_config_file_arg(p)
    add_settings_args(p, JOIN_COMPONENTS, [CONNECT, SERVE, DEVICE, MONITORING, ADVANCED, TRAINERS], "join")
    next(g for g in p._action_groups if g.title == CONNECT).add_argument(
        "--public", dest="reachability", action="store_const", const="public",
        help="same as --reachability public (kept for old scripts)")
    p.set_defaults(func=main)


def settings_from_args(args) -> JoinSettings:
    """The node's settings; a join without --initial-peers or --identity is refused or given a default."""
    settings = JoinSettings.from_args(args)
    connect = settings.connect
    if not connect.initial_peers:
        raise SystemExit("error: join needs --initial-peers (or RESBM_INITIAL_PEERS): the address of a running "
                         "peer, as `resbm-node bootstrap` printed it")
    if not connect.identity:
        run_id = chosen_run_id(connect.run_id, load_config_file(settings.serve.config) if settings.serve.config
                               else None)
        identity = str(default_identity(run_id, settings.serve.stage))
        settings = settings.replace(connect=dataclasses.replace(connect, identity=identity))
    return settings


def main(args) -> int:
    import torch
    from node.lifecycle import Node  # (torch and hivemind: not while building --help)
    settings = settings_from_args(args)
    setup_logging(settings.monitoring.verbose)
    if settings.device.threads:
        torch.set_num_threads(settings.device.threads)
    return run_command(Node(settings).run(), MemoryError, ConfigError)  # ConfigError: not the run's data
