"""NAT lab and bench: a "home" namespace behind a "router" namespace doing source NAT.

Topology (on top of bench/netns.py's NetnsLab)::

    public hosts h0..h{n-1}: 11.77.0.{i+1}/24 on the lab bridge (optionally shaped)
    router  h{n}:   eth0 11.77.0.{n+1}/24 on the bridge, eth1 192.168.77.1/24 to home,
                    MASQUERADE out of eth0, inbound connections that home did not open dropped
    home    h{n+1}: eth0 192.168.77.2/24, default route via the router

Public hosts have no route to 192.168.77.0/24 either, as on the internet: nobody can dial home,
home can dial everybody. The router and home are named like lab hosts, so NetnsLab's cleanup and
cleanup_stale remove them too.

The public side uses globally routable addresses (11.77.0.0/24) inside the isolated namespaces:
a libp2p relay puts only public addresses of its own into a reservation (manet.IsPublicAddr), and a
reservation without addresses gives the home node no /p2p-circuit address (seen with 10.77.0.0/24:
"skipping node that we recently failed to obtain a reservation with").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.netns import Host, NetnsLab, require_root_netns
from bench.plotting import fmt, line_plot, machine_info, markdown_table, write_json
from node.local_swarm import Swarm
from swarm.config import ModelConfig, RunConfig, TrainConfig

HOME_NET = "192.168.77"
ROUTED_NET = "10.78.0"    # the routed lab's home network: private, but routed (no NAT)
PUBLIC_NET = "11.77.0.0/24"  # see the module doc: relays announce only public addresses


class NatLab(NetnsLab):
    """NetnsLab with `n_public` bridged hosts plus a router and a home host behind it.
    `lab.router` and `lab.home` are host indices for popen().
    `nat=False` builds the routed lab instead: home sits on ROUTED_NET (private 10.x addresses, as in a
    cloud VPC or a campus network) behind a router that only forwards, and the public hosts route that
    network through it: everybody can dial home, though home sends from a private address via a router."""

    def __init__(self, n_public: int, rate_mbit: float | None = None, nat: bool = True, **kw):
        kw.setdefault("subnet", PUBLIC_NET)
        super().__init__(n_public + 1, rate_mbit=rate_mbit, **kw)
        base = self.hosts[0].name.rsplit("-", 1)[0]
        self.nat = nat
        self.home_net = HOME_NET if nat else ROUTED_NET
        self.router, self.home = n_public, n_public + 1
        self.hosts.append(Host(f"{base}-h{self.home}", f"{self.home_net}.2"))

    def _build(self) -> None:
        home = self.hosts.pop()  # not on the bridge: behind the router
        try:
            super()._build()
        finally:
            self.hosts.append(home)
        router = self.hosts[self.router].name
        self._add_netns(home.name)
        self._ip(router, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", home.name)
        self._ip(router, "addr", "add", f"{self.home_net}.1/24", "dev", "eth1")
        self._ip(router, "link", "set", "eth1", "up")
        self._ip(home.name, "addr", "add", f"{home.ip}/24", "dev", "eth0")
        self._ip(home.name, "link", "set", "eth0", "up")
        self._ip(home.name, "route", "add", "default", "via", f"{self.home_net}.1")
        if self.nat:
            self._router_nat(router)
        else:
            self._router_forward(router)

    def _router_forward(self, router: str) -> None:
        subprocess.run(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True,
                       capture_output=True, timeout=15)
        for i, h in enumerate(self.hosts[:self.router]):
            self._ip(h.name, "route", "add", f"{self.home_net}.0/24", "via", self.hosts[self.router].ip)

    def block_home_to(self, host: int) -> None:
        """The router drops what home sends to public host `host`: home cannot open a connection to
        it, so that host reaches the home node only through a relay."""
        subprocess.run(["ip", "netns", "exec", self.hosts[self.router].name, "iptables", "-I", "FORWARD", "-i", "eth1",
                        "-d", self.hosts[host].ip, "-j", "DROP"], check=True, capture_output=True, timeout=15)

    def _router_nat(self, router: str) -> None:
        def ns(*argv):
            subprocess.run(["ip", "netns", "exec", router, *argv], check=True, capture_output=True, timeout=15)
        ns("sysctl", "-qw", "net.ipv4.ip_forward=1")
        ns("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
        ns("iptables", "-A", "FORWARD", "-i", "eth0", "-o", "eth1", "-m", "conntrack",
           "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        ns("iptables", "-A", "FORWARD", "-i", "eth0", "-o", "eth1", "-j", "DROP")


def require_nat_lab() -> str | None:
    """None if a NAT lab can be built here; else why not."""
    reason = require_root_netns()
    if reason is None and shutil.which("iptables") is None:
        reason = "'iptables' not found (Debian package iptables)"
    if reason is None:
        try:
            with NatLab(1):
                pass
        except (subprocess.SubprocessError, OSError) as e:
            reason = f"cannot build a NAT lab: {(getattr(e, 'stderr', None) or str(e)).strip()}"
    return reason


# ------------------------------------------------------------------ swarm in the NAT lab
BOOT, TRAINER, STAGE2, DIRECT = 0, 1, 2, 3  # public hosts of NatLab(4) (the test needs only the first 3)
HOME_PORT, STAGE2_PORT = 31338, 31339


def peer_id_of(identity: Path) -> str:
    from hivemind.p2p import PeerID
    return PeerID.from_identity(identity.read_bytes()).to_base58()


def stage2_addr(lab: NatLab, swarm) -> str:
    return f"/ip4/{lab.hosts[STAGE2].ip}/tcp/{STAGE2_PORT}/p2p/{peer_id_of(swarm.run_dir / 'stage2.id')}"


def start_swarm(lab: NatLab, swarm, relayed: bool, relay_wait_s: float = 400, second_relay: bool = False) -> list[str]:
    """Bootstrap (the relay) on h0, stage 2 on h2, stage 1's only replica at home behind the NAT
    (`relayed`) or on public host h3; the bootstrap relays (`--reachability public`), stage 1 decides
    by itself (`--reachability auto`). Stage 2 keeps NAT helpers off (Swarm's default), or with `second_relay` is
    public too and stage 1 reserves on both relays. Returns the bootstrap's addresses once stages 1
    and 2 serve."""
    wrap = lambda i: (lambda cmd: lab.exec_argv(i, cmd))  # noqa: E731
    where = lab.home if relayed else DIRECT
    peers = swarm.start_bootstrap(host=lab.hosts[BOOT].ip, wrap=wrap(BOOT), extra=["--reachability", "public"])
    swarm.start_stage("stage2", 2, peers, host=lab.hosts[STAGE2].ip, wrap=wrap(STAGE2),
                      extra=["--port", str(STAGE2_PORT), "--reachability", "public"] if second_relay else [])
    home = ["--port", str(HOME_PORT), "--reachability", "auto"]
    if second_relay:
        swarm.wait_for_line("stage2", "serving", 180)
        home += ["--relay", *peers, stage2_addr(lab, swarm)]
    swarm.start_stage("stage1", 1, peers, host=lab.hosts[where].ip, extra=home, wrap=wrap(where))
    if relayed:
        swarm.wait_for_line("stage1", "relayed: reachable through", relay_wait_s)
    for name in ("stage1", "stage2"):
        swarm.wait_for_line(name, "serving", 180)
    return peers


def start_trainer(lab: NatLab, swarm, peers: list[str], steps: int, i: int = 0):
    return swarm.start_trainer(i, peers, steps, host=lab.hosts[TRAINER].ip,
                               wrap=lambda cmd: lab.exec_argv(TRAINER, cmd),
                               extra=["--eval-every", "0", "--checkpoint-dir", ""])


def iface_bytes(lab: NatLab, host: int, dev: str = "eth0") -> int:
    """Bytes received + sent on a host's interface (the relay's whole traffic when host = BOOT)."""
    stats = "/sys/class/net/{}/statistics/{}_bytes"
    out = subprocess.run(lab.exec_argv(host, ["cat", stats.format(dev, "rx"), stats.format(dev, "tx")]),
                         capture_output=True, text=True, check=True, timeout=15).stdout.split()
    return sum(int(x) for x in out)


SIZES = {  # every size fits the 2-core machine's namespaces; --scale is for a machine with more cores
    "default": dict(d=64, layers=3, heads=2, seq=64, batch=8),
    "scale": dict(d=256, layers=6, heads=4, seq=128, batch=16),
}


def lab_run(run_id: str, size: dict | None = None) -> RunConfig:
    """3 stages, 2 microbatches a step; the default size is cheap on 2 cores, yet codes worth counting."""
    size = size or SIZES["default"]
    model = ModelConfig(d_model=size["d"], n_layers=size["layers"], n_heads=size["heads"], ratio=16,
                        seq_len=size["seq"], n_stages=3)
    return RunConfig(model=model, train=TrainConfig(batch_size=size["batch"], microbatches=2), run_id=run_id)


MODES = {  # stage 1's only replica ...
    "direct": "on a public host",
    "relayed": "at home behind NAT (the trainer may also use a connection the home node opened)",
    "relay-only": "at home, and the router drops what home sends to the trainer: every code crosses the relay",
}


def one_run(mode: str, rate: float, steps: int, workdir, size: dict) -> dict:
    """tokens/s of a trainer through stage 1 (MODES), and the relay's (bootstrap's) bytes per token
    while the trainer ran."""
    run = lab_run("natbench", size)
    run_dir = Path(workdir) / mode
    run_dir.mkdir(parents=True)
    with NatLab(4, rate_mbit=rate) as lab:
        swarm = Swarm(run_dir, threads=1, run=run)
        try:
            peers = start_swarm(lab, swarm, relayed=mode != "direct")
            if mode == "relay-only":
                lab.block_home_to(TRAINER)
            before = iface_bytes(lab, BOOT)
            trainer = start_trainer(lab, swarm, peers, steps)
            t0 = time.monotonic()
            code = trainer.wait(timeout=1200)
            relay_bytes = iface_bytes(lab, BOOT) - before
        finally:
            swarm.stop()
    summary = json.loads((run_dir / "trainer0.json").read_text())
    tokens = summary["steps_completed"] * run.train.batch_size * run.model.seq_len
    return {"mode": mode, "relayed": mode != "direct", "rate_mbit": rate, "exit_code": code,
            "wall_s": round(time.monotonic() - t0, 1), "steps": summary["steps_completed"],
            "tokens_per_s": summary["tokens_per_s"], "loss_first": summary["train_loss_first"],
            "loss_last": summary["train_loss_last"], "relay_bytes": relay_bytes,
            "relay_bytes_per_token": relay_bytes / max(tokens, 1)}


def report(rows: list[dict], png: str) -> str:
    table = markdown_table(
        ["stage 1 replica", "link Mbit/s", "steps", "tokens/s", "loss first -> last", "relay B/token"],
        [[r["mode"], fmt(r["rate_mbit"], "g"), r["steps"], fmt(r["tokens_per_s"], ".0f"),
          f"{fmt(r['loss_first'], '.2f')} -> {fmt(r['loss_last'], '.2f')}", fmt(r["relay_bytes_per_token"], ".1f")]
         for r in rows])
    xs = list(range(len(rows)))
    names = [r["mode"] for r in rows]
    line_plot(png, [
        {"title": "tokens/s by where stage 1 is", "xlabel": "stage 1 replica", "ylabel": "tokens/s",
         "xticks": xs, "xticklabels": names, "ylim": (0, 1.15 * max(r["tokens_per_s"] for r in rows)),
         "series": [{"x": xs, "y": [r["tokens_per_s"] for r in rows], "style": {"marker": "o"}}]},
        {"title": "relay (bootstrap) bytes per token", "xlabel": "stage 1 replica", "ylabel": "bytes/token",
         "xticks": xs, "xticklabels": names, "ylim": (0, 1.15 * max(r["relay_bytes_per_token"] for r in rows)),
         "series": [{"x": xs, "y": [r["relay_bytes_per_token"] for r in rows], "style": {"marker": "o"}}]}])
    return table + "\n\n" + "\n".join(f"- {mode}: stage 1 {where}" for mode, where in MODES.items())


# ------------------------------------------------------------------ join -> serving
STARTUP_LABS = {  # lab -> (NatLab's public subnet, what it is)
    "routed": ("10.77.0.0/24", "every host on private 10.x addresses, home on 10.78.0.2 behind a router that "
                               "forwards without NAT (a VPC, a campus network): dialable; a relay could give no "
                               "usable reservation (it has no public address)"),
    "routed-public": (PUBLIC_NET, "as routed, but the bootstrap (relay) on a public 11.77.0.1: dialable, yet a "
                                  "relay reservation is possible"),
    "nat": (PUBLIC_NET, "home on 192.168.77.2 behind a MASQUERADE router that drops inbound connections: must relay"),
}


def startup_run(kind: str, workdir, timeout: float = 480) -> dict:
    """Seconds from starting `join --stage 1 --reachability auto` at home to its `serving` line (the
    bootstrap, --reachability public, already up on the public side), and what the node decided."""
    run = lab_run("natstart")
    run_dir = Path(workdir) / f"startup-{kind}"
    run_dir.mkdir(parents=True)
    with NatLab(1, nat=kind == "nat", subnet=STARTUP_LABS[kind][0]) as lab:
        swarm = Swarm(run_dir, threads=1, run=run)
        try:
            peers = swarm.start_bootstrap(host=lab.hosts[BOOT].ip, wrap=lambda cmd: lab.exec_argv(BOOT, cmd),
                                          extra=["--reachability", "public"])
            t0, load = time.monotonic(), os.getloadavg()[0]  # (the machine is shared: say how busy it was)
            swarm.start_stage("stage1", 1, peers, host=lab.hosts[lab.home].ip,
                              extra=["--port", str(HOME_PORT), "--reachability", "auto"],
                              wrap=lambda cmd: lab.exec_argv(lab.home, cmd))
            try:
                swarm.wait_for_line("stage1", "stage 1 serving", timeout)
                seconds = round(time.monotonic() - t0, 1)
            except RuntimeError:
                seconds = None
        finally:
            swarm.stop()
    log = (run_dir / "stage1.log").read_text(errors="replace")
    return {"lab": kind, "join_to_serving_s": seconds, "load_avg_1min": round(load, 1),
            "relayed": "relayed: reachable through" in log,
            "waited_for_relay": "behind NAT" in log, "no_reservation": "no relay reservation" in log,
            "probe": next((line.strip() for line in log.splitlines() if "dial-back" in line), None),
            **({} if seconds is not None else {"log_tail": log.splitlines()[-15:]})}


def startup_main(args) -> int:
    with tempfile.TemporaryDirectory(prefix="natstart-") as tmp:
        rows = [startup_run(kind, tmp) for kind in args.labs]
    path = Path(args.json_out)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("startup", {})[args.label] = {"rows": rows, "machine": machine_info(),
                                                   "labs": {k: STARTUP_LABS[k][1] for k in args.labs}}
    write_json(str(path), data)
    for r in rows:
        print(f"{args.label}: {r['lab']} lab: join -> serving {r['join_to_serving_s']} s "
              f"(relayed {r['relayed']}, waited for a relay {r['waited_for_relay']}, probe: {r['probe']})")
    return 0 if all(r["join_to_serving_s"] is not None for r in rows) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="tokens/s through a relayed stage-1 replica vs a direct one; "
                                            "with --startup, seconds from join to serving in the routed and NAT labs")
    p.add_argument("--rate", type=float, default=10.0, help="link rate in Mbit/s (every host's link)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--scale", action="store_true", help="a d=256, 6-layer model (for a machine with more cores)")
    p.add_argument("--json-out", default="bench/results/nat.json")
    p.add_argument("--png-out", default=None, help="default: the JSON's path with .png")
    p.add_argument("--startup", action="store_true", help="measure join -> serving with --reachability auto in the "
                                                          "labs of --labs (merged into the JSON under 'startup')")
    p.add_argument("--labs", nargs="+", choices=tuple(STARTUP_LABS), default=["routed", "nat"])
    p.add_argument("--label", default="after", help="--startup: the key of this measurement (e.g. before, after)")
    args = p.parse_args(argv)
    reason = require_nat_lab()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if args.startup:
        return startup_main(args)
    size = SIZES["scale" if args.scale else "default"]
    with tempfile.TemporaryDirectory(prefix="natbench-") as tmp:
        rows = [one_run(mode, args.rate, args.steps, tmp, size) for mode in MODES]
    png = args.png_out or str(Path(args.json_out).with_suffix(".png"))
    print(report(rows, png))
    failed = [r for r in rows if r["exit_code"] != 0]
    for r in failed:
        print(f"{r['mode']} run: trainer exit code {r['exit_code']}", file=sys.stderr)
    write_json(args.json_out, {"rows": rows, "size": size, "machine": machine_info(),
                               "command": " ".join(["python -m bench.nat", *(argv if argv is not None else sys.argv[1:])])})
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
