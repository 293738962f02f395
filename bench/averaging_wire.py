"""What averaging rounds put on the wire, measured from outside: two replicas (real DHTs and
averagers, as a node runs them) average on loopback with nothing else running, and the loopback
interface's byte counter is read around each round. Replicas that start apart run a full round
first (8-bit parameters: their anchors differ), then anchored rounds (2-bit changes since the
anchor they now share), each after a few simulated local steps. A last anchored round has the
second replica reach it `--late` seconds after the first, as replicas that step on their own
microbatches do: what the first puts on the wire while it waits is matchmaking's (its DHT reads of
the group key, paced by node/group_keys.py).

    python -m bench.averaging_wire [--params N] [--rounds R] [--late S] [--link-mbit M] [--json-out F]

"payload" is the replicas' own count (sent plus received, so each byte crossing counts twice; the
table halves it); "wire" is everything loopback carried meanwhile: the parts, their framing
(protobuf, yamux, noise, TCP/IP), matchmaking and the DHT. Loopback packets are up to 64 KiB, so
per-packet headers weigh less here than on a 1500-byte link; a link that drops packets adds
retransmissions on top (bench.scaling measures that). Run it on an otherwise idle machine: every
loopback byte counts.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
import types
from pathlib import Path

import torch

from bench.plotting import line_plot, machine_info, markdown_table, write_json


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def _replica(params: list[torch.Tensor]):
    def change_weights(fn):
        with torch.no_grad():
            fn(params)
    return types.SimpleNamespace(params=params, change_weights=change_weights)


async def _rounds(reps, lates: list[float], gen: torch.Generator) -> list[dict]:
    """One round per entry of `lates`: the second replica reaches it that many seconds after the first."""
    async def in_worker(fn):
        return fn()

    async def average(r, k, late):
        await asyncio.sleep(late)
        return await r.average(k, in_worker)

    rows = []
    for k, late in enumerate(lates):
        for r in reps:  # each replica's own local steps since the last round
            r.worker.change_weights(lambda ps: [p.add_(2e-3 * torch.randn(p.shape, generator=gen)) for p in ps])
        payload, kinds, wire, start = [r.figures()["bytes"] or 0.0 for r in reps], [dict(r.kinds) for r in reps], \
            loopback_bytes(), time.monotonic()
        ok = await asyncio.gather(average(reps[0], k, 0.0), average(reps[1], k, late))
        wire, seconds = loopback_bytes() - wire, time.monotonic() - start
        sent = sum((r.figures()["bytes"] or 0.0) - p for r, p in zip(reps, payload)) / 2
        kind = [k for k, c in reps[0].kinds.items() if c != kinds[0].get(k, 0)]
        rows.append({"round": k, "complete": all(ok), "kind": kind[0] if len(kind) == 1 else "?", "late_s": late,
                     "seconds": seconds, "payload_bytes": sent, "wire_bytes": wire,
                     "wire_per_payload": wire / sent if sent else None})
    return rows


def measure(params: int, rounds: int, link_mbit: float, late_s: float) -> list[dict]:
    from node.averaging import ReplicaAverager
    from node.dht import start_dht, visible_maddrs
    from node.metrics import NodeMetrics
    from node.runtime import SocketJanitor
    from node.settings import AveragingSettings

    gen = torch.Generator().manual_seed(0)
    base = [0.05 * torch.randn(params // 4, generator=gen) for _ in range(4)]  # weights' scale
    start = [[t + 0.01 * torch.randn(t.shape, generator=gen) for t in base] for _ in range(2)]  # apart

    async def two():
        return 2

    janitor, dhts, reps = SocketJanitor(), [], []
    try:
        dhts.append(start_dht("wire"))
        dhts.append(start_dht("wire", visible_maddrs(dhts[0])))
        reps = [ReplicaAverager(d, "wire", 1, _replica(p), 1, two, NodeMetrics(),
                                AveragingSettings(link_mbit=link_mbit)) for d, p in zip(dhts, start)]
        return asyncio.run(_rounds(reps, [0.0] * rounds + ([late_s] if late_s > 0 else []), gen))
    finally:
        for r in reps:
            r.shutdown()
        for d in dhts:
            d.shutdown()
        janitor.sweep()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=256_000, help="parameters per replica (default 256k: "
                   "bench.scaling's stage; more for bigger hardware)")
    p.add_argument("--rounds", type=int, default=4, help="rounds with both replicas on time: the first full, the "
                                                          "rest anchored")
    p.add_argument("--link-mbit", type=float, default=10.0, help="the replicas' declared link (paces the rounds)")
    p.add_argument("--late", type=float, default=10.0, metavar="S",
                   help="one more anchored round, which the second replica reaches S seconds after the first "
                        "(0: none; below the default 15 s matchmaking wait)")
    p.add_argument("--json-out", default="bench/results/averaging_wire.json")
    args = p.parse_args(argv)
    rows = measure(args.params, args.rounds, args.link_mbit, args.late)
    text = markdown_table(["round", "kind", "partner late s", "complete", "seconds", "payload bytes", "loopback bytes",
                           "wire / payload"],
                          [[r["round"], r["kind"], f"{r['late_s']:g}", r["complete"], f"{r['seconds']:.1f}",
                            f"{r['payload_bytes']:,.0f}",
                            f"{r['wire_bytes']:,}", f"{r['wire_per_payload']:.2f}" if r["wire_per_payload"] else "-"]
                           for r in rows])
    print(f"averaging rounds of {args.params:,} parameters between 2 replicas on loopback\n\n{text}")
    write_json(args.json_out, {"params": args.params, "link_mbit": args.link_mbit, "rows": rows, "table": text,
                               "machine": machine_info(),
                               "command": " ".join(["python -m bench.averaging_wire", *(argv or sys.argv[1:])])})
    line_plot(str(Path(args.json_out).with_suffix(".png")),
              [{"title": "bytes on loopback per averaging round", "xlabel": "round", "ylabel": "bytes",
                "series": [{"label": label, "x": [r["round"] for r in rows], "y": [r[key] for r in rows],
                            "style": {"marker": "o"}, "labels": [r["kind"] for r in rows]}
                           for label, key in (("payload (replicas' count)", "payload_bytes"),
                                              ("loopback interface", "wire_bytes"))]}])
    return 0 if all(r["complete"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
