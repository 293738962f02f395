"""`resbm-node status`: what the DHT says about a swarm: stages x replicas (stage 0's replicas are
the trainers), throughput, queue, record age and version;
stages with no replica, stage 0 included, are flagged. `--watch` refreshes, `--json` is for
scripts (one JSON document; with --watch, one per line)."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from node.runtime import SocketJanitor, close_hivemind, run_command, setup_logging, stop_event_on_signals
from protocol import MAX_STAGES, PROTOCOL_VERSION, stage_role
from swarm.config import DEFAULT_RUN_ID, LOCAL_RUN_ID, ConfigError, RunConfig

log = logging.getLogger("resbm.status")

DEFAULT_RUN_IDS = (DEFAULT_RUN_ID, LOCAL_RUN_ID)  # the defaults of bootstrap/join and of local


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show the swarm's stages and replicas as the DHT sees them",
                       description="Join the DHT briefly (serving no stage), read the run config and "
                                   "the signed stage records, and print a table of stages x replicas.")
    add_reader_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until interrupted")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=main)


def add_reader_args(p) -> None:
    """Flags of a peer that only reads the swarm's records (status, monitor)."""
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR",
                   help="multiaddrs of running peers, e.g. the bootstrap's /ip4/.../tcp/.../p2p/... "
                        "(any live peer's address will do)")
    p.add_argument("--run-id", default=None,
                   help=f"run to inspect (default: whichever of {', '.join(DEFAULT_RUN_IDS)} exists; "
                        f"`resbm-node local` uses resbm-local, bootstrap/join resbm)")
    p.add_argument("--host", default="127.0.0.1", help="address this reading peer listens on")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the run config record")


# --- reading the DHT ---------------------------------------------------------------------------
async def snapshot(dht, run_id: str, config_timeout: float = 0.0) -> dict:
    """One JSON-able picture of the swarm (see `render_table` for the fields)."""
    from hivemind.utils import get_dht_time
    from node.announce import stage_items  # (hivemind: not while building --help)

    published, run, error = await _published_run(dht, run_id, config_timeout)
    fingerprint = run.fingerprint if run else None
    version = published.get("version") if published else None
    tokens_per_microbatch = run.train.microbatch_size * run.model.seq_len if run else None

    # without a config we do not know how many stages there are: look under every stage key
    items = await stage_items(dht, run_id, range(run.model.n_stages if run else MAX_STAGES))
    now = get_dht_time()
    live, ignored = _sort_records(items, now, fingerprint, version if version is not None else PROTOCOL_VERSION)

    n_stages = run.model.n_stages if run else 1 + max([r["stage"] for r in live.values()], default=0)
    stages = []
    for k in range(n_stages):
        reps = sorted((r for r in live.values() if r["stage"] == k), key=lambda r: r["peer_id"])
        role = stage_role(k, n_stages)
        stages.append({
            "stage": k, "role": role, "missing": not reps,
            "replicas": [{
                "peer_id": r["peer_id"], "role": role,
                "throughput": r["throughput"],
                "tokens_per_s": r["throughput"] * tokens_per_microbatch if tokens_per_microbatch else None,
                "queue": r["queue"], "age_s": r["age_s"], "version": r["version"], "step": r["step"], "state": r["state"],
                "fingerprint": r["fingerprint"], "uptime_s": round(max(0.0, now - r["started"]), 1),
                "relayed": r["relayed"], "distance": r.get("distance"),
            } for r in reps],
        })
    missing = [s["stage"] for s in stages if s["missing"]]
    return {"run_id": run_id, "fingerprint": fingerprint, "version": version, "n_stages": n_stages,
            "dht_time": now, "stages": stages, "missing_stages": missing,
            "replicas_total": sum(len(s["replicas"]) for s in stages), "ignored_records": ignored,
            "ok": error is None and not missing, "error": error}


async def _published_run(dht, run_id: str, timeout: float) -> tuple[dict | None, RunConfig | None, str | None]:
    """The run config record (waiting up to `timeout` for it), the run config it holds, and what was
    wrong if there is none."""
    from node.announce import wait_for_config
    published = await wait_for_config(dht, run_id, timeout)
    if published is None:
        return None, None, f"no run config for run {run_id!r} in the DHT (is its bootstrap up? is --run-id right?)"
    try:
        return published, RunConfig.from_wire_dict(published["config"]), None
    except (ConfigError, KeyError, TypeError) as e:
        return published, None, f"the published run config is malformed: {e}"


def _sort_records(items, now: float, fingerprint: str | None, version: int) -> tuple[dict[str, dict], list[dict]]:
    """The newest usable record of each peer, and the records ignored with the reason why."""
    from node.announce import classify, newest_per_peer
    usable, ignored = [], []
    for _, subkey, item in items:
        rec, why = classify(subkey, item.value, now, fingerprint, version)
        if rec is None or why:
            rec = rec or {}
            ignored.append({"peer_id": rec.get("peer_id"), "stage": rec.get("stage"), "reason": why or "malformed",
                            "state": rec.get("state"), "fingerprint": rec.get("fingerprint"),
                            "version": rec.get("version")})
            continue
        usable.append(rec)
    return newest_per_peer(usable), ignored


# --- printing ----------------------------------------------------------------------------------
def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else "…" + peer_id[-14:]


def _percent(distance: float | None) -> str:
    """A replica's distance from its group's mean at its last averaging round, or '-' before any."""
    return "-" if distance is None else f"{100 * distance:.2f}%"


def render_table(snap: dict) -> str:
    lines = []
    if snap["error"]:
        lines.append(f"error: {snap['error']}")
    lines.append(f"run {snap['run_id']}  fingerprint {snap['fingerprint'] or '?'}  protocol {snap['version'] or '?'}  "
                 f"{snap['n_stages']} stages  {snap['replicas_total']} nodes  "
                 f"at {time.strftime('%H:%M:%S', time.localtime(snap['dht_time']))}")
    header = (f"{'STAGE':<6}{'ROLE':<12}{'PEER':<17}{'STATE':<9}{'TOKENS/S':>10}{'MICRO/S':>8}{'QUEUE':>7}{'STEP':>7}"
              f"{'AGE':>7}{'VER':>5}{'APART':>8}  VIA")
    lines.append(header)
    for s in snap["stages"]:
        if not s["replicas"]:
            what = "TRAINER" if s["stage"] == 0 else "REPLICA"
            lines.append(f"{s['stage']:<6}{s['role']:<12}!! NO {what}: start one with "
                         f"`resbm-node join --stage {s['stage']} ...`")
            continue
        for r in s["replicas"]:
            tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] is not None else "?"
            lines.append(f"{s['stage']:<6}{r['role']:<12}{_short(r['peer_id']):<17}{r['state']:<9}{tps:>10}"
                         f"{r['throughput']:>8.1f}{r['queue']:>7}{r['step']:>7}{r['age_s']:>6.0f}s{r['version']:>5}"
                         f"{_percent(r['distance']):>8}  {'relay' if r['relayed'] else 'direct'}")
    if snap["missing_stages"]:
        lines.append(f"MISSING: stage(s) {', '.join(map(str, snap['missing_stages']))} have no replica; "
                     f"training is paused until each has one")
    idle = [r for r in snap["ignored_records"] if r["reason"].startswith("not serving")]
    if idle:
        lines.append("not serving: " + ", ".join(f"{_short(r['peer_id'])} (stage {r['stage']}, {r['state']})"
                                                 for r in idle))
    if snap["ignored_records"]:
        reasons: dict[str, int] = {}
        for r in snap["ignored_records"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        lines.append("ignored records: " + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())))
    lines.append("(MICRO/S: microbatches per second a replica sustains; AGE: seconds since its record was refreshed; "
                 "APART: how far its parameters were from its replicas' mean at its last averaging round)")
    return "\n".join(lines)


async def resolve_run_id(dht, requested: str | None, timeout: float) -> str:
    """--run-id, or the first default run id that has a published config (waiting up to `timeout`)."""
    from node.announce import fetch_config
    if requested:
        return requested
    deadline = time.monotonic() + timeout
    while True:
        for run_id in DEFAULT_RUN_IDS:
            if await fetch_config(dht, run_id) is not None:
                return run_id
        if time.monotonic() >= deadline:
            return DEFAULT_RUN_IDS[0]
        await asyncio.sleep(0.5)


# --- command -----------------------------------------------------------------------------------
def main(args) -> int:
    setup_logging(args.verbose)
    return run_command(_main(args))


async def _main(args) -> int:
    from node.dht import start_dht
    janitor = SocketJanitor()
    stop = stop_event_on_signals(asyncio.get_running_loop())
    dht = None
    try:
        dht = start_dht(args.run_id or DEFAULT_RUN_IDS[0], args.initial_peers, host=args.host)  # dials out only: no NAT helpers
        run_id = await resolve_run_id(dht, args.run_id, args.timeout)
        first = True
        while True:
            snap = await snapshot(dht, run_id, config_timeout=args.timeout if first and args.run_id else 0.0)
            if snap["error"] and not args.run_id:
                snap["error"] += f"; tried run ids {', '.join(DEFAULT_RUN_IDS)}: pass --run-id"
                run_id = await resolve_run_id(dht, None, 0.0)  # --watch: a swarm that starts later is found
            first = False
            if args.json:
                print(json.dumps(snap, indent=None if args.watch else 1), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[H\033[2J", end="")
                print(render_table(snap) + ("\n" if args.watch else ""), flush=True)
            if not args.watch:
                return 0 if snap["error"] is None else 1
            try:
                await asyncio.wait_for(stop.wait(), args.watch)
                return 0
            except asyncio.TimeoutError:
                pass
    finally:
        await close_hivemind(None, dht)
        janitor.sweep()
