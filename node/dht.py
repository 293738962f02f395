"""Starting a hivemind DHT peer safely: validated addresses, no NAT/relay probing by default,
signed and schema-checked records, and a clear error instead of a hang."""
from __future__ import annotations

import os
import socket
import sys

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from node.lifeline import watch_parent
from protocol.records import make_schema


class AddressError(ValueError):
    pass


class OwnedDHT(DHT):
    """hivemind's DHT whose process (and its p2pd) exits when the node's main process dies."""

    def run(self) -> None:
        watch_parent(self._parent_pid)
        super().run()


def parse_initial_peers(addrs) -> list[str]:
    """Validate user-given multiaddrs with hivemind's own parser; each must name a peer (/p2p/...)."""
    out = []
    for raw in addrs or ():
        for addr in str(raw).replace(",", " ").split():
            try:
                maddr = Multiaddr(addr)
            except Exception as e:
                raise AddressError(f"initial peer {addr!r} is not a valid multiaddr ({e}); expected e.g. "
                                   f"/ip4/1.2.3.4/tcp/31337/p2p/Qm...") from None
            if "p2p" not in [p.name for p in maddr.protocols()]:
                raise AddressError(f"initial peer {addr!r} lacks the /p2p/<peer id> part; copy the full address "
                                   f"that `resbm-node bootstrap` printed")
            out.append(str(maddr))
    return out


def host_maddrs(host: str, port: int) -> list[str]:
    family = "ip6" if ":" in host else "ip4"
    return [f"/{family}/{host}/tcp/{port}"]


def check_port_free(host: str, port: int) -> None:
    """Refuse a TCP port that a live process listens on. libp2p binds with SO_REUSEPORT, so a second
    p2pd on a held port would start silently and share the port with the first; a plain bind (with
    SO_REUSEADDR, which ignores sockets left in TIME_WAIT by a killed node, but not SO_REUSEPORT)
    fails exactly when somebody listens there."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise AddressError(f"port {port} on {host} is already in use ({e.strerror}): is another bootstrap "
                               f"or node running with --port {port}? Stop it or choose another port") from None


def start_dht(run_id: str, initial_peers=(), *, host: str = "127.0.0.1", port: int = 0, identity: str | None = None,
              announce: list[str] | None = None, public: bool = False, rsa_key: RSAPrivateKey | None = None,
              startup_timeout: float = 20.0) -> DHT:
    """A DHT peer for run `run_id`. `public=True` enables hivemind's NAT traversal helpers (AutoNAT,
    port mapping, relays) for volunteers behind NAT; off by default, and always off in tests."""
    peers = parse_initial_peers(initial_peers)
    check_port_free(host, port)
    if identity:
        os.makedirs(os.path.dirname(os.path.abspath(identity)), exist_ok=True)
    validators = [RSASignatureValidator(rsa_key), SchemaValidator(make_schema(run_id), allow_extra_keys=True)]
    try:
        dht = OwnedDHT(initial_peers=peers, start=True, record_validators=validators,
                  host_maddrs=host_maddrs(host, port), announce_maddrs=announce, identity_path=identity,
                     nat_port_map=public, auto_nat=public, use_relay=public, use_auto_relay=public,
                        startup_timeout=startup_timeout, await_ready=True)
    except Exception as e:
        where = f" (initial peers: {', '.join(peers)})" if peers else ""
        raise ConnectionError(f"could not start the DHT peer{where}: {type(e).__name__}: {e}") from e
    if peers and not _reached_any(dht):
        dht.shutdown()
        raise ConnectionError(f"none of the initial peers answered: {', '.join(peers)}. Is the bootstrap running "
                              f"and reachable from here (address, port, firewall)?")
    return dht


async def _count_peers(_dht, node) -> int:
    return len(await node.p2p.list_peers())


def _reached_any(dht: DHT) -> bool:
    return dht.run_coroutine(_count_peers) > 0


def visible_maddrs(dht: DHT) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]


def print_own_addrs(dht: DHT, role: str) -> list[str]:
    """Tell the operator this node's own multiaddrs: any live peer's address lets others join."""
    addrs = visible_maddrs(dht)
    print(f"{role} listening; others can join through this node with:", file=sys.stderr)
    for a in addrs:
        print(f"  --initial-peers {a}", file=sys.stderr)
    sys.stderr.flush()
    return addrs
