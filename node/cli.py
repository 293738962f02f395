"""resbm-node: one command for every role in a ResBM swarm."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from node import bootstrap, export, join, local, status, train_local
    p = argparse.ArgumentParser(prog="resbm-node", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_local.add_parser(sub)
    bootstrap.add_parser(sub)
    join.add_parser(sub)
    local.add_parser(sub)
    status.add_parser(sub)
    export.add_parsers(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
