"""Print requested vs measured link rate for NetnsLab as a markdown table.

    sudo python -m bench.netns_check [--rates 1 10 100] [--seconds 3]

Each rate gets a fresh 2-host lab; "unshaped" is a lab without tbf.  The
measured value is TCP goodput, ideally 1448/1514 = 95.6 % of the frame rate.
"""

from __future__ import annotations

import argparse
import sys

from bench.netns import NetnsLab, measure_throughput_mbit, prepare, tbf_burst_bytes

GOODPUT_FRACTION = 1448 / 1514  # TCP payload per Ethernet frame at MTU 1500 (with timestamps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[1, 10, 100], help="Mbit/s")
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement window per rate")
    ap.add_argument("--no-unshaped", action="store_true", help="skip the unshaped row")
    args = ap.parse_args(argv)

    reason = prepare()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1

    print("| requested (Mbit/s) | tbf burst (bytes) | measured goodput (Mbit/s) | goodput / requested |")
    print("|---:|---:|---:|---:|")
    for rate in [*args.rates, *([] if args.no_unshaped else [None])]:
        with NetnsLab(2, rate_mbit=rate) as lab:
            got = measure_throughput_mbit(lab, 0, 1, seconds=args.seconds)
        if rate is None:
            print(f"| unshaped | - | {got:.1f} | - |")
        else:
            print(f"| {rate:g} | {tbf_burst_bytes(rate)} | {got:.2f} | {got / rate:.3f} |")
        sys.stdout.flush()
    print(f"\nIdeal goodput / requested: {GOODPUT_FRACTION:.3f} (tbf counts Ethernet+IP+TCP headers).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
