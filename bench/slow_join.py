"""A third replica of stage 1 joins on a slow link while the swarm trains: seconds until it serves,
and whether what it serves is the live state (node/state_sync.py).

Lab (bench/netns.py, needs root): h0 bootstrap, h1 trainer, h2 and h3 stage 1, h4 stage 2 on fast
links; h5, the joiner (stage 1), on a `--rate` Mbit/s link (tc tbf on both ends of its veth). The
trainer trains throughout; the joiner starts once it has stepped a few times.

`--trainer`: the joiner is a second trainer (stage 0), and every link is `--rate` Mbit/s, each node
told so (`--link-mbit`): its state comes from the training trainer, whose link the codes keep busy
(the scaling lab's case when one trainer serves before the others start).

    python -m bench.slow_join --rate 0.5 [--trainer]     # results: bench/results/slow_join.{json,log}
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.nat import lab_run
from bench.netns import NetnsLab, require_root_netns, tbf_burst_bytes
from bench.plotting import machine_info, write_json
from node.local_swarm import Swarm

SIZE = dict(d=128, layers=6, heads=4, seq=64, batch=8)  # stage 1's state: a few MB, a minute or more at 0.5 Mbit/s
BOOT, TRAINER, JOINER = 0, 1, 5


def shape(lab: NetnsLab, host: int, rate_mbit: float) -> None:
    """`rate_mbit` on host's link, both directions (as NetnsLab shapes every link)."""
    for ns, dev in ((lab.hosts[host].name, "eth0"), (lab.switch, f"p{host}")):
        subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                        "burst", str(tbf_burst_bytes(rate_mbit)), "latency", "50ms"], check=True, capture_output=True,
                       timeout=15)


def trainer_step(log: Path, total: int = 100000) -> int:
    """Steps the trainer's progress line reports ('12/100000')."""
    text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""
    return max((int(w.split("/")[0]) for w in text.split() if re.fullmatch(rf"\d+/{total}", w)), default=0)


def one_run(rate: float, workdir: Path, timeout: float, trainer_joins: bool = False) -> dict:
    run = lab_run("slowjoin", SIZE)
    stage = 0 if trainer_joins else 1
    with NetnsLab(6) as lab:
        for host in range(6) if trainer_joins else [JOINER]:
            shape(lab, host, rate)
        link = ["--link-mbit", f"{rate:g}"] if trainer_joins else []
        wrap = lambda i: (lambda cmd: lab.exec_argv(i, cmd))  # noqa: E731
        swarm = Swarm(workdir, threads=1, run=run)
        try:
            peers = swarm.start_bootstrap(host=lab.hosts[BOOT].ip, wrap=wrap(BOOT))
            for name, k, host in (("stage1-a", 1, 2), ("stage1-b", 1, 3), ("stage2", 2, 4)):
                swarm.start_stage(name, k, peers, host=lab.hosts[host].ip, wrap=wrap(host), extra=link)
            for name in ("stage1-a", "stage1-b", "stage2"):
                swarm.wait_for_line(name, "-> serving", 300)
            train = ["--eval-every", "0", "--checkpoint-dir", "", *link]
            swarm.start_trainer(0, peers, 100000, host=lab.hosts[TRAINER].ip, wrap=wrap(TRAINER), extra=train)
            trainer_log = workdir / "trainer0.log"
            deadline = time.monotonic() + 300
            while trainer_step(trainer_log) < 3 and time.monotonic() < deadline:
                time.sleep(1)
            step0, t0 = trainer_step(trainer_log), time.monotonic()
            if trainer_joins:
                swarm.start_trainer(1, peers, 100000, host=lab.hosts[JOINER].ip, wrap=wrap(JOINER), extra=train)
            else:
                swarm.start_stage("joiner", 1, peers, host=lab.hosts[JOINER].ip, wrap=wrap(JOINER))
            joiner = "trainer1" if trainer_joins else "joiner"
            try:
                swarm.wait_for_line(joiner, "-> serving", timeout)  # (not the "not serving" of a retry)
                seconds = round(time.monotonic() - t0, 1)
            except RuntimeError:
                seconds = None
            step1 = trainer_step(trainer_log)
        finally:
            swarm.stop()
    log = (workdir / f"{joiner}.log").read_text(errors="replace")
    loaded = re.search(rf"loaded stage {stage} at step (\d+) from live replica", log)
    download = re.search(rf"downloaded stage {stage} at step \S+ from \S+: (\d+) bytes in (\d+) s", log)
    return {"rate_mbit": rate, "joiner_stage": stage, "every_link_shaped": trainer_joins,
            "join_to_serving_s": seconds, "live_state": bool(loaded),
            "loaded_step": int(loaded.group(1)) if loaded else None,
            "served_init": "starting from initialisation" in log,
            "state_bytes": int(download.group(1)) if download else None,
            "download_s": int(download.group(2)) if download else None,
            "trainer_steps_during_join": step1 - step0,
            "retries": log.count("none handed over its state"), "resumed_chunks": log.count("resuming at byte"),
            "joiner_log_tail": log.splitlines()[-12:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="a third stage-1 replica joins on a slow link while the swarm trains")
    p.add_argument("--rate", type=float, default=0.5, help="the joiner's link, Mbit/s")
    p.add_argument("--timeout", type=float, default=900, help="give up on the joiner after this many seconds")
    p.add_argument("--trainer", action="store_true",
                   help="the joiner is a second trainer, fetching from the training one; every link at --rate")
    p.add_argument("--label", default="after")
    p.add_argument("--json-out", default="bench/results/slow_join.json")
    args = p.parse_args(argv)
    reason = require_root_netns()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="slowjoin-") as tmp:
        row = one_run(args.rate, Path(tmp), args.timeout, args.trainer)
    path = Path(args.json_out)
    import json
    data = json.loads(path.read_text()) if path.exists() else {}
    data[args.label] = {"row": row, "size": SIZE, "machine": machine_info(),
                        "command": " ".join(["python -m bench.slow_join", *(argv if argv is not None else sys.argv[1:])])}
    write_json(str(path), data)
    print(f"{args.label}: {'trainer ' if args.trainer else ''}joiner on {args.rate} Mbit/s: join -> serving {row['join_to_serving_s']} s, live state "
          f"{row['live_state']} (step {row['loaded_step']}), initialisation {row['served_init']}, "
          f"{row['state_bytes']} bytes in {row['download_s']} s, trainer steps meanwhile "
          f"{row['trainer_steps_during_join']}")
    return 0 if row["live_state"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
