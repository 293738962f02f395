"""What one replica-averaging round costs a stage, computed (not measured) from the scheme's
arithmetic (swarm/averaging_plan.py): bytes one replica sends plus receives per round, and the
seconds its link needs for them, under today's scheme (anchored rounds in 2-bit blocks, one fragment
per round, paced to a share of the link) next to the fp32 all-reduce of everything that ran before it.

    python -m bench.averaging_cost [--params N] [--group G] [--links 10,100] [--json-out F]

Transfer time only: matchmaking (about a second), the reducers' CenteredClip and round trips come on
top. bench.scaling measures real rounds on shaped links.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.plotting import line_plot, machine_info, markdown_table, write_json
from swarm.averaging_plan import (ANCHORED_BYTES, BUDGET_SHARE, FP16_BYTES, FP32_BYTES, FULL_BYTES, INT4_BYTES,
                                  fragment_count, round_cost)

SCHEMES = (("fp32 all-reduce, all at once, whole link (before)", FP32_BYTES, False, 1.0),
           ("fp16, all at once, whole link", FP16_BYTES, False, 1.0),
           ("fp16, one fragment per round, whole link", FP16_BYTES, True, 1.0),
           ("fp16, one fragment per round, paced to 10% of the link (until 8-bit)", FP16_BYTES, True, 0.1),
           ("8-bit blocks, one fragment per round, paced to 5% of the link (until anchored rounds)", FULL_BYTES, True,
            0.05),
           ("anchored 4-bit blocks, one fragment per round, paced to 2.5% of the link (until 2-bit)", INT4_BYTES,
            True, 0.025),
           (f"anchored 2-bit blocks, one fragment per round, paced to {BUDGET_SHARE:.2%} of the link (now)",
            ANCHORED_BYTES, True, BUDGET_SHARE))


def rows_for(params: int, group: int, links: list[float]) -> list[dict]:
    out = []
    for link in links:
        for name, width, fragmented, share in SCHEMES:
            fragments = fragment_count(params) if fragmented else 1
            out.append({"scheme": name, **round_cost(params, group, link, width, fragments, share)})
    return out


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["link Mbit/s", "scheme", "fragments", "bytes per round", "seconds per round", "seconds for every parameter"],
        [[f"{r['link_mbit']:g}", r["scheme"], r["fragments"], f"{r['round_bytes'] / 1e6:,.0f} MB",
          f"{r['round_s']:,.1f}", f"{r['all_fragments_s']:,.0f}"] for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=250_000_000, help="parameters of one stage (default 250M)")
    p.add_argument("--group", type=int, default=2, help="replicas averaging together (default 2)")
    p.add_argument("--links", default="10,100", help="link rates in Mbit/s, comma-separated")
    p.add_argument("--json-out", default="bench/results/averaging_cost.json")
    args = p.parse_args(argv)
    links = [float(x) for x in args.links.split(",")]
    rows = rows_for(args.params, args.group, links)
    text = table(rows)
    print(f"one averaging round of a {args.params / 1e6:g}M-parameter stage, {args.group} replicas, butterfly "
          f"all-reduce (computed: transfer only)\n\n{text}")
    write_json(args.json_out, {"params": args.params, "group": args.group, "rows": rows, "table": text,
                               "computed": True, "machine": machine_info(),
                               "command": " ".join(["python -m bench.averaging_cost", *(argv or sys.argv[1:])])})
    series = [{"label": name, "x": links, "y": [r["round_s"] for r in rows if r["scheme"] == name],
               "style": {"marker": "o"}} for name, *_ in SCHEMES]
    line_plot(str(Path(args.json_out).with_suffix(".png")),
              [{"title": f"seconds per averaging round, {args.params / 1e6:g}M-parameter stage", "xlabel": "Mbit/s",
                "ylabel": "seconds (log)", "series": series, "logy": True, "logx": True}])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
