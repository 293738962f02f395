"""Starting a hivemind DHT peer safely: validated addresses, no NAT/relay probing by default,
signed and schema-checked records, and a clear error instead of a hang."""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from hivemind import DHT
from hivemind.p2p import P2P
from hivemind.dht.schema import SchemaValidator
from hivemind.utils.multiaddr import Multiaddr

from node.lifeline import watch_parent
from node.settings import REACHABILITY, ConnectSettings
from protocol import PROTOCOL_VERSION
from protocol.contract import DIALBACK_HANDLER, PEER_METHODS, check_fields, pack_meta, refusal, unpack_meta
from protocol.errors import PayloadError
from protocol.records import make_schema
from protocol.signing import Ed25519RecordValidator


class AddressError(ValueError):
    pass


# No DHT caches. A read that does not ask for the latest was answered by a cached copy of an earlier
# answer while any record in it lived, and our own stores kept that copy alive (they update our record
# in it): a replica that joined since, or a trainer whose record had expired from the copy, was missing
# from a node's periodic reads (in the scaling lab trainers that lost each other sent 25-34% of their
# calls outside their routing slots; tests/test_dht_cache.py). A key's holders, which every store
# reaches, answer instead: our own storage where we hold the key.
NO_CACHE = dict(cache_locally=False, cache_nearest=0, cache_on_store=False)

# How far our periodic DHT calls walk. Every DHT find is answered with the key's whole value (every
# replica's record of a stage) and up to 20 peers. hivemind's defaults walk a beam of 20 nodes for a
# store (every node of a swarm that small) and start 4 finds at once for a read, so a stage node of a
# 10-node swarm answered and asked 0.7-0.8 finds per second, 1.3-1.4 kB/s each way, most of its idle
# traffic (bench.idle_traffic --scale). A store, and a read of the latest copy, need only the key's
# RECORD_REPLICAS holders (its nearest nodes); a read that need not be the latest stops at the first
# holder, which the nearest known node nearly always is.
RECORD_REPLICAS = 5                        # holders of each key (hivemind's default, written once here)
HOLDERS_WALK = dict(beam_size=RECORD_REPLICAS)
QUICK_READ = dict(num_workers=1)


def subkey_items(found) -> dict:
    """{subkey: ValueWithExpiration} of a dictionary value a DHT get found; empty if it found nothing or a
    plain value (our records, the run config and averaging group keys are all stored under subkeys)."""
    return dict(found.value.items()) if found is not None and isinstance(found.value, dict) else {}


class OwnedDHT(DHT):
    """hivemind's DHT whose process (and its p2pd) exits when the node's main process dies. `p2pd_flags`
    are extra p2pd command-line flags that hivemind.P2P.create has no parameter for (relay service caps).
    `reachability`: the mode its p2pd was started in (REACHABILITY; "private": reached through a relay)."""

    def __init__(self, *args, p2pd_flags: dict | None = None, reachability: str = "off", **kwargs):
        self._p2pd_flags = dict(p2pd_flags or {})
        self.reachability = reachability
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        watch_parent(self._parent_pid)
        if self._p2pd_flags:
            _add_p2pd_flags(self._p2pd_flags)  # in this (the DHT's) process only, before it starts p2pd
        super().run()


def _add_p2pd_flags(extra: dict) -> None:
    make_args = P2P._make_process_args

    def with_extra(*args, **kwargs):
        return make_args(*args, **{**kwargs, **extra})
    P2P._make_process_args = staticmethod(with_extra)


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


@dataclass(frozen=True)
class RelayCaps:
    """Relay service caps (p2pd -relay* flags) of a public node. A relayed stage moves a few KB of codes
    per microbatch, so a relay needs few, small buffers; reservations are cheap (one per home node).
    Worst case memory: max_reservations x max_circuits x 2 x buffer_bytes (64 x 16 x 2 x 1 MiB = 2 GiB,
    only if every home node held every circuit at once; p2pd's 16 MiB default would make it 32 GiB)."""
    max_reservations: int = ConnectSettings.relay_max_reservations  # home nodes one relay accepts (p2pd: 128)
    max_circuits: int = ConnectSettings.relay_max_circuits  # relayed connections per home node at once (p2pd: 16)
    buffer_bytes: int = ConnectSettings.relay_buffer_kib * 1024  # per connection and direction (p2pd: 16 MiB)
    data_limit_bytes: int = 1 << 32   # per relayed connection before the relay resets it (p2pd default)
    time_limit: str = "24h"           # per relayed connection (p2pd's 30 min default would cut a long run)

    def flags(self) -> dict:
        if self.max_reservations <= 0:
            return dict(relayService=False)
        return dict(relayService=True, relayMaxReservations=self.max_reservations,
                    relayMaxCircuits=self.max_circuits, relayBufferSize=self.buffer_bytes,
                    relayDataLimit=self.data_limit_bytes, relayTimeLimit=self.time_limit)


def p2p_options(reachability: str, relays: list[str], caps: RelayCaps = RelayCaps()) -> tuple[dict, dict]:
    """(hivemind DHT/P2P kwargs, extra p2pd flags) for a reachability mode.
    public: dialable; serves as a relay (capped) and as an AutoNAT server, never uses one.
    private: cannot be dialled; reserves a slot on `relays` and announces the /p2p-circuit address.
    off: loopback/tests: no relay, no AutoNAT, as hivemind's defaults would otherwise probe.
    UPnP/NAT-PMP port mapping stays off in every mode: it would reconfigure the volunteer's router."""
    if reachability == "off":
        return dict(nat_port_map=False, auto_nat=False, use_relay=False, use_auto_relay=False), {}
    if reachability == "public":
        return (dict(nat_port_map=False, auto_nat=True, use_relay=True, use_auto_relay=False,
                     force_reachability="public"), caps.flags())
    if reachability == "private":
        if not relays:
            raise AddressError("a node that cannot be dialled needs a relay: give --initial-peers or --relay")
        # client_mode: others must not put an undialable peer in their DHT routing tables (their stores
        # and gets would wait on it); our own stage handlers are still reached through the relay.
        return (dict(nat_port_map=False, auto_nat=True, use_relay=True, use_auto_relay=True, client_mode=True,
                     force_reachability="private", trusted_relays=list(relays)),
                dict(relayService=False))
    raise ValueError(f"reachability must be one of {REACHABILITY}, not {reachability!r}")


def _source_ip(peer_ip: str) -> str:
    """The local address this host would send from towards `peer_ip` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET6 if ":" in peer_ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_ip, 9))
        return s.getsockname()[0]


def _via_gateway(peer_ip: str) -> bool:
    """Whether packets to `peer_ip` leave through a router (not on our own link). Unknown: True."""
    try:
        out = subprocess.run(["ip", "route", "get", peer_ip], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return " via " in out or not out


def guess_reachability(host: str, peers: list[str], announce) -> str:
    """The "auto" decision. off: listening on loopback (nobody else could dial us anyway). public: a
    bootstrap (no peers), an operator-given --announce address, or a peer reached from a global address
    or on our own link. private: we send from a private address through a router to the peers; private
    addresses are not routed between networks, so a NAT rewrites ours and nobody can dial it back."""
    if ipaddress.ip_address(host if host not in ("0.0.0.0", "::") else "0.0.0.0").is_loopback:
        return "off"
    if not peers or announce:
        return "public"
    peer_ip = Multiaddr(peers[0]).value_for_protocol(Multiaddr(peers[0]).protocols()[0].code)
    try:
        source = ipaddress.ip_address(_source_ip(peer_ip) if host in ("0.0.0.0", "::") else host)
    except (OSError, ValueError):
        return "public"
    return "private" if source.is_private and _via_gateway(peer_ip) else "public"


def start_dht_from_args(run_id: str, a) -> DHT:
    """The DHT peer of a bootstrap or join command (node/args.py add_connect_args)."""
    caps = RelayCaps(a.relay_max_reservations, a.relay_max_circuits, a.relay_buffer_kib * 1024)
    return start_dht(run_id, a.initial_peers, host=a.host, port=a.port, identity=a.identity, announce=a.announce,
                     reachability=a.reachability, relays=a.relay, relay_caps=caps, relay_wait_s=a.relay_wait_s)


def start_dht(run_id: str, initial_peers=(), *, host: str = "127.0.0.1", port: int = 0, identity: str | None = None,
              announce: list[str] | None = None, reachability: str = "off",
              relays=(), relay_caps: RelayCaps = RelayCaps(),
              startup_timeout: float = 20.0, client_mode: bool = False,
              relay_wait_s: float = ConnectSettings.relay_wait_s) -> DHT:
    """A DHT peer for run `run_id`. `reachability` (REACHABILITY): "auto" starts with the mode that this
    node's addresses suggest (guess_reachability), then asks an initial peer to dial it back
    (probe_reachability) and restarts in the other mode if the dial-back disagrees; "private" is relayed
    through `relays` (by default the initial peers); "off" (the default for library callers and tests)
    keeps every NAT helper off. The chosen mode is the DHT's `reachability`; a public node answers others'
    dial-back probes. `client_mode`: read and write, but answer no DHT request (others keep this peer
    out of their routing tables), as a watcher such as `monitor` should."""
    peers = parse_initial_peers(initial_peers)
    check_port_free(host, port)
    if identity:
        os.makedirs(os.path.dirname(os.path.abspath(identity)), exist_ok=True)
    # owner-signed records (this process's key: the Announcer's validators sign with the same one)
    validators = [Ed25519RecordValidator(), SchemaValidator(make_schema(run_id), allow_extra_keys=True)]

    def launch(mode: str, port: int) -> DHT:
        kwargs, flags = p2p_options(mode, parse_initial_peers(relays) or peers if mode == "private" else [], relay_caps)
        kwargs["client_mode"] = kwargs.get("client_mode", False) or client_mode
        try:
            dht = OwnedDHT(initial_peers=peers, start=True, record_validators=validators, reachability=mode,
                           host_maddrs=host_maddrs(host, port), announce_maddrs=announce, identity_path=identity,
                           p2pd_flags=flags, startup_timeout=startup_timeout, await_ready=True, **NO_CACHE,
                           num_replicas=RECORD_REPLICAS,
                           **kwargs)
        except Exception as e:
            where = f" (initial peers: {', '.join(peers)})" if peers else ""
            raise ConnectionError(f"could not start the DHT peer{where}: {type(e).__name__}: {e}") from e
        if peers and not _reached_any(dht):
            dht.shutdown()
            raise ConnectionError(f"none of the initial peers answered: {', '.join(peers)}. Is the bootstrap running "
                                  f"and reachable from here (address, port, firewall)?")
        return dht

    mode = reachability
    probe = mode == "auto" and bool(peers) and not announce
    if mode == "auto":
        mode = guess_reachability(host, peers, announce)
        probe = probe and mode != "off"
    dht = launch(mode, port)
    if probe:
        probed, ports = probe_reachability(dht, peers)
        if probed is not None and probed != mode:
            # p2pd's relay and AutoNAT settings are fixed at its start: start again in the probed mode, on the
            # port that was probed (and with the same identity, if it has one)
            _stop_fully(dht)
            port = port or (ports[0] if ports else 0)
            _wait_port_free(host, port)
            mode = probed
            dht = launch(mode, port)
    if mode == "public":
        dht.run_coroutine(_serve_dialback)
    if mode == "private":
        wait_for_relay(dht, relay_wait_s)
    return dht


def _stop_fully(dht: DHT) -> None:
    """Shut a DHT peer down and make sure its p2pd is gone: hivemind terminates a DHT process that does
    not stop within its grace (a busy machine), and its p2pd would live on, holding our port."""
    from node.lifeline import descendants
    helpers = descendants(dht.pid) if dht.pid else []
    dht.shutdown()
    for pid in helpers:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"p2pd" in f.read():
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def _wait_port_free(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check_port_free(host, port)
        except AddressError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- reachability probe: a dial-back by a peer this node reaches ----------------------------------
# AutoNAT (p2pd has it) cannot decide in a private network: its servers refuse to dial private
# addresses. Instead a public node that this node reached dials it back: a plain TCP connection to the
# address it sees the node connect from (never to any other address: nobody can use the probe to make
# a node dial a third party), at the node's listening port, which must answer as libp2p does
# (multistream-select). A fresh TCP connection, not a libp2p dial, which would reuse the open connection.
DIALBACK_TIMEOUT_S = 3.0
MAX_DIALBACK_PORTS = 4
MAX_DIALBACKS = 8             # probes one public node runs at once (each dials at most 2 x 4 addresses)


async def _tcp_dial(ip: str, port: int, timeout: float = DIALBACK_TIMEOUT_S) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        head = await asyncio.wait_for(reader.read(64), timeout)  # a libp2p listener speaks first
    except (OSError, asyncio.TimeoutError):
        head = b""
    finally:
        writer.close()
    return b"/multistream/" in head


def _ip_and_port(maddr: str) -> tuple[str | None, int | None]:
    """("1.2.3.4", 5) of "/ip4/1.2.3.4/tcp/5/..."; Nones for anything else (relayed, dns, quic)."""
    parts = maddr.split("/")
    if "/p2p-circuit" in maddr or len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None, None
    try:
        return parts[2], int(parts[4])
    except ValueError:
        return None, None


async def _observed_ips(p2p, peer_id) -> list[str]:
    """The addresses `peer_id` is connected from, as this node sees them (p2pd lists each connection's
    remote address)."""
    ips = []
    for info in await p2p.list_peers():
        if info.peer_id == peer_id:
            for addr in info.addrs:
                ip, _ = _ip_and_port(str(addr))
                if ip and ip not in ips:
                    ips.append(ip)
    return ips


def _dialback_handler(p2p):
    from hivemind.proto import runtime_pb2
    method = PEER_METHODS["dialback"]
    probing = asyncio.Semaphore(MAX_DIALBACKS)

    async def handle(request, context):
        try:
            if probing.locked():
                raise PayloadError("busy", f"{MAX_DIALBACKS} dial-back probes are running here; ask another peer")
            async with probing:
                reply = await probe(request, context)
        except PayloadError as e:
            reply = refusal(e.reason, e.detail)
        return runtime_pb2.ExpertResponse(metadata=pack_meta(reply))

    async def probe(request, context) -> dict:
        meta = unpack_meta(request.metadata)
        if meta.get("v") != PROTOCOL_VERSION:
            raise PayloadError("version", f"protocol version {meta.get('v')!r} is not ours ({PROTOCOL_VERSION})")
        ports = [p for p in check_fields(method.fields, meta)["ports"] if 0 < p < 65536][:MAX_DIALBACK_PORTS]
        ips = (await _observed_ips(p2p, context.remote_id))[:2]
        targets = [(ip, port) for ip in ips for port in ports]
        answered = await asyncio.gather(*(_tcp_dial(ip, port) for ip, port in targets))
        return {"ok": True, "dialed": [f"{ip}:{port}" for (ip, port), ok in zip(targets, answered) if ok],
                "observed": ips}
    return handle


async def _serve_dialback(_dht, node) -> None:
    from hivemind.proto import runtime_pb2
    await node.p2p.add_protobuf_handler(DIALBACK_HANDLER, _dialback_handler(node.p2p), runtime_pb2.ExpertRequest)


def _peer_id_of(maddr: str) -> str:
    return maddr.split("/p2p/")[-1].split("/")[0]


async def _ask_dialback(_dht, node, peers: list[str], ports: list[int] | None, timeout: float) -> dict:
    """Ask the first initial peer that answers to dial us back at `ports` (default: our listening ports)."""
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2
    if ports is None:
        ports = sorted({p for p in (_ip_and_port(str(a))[1] for a in await node.p2p.get_visible_maddrs()) if p})
    errors = []
    for addr in peers[:3]:
        peer = _peer_id_of(addr)
        request = runtime_pb2.ExpertRequest(metadata=pack_meta({"v": PROTOCOL_VERSION, "ports": ports}))
        try:
            response = await asyncio.wait_for(node.p2p.call_protobuf_handler(
                PeerID.from_base58(peer), DIALBACK_HANDLER, request, runtime_pb2.ExpertResponse), timeout)
            meta = unpack_meta(response.metadata)
            if not meta.get("ok"):
                raise PayloadError(meta.get("reason") if meta.get("reason") in PayloadError.REASONS else "malformed",
                                   str(meta.get("error")))
            reply = check_fields(PEER_METHODS["dialback"].reply_fields, meta)
        except Exception as e:  # an older peer without the handler, a refusal, a timeout
            errors.append(f"{peer[-8:]}: {type(e).__name__}: {str(e)[:120]}")
            continue
        return {"peer": peer, "ports": ports, "dialed": reply["dialed"], "observed": reply["observed"]}
    return {"peer": None, "ports": ports, "errors": errors}


def ask_dialback(dht: DHT, peers: list[str], ports: list[int] | None = None, timeout: float = 15.0) -> dict:
    """One dial-back: {"peer", "ports", "dialed", "observed"} from the peer that answered, or {"peer": None,
    "errors"}."""
    return dht.run_coroutine(functools.partial(_ask_dialback, peers=peers, ports=ports, timeout=timeout))


def probe_reachability(dht: DHT, peers: list[str]) -> tuple[str | None, list[int]]:
    """("public" | "private" | None, the ports probed) by a dial-back from an initial peer; None when no
    peer could answer (older peers have no dial-back): the caller keeps the address guess."""
    result = ask_dialback(dht, peers)
    ports = result["ports"]
    if result["peer"] is None:
        print(f"reachability: no dial-back probe ({'; '.join(result['errors']) or 'no initial peer'}); keeping the "
              f"guess from the addresses", file=sys.stderr, flush=True)
        return None, ports
    if result["dialed"]:
        print(f"reachability: a dial-back by {result['peer'][-8:]} reached {', '.join(result['dialed'])}: dialable, "
              f"no relay needed (public)", file=sys.stderr, flush=True)
        return "public", ports
    print(f"reachability: a dial-back by {result['peer'][-8:]} could not reach port(s) {ports} at "
          f"{', '.join(result['observed']) or 'our address'}: behind NAT or a firewall (private)", file=sys.stderr,
          flush=True)
    return "private", ports


def wait_for_relay(dht: DHT, wait_s: float, poll_s: float = 1.0) -> list[str]:
    """Block until p2pd announces a relayed (/p2p-circuit) address; return those addresses (none if the
    wait ran out: the node still starts, but only peers it dialled itself can reach it)."""
    deadline = time.monotonic() + wait_s
    print("behind NAT (reachability private): waiting for a relay reservation...", file=sys.stderr, flush=True)
    while time.monotonic() < deadline:
        relayed = [a for a in visible_maddrs(dht, latest=True) if "/p2p-circuit" in a]
        if relayed:
            print(f"relayed: reachable through {relayed[0]}", file=sys.stderr, flush=True)
            return relayed
        time.sleep(poll_s)
    print(f"no relay reservation after {wait_s:.0f}s: peers cannot dial this node", file=sys.stderr,
          flush=True)
    return []


async def _count_peers(_dht, node) -> int:
    return len(await node.p2p.list_peers())


def _reached_any(dht: DHT) -> bool:
    return dht.run_coroutine(_count_peers) > 0


async def _latest_maddrs(_dht, node) -> list[str]:
    return [str(a) for a in await node.p2p.get_visible_maddrs(latest=True)]


def visible_maddrs(dht: DHT, latest: bool = False) -> list[str]:
    """This node's addresses; `latest` asks p2pd again (a relayed address appears after start-up)."""
    return dht.run_coroutine(_latest_maddrs) if latest else [str(a) for a in dht.get_visible_maddrs()]


def print_own_addrs(dht: DHT, role: str) -> list[str]:
    """Tell the operator this node's own multiaddrs: any live peer's address lets others join."""
    addrs = visible_maddrs(dht)
    print(f"{role} listening; others can join through this node with:", file=sys.stderr)
    for a in addrs:
        print(f"  --initial-peers {a}", file=sys.stderr)
    sys.stderr.flush()
    return addrs
