"""resbm-node: one command for every role in a ResBM swarm."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from node import bootstrap, export, join, local, monitor, status, train_local
    from node.args import identity_peer_id
    p = argparse.ArgumentParser(prog="resbm-node", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_local.add_parser(sub)
    bootstrap.add_parser(sub)
    join.add_parser(sub)
    local.add_parser(sub)
    status.add_parser(sub)
    monitor.add_parser(sub)
    export.add_parsers(sub)
    ident = sub.add_parser("identity", help="print the peer id of an identity file (created if missing)",
                           description="Create or read a libp2p identity file and print its peer id, e.g. to "
                                       "pass each trainer's id to `bootstrap --trainer`.")
    ident.add_argument("path")
    ident.set_defaults(func=lambda a: print(identity_peer_id(a.path)))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
