"""Does the swarm get faster with more volunteers? Throughput and per-link bytes at 1, 2 (and 3)
volunteers on EVERY stage, trainers included, on rate-limited links.

    python -m bench.scaling [--quick | --scale] --json-out F

Every node (bootstrap, trainers = stage-0 replicas, the replicas of every later stage) runs in its own
network namespace on its own `tc tbf` link of R Mbit/s each way (bench/netns.py; needs root). The model
and R are chosen with bench/wire_budget.py so that the links, not this machine's 2 cores, bound the
throughput (docs/route-design.md section 12); the compute-bound figure (the same model in one process,
no network) is printed beside every row. n volunteers per stage = n trainers + n replicas of every later
stage; each replica handles about 1/n of the tokens, so the links allow about n times the tokens/s,
less what replica averaging (every `average_every` steps, in the background) costs. Trainers feed
independently (no barrier): the swarm's tokens/s is the sum of every trainer's steady rate.

Bytes per token of a node = (bytes sent + received) / the tokens it handled, from the nodes' own
message counters (the trainer summary's `nodes`); the namespace's interface counters (eth0 tx+rx, every
frame on its shaped link) are reported beside them as a check. Averaging bytes are not counted by the
nodes, so they are measured as what the interface carried beyond the messages, less the framing and
DHT overhead that the 1-per-stage run (which never averages) shows as a fraction of its message bytes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from statistics import mean

from bench.bandwidth import compute_bound, parse_bench_args, swarm_in_lab
from bench.netns import CONGESTION
from bench.plotting import line_plot, machine_info, markdown_table, steady_part, steady_tokens_per_s, write_json
from node.args import positive_seconds
from node.settings import AveragingSettings, RecordSettings, link_fraction
from swarm.config import ModelConfig, RunConfig, TrainConfig
from swarm.data import ByteCorpus
from swarm.local_trainer import token_id_bytes, wire_stats
from bench.wire_budget import code_bytes, link_bound_tokens_per_s

TCP_GOODPUT = 1448 / 1514  # what of a tbf rate TCP payload gets (bench/netns.py)
# runs: (volunteers per stage, average_every); every headline row averages at the project's default
# cadence (TrainConfig.average_every), as a user's swarm does
DEFAULT_EVERY = TrainConfig().average_every
SIZES = {
    # quick: averaging every 2 steps at half the link; a round there takes 10-20 s (as long as 10-20
    # steps), so 30 steps hold complete rounds on every stage (10 held one, or none on a slow machine)
    "quick": dict(d=64, layers=3, heads=2, stages=3, ratio=8, seq=64, batch=16, micro=4, rate=0.5, steps=30,
                  warmup=2, budget=150, runs=[(1, 2), (2, 2)], link_share=0.5),
    # (n, 0): the same row without averaging, for what averaging costs
    # 40 steps: a round paced to the node's default share of a 0.5 Mbit/s link takes 1-2 minutes
    "default": dict(d=128, layers=3, heads=4, stages=3, ratio=8, seq=128, batch=32, micro=8, rate=0.5, steps=40,
                    warmup=3, budget=420, runs=[(1, DEFAULT_EVERY), (2, DEFAULT_EVERY), (2, 0)]),
    "scale": dict(d=128, layers=3, heads=4, stages=3, ratio=8, seq=128, batch=32, micro=8, rate=0.5, steps=40,
                  warmup=3, budget=500, runs=[(1, DEFAULT_EVERY), (2, DEFAULT_EVERY), (3, DEFAULT_EVERY), (2, 0),
                                              (3, 0)]),
}


def row_spec(text: str) -> tuple[int, int]:
    """argparse type for --rows: 'N:E', N volunteers per stage averaging every E steps (0: off)."""
    try:
        per_stage, every = (int(x) for x in text.split(":"))
    except ValueError:
        per_stage = every = -1
    if per_stage < 1 or every < 0:
        raise argparse.ArgumentTypeError(f"expected PER_STAGE:AVERAGE_EVERY (e.g. 2:10, or 2:0 without averaging), "
                                         f"got {text!r}")
    return per_stage, every


def run_config(size: dict, average_every: int) -> RunConfig:
    model = ModelConfig(d_model=size["d"], n_layers=size["layers"], n_heads=size["heads"], seq_len=size["seq"],
                        n_stages=size["stages"], ratio=size["ratio"])
    train = TrainConfig(batch_size=size["batch"], microbatches=size["micro"], average_every=average_every)
    return RunConfig(model=model, train=train, run_id=f"scale-{average_every}")


def predicted_link_bound(cfg: ModelConfig, rate_mbit: float, per_stage: int) -> float:
    """Tokens/s the links allow for codes, gradients and targets alone (wire_budget; no framing, no averaging)."""
    ws = wire_stats(cfg)
    per_node = {role: code_bytes(role, ws["wire_bytes_per_token_fwd"], ws["wire_bytes_per_token_bwd"],
                                     token_id_bytes(cfg))
                for role in ("trainer", "middle", "tail")}
    return link_bound_tokens_per_s(rate_mbit * 1e6 / 8 * TCP_GOODPUT, per_node, per_stage)


def traffic_by_peer(peers: dict, stage: int, stage_of: dict, tokens: int) -> dict:
    """A node's bytes received and sent per handled token, by whom with: the adjacent stages (its data
    path, plus DHT), its own stage (averaging, plus DHT), the bootstrap and the other stages (DHT only).
    Received bytes crossed its link; sent bytes are counted before its uplink's tbf (drops included)."""
    out = {kind: {"received": 0.0, "sent": 0.0} for kind in ("adjacent", "same stage", "bootstrap", "other stages")}
    for name, c in peers.items():
        other = stage_of.get(name)
        kind = ("bootstrap" if other is None else "same stage" if other == stage
                else "adjacent" if abs(other - stage) == 1 else "other stages")
        for way in ("received", "sent"):
            out[kind][way] += c[way] / tokens
    return out


def dropped_share(peer_bytes: dict, name: str) -> float:
    """Of the bytes node `name` sent to other nodes, the share that never reached them: dropped by its
    uplink's or their downlink's tbf queue, so sent again by TCP (the latter crossed its link twice)."""
    sent = sum(c["sent"] for c in peer_bytes[name].values())
    arrived = sum(peer_bytes[other][name]["received"] for other in peer_bytes[name])
    return max(0.0, 1 - arrived / sent) if sent else 0.0


def node_figures(summaries: list[dict], iface: dict, lab: dict | None = None) -> list[dict]:
    """Per node: role, message and interface bytes per handled token (nodes that answered `info`).
    Every trainer's summary is read: a trainer that finished first has left the DHT before the
    others list the nodes, but its own summary has its figures (the latest reading of a node wins)."""
    moved = lambda n: n["bytes_sent"] + n["bytes_received"]  # noqa: E731
    latest = {}
    for n in (n for s in summaries for n in s["nodes"] if not n.get("error") and n.get("tokens")):
        if n["peer_id"] not in latest or moved(n) > moved(latest[n["peer_id"]]):
            latest[n["peer_id"]] = n
    out = []
    for n in latest.values():
        msg = moved(n)
        fig = {"stage": n["stage"], "role": n["role"], "peer_id": n["peer_id"], "tokens": n["tokens"],
               "message_bytes": msg, "iface_bytes": iface.get(n["peer_id"], 0), "averaging": n.get("averaging"),
               "next_hop_calls": n.get("next_hop_calls", {})}
        name = lab["names"].get(n["peer_id"]) if lab else None
        if name in (lab or {}).get("peer_bytes", {}):
            fig["bytes_per_token_by_peer"] = traffic_by_peer(lab["peer_bytes"][name], n["stage"], lab["stage_of"],
                                                             n["tokens"])
            fig["dropped_share"] = dropped_share(lab["peer_bytes"], name)
        out.append(fig)
    return out


def row_figures(nodes: list[dict], overhead: float) -> dict:
    """The row's bytes per handled token: busiest node, middle stage (mean of its replicas), trainer
    (the busier one), and averaging (interface bytes beyond messages x (1 + overhead), mean per replica)."""
    per = lambda n, key: n[key] / n["tokens"]  # noqa: E731
    busiest = max(nodes, key=lambda n: per(n, "message_bytes"))
    middle = [n for n in nodes if n["role"] == "middle"]
    trainers = [n for n in nodes if n["stage"] == 0]
    averaging = [max(0.0, n["iface_bytes"] - n["message_bytes"] * (1 + overhead)) / n["tokens"] for n in nodes]
    return {"busiest_node_bytes_per_token": per(busiest, "message_bytes"), "busiest_node_role": busiest["role"],
            "busiest_node_iface_bytes_per_token": per(busiest, "iface_bytes"),
            "middle_stage_bytes_per_token": mean(per(n, "message_bytes") for n in middle) if middle else 0.0,
            "middle_stage_iface_bytes_per_token": mean(per(n, "iface_bytes") for n in middle) if middle else 0.0,
            "trainer_bytes_per_token": max(per(n, "message_bytes") for n in trainers) if trainers else 0.0,
            "trainer_iface_bytes_per_token": max(per(n, "iface_bytes") for n in trainers) if trainers else 0.0,
            "averaging_bytes_per_token": mean(averaging) if averaging else 0.0}


def averaging_figures(nodes: list[dict], tokens_per_s: float, per_stage: int, rate_mbit: float) -> dict:
    """The replicas' own averaging counts: rounds (complete, partial, failed, still running when the
    run ended), the rounds that formed a group by its size and by kind (anchored or full; each replica
    counts its own), payload
    bytes per token per replica and their share of a replica's link (both directions), the largest
    replica distance."""
    reps = [n for n in nodes if n.get("averaging")]
    if not reps:
        return {}
    a = lambda key: [n["averaging"][key] or 0.0 for n in reps]  # noqa: E731
    per_token = mean(n["averaging"]["bytes"] / n["tokens"] for n in reps)
    replica_Bps = per_token * tokens_per_s / per_stage  # a replica handles 1/n of the swarm's tokens
    groups, kinds = {}, {}
    for n in reps:
        for size, count in (n["averaging"].get("groups") or {}).items():
            groups[int(size)] = groups.get(int(size), 0) + count
        for kind, count in (n["averaging"].get("kinds") or {}).items():
            kinds[kind] = kinds.get(kind, 0) + count
    return {"averaging_rounds": sum(a("rounds")), "averaging_partial_rounds": sum(a("partial")),
            "averaging_failed_rounds": sum(a("failures")), "averaging_in_flight": sum(map(bool, a("in_flight"))),
            "averaging_groups": dict(sorted(groups.items())), "averaging_kinds": dict(sorted(kinds.items())),
            "averaging_payload_bytes_per_token": per_token,
            "averaging_link_share": replica_Bps / (2 * rate_mbit * 1e6 / 8),
            "replica_distance_max": max(a("distance_max"))}


def framing_overhead(nodes: list[dict]) -> float:
    """Interface bytes beyond message bytes, as a fraction of them, in a run without averaging."""
    msg = sum(n["message_bytes"] for n in nodes)
    return max(0.0, sum(n["iface_bytes"] for n in nodes) / msg - 1) if msg else 0.0


def measure(size: dict, per_stage: int, every: int, workdir: Path, limit: float, overhead: float | None,
            announce_s: float, rtt_ms: float = 0.0, queue_ms: float = 50.0, congestion: str = CONGESTION) -> dict:
    """One row: train in the lab, then turn the summary and the interface counters into figures."""
    run = run_config(size, every)
    share = size.get("link_share", AveragingSettings().link_share)
    row = {"per_stage": per_stage, "average_every": every, "link_mbit": size["rate"], "compute_bound_tokens_per_s":
           limit, "predicted_link_bound_tokens_per_s": predicted_link_bound(run.model, size["rate"], per_stage),
           "announce_period_s": announce_s, "rtt_ms": rtt_ms, "queue_ms": queue_ms, "congestion": congestion,
           "link_share": share}
    row["bound"] = "compute" if row["predicted_link_bound_tokens_per_s"] > limit else "link"
    res = swarm_in_lab(run, size["rate"], workdir, size["steps"], size["budget"], per_stage=per_stage,
                       node_args=("--announce-period", str(announce_s), "--link-mbit", f"{size['rate']:g}",
                                  "--link-share", f"{share:g}"),
                       rtt_ms=rtt_ms, queue_ms=queue_ms, congestion=congestion)
    if "error" in res or res["summaries"][0].get("error"):
        return {**row, "error": res.get("error") or res["summaries"][0]["error"], "tokens_per_s": 0.0}
    summaries = res["summaries"]
    nodes = node_figures(summaries, res["iface"], res)
    measured_overhead = framing_overhead(nodes)
    # trainers feed in parallel and wait for nobody: the swarm's rate is the sum of their steady rates
    per_trainer = [steady_tokens_per_s(s["step_times"], size["warmup"], size["batch"] * size["seq"])
                   for s in summaries]
    staleness = [x for s in summaries for x in steady_part(s["staleness"], size["warmup"])]
    row.update(steps=min(s["steps_completed"] for s in summaries), tokens_per_s=sum(per_trainer),
               trainer_tokens_per_s=per_trainer,
               skipped_microbatches=sum(s["skipped_microbatches"] for s in summaries),
               staleness=mean(staleness) if staleness else 0.0,
               framing_overhead=measured_overhead, nodes=nodes, cpu_busy=res["cpu_busy"],
               **row_figures(nodes, measured_overhead if overhead is None else overhead))
    row.update(averaging_figures(nodes, row["tokens_per_s"], per_stage, size["rate"]))
    return row


def table(runs: list[dict]) -> str:
    f = lambda r, k, spec=".0f": format(r.get(k, 0.0), spec)  # noqa: E731
    rows = [[r["per_stage"], r["average_every"], f"{r['link_mbit']:g}", f(r, "tokens_per_s"),
             f(r, "compute_bound_tokens_per_s"), f(r, "predicted_link_bound_tokens_per_s"),
             f"{f(r, 'busiest_node_bytes_per_token', '.1f')} ({r.get('busiest_node_role', '-')})",
             f(r, "middle_stage_bytes_per_token", ".1f"), f(r, "trainer_bytes_per_token", ".1f"),
             f"{f(r, 'middle_stage_iface_bytes_per_token', '.1f')} / {f(r, 'trainer_iface_bytes_per_token', '.1f')}",
             f"{f(r, 'averaging_payload_bytes_per_token', '.1f')} / {f(r, 'averaging_bytes_per_token', '.1f')}",
             f"{100 * r.get('averaging_link_share', 0.0):.1f}%",
             f"{r.get('averaging_rounds', 0):.0f} / {r.get('averaging_partial_rounds', 0):.0f} / "
             f"{r.get('averaging_failed_rounds', 0):.0f} / {r.get('averaging_in_flight', 0):.0f}",
             ", ".join(f"{c}x{g}" for g, c in r.get("averaging_groups", {}).items()) or "-",
             " / ".join(str(r.get("averaging_kinds", {}).get(k, 0)) for k in ("anchored", "full"))
             if r.get("averaging_groups") else "-",
             f"{100 * r.get('replica_distance_max', 0.0):.2f}%", f(r, "staleness", ".2f"),
             f"{100 * r.get('cpu_busy', 0.0):.0f}%",
             r.get("steps", 0), r.get("error", "")[:60]] for r in runs]
    return markdown_table(["per stage", "avg every", "link Mbit/s", "tokens/s", "compute-bound", "link bound (codes)",
                           "busiest B/tok", "middle B/tok", "trainer B/tok", "iface middle / trainer B/tok",
                           "averaging B/tok (payload / iface)", "averaging link share",
                           "rounds / partial / failed / running at the end", "groups (rounds x replicas)",
                           "anchored / full",
                           "apart max", "staleness", "CPU busy", "steps", "error"], rows)


def traffic_table(runs: list[dict]) -> str:
    """Where a node's link goes, per row and role (mean over its replicas), in B per handled token:
    its messages (the nodes' own counters), what it received from the adjacent stages (codes,
    gradients, and DHT), from its own stage (averaging and DHT) and from the bootstrap and other stages
    (DHT only), all it carried (interface), and the share of what it sent that a tbf queue dropped (TCP
    sends it again; a drop at its own uplink costs its link nothing, one at the receiver's downlink costs
    the bytes twice)."""
    rows = []
    for r in runs:
        for role in ("trainer", "middle", "tail"):
            ns = [n for n in r.get("nodes", []) if n["role"] == role and "bytes_per_token_by_peer" in n]
            if not ns:
                continue
            got = lambda kind: mean(n["bytes_per_token_by_peer"][kind]["received"] for n in ns)  # noqa: E731
            rows.append([r["per_stage"], r["average_every"], role,
                         f"{mean(n['message_bytes'] / n['tokens'] for n in ns):.1f}", f"{got('adjacent'):.1f}",
                         f"{got('same stage'):.1f}", f"{got('bootstrap') + got('other stages'):.1f}",
                         f"{mean(n['iface_bytes'] / n['tokens'] for n in ns):.1f}",
                         f"{100 * mean(n['dropped_share'] for n in ns):.0f}%", main_replica_share(ns)])
    return markdown_table(["per stage", "avg every", "role", "messages B/tok", "received: adjacent stages",
                           "received: own stage", "received: DHT-only peers", "interface (both ways)",
                           "sent, then dropped by a tbf", "calls to its main next replica"], rows)


def main_replica_share(nodes: list[dict]) -> str:
    """How a role's calls split over the next stage's replicas (the routing slots, swarm/routing.py):
    the share of a node's calls that went to the replica it called most, mean over the role's nodes."""
    shares = [max(c.values()) / sum(c.values()) for n in nodes if (c := n.get("next_hop_calls"))]
    return f"{100 * mean(shares):.0f}%" if shares else "-"


def verdicts(runs: list[dict]) -> tuple[float | None, list[str]]:
    head = {}  # per_stage -> its first (headline) row
    for r in runs:
        head.setdefault(r["per_stage"], r)
    out, speedup = [], None
    for n, goal in ((2, 1.9), (3, 2.7)):
        if 1 in head and n in head and head[1]["tokens_per_s"]:
            x = head[n]["tokens_per_s"] / head[1]["tokens_per_s"]
            speedup = x if n == 2 else speedup
            out.append(f"- {n} volunteers per stage vs 1 (average_every {head[n]['average_every']}): {x:.2f}x "
                       f"(goal >= {goal}x): {'met' if x >= goal else 'MISSED'}")
    out += averaging_verdicts(runs)
    for r in runs:
        if r.get("middle_stage_bytes_per_token"):
            ok = r["trainer_bytes_per_token"] <= r["middle_stage_bytes_per_token"]
            out.append(f"- {r['per_stage']}/stage, average_every {r['average_every']}: trainer link "
                       f"{r['trainer_bytes_per_token']:.1f} B/token vs middle stage {r['middle_stage_bytes_per_token']:.1f}"
                       f" (goal: trainer <= middle): {'met' if ok else 'MISSED'}")
    return speedup, out


def averaging_verdicts(runs: list[dict]) -> list[str]:
    """What averaging at the default cadence costs (rows with and without it at the same size) and
    whether its rounds complete."""
    out = []
    off = {r["per_stage"]: r for r in runs if r["average_every"] == 0 and r.get("tokens_per_s")}
    for r in runs:
        if not r["average_every"] or r["per_stage"] < 2 or not r.get("tokens_per_s"):
            continue
        n = r["per_stage"]
        if n in off:
            x = r["tokens_per_s"] / off[n]["tokens_per_s"]
            extra = r["middle_stage_iface_bytes_per_token"] - off[n]["middle_stage_iface_bytes_per_token"]
            out.append(f"- {n}/stage: tokens/s with averaging every {r['average_every']} / without: {x:.2f} "
                       f"(goal >= 0.9): {'met' if x >= 0.9 else 'MISSED'}; a middle replica's interface carried "
                       f"{extra:.1f} B/token more with it")
        if "averaging_link_share" in r:
            share, partial = r["averaging_link_share"], r["averaging_partial_rounds"]
            out.append(f"- {n}/stage: averaging payload {r['averaging_payload_bytes_per_token']:.1f} B/token per "
                       f"replica = {100 * share:.1f}% of its link (goal <= 10%): {'met' if share <= 0.1 else 'MISSED'}; "
                       f"rounds {r['averaging_rounds']:.0f} complete, {partial:.0f} partial (goal 0): "
                       f"{'met' if partial == 0 and r['averaging_rounds'] else 'MISSED'}, "
                       f"{r['averaging_failed_rounds']:.0f} failed, {r.get('averaging_in_flight', 0):.0f} still "
                       f"running at the end; replicas apart at most "
                       f"{100 * r['replica_distance_max']:.2f}%")
    return out


def plot(path: str, runs: list[dict]) -> None:
    series = []
    for every in sorted({r["average_every"] for r in runs}):
        rs = sorted((r for r in runs if r["average_every"] == every), key=lambda r: r["per_stage"])
        series.append({"label": f"measured, average_every {every}" if every else "measured, averaging off", "x": [r["per_stage"] for r in rs],
                       "y": [r["tokens_per_s"] for r in rs], "style": {"marker": "o"}})
    xs = sorted({r["per_stage"] for r in runs})
    series.append({"label": "link bound (codes only)", "x": xs,
                   "y": [runs[0]["predicted_link_bound_tokens_per_s"] * n for n in xs], "style": {"ls": "--"}})
    series.append({"label": "compute-bound (1 process)", "x": [xs[0], xs[-1]],
                   "y": [runs[0]["compute_bound_tokens_per_s"]] * 2, "style": {"ls": ":"}})
    line_plot(path, [{"title": f"tokens/s vs volunteers per stage ({runs[0]['link_mbit']:g} Mbit/s links)",
                      "xlabel": "volunteers on every stage", "ylabel": "tokens/s", "series": series}])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="1 and 2 per stage, a few steps (~3 minutes)")
    g.add_argument("--scale", action="store_true", help="adds 3 per stage (10 namespaces; for more cores)")
    p.add_argument("--announce-period", type=positive_seconds, default=RecordSettings().announce_period, metavar="S",
                   help="every node's `join --announce-period` (its DHT record store period; default: the node's, "
                        "%(default)g)")
    p.add_argument("--rtt-ms", type=float, default=0.0, metavar="MS",
                   help="round-trip time added to every path between two nodes (bench/netns.py's delay line; "
                        "default 0: none)")
    p.add_argument("--queue-ms", type=float, default=50.0, metavar="MS",
                   help="every tbf's queue in ms of its rate (default 50: ~7 kB at 0.5 Mbit/s, shallow; home "
                        "routers often buffer 100s of ms)")
    p.add_argument("--congestion", default=CONGESTION, choices=("reno", "bbr"),
                   help="every node's TCP congestion control (default %(default)s: loss-based, as volunteers' "
                        "CUBIC; bbr shows what BBRv1 does to the lab's short queues)")
    p.add_argument("--link-share", type=link_fraction, default=None, metavar="F",
                   help="every node's `join --link-share` (default: the node's, %s; --quick: 0.5)"
                        % AveragingSettings().link_share)
    p.add_argument("--rows", type=row_spec, nargs="+", default=None, metavar="N:E",
                   help="run only these rows, N per stage averaging every E steps (0: off), e.g. --rows 2:10 2:0 "
                        "(default: the size's; ratios to 1 per stage need a 1:E row first)")
    p.add_argument("--keep", default=None, help="keep the nodes' logs in this folder")
    p.add_argument("--json-out", default="bench/results/scaling.json")
    p.add_argument("--png-out", default=None, help="default: the JSON's path with .png")
    args, name, size = parse_bench_args(p, argv, SIZES)
    if size is None:
        return 2
    if args.link_share is not None:
        size = {**size, "link_share": args.link_share}
    if args.rows:
        size = {**size, "runs": args.rows}
    limit = compute_bound(run_config(size, 100), ByteCorpus(), steps=3, warmup=1)
    runs, overhead = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for per_stage, every in size["runs"]:
            print(f"[{per_stage} per stage, average_every {every}, {size['rate']:g} Mbit/s]", file=sys.stderr, flush=True)
            runs.append(measure(size, per_stage, every, Path(args.keep or tmp), limit, overhead, args.announce_period,
                                args.rtt_ms, args.queue_ms, args.congestion))
            if per_stage == 1 and "framing_overhead" in runs[-1]:
                overhead = runs[-1]["framing_overhead"]  # no averaging with one replica: the baseline
    speedup, verdict = verdicts(runs)
    text = table(runs)
    traffic = traffic_table(runs)
    print(f"\n{name}: d={size['d']}, {size['layers']} layers, {size['stages']} stages, ratio {size['ratio']}, "
          f"batch {size['batch']}x{size['seq']} in {size['micro']} microbatches; records stored every "
          f"{args.announce_period:g} s; tbf both ways, "
          f"{f'{args.rtt_ms:g} ms RTT added (delay line)' if args.rtt_ms else 'no latency emulation'}; "
          f"tbf queues {args.queue_ms:g} ms; TCP {args.congestion}; "
          f"B/tok = bytes sent + received per token the node handled\n\n{text}\n\nWhere the links go (B per handled "
          f"token; received = what crossed the node's downlink):\n\n{traffic}\n\n" + "\n".join(verdict))
    png = args.png_out or str(Path(args.json_out).with_suffix(".png"))
    write_json(args.json_out, {"size": name, "config": size, "runs": runs, "speedup_2": speedup, "verdict": verdict,
                               "table": text, "traffic_table": traffic, "machine": machine_info(), "latency_emulated": args.rtt_ms > 0,
                               "rtt_ms": args.rtt_ms,
                               "command": " ".join(["python -m bench.scaling", *(argv or sys.argv[1:])])})
    plot(png, runs)
    print(f"\nwrote {args.json_out} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
