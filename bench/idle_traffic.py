"""Quiet when idle? A node's background traffic on an idle swarm, against the goal of issue 20:
at most 5% of a 1 Mbit/s link with 2 volunteers per stage.

    python -m bench.idle_traffic [--quick | --scale] [--announce-periods 5,15] [--window S]

A lab (bench/netns.py: one network namespace per node, every link shaped with `tc tbf` to
`--rate` Mbit/s each way) holds a bootstrap and `replicas` replicas of every later stage of the
model. Once every node serves (the second replica of a stage has downloaded its state) and a settle
period has passed, each namespace's interface counters (eth0 tx and rx bytes: every frame on its
shaped link, TCP/IP, TLS, yamux and libp2p framing included) are read every few seconds over a
window. Nothing feeds microbatches, so what the links carry is the background: stage-record stores
(every `--announce-period`, at the holders the last walk found: node/record_store.py), reads of its
own stage's records (watch_swarm, once per period; with no DHT cache a node that does not hold the key
asks a holder), the run config's keep-alive (a check every RESBM_CONFIG_TTL_S / 4 = 30 s; 3 keepers
re-publish), hivemind's DHT upkeep, libp2p's own messages and, if any, averaging matchmaking.

Trainers: a trainer (`join --stage 0`) cannot idle. With `--steps 0` it waits for every stage,
trains nothing, writes its summary and leaves (node/trainer_loop.py: the loop ends at once; the
lifecycle then drains and stops), so a swarm "with trainers joined but not training" does not
exist. The idle swarm measured here is therefore the stage replicas and the bootstrap only; a
trainer's background tasks while it trains are the same ones a stage node runs (node/lifecycle.py
`_keep_fresh`: its record, watch_swarm, the config keep-alive), so the stage rows stand for it.
The first row checks that claim: after its window a trainer is started with `--steps 0` in its own
namespace and the bench reports whether, and how fast, it left.

Where the bytes go: `--count-rpcs` (on by default) puts a sitecustomize.py (HOOK below, written into
the bench's work folder; node/ is untouched) on every node's PYTHONPATH that counts every unary RPC
through hivemind's p2pd client by kind (DHT find / store / ping, averager matchmaking, ...), with the
payload bytes of its requests and answers; the rest of the interface bytes is framing (libp2p, yamux,
TLS, TCP/IP headers, ACKs). `--breakdown` (on by default, off with --quick) adds rows at the first
period with one background task removed: `no-config-refresh` (RESBM_CONFIG_TTL_S=86400: the keepers
publish the config once, at start), `no-averager` (average_every=0: no DecentralizedAverager
process). With two periods, each node's bytes/s are also split into a part per record period and a
part independent of it (rate = fixed + per_period_bytes / period, solved from the two rows).

Writes bench/results/idle_traffic.json and .png. Needs root.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from statistics import mean

from bench.bandwidth import cpu_jiffies, parse_bench_args
from bench.netns import NetnsLab
from bench.plotting import line_plot, machine_info, markdown_table, write_json
from node.local_swarm import Swarm, tail
from node.runtime import identity_peer_id
from swarm.config import ModelConfig, RunConfig, TrainConfig

GOAL = 0.05  # of the link, per direction (issue 20)
SIZES = {
    "quick": dict(stages=3, replicas=2, layers=3, window=30.0, settle=5.0, periods=[5.0], breakdown=False,
                  probe_trainer=False, start_timeout=150.0),
    "default": dict(stages=3, replicas=2, layers=3, window=120.0, settle=30.0, periods=[5.0, 15.0], breakdown=True,
                    probe_trainer=True, start_timeout=240.0),
    "scale": dict(stages=4, replicas=3, layers=4, window=120.0, settle=30.0, periods=[5.0, 15.0], breakdown=True,
                  probe_trainer=True, start_timeout=400.0),
}
VARIANTS = {  # name -> (extra environment of every node, average_every or None for the run default)
    "default": ({}, None),
    "no-config-refresh": ({"RESBM_CONFIG_TTL_S": "86400"}, None),
    "no-averager": ({}, 0),
}
BREAKDOWN = ["no-config-refresh", "no-averager"]  # --breakdown's rows
SAMPLE_S = 5.0

# --count-rpcs: a sitecustomize.py put on every node's PYTHONPATH (the bench writes it into its work folder;
# node/ is not touched). It wraps hivemind's p2pd client, through which every unary RPC goes (DHT find /
# store / ping, averager matchmaking, our own info calls): per handler name, calls and the bytes of
# requests and responses as serialized protobufs, each side seen from this process. Streams (state
# transfer, all-reduce, codes) are counted as calls only. Every process (the node, its forked DHT and
# averager processes) writes its counters, keyed by its network namespace, to the folder every second.
HOOK = r"""
import os
if os.environ.get("RESBM_RPC_COUNT_DIR"):
    import json, threading, time
    from hivemind.p2p.p2p_daemon_bindings import p2pclient
    _dir, _counts, _state = os.environ["RESBM_RPC_COUNT_DIR"], {}, {"pid": None}

    def _reset():
        _counts.clear()
        _state["pid"] = None

    os.register_at_fork(after_in_child=_reset)

    def _dump():
        ns = os.readlink("/proc/self/ns/net").strip("net:[]")
        path = os.path.join(_dir, f"{ns}-{os.getpid()}.json")
        while True:
            time.sleep(1.0)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"ns": ns, "pid": os.getpid(), "counts": _counts}, f)
            os.replace(tmp, path)

    def _count(key, tx, rx):
        if _state["pid"] != os.getpid():
            _state["pid"] = os.getpid()
            threading.Thread(target=_dump, daemon=True).start()
        c = _counts.setdefault(key, [0, 0, 0])
        c[0] += 1
        c[1] += tx
        c[2] += rx

    _call, _add, _open, _stream = (p2pclient.Client.call_unary_handler, p2pclient.Client.add_unary_handler,
                                   p2pclient.Client.stream_open, p2pclient.Client.stream_handler)

    async def call_unary_handler(self, peer_id, proto, data):
        response = await _call(self, peer_id, proto, data)
        _count("out " + proto, len(data), len(response))
        return response

    async def add_unary_handler(self, proto, handler, balanced=False):
        async def counted(request, remote_id):
            response = await handler(request, remote_id)
            _count("in " + proto, len(response) if isinstance(response, (bytes, bytearray)) else 0, len(request))
            return response
        return await _add(self, proto, counted, balanced)

    async def stream_open(self, peer_id, protocols):
        _count("stream out " + ",".join(protocols), 0, 0)
        return await _open(self, peer_id, protocols)

    async def stream_handler(self, proto, handler_cb, balanced=False):
        async def counted(*args):
            _count("stream in " + proto, 0, 0)
            return await handler_cb(*args)
        return await _stream(self, proto, counted, balanced)

    p2pclient.Client.call_unary_handler, p2pclient.Client.add_unary_handler = call_unary_handler, add_unary_handler
    p2pclient.Client.stream_open, p2pclient.Client.stream_handler = stream_open, stream_handler
"""


def install_hook(workdir: Path) -> dict:
    """The environment that puts HOOK on every node's PYTHONPATH, counting its RPCs into workdir/rpc-counts."""
    return {**write_hook(workdir), "RESBM_RPC_COUNT_DIR": str(workdir / "rpc-counts")}


def write_hook(workdir: Path) -> dict:
    hook = workdir / "rpc-hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    return {"PYTHONPATH": str(hook)}


def read_rpc_counts(folder: Path) -> dict:
    """{(namespace, pid): {key: [calls, tx bytes, rx bytes]}} of every process that has written its counters."""
    out = {}
    for f in folder.glob("*.json") if folder.is_dir() else []:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out[(d["ns"], d["pid"])] = d["counts"]
    return out


def rpc_short(key: str) -> str:
    """A handler's kind without the run's prefix: 'out DHTProtocol.rpc_find', 'in ..._avg_stage1....rpc_join_group'
    -> 'out rpc_find', 'in averager rpc_join_group'."""
    direction, _, proto = key.partition(" ")
    if direction == "stream":
        direction, _, proto = key.partition(" ")[2].partition(" ")
        direction = f"stream {direction}"
    name = proto.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    return f"{direction} {'averager ' if '_avg_' in proto else ''}{name}"


def rpc_window(before: dict, after: dict, ns_of_host: dict, window: float) -> dict:
    """Per host name: {kind: {"calls_per_s", "tx_Bps", "rx_Bps"}} over the window (payload bytes, no framing)."""
    out: dict = {}
    for key, counts in after.items():
        host = ns_of_host.get(key[0])
        if host is None:
            continue
        old = before.get(key, {})
        for k, (n, tx, rx) in counts.items():
            n0, tx0, rx0 = old.get(k, (0, 0, 0))
            e = out.setdefault(host, {}).setdefault(rpc_short(k), {"calls_per_s": 0.0, "tx_Bps": 0.0, "rx_Bps": 0.0})
            e["calls_per_s"] += (n - n0) / window
            e["tx_Bps"] += (tx - tx0) / window
            e["rx_Bps"] += (rx - rx0) / window
    return {h: {k: v for k, v in kinds.items() if v["calls_per_s"]} for h, kinds in out.items()}


def run_config(size: dict, average_every: int | None, tag: str) -> RunConfig:
    """A tiny model: an idle swarm moves no codes, so the model's size only matters at start-up."""
    model = ModelConfig(d_model=64, n_layers=size["layers"], n_heads=2, seq_len=32, n_stages=size["stages"], ratio=8)
    train = TrainConfig(batch_size=4, microbatches=2)
    if average_every is not None:
        train = replace(train, average_every=average_every)
    return RunConfig(model=model, train=train, run_id=f"idle-{tag}")


def lab_nodes(size: dict) -> list[tuple[str, int]]:
    """(name, stage) of every measured namespace: the bootstrap (stage -1), then every stage replica."""
    return [("bootstrap", -1)] + [(f"stage{k}-{r}", k) for k in range(1, size["stages"])
                                  for r in range(size["replicas"])]


FRAME_HEADERS = 14 + 20 + 32  # Ethernet + IPv4 + TCP with timestamps, per frame (what tbf counts besides TCP payload)


def iface_counters(lab: NetnsLab, i: int) -> tuple[int, int, int, int]:
    """(tx bytes, rx bytes, tx frames, rx frames) of host i's eth0 so far."""
    stats = "/sys/class/net/eth0/statistics"
    names = ["tx_bytes", "rx_bytes", "tx_packets", "rx_packets"]
    out = subprocess.run(lab.exec_argv(i, ["cat", *(f"{stats}/{n}" for n in names)]), check=True,
                         capture_output=True, text=True, timeout=15).stdout.split()
    return tuple(int(v) for v in out)


def probe_trainer(swarm: Swarm, lab: NetnsLab, host: int, peers: list[str], timeout: float = 150.0) -> dict:
    """Start trainer0 with --steps 0 and see whether it stays (idles) or leaves."""
    t0 = time.monotonic()
    proc = swarm.start_trainer(0, peers, 0, host=lab.hosts[host].ip, wrap=lambda cmd: lab.exec_argv(host, cmd),
                               extra=["--eval-every", "0", "--checkpoint-dir", ""])
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    log = tail(swarm.run_dir / "trainer0.log", 6)
    return {"exit_code": code, "seconds": round(time.monotonic() - t0, 1), "stayed": code is None,
            "log_tail": log}


def measure(size: dict, period: float, variant: str, workdir: Path, rate: float, window: float, settle: float,
            probe: bool, count_rpcs: bool) -> dict:
    """One idle swarm in the lab; per node: bytes/s each way over the window, and the samples."""
    env, every = VARIANTS[variant]
    tag = f"{variant}-{period:g}"
    nodes = lab_nodes(size)
    run_dir = workdir / tag
    run_dir.mkdir(parents=True)
    counts_dir = None
    if count_rpcs:
        env = {**env, **install_hook(run_dir)}
        counts_dir = Path(env["RESBM_RPC_COUNT_DIR"])
        counts_dir.mkdir()
    run = run_config(size, every, tag)
    trainer_host = len(nodes)  # a namespace for the --steps 0 probe, idle during the window
    run = replace(run, train=replace(run.train, trainers=(identity_peer_id(str(run_dir / "trainer0.id")),)))
    row = {"variant": variant, "announce_period_s": period, "rate_mbit": rate, "window_s": window,
           "settle_s": settle, "average_every": run.train.average_every, "env": env}
    with environment(env), NetnsLab(len(nodes) + 1, rate_mbit=rate) as lab:
        swarm = Swarm(run_dir, threads=1, run=run)
        try:
            t_start = time.monotonic()
            peers = start_nodes(swarm, lab, nodes, period, size["start_timeout"])
            row["start_s"] = round(time.monotonic() - t_start, 1)
            time.sleep(settle)
            ns_of_host = {subprocess.run(lab.exec_argv(i, ["readlink", "/proc/self/ns/net"]), check=True,
                                         capture_output=True, text=True).stdout.strip().strip("net:[]"): name
                          for i, (name, _) in enumerate(nodes)}
            rpc0 = read_rpc_counts(counts_dir) if counts_dir else {}
            cpu0 = cpu_jiffies()
            samples = sample_window(lab, len(nodes), window)
            busy, total = (a - b for a, b in zip(cpu_jiffies(), cpu0))
            if counts_dir:
                time.sleep(1.2)  # every process has dumped its counters since the window closed
                row["rpcs"] = rpc_window(rpc0, read_rpc_counts(counts_dir), ns_of_host,
                                         samples[-1][0] - samples[0][0] + 1.2)
            for name, proc, _ in swarm.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited during the window (code {proc.returncode}):\n"
                                       f"{tail(swarm.run_dir / f'{name}.log')}")
            if probe:
                row["trainer_probe"] = probe_trainer(swarm, lab, trainer_host, peers)
        except RuntimeError as e:
            return {**row, "error": str(e)[-2000:]}
        finally:
            swarm.stop()
    row["cpu_busy"] = busy / total if total else 0.0
    row["nodes"] = node_rows(nodes, samples, rate)
    for n in row["nodes"]:
        kinds = row.get("rpcs", {}).get(n["node"], {})
        n["rpc_payload_tx_Bps"] = sum(k["tx_Bps"] for k in kinds.values())
        n["rpc_payload_rx_Bps"] = sum(k["rx_Bps"] for k in kinds.values())
    row.update(swarm_figures(row["nodes"]))
    return row


def start_nodes(swarm: Swarm, lab: NetnsLab, nodes: list[tuple[str, int]], period: float, timeout: float) -> list[str]:
    """The bootstrap in the lab's first namespace, then one node per namespace, until every one serves;
    returns the bootstrap's addresses."""
    def wrap(i):
        return lambda cmd: lab.exec_argv(i, cmd)
    peers = swarm.start_bootstrap(host=lab.hosts[0].ip, wrap=wrap(0))
    for i, (name, stage) in enumerate(nodes[1:], 1):
        swarm.start_stage(name, stage, peers, host=lab.hosts[i].ip, wrap=wrap(i),
                          extra=["--checkpoint-dir", "", "--announce-period", f"{period:g}"])
    for name, _ in nodes[1:]:
        swarm.wait_for_line(name, "serving", timeout)
    return peers


@contextmanager
def environment(env: dict):
    """`env` in os.environ while the block runs (Swarm.start hands our environment to every node)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sample_window(lab: NetnsLab, hosts: int, window: float) -> list:
    """(seconds into the window, every host's interface counters), every SAMPLE_S, both ends included."""
    samples, t0 = [], time.monotonic()
    while True:
        now = time.monotonic() - t0
        samples.append((now, [iface_counters(lab, i) for i in range(hosts)]))
        if now >= window:
            return samples
        time.sleep(min(SAMPLE_S, max(0.0, window - (time.monotonic() - t0))))


def node_rows(nodes: list[tuple[str, int]], samples: list, rate: float) -> list[dict]:
    link = rate * 1e6 / 8
    (t0, first), (t1, last) = samples[0], samples[-1]
    out = []
    for i, (name, stage) in enumerate(nodes):
        tx, rx, txp, rxp = ((last[i][d] - first[i][d]) / (t1 - t0) for d in range(4))
        series = [(tb, max(cb[i][0] - ca[i][0], cb[i][1] - ca[i][1]) / (tb - ta))
                  for (ta, ca), (tb, cb) in zip(samples, samples[1:])]
        out.append({"node": name, "stage": stage if stage >= 0 else None, "tx_Bps": tx, "rx_Bps": rx,
                    "tx_frames_per_s": txp, "rx_frames_per_s": rxp,
                    "header_share": FRAME_HEADERS * (txp + rxp) / (tx + rx) if tx + rx else 0.0,
                    "share": max(tx, rx) / link, "series_t": [t for t, _ in series],
                    "series_Bps": [v for _, v in series], "peak_sample_share": max(v for _, v in series) / link})
    return out


def swarm_figures(nodes: list[dict]) -> dict:
    worst = max(nodes, key=lambda n: n["share"])
    return {"max_share": worst["share"], "worst_node": worst["node"], "mean_share": mean(n["share"] for n in nodes),
            "mean_tx_Bps": mean(n["tx_Bps"] for n in nodes), "mean_rx_Bps": mean(n["rx_Bps"] for n in nodes),
            "stage_mean_share": mean(n["share"] for n in nodes if n["stage"] is not None)}


def message_sizes(run: RunConfig, period: float) -> dict:
    """Bytes of one signed stage record and one signed config record as hivemind stores them (the
    StoreRequest protobuf, before libp2p/TLS/TCP framing), and of a stage key's GET answer per record."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.proto import dht_pb2
    from hivemind.utils import get_dht_time
    from hivemind.utils.serializer import MSGPackSerializer
    from node.announce import owner_subkey
    from protocol.records import config_key, stage_key, stage_record
    from protocol.signing import Ed25519RecordValidator

    v, now = Ed25519RecordValidator(), get_dht_time()
    peer_id = "Qm" + "A" * 44  # libp2p peer ids of hivemind peers (RSA identities): "Qm..." ids of 46 characters
    node = dht_pb2.NodeInfo(node_id=DHTID.generate().to_bytes())

    def store(key: str, subkey, value) -> tuple[int, int]:
        rec = DHTRecord(key=DHTID.generate(source=key).to_bytes(), subkey=MSGPackSerializer.dumps(subkey),
                        value=MSGPackSerializer.dumps(value), expiration_time=now + 3 * period)
        signed = v.sign_value(rec)
        req = dht_pb2.StoreRequest(keys=[rec.key], subkeys=[rec.subkey], values=[signed],
                                   expiration_time=[rec.expiration_time], in_cache=[False], peer=node)
        return len(req.SerializeToString()), len(rec.subkey) + len(signed)

    stage_req, stage_item = store(stage_key(run.run_id, 1), owner_subkey(peer_id, v), stage_record(
        stage=1, peer_id=peer_id, throughput=1.0, queue=0, fingerprint=run.fingerprint, step=0, serving=True,
        started=now, updated=now, state="serving", relayed=False, distance=0.01))
    config_req, config_item = store(config_key(run.run_id), v.local_public_key, {
        "version": 1, "fingerprint": run.fingerprint, "config": run.wire_dict(), "updated": now})
    return {"stage_record_store_request_bytes": stage_req, "stage_record_item_bytes": stage_item,
            "config_store_request_bytes": config_req, "config_item_bytes": config_item}


def split_by_period(rows: list[dict]) -> dict | None:
    """rate = fixed + per_period / period, per node and direction, from the default rows at two periods."""
    by = {r["announce_period_s"]: r for r in rows if r["variant"] == "default" and "nodes" in r}
    if len(by) < 2:
        return None
    (pa, ra), (pb, rb) = sorted(by.items())[:2]
    out = {"periods": [pa, pb], "nodes": []}
    for na, nb in zip(ra["nodes"], rb["nodes"]):
        entry = {"node": na["node"]}
        for d in ("tx", "rx"):
            per = (na[f"{d}_Bps"] - nb[f"{d}_Bps"]) / (1 / pa - 1 / pb)
            entry[f"{d}_bytes_per_period"] = per
            entry[f"{d}_fixed_Bps"] = nb[f"{d}_Bps"] - per / pb
        out["nodes"].append(entry)
    return out


def rpc_table(row: dict) -> str:
    """Where one row's bytes go: per RPC kind, calls/s and payload bytes/s of the mean stage node and of
    the bootstrap; then payload vs interface bytes (the rest is framing: libp2p, yamux, TLS, TCP/IP, ACKs)."""
    rpcs, stage_nodes = row.get("rpcs", {}), [n["node"] for n in row["nodes"] if n["stage"] is not None]
    kinds = sorted({k for v in rpcs.values() for k in v},
                   key=lambda k: -sum(v.get(k, {}).get("tx_Bps", 0) + v.get(k, {}).get("rx_Bps", 0)
                                      for v in rpcs.values()))

    def avg(k, field, names):
        return mean(rpcs.get(nm, {}).get(k, {}).get(field, 0.0) for nm in names)
    lines = [[k, f"{avg(k, 'calls_per_s', stage_nodes):.2f}", f"{avg(k, 'tx_Bps', stage_nodes):.0f}",
              f"{avg(k, 'rx_Bps', stage_nodes):.0f}", f"{avg(k, 'calls_per_s', ['bootstrap']):.2f}",
              f"{avg(k, 'tx_Bps', ['bootstrap']):.0f}", f"{avg(k, 'rx_Bps', ['bootstrap']):.0f}"] for k in kinds]
    stage = [n for n in row["nodes"] if n["stage"] is not None]
    boot = [n for n in row["nodes"] if n["stage"] is None]
    for label, key in (("all RPC payload", "rpc_payload_{}_Bps"), ("interface (eth0)", "{}_Bps")):
        lines.append([f"**{label}**", "", *(f"{mean(n[key.format(d)] for n in stage):.0f}" for d in ("tx", "rx")), "",
                      *(f"{mean(n[key.format(d)] for n in boot):.0f}" for d in ("tx", "rx"))])
    return markdown_table(["RPC (as seen by the node: out = it called, in = it answered)", "stage node calls/s",
                           "tx B/s", "rx B/s", "bootstrap calls/s", "tx B/s", "rx B/s"], lines)


def tables(rows: list[dict], rate: float) -> tuple[str, str]:
    ok = [r for r in rows if "nodes" in r]
    per_node = markdown_table(
        ["variant", "period s", "node", "tx B/s", "rx B/s", f"share of {rate:g} Mbit/s (larger dir.)",
         "peak 5 s share", "frames/s tx / rx", "Eth+IP+TCP headers", "goal <= 5%"],
        [[r["variant"], f"{r['announce_period_s']:g}", n["node"], f"{n['tx_Bps']:.0f}", f"{n['rx_Bps']:.0f}",
          f"{100 * n['share']:.2f}%", f"{100 * n['peak_sample_share']:.1f}%",
          f"{n['tx_frames_per_s']:.1f} / {n['rx_frames_per_s']:.1f}", f"{100 * n['header_share']:.0f}%",
          "met" if n["share"] <= GOAL else "MISSED"] for r in ok for n in r["nodes"]], align="lrlrrrrrrl")
    summary = markdown_table(
        ["variant", "period s", "nodes", "swarm max share (node)", "swarm mean share", "stage nodes' mean share",
         "mean tx / rx B/s", "CPU busy", "goal <= 5%"],
        [[r["variant"], f"{r['announce_period_s']:g}", len(r["nodes"]), f"{100 * r['max_share']:.2f}% ({r['worst_node']})",
          f"{100 * r['mean_share']:.2f}%", f"{100 * r['stage_mean_share']:.2f}%",
          f"{r['mean_tx_Bps']:.0f} / {r['mean_rx_Bps']:.0f}", f"{100 * r['cpu_busy']:.0f}%",
          "met" if r["max_share"] <= GOAL else "MISSED"] for r in ok]
        + [[r["variant"], f"{r['announce_period_s']:g}", "-", "ERROR", "-", "-", "-", "-", r["error"][:80]]
           for r in rows if "error" in r], align="lrrrrrrrl")
    return per_node, summary


def verdicts(rows: list[dict], size: dict) -> list[str]:
    out = []
    for r in rows:
        label = f"{r['variant']}, records every {r['announce_period_s']:g} s"
        if "error" in r:
            out.append(f"- {label}: no measurement ({r['error'].splitlines()[0][:120]})")
            continue
        out.append(f"- {label}, {size['replicas']} replicas per stage: busiest node {r['worst_node']} at "
                   f"{100 * r['max_share']:.2f}% of its link (larger direction; swarm mean {100 * r['mean_share']:.2f}%) "
                   f"(goal <= 5%): {'met' if r['max_share'] <= GOAL else 'MISSED'}")
    return out


def differences(rows: list[dict], split: dict | None) -> list[str]:
    """What each removed task was worth: the default row at the same period minus the row without it
    (share of a stage node's link, larger direction, mean of the stage nodes), and the period split."""
    base = {r["announce_period_s"]: r for r in rows if r["variant"] == "default" and "nodes" in r}
    out = []
    for r in rows:
        b = base.get(r["announce_period_s"])
        if r["variant"] == "default" or "nodes" not in r or b is None:
            continue
        d = b["stage_mean_share"] - r["stage_mean_share"]
        out.append(f"- default - {r['variant']} at {r['announce_period_s']:g} s: {100 * d:+.2f} percentage points of a "
                   f"stage node's link ({d / b['stage_mean_share']:+.0%} of its idle traffic; busiest node "
                   f"{100 * b['max_share']:.2f}% -> {100 * r['max_share']:.2f}%)")
    if split:
        stage = [e for e in split["nodes"] if e["node"] != "bootstrap"]
        out.append(f"- a stage node's interface bytes per record period: {mean(e['tx_bytes_per_period'] for e in stage):.0f} "
                   f"tx / {mean(e['rx_bytes_per_period'] for e in stage):.0f} rx, plus {mean(e['tx_fixed_Bps'] for e in stage):.0f}"
                   f" / {mean(e['rx_fixed_Bps'] for e in stage):.0f} B/s independent of the period (from the "
                   f"{split['periods'][0]:g} s and {split['periods'][1]:g} s rows)")
    return out


def plot(path: str, rows: list[dict], rate: float) -> None:
    link = rate * 1e6 / 8
    ok = [r for r in rows if "nodes" in r and r["variant"] == "default"]
    if not ok:
        return
    panels = []
    for r in ok:
        panels.append({"title": f"idle, records every {r['announce_period_s']:g} s ({rate:g} Mbit/s links)",
                       "xlabel": "seconds into the window", "ylabel": "% of the link (larger direction, 5 s bins)",
                       "hline": 100 * GOAL,
                       "series": [{"label": n["node"], "x": n["series_t"], "y": [100 * v / link for v in n["series_Bps"]],
                                   "style": {"lw": 1.0}} for n in r["nodes"]]})
    everything = [r for r in rows if "nodes" in r]
    names = [n["node"] for n in everything[0]["nodes"]]
    panels.append({"title": "mean over the window, per node", "xlabel": "node", "ylabel": "% of the link",
                   "hline": 100 * GOAL, "xticks": list(range(len(names))), "xticklabels": names,
                   "series": [{"label": f"{r['variant']} {r['announce_period_s']:g} s", "x": list(range(len(names))),
                               "y": [100 * n["share"] for n in r["nodes"]], "style": {"marker": "o", "ls": "--"}}
                              for r in everything]})
    line_plot(path, panels)


def our_p2pd(workdir: Path) -> list[str]:
    """p2pd processes whose command line names our work folder (their identity files live there)."""
    out = subprocess.run(["pgrep", "-af", "p2pd"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(workdir) in line]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="one 30 s window at the default period (< 3 minutes)")
    g.add_argument("--scale", action="store_true", help="4 stages x 3 replicas (10 namespaces; for more cores)")
    p.add_argument("--announce-periods", default=None, metavar="S[,S...]",
                   help="every node's `join --announce-period`, one swarm each (default 5,15; quick: 5)")
    p.add_argument("--window", type=float, default=None, help="measured seconds (default 120; quick: 30)")
    p.add_argument("--settle", type=float, default=None, help="seconds after every node serves, before the window")
    p.add_argument("--rate", type=float, default=1.0, help="every link's rate, Mbit/s each way (default 1)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=None,
                   help="rows with the config keep-alive or the averager removed (default: on, off with --quick)")
    p.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "default"], default=None,
                   help="the breakdown rows to run (default: all of them, with --breakdown)")
    p.add_argument("--count-rpcs", action=argparse.BooleanOptionalAction, default=True,
                   help="count every node's RPCs by kind (a sitecustomize hook on the nodes' PYTHONPATH; default on)")
    p.add_argument("--keep", default=None, help="keep the nodes' logs in this folder")
    p.add_argument("--json-out", default="bench/results/idle_traffic.json")
    p.add_argument("--png-out", default=None, help="default: the JSON's path with .png")
    return p


def print_details(rows: list[dict], split: dict | None, sizes: dict, probe: dict | None) -> tuple[dict, list[str]]:
    """Message sizes, where the bytes go, the period split, what each removed task was worth and the
    trainer probe; returns the RPC tables and the differences, for the JSON."""
    print(f"\none signed stage record: {sizes['stage_record_item_bytes']} B as stored "
          f"({sizes['stage_record_store_request_bytes']} B StoreRequest); the config record: "
          f"{sizes['config_item_bytes']} B ({sizes['config_store_request_bytes']} B StoreRequest)")
    rpc_tables = {f"{r['variant']} {r['announce_period_s']:g} s": rpc_table(r) for r in rows
                  if r.get("rpcs") and "nodes" in r}
    for label, text in rpc_tables.items():
        print(f"\nwhere the bytes go ({label}; payload = serialized protobufs, mean of the stage nodes):\n{text}")
    if split:
        print(f"\nsplit from the {split['periods'][0]:g} s and {split['periods'][1]:g} s rows "
              f"(rate = fixed + bytes per period / period):")
        print(markdown_table(["node", "tx B per period", "rx B per period", "tx fixed B/s", "rx fixed B/s"],
                             [[e["node"], f"{e['tx_bytes_per_period']:.0f}", f"{e['rx_bytes_per_period']:.0f}",
                               f"{e['tx_fixed_Bps']:.0f}", f"{e['rx_fixed_Bps']:.0f}"] for e in split["nodes"]]))
    diffs = differences(rows, split)
    if diffs:
        print("\n" + "\n".join(diffs))
    if probe:
        print(f"\ntrainer probe (join --stage 0 --steps 0): "
              f"{'stayed (idles)' if probe['stayed'] else 'left with exit code ' + str(probe['exit_code'])} after "
              f"{probe['seconds']:g} s")
    return rpc_tables, diffs


def main(argv=None) -> int:
    args, name, size = parse_bench_args(parser(), argv, SIZES)
    if size is None:
        return 2
    periods = [float(s) for s in args.announce_periods.split(",")] if args.announce_periods else size["periods"]
    window = args.window or size["window"]
    settle = size["settle"] if args.settle is None else args.settle
    breakdown = size["breakdown"] if args.breakdown is None else args.breakdown
    extra = args.variants or (BREAKDOWN if breakdown else [])
    plan = [("default", s) for s in periods] + [(v, periods[0]) for v in extra]
    rows = []
    with tempfile.TemporaryDirectory(prefix="idle-") as tmp:
        workdir = Path(args.keep or tmp).resolve()
        for k, (variant, period) in enumerate(plan):
            print(f"[{variant}, records every {period:g} s: {size['stages'] - 1} stages x {size['replicas']} replicas "
                  f"+ bootstrap, {args.rate:g} Mbit/s, settle {settle:g} s, window {window:g} s]", file=sys.stderr,
                  flush=True)
            rows.append(measure(size, period, variant, workdir, args.rate, window, settle,
                                probe=size["probe_trainer"] and k == 0, count_rpcs=args.count_rpcs))
            if "error" in rows[-1]:
                print(f"  FAILED: {rows[-1]['error']}", file=sys.stderr, flush=True)
            else:
                print(f"  started in {rows[-1]['start_s']:g} s; busiest {rows[-1]['worst_node']} "
                      f"{100 * rows[-1]['max_share']:.2f}%", file=sys.stderr, flush=True)
        left = our_p2pd(workdir)
    sizes = message_sizes(run_config(size, None, "size"), periods[0])
    split = split_by_period(rows)
    per_node, summary = tables(rows, args.rate)
    verdict = verdicts(rows, size)
    probe = next((r["trainer_probe"] for r in rows if "trainer_probe" in r), None)
    print(f"\n{name}: {size['stages']}-stage model, bootstrap + {size['replicas']} replicas of each of stages "
          f"1..{size['stages'] - 1}, no trainers (a trainer cannot idle: see the module docstring), nobody feeds "
          f"microbatches; every link tbf {args.rate:g} Mbit/s each way; interface bytes (eth0 tx, rx) over "
          f"{window:g} s after every node served + {settle:g} s\n\n{summary}\n\n{per_node}\n\n" + "\n".join(verdict))
    rpc_tables, diffs = print_details(rows, split, sizes, probe)
    print(f"p2pd left running by this bench: {len(left)}", file=sys.stderr)
    png = args.png_out or str(Path(args.json_out).with_suffix(".png"))
    write_json(args.json_out, {"size": name, "config": size, "periods": periods, "window_s": window, "settle_s": settle,
                               "rate_mbit": args.rate, "goal_share": GOAL, "rows": rows, "split_by_period": split,
                               "message_sizes": sizes, "trainer_probe": probe, "trainers_measured": False,
                               "verdict": verdict, "table": summary, "per_node_table": per_node,
                               "rpc_tables": rpc_tables, "differences": diffs,
                               "p2pd_left": left, "machine": machine_info(),
                               "command": " ".join(["python -m bench.idle_traffic", *(argv or sys.argv[1:])])})
    plot(png, rows, args.rate)
    print(f"\nwrote {args.json_out} and {png}", file=sys.stderr)
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
