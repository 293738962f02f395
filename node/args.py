"""What the command line says about a run, shared by every subcommand.

The model, training and data flags are generated from the fields of swarm.config's ModelConfig,
TrainConfig and DataConfig (type, default, help and choices live there, once), so every field can be set and a
new field needs no flag written by hand. Nothing here imports torch or hivemind at module level:
`resbm-node --help` must answer fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from swarm.config import DEFAULT_RUN_ID, SECTION_TYPES, ConfigError, RunConfig

SECTIONS = tuple(SECTION_TYPES.items())
TITLES = {"model": "model (must match across the swarm)", "train": "training (must match across the swarm)",
          "data": "data (must match across the swarm; the tokenizer sets --vocab-size)"}


# --- model and training flags, generated from the config dataclasses ----------------------------
def _flags(f: dataclasses.Field) -> list[str]:
    """The field's flag, then --field-name as an alias when the flag is a shorter, older name."""
    own = "--" + f.name.replace("_", "-")
    flag = f.metadata.get("flag") or own
    return [flag] if flag == own else [flag, own]


def _add_field(group, section: str, f: dataclasses.Field, default) -> None:
    meta = f.metadata
    kw = dict(dest=f"{section}.{f.name}", help=meta["help"].replace("%", "%%"), choices=meta.get("choices"),
              metavar=meta.get("metavar") or (None if meta.get("choices") else f.name.upper()))
    if isinstance(f.default, tuple):  # repeatable, and several values after one flag: --trainer A --trainer B
        kw.update(action="extend", nargs="+", type=meta["item"], default=list(default))
    else:
        kw.update(type=type(f.default), default=default)
        kw["help"] += " (default: %(default)r)" if isinstance(f.default, str) else " (default: %(default)s)"
    group.add_argument(*_flags(f), **kw)


def add_run_args(p: argparse.ArgumentParser, skip=(), **defaults) -> None:
    """One flag per ModelConfig/TrainConfig/DataConfig field except `skip` and derived ones; `defaults`
    (field name -> value) overrides the dataclass default for this subcommand (e.g. `local` trains 4 stages)."""
    unknown = set(defaults) - {f.name for _, cls in SECTIONS for f in dataclasses.fields(cls)}
    assert not unknown, f"no config field named {unknown}"
    for section, cls in SECTIONS:
        group = p.add_argument_group(TITLES[section])
        for f in dataclasses.fields(cls):
            if f.name not in skip and not f.metadata.get("derived"):
                _add_field(group, section, f, defaults.get(f.name, f.default))


def run_config_from_args(args, run_id: str | None = None) -> RunConfig:
    """The RunConfig the generated flags describe, its data resolved (swarm.data.resolve_data: hashes,
    vocabulary size); a bad combination exits with the config's message."""
    from swarm.data import resolve_data  # imports torch: not at module level (--help must stay fast)
    parts = {}
    for section, cls in SECTIONS:
        values = {f.name: getattr(args, f"{section}.{f.name}", f.default) for f in dataclasses.fields(cls)}
        parts[section] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return resolve_data(RunConfig(**{section: cls(**parts[section]) for section, cls in SECTIONS},
                                      run_id=run_id or getattr(args, "run_id", None) or DEFAULT_RUN_ID))
    except ConfigError as e:
        raise SystemExit(f"error: {e}")


def parse_run_config(argv: list[str], run_id: str = DEFAULT_RUN_ID) -> RunConfig:
    """A RunConfig from model/training/data flags, e.g. a benchmark's size table."""
    p = argparse.ArgumentParser(prog="run-config")
    add_run_args(p)
    return run_config_from_args(p.parse_args(argv), run_id)


# --- run config files -----------------------------------------------------------------------------
def load_config_file(path: str) -> RunConfig:
    try:
        return RunConfig.from_wire_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, ConfigError) as e:
        raise SystemExit(f"error: cannot use config file {path}: {e}")


def save_config_file(run: RunConfig, path: str | Path) -> Path:
    """The run config JSON that `join --config` and `bootstrap --config` read (written atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(run.wire_dict(), indent=1))
    tmp.replace(path)
    return path


def chosen_run_id(requested: str | None, config: RunConfig | None) -> str:
    """--run-id, else the run id inside --config, else the default; the two must not disagree."""
    if config is not None:
        if requested and requested != config.run_id:
            raise SystemExit(f"error: --run-id {requested} but the --config file is for run {config.run_id}")
        return config.run_id
    return requested or DEFAULT_RUN_ID


async def resolve_run_config(dht, run_id: str, config_path: str | None = None, timeout_s: float = 30.0) -> RunConfig:
    """The published run config; a --config file must match it exactly (fingerprint)."""
    import asyncio
    import logging
    import time
    from node.announce import fetch_config
    from protocol import PROTOCOL_VERSION
    from protocol.fingerprint import describe_diff
    local = load_config_file(config_path) if config_path else None
    deadline = time.monotonic() + timeout_s
    published = await fetch_config(dht, run_id)
    while published is None and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        published = await fetch_config(dht, run_id)
    if published is None:
        if local is None:
            raise SystemExit(f"error: no run config for run {run_id!r} found in the DHT after {timeout_s:.0f}s; "
                             f"is the bootstrap of this run up, or pass --config")
        logging.getLogger("resbm.config").warning("no published config for run %s; using --config %s "
                                                  "(fingerprint %s)", run_id, config_path, local.fingerprint)
        return local
    if published.get("version") != PROTOCOL_VERSION:
        raise SystemExit(f"error: the swarm speaks protocol version {published.get('version')}, this node "
                         f"{PROTOCOL_VERSION}; install the matching resbm-swarm release")
    run = RunConfig.from_wire_dict(published["config"])
    if run.fingerprint != published.get("fingerprint"):
        raise SystemExit("error: the published run config does not match its own fingerprint (corrupt record)")
    if local is not None and local.fingerprint != run.fingerprint:
        diff = describe_diff(local.wire_dict(), run.wire_dict())
        raise SystemExit(f"error: --config {config_path} (fingerprint {local.fingerprint}) differs from the swarm's "
                         f"run config ({run.fingerprint}): " + "; ".join(diff))
    return run


# --- where to connect, monitoring ------------------------------------------------------------------
def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds above 0 (a period of 0 would never wait)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_connect_args(p) -> None:
    g = p.add_argument_group("where to connect")
    g.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR",
                   help="multiaddrs of running peers, e.g. the bootstrap's /ip4/.../tcp/.../p2p/...")
    g.add_argument("--run-id", default=None,
                   help=f"run to join (DHT namespace; default: the one in --config, else {DEFAULT_RUN_ID!r})")
    g.add_argument("--identity", default=None, help="libp2p identity file; created if missing, keeps the peer id")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a public node)")
    g.add_argument("--port", type=int, default=0, help="TCP port to listen on (0: any free port)")
    g.add_argument("--announce", nargs="*", default=None, metavar="MULTIADDR",
                   help="addresses others should dial (e.g. your public IP) if not the listen address")
    g.add_argument("--reachability", choices=("off", "auto", "public", "private"), default="auto",
                   help="can others dial this node? auto (default): decided at start (off on loopback; public "
                        "for a bootstrap or with --announce; private when this host sends from a private "
                        "address through a router); public: yes, and it relays for nodes behind NAT (capped); "
                        "private: no (home NAT): reserve a slot on a relay and serve through it; off: no NAT "
                        "helpers at all (see docs/nat.md)")
    g.add_argument("--public", dest="reachability", action="store_const", const="public",
                   help="same as --reachability public (kept for old scripts)")
    g.add_argument("--relay", nargs="+", default=[], metavar="MULTIADDR",
                   help="relays a private node reserves a slot on (default: the --initial-peers)")
    g.add_argument("--relay-max-reservations", type=int, default=64, metavar="N",
                   help="public nodes relay for at most N nodes behind NAT (0: relay for nobody)")
    g.add_argument("--relay-max-circuits", type=int, default=16, metavar="N",
                   help="relayed connections per node behind NAT at once")
    g.add_argument("--relay-buffer-kib", type=int, default=1024, metavar="KIB",
                   help="relay buffer per relayed connection and direction")


def add_monitoring_args(p) -> None:
    g = p.add_argument_group("monitoring")
    g.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off)")
    g.add_argument("--metrics-host", default="127.0.0.1",
                   help="address for /metrics (0.0.0.0 to let a Prometheus on another host scrape it)")
    g.add_argument("--verbose", "-v", action="store_true", help="debug logging")


# --- devices and identities ------------------------------------------------------------------------
def resolve_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {name}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but this machine has no usable CUDA GPU")
    return dev


def identity_peer_id(path: str) -> str:
    """The libp2p peer id of an identity file, creating the file if it does not exist yet."""
    import os
    from hivemind.p2p import P2P, PeerID
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        P2P.generate_identity(path)
    with open(path, "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()
