"""resbm-node: one command for every role in a ResBM swarm.

Every flag can also come from a RESBM_<FLAG> environment variable (RESBM_INITIAL_PEERS, RESBM_HOST,
...), and `join`'s from a settings file (--config-file node.toml); a flag given wins."""
from __future__ import annotations

import argparse
import os
import sys

from node import bootstrap, export, join, local_swarm, monitor, status, train_local
from node.args import parse_command_line
from node.runtime import identity_peer_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resbm-node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_local.add_parser(sub)
    bootstrap.add_parser(sub)
    join.add_parser(sub)
    local_swarm.add_parser(sub)
    status.add_parser(sub)
    monitor.add_parser(sub)
    export.add_parsers(sub)
    ident = sub.add_parser("identity", help="print the peer id of an identity file (created if missing)",
                           description="Create or read a libp2p identity file and print its peer id, e.g. to "
                                       "pass each trainer's id to `bootstrap --trainer`.")
    ident.add_argument("path")
    ident.set_defaults(func=lambda a: print(identity_peer_id(a.path)))
    return p


def parse_args(argv=None, environ=None) -> argparse.Namespace:
    """The command line with RESBM_* variables and --config-file under it."""
    return parse_command_line(build_parser(), sys.argv[1:] if argv is None else list(argv),
                              os.environ if environ is None else environ)


def main(argv=None) -> int:
    args = parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
