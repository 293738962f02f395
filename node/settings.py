"""Every setting of a node process, one frozen dataclass per component (torchtitan style, like the
run's ModelConfig/TrainConfig/DataConfig in swarm/config.py).

Each field is written once: its default, its help and the argparse group its flag is shown in.
node/args.py generates the flags from these fields (`--field-name` unless `flag` says otherwise),
reads `RESBM_<FLAG>` environment variables for every flag and `join --config-file node.toml`; the
runtime (node/lifecycle.py, node/trainer.py, node/route.py, ...) receives the dataclasses, never an
argparse namespace. Values that follow from others are properties (the record's lifetime and the
route refresh follow the record period), not settings of their own.

Precedence, highest first: command-line flag, RESBM_* environment variable, --config-file, the
per-command default below (COMMAND_DEFAULTS), the field's default.

Nothing here imports torch or hivemind: `resbm-node --help` must answer fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from node.admission import BAD_PEER_BAN_S, BAD_REQUESTS, BAD_WINDOW_S, JOINERS, STATE_OTHERS, STRANGERS
from swarm.averaging_plan import BUDGET_SHARE
from swarm.config import DEFAULT_RUN_ID, TrainConfig
from swarm.deadlines import RETRY_BASE_S, RETRY_CAP_S
from swarm.routing import BAN_BASE_S, BAN_MAX_S

REACHABILITY = ("auto", "public", "private", "off")

# argparse groups, in the order `join --help` shows them (tests/test_cli_config.py)
CONNECT, SERVE, DEVICE, MONITORING, ADVANCED, TRAINERS = (
    "where to connect", "what to serve", "device", "monitoring", "advanced", "trainers only (--stage 0)")


def setting(default, help: str, *, group: str, flag: str | None = None, short: str | None = None, type=None,
            choices=None, metavar=None, nargs=None, required: bool = False, hidden: bool = False):
    """A node setting that is also a flag: `flag` defaults to --field-name, `type` to the default's type,
    `nargs` ("+", "*") makes a tuple of values; `hidden` settings are flags, environment variables
    and config-file keys like the others but not listed in --help (tests and tuning only)."""
    return field(default=default, metadata=dict(help=help, group=group, flag=flag, short=short, type=type,
                                                choices=choices, metavar=metavar, nargs=nargs, required=required,
                                                hidden=hidden))


def data_dir() -> Path:
    """Where a node keeps what should survive a restart by default ($XDG_DATA_HOME, else
    ~/.local/share, then resbm-swarm)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "resbm-swarm"


def positive_seconds(text) -> float:
    """argparse type: a finite number of seconds above 0 (a period of 0 would never wait)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def link_fraction(text) -> float:
    """argparse type: a share of a link, above 0 and at most 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share of the link above 0 and at most 1, got {text!r}")
    return value


def stage_arg(text):
    """argparse type of --stage: a stage number or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a stage number or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("stage numbers start at 0")
    return value


# --- where to connect (node/dht.py) ---------------------------------------------------------------
@dataclass(frozen=True)
class ConnectSettings:
    initial_peers: tuple = setting((), "multiaddrs of running peers, e.g. the bootstrap's /ip4/.../tcp/.../p2p/...",
                                   group=CONNECT, nargs="+", metavar="MULTIADDR", type=str)
    run_id: str | None = setting(None, f"run to join (DHT namespace; default: the one in --config, else "
                                       f"{DEFAULT_RUN_ID!r})", group=CONNECT, type=str)
    identity: str | None = setting(None, "libp2p identity file; created if missing, keeps the peer id", group=CONNECT,
                                   type=str)
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)", group=CONNECT)
    port: int = setting(0, "TCP port to listen on (0: any free port)", group=CONNECT)
    announce: tuple | None = setting(None, "addresses others should dial (e.g. your public IP) if not the listen "
                                           "address", group=CONNECT, nargs="*", metavar="MULTIADDR", type=str)
    reachability: str = setting(
        "auto", "can others dial this node? auto (default): decided at start (off on loopback; public for a "
                "bootstrap or with --announce; private when this host sends from a private address through a "
                "router); public: yes, and it relays for nodes behind NAT (capped); private: no (home NAT): "
                "reserve a slot on a relay and serve through it; off: no NAT helpers at all (see docs/nat.md)",
        group=CONNECT, choices=REACHABILITY)
    relay: tuple = setting((), "relays a private node reserves a slot on (default: the --initial-peers)",
                           group=CONNECT, nargs="+", metavar="MULTIADDR", type=str)
    relay_max_reservations: int = setting(64, "public nodes relay for at most N nodes behind NAT (0: relay for "
                                              "nobody)", group=CONNECT, metavar="N")
    relay_max_circuits: int = setting(16, "relayed connections per node behind NAT at once", group=CONNECT,
                                      metavar="N")
    relay_buffer_kib: int = setting(1024, "relay buffer per relayed connection and direction", group=CONNECT,
                                    metavar="KIB")
    relay_wait_s: float = setting(300.0, "a private node waits this long for its relay reservation (p2pd's "
                                         "autorelay reserves only after its boot delay, measured at 1.5-3 min)",
                                  group=CONNECT, metavar="S", hidden=True)


# --- monitoring (node/metrics.py, logging) -------------------------------------------------------
@dataclass(frozen=True)
class MonitoringSettings:
    metrics_port: int = setting(0, "serve Prometheus /metrics on this port (0: off)", group=MONITORING)
    metrics_host: str = setting("127.0.0.1", "address for /metrics (0.0.0.0 to let a Prometheus on another host "
                                             "scrape it)", group=MONITORING)
    verbose: bool = setting(False, "debug logging", group=MONITORING, short="-v")


# --- stage records (node/announce.py) ------------------------------------------------------------
@dataclass(frozen=True)
class RecordSettings:
    # 15 s, not 5: each store costs ~1 KB per node holding the key and every read's answer carries every
    # record of the key; at 5 s that was 6.2% of an idle node's 1 Mbit/s link (3.4% at 15 s,
    # bench.idle_traffic) and a DHT share of a busy trainer's link that grew with the swarm
    # (bench.scaling). Routers do not wait for records to drop a dead replica: its first failed call does.
    announce_period: float = setting(
        15.0, "re-sign and store this node's stage record every S seconds, and re-read the others' as often; "
              "a record expires after 3 S. Shorter: joiners are found sooner, at ~1 KB per store per node that "
              "holds the key; routers drop a dead replica on its first failed call either way",
        group=ADVANCED, type=positive_seconds, metavar="S")
    # 600 s, not 120: when every node re-published, each store's lookups carried every node's 1.5 kB copy;
    # at 120 s (a refresh every 30 s) that was a quarter of an idle node's traffic (bench.idle_traffic).
    # Now 3 keepers publish (node/announce.py keep_config_alive); the others check every quarter of it.
    config_ttl_s: float = setting(600.0, "lifetime of the run config record this node publishes; a keeper "
                                         "re-publishes it every quarter of that, so it survives a lost refresh or two",
                                  group=ADVANCED, type=positive_seconds, metavar="S", hidden=True)

    @property
    def ttl_s(self) -> float:
        """Lifetime of one stage record: three periods, so one lost refresh does not drop the node."""
        return 3 * self.announce_period

    @property
    def read_s(self) -> float:
        """How often a node re-reads the others' records (its routes, its joiners): once per period,
        as often as they can change."""
        return self.announce_period


# --- routes (node/route.py, swarm/deadlines.py) ---------------------------------------------------
@dataclass(frozen=True)
class RouteSettings:
    transit_s: float = setting(0.2, "seconds a hop keeps back for a message's transit each way", group=ADVANCED,
                               metavar="S", hidden=True)
    patience_s: float = setting(3.0, "how long one call may wait for a banned replica's ban to end", group=ADVANCED,
                                metavar="S", hidden=True)
    ban_base_s: float = setting(BAN_BASE_S, "a failed replica's first ban; each further failure doubles it",
                                group=ADVANCED, metavar="S", hidden=True)
    ban_max_s: float = setting(BAN_MAX_S, "the longest ban of a failed replica", group=ADVANCED, metavar="S",
                               hidden=True)
    retry_base_s: float = setting(RETRY_BASE_S, "a hop's backoff before its second retry; doubling from there",
                                  group=ADVANCED, metavar="S", hidden=True)
    retry_cap_s: float = setting(RETRY_CAP_S, "the longest backoff between a hop's retries", group=ADVANCED,
                                 metavar="S", hidden=True)


# --- what to serve, and the node's life (node/lifecycle.py) --------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    stage: object = setting(None, "stage to serve (0: a trainer, which feeds its own share of the data; any number "
                                  "may run), or 'auto': the stage that needs throughput most; an auto node also "
                                  "moves later if the swarm becomes badly unbalanced",
                            group=SERVE, type=stage_arg, required=True)
    config: str | None = setting(None, "run config JSON (as written by `bootstrap --save-config`)", group=SERVE,
                                 type=str)
    checkpoint_dir: str = setting(str(Path.home() / ".cache" / "resbm-swarm"),
                                  "where this node keeps its stage checkpoint ('' to disable); with the same "
                                  "--identity a restarted node resumes from it when no live replica can hand over "
                                  "the state", group=SERVE)
    save_every_min: float = setting(10.0, "checkpoint every N minutes (and on exit)", group=ADVANCED)
    init_from: str | None = setting(None, "with no live replica and no checkpoint, start from this `resbm-node "
                                          "export` file's weights (same model) instead of initialisation",
                                    group=ADVANCED, metavar="EXPORT", type=str)
    rebalance_every: float = setting(60.0, "auto nodes: seconds between balance checks", group=ADVANCED)
    auto_target: int | None = setting(None, "tests: the stage an auto node starts on", group=ADVANCED, type=int,
                                      hidden=True)
    config_timeout_s: float = setting(30.0, "how long a joining node waits for the run config in the DHT",
                                      group=ADVANCED, type=positive_seconds, metavar="S", hidden=True)
    drain_timeout_s: float = setting(10.0, "leaving a stage: requests still in flight after this many seconds are "
                                           "abandoned (their callers retry elsewhere)", group=ADVANCED,
                                     flag="--drain-timeout", metavar="S")
    # whom the stage serves when many ask at once (node/admission.py)
    strangers: int = setting(STRANGERS, "compute calls in flight at once for peers that are not the run's trainers",
                             group=ADVANCED, metavar="N", hidden=True)
    joiner_downloads: int = setting(JOINERS, "state downloads at once for peers joining this stage", group=ADVANCED,
                                    metavar="N", hidden=True)
    other_downloads: int = setting(STATE_OTHERS, "state downloads at once for any other peer", group=ADVANCED,
                                   metavar="N", hidden=True)
    bad_requests: int = setting(BAD_REQUESTS, "refuse a peer after this many bad requests within --bad-window-s",
                                group=ADVANCED, metavar="N", hidden=True)
    bad_window_s: float = setting(BAD_WINDOW_S, "the window in which a peer's bad requests are counted",
                                  group=ADVANCED, metavar="S", hidden=True)
    bad_peer_ban_s: float = setting(BAD_PEER_BAN_S, "how long a peer with too many bad requests is refused",
                                    group=ADVANCED, metavar="S", hidden=True)


# --- the device (swarm/stage_worker.py) -----------------------------------------------------------
@dataclass(frozen=True)
class DeviceSettings:
    device: str = setting("auto", "auto | cpu | cuda[:i]", group=DEVICE)
    threads: int = setting(0, "torch CPU threads (0: torch default)", group=DEVICE)
    # Per node, not part of the run config: CPU and GPU replicas of a stage compute the same math.
    precision: str = setting("auto", "the forward's precision: auto (bf16 on a GPU that has it, else fp16 with a "
                                     "loss scaler; fp32 on a CPU), bf16, fp16 or fp32", group=DEVICE,
                             choices=("auto", "bf16", "fp16", "fp32"))  # swarm/precision.py PRECISIONS (no torch here)
    activation_checkpointing: bool = setting(False, "keep only each block's input for the backward and recompute "
                                                    "the rest: ~1/3 more compute for most of the activation memory",
                                             group=DEVICE)


# --- a trainer (node/trainer.py, node/training_run.py) --------------------------------------------
@dataclass(frozen=True)
class TrainerSettings:
    steps: int = setting(TrainConfig.steps, "optimizer steps to train", group=TRAINERS)  # one default, train-local's
    data: str | None = setting(None, "where this node keeps the run's data, if not at the run config's path (it must "
                                     "be the same files: names and sizes are checked)", group=TRAINERS,
                               metavar="PATH", type=str)
    tokenizer: str | None = setting(None, "where this node keeps the run's tokenizer file, if not at the run config's "
                                          "path (its content is checked)", group=TRAINERS, metavar="FILE", type=str)
    eval_every: int = setting(25, "validation every N steps (0: only at the end)", group=TRAINERS)
    json_out: str | None = setting(None, "write the run summary JSON here", group=TRAINERS, type=str)
    stall_timeout_s: float = setting(float("inf"), "give up after a stage has had no replica at all this long "
                                                   "(seconds)", group=TRAINERS, flag="--stall-timeout", metavar="S")
    window: int = setting(0, "microbatches this trainer keeps in flight, across step boundaries (0: one step's "
                             "worth)", group=TRAINERS, metavar="N")
    sync: bool = setting(False, "start no microbatch of the next step before this step's are in: nothing is ever "
                                "stale, and with one replica per stage a step equals train-local's (slower: the "
                                "pipeline drains)", group=TRAINERS)
    min_route_timeout_s: float = setting(30.0, "a microbatch's walk is given at least this long", group=TRAINERS,
                                         metavar="S", hidden=True)
    poll_min_s: float = setting(1.0, "pauses poll the DHT from this interval ...", group=TRAINERS, metavar="S",
                                hidden=True)
    poll_max_s: float = setting(10.0, "... doubling up to this one", group=TRAINERS, metavar="S", hidden=True)


# --- replica averaging (node/averaging.py, swarm/averaging_plan.py) -------------------------------
@dataclass(frozen=True)
class AveragingSettings:
    link_mbit: float = setting(10.0, "this node's link rate per direction, in Mbit/s: replica averaging is paced "
                                     "to --link-share of it, and a state reply to a joiner is about 2 s of it",
                               group=ADVANCED, metavar="MBIT")
    link_share: float = setting(BUDGET_SHARE, "the share of that link replica averaging may use per direction: "
                                              "its rounds are paced to it", group=ADVANCED, type=link_fraction,
                                metavar="F")
    gather_s: float = setting(60.0, "an averaging round waits this long for the stage's other replicas (they "
                                    "reach their rounds at different moments)", group=ADVANCED, metavar="S",
                              hidden=True)
    # Not hivemind's 1-2 s: on a link the codes keep busy a matchmaking request waits behind them (in the
    # scaling lab at 3 per stage, rounds with 1 s found no group: 9 of 9 failed). 15 s, as hivemind's
    # Optimizer: a group with every replica starts at once (node/averaging.py sets the target), so this
    # only bounds how long a group short of one waits for it; with 5 s a replica that reached its round
    # a few seconds after two others, or joined a leader just after its declared time, found no group.
    matchmaking_s: float = setting(15.0, "the longest an averaging group short of some of the stage's replicas waits "
                                         "for them", group=ADVANCED, metavar="S", hidden=True)
    # hivemind re-reads the group key as soon as each read answers while a replica waits (node/group_keys.py)
    group_poll_s: float = setting(2.0, "a replica waiting for its averaging group reads the group's DHT key at most "
                                       "this often", group=ADVANCED, metavar="S", hidden=True)


# --- a whole `join` process -----------------------------------------------------------------------
@dataclass(frozen=True)
class JoinSettings:
    """Everything `resbm-node join` was told, by component."""
    connect: ConnectSettings = field(default_factory=ConnectSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    records: RecordSettings = field(default_factory=RecordSettings)
    route: RouteSettings = field(default_factory=RouteSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    averaging: AveragingSettings = field(default_factory=AveragingSettings)

    @classmethod
    def from_args(cls, args) -> "JoinSettings":
        return cls(**{name: from_namespace(component, args) for name, component in _COMPONENTS.items()})

    def replace(self, **components) -> "JoinSettings":
        return dataclasses.replace(self, **components)


_COMPONENTS = {"connect": ConnectSettings, "serve": ServeSettings, "device": DeviceSettings,
               "monitoring": MonitoringSettings, "records": RecordSettings, "route": RouteSettings,
               "trainer": TrainerSettings, "averaging": AveragingSettings}
JOIN_COMPONENTS = tuple(_COMPONENTS.values())

# Where a command's default differs from the field's, on purpose (each written here, once).
COMMAND_DEFAULTS = {
    "join": {"host": "0.0.0.0", "stall_timeout_s": 600.0},  # a volunteer serves others; a stalled trainer gives up
    "train-local": {"eval_every": 50},
    "local": {"n_stages": 4, "n_layers": 4, "steps": 100},  # (run config fields: swarm/config.py)
}


def from_namespace(cls, args):
    """The `cls` settings an argparse namespace (or any object with the field names) holds; fields it
    lacks keep their defaults."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def default_identity(run_id: str, stage) -> Path:
    """`join`'s identity file when --identity is not given: one per run and stage under the user's data
    directory, so a restarted node is the same peer and finds its own checkpoint (named by peer id)."""
    return data_dir() / "identities" / f"{run_id}-stage{stage}.id"
