"""NAT lab and bench: a "home" namespace behind a "router" namespace doing source NAT.

Topology (on top of bench/netns.py's NetnsLab)::

    public hosts h0..h{n-1}: 10.77.0.{i+1}/24 on the lab bridge (optionally shaped)
    router  h{n}:   eth0 10.77.0.{n+1}/24 on the bridge, eth1 192.168.77.1/24 to home,
                    MASQUERADE out of eth0, inbound connections that home did not open dropped
    home    h{n+1}: eth0 192.168.77.2/24, default route via the router

Public hosts have no route to 192.168.77.0/24 either, as on the internet: nobody can dial home,
home can dial everybody. The router and home are named like lab hosts, so NetnsLab's cleanup and
cleanup_stale remove them too.
"""
from __future__ import annotations

import shutil
import subprocess

from bench.netns import Host, NetnsLab, require_root_netns

HOME_NET = "192.168.77"


class NatLab(NetnsLab):
    """NetnsLab with `n_public` bridged hosts plus a router and a home host behind it.
    `lab.router` and `lab.home` are host indices for popen()."""

    def __init__(self, n_public: int, rate_mbit: float | None = None, **kw):
        super().__init__(n_public + 1, rate_mbit=rate_mbit, **kw)
        base = self.hosts[0].name.rsplit("-", 1)[0]
        self.router, self.home = n_public, n_public + 1
        self.hosts.append(Host(f"{base}-h{self.home}", f"{HOME_NET}.2"))

    def _build(self) -> None:
        home = self.hosts.pop()  # not on the bridge: behind the router
        try:
            super()._build()
        finally:
            self.hosts.append(home)
        router = self.hosts[self.router].name
        self._add_netns(home.name)
        self._ip(router, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", home.name)
        self._ip(router, "addr", "add", f"{HOME_NET}.1/24", "dev", "eth1")
        self._ip(router, "link", "set", "eth1", "up")
        self._ip(home.name, "addr", "add", f"{home.ip}/24", "dev", "eth0")
        self._ip(home.name, "link", "set", "eth0", "up")
        self._ip(home.name, "route", "add", "default", "via", f"{HOME_NET}.1")
        self._router_nat(router)

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
