"""Process plumbing shared by every role: logging, stop signals, clean shutdown of hivemind parts."""
from __future__ import annotations

import asyncio
import glob
import logging
import os
import signal
import socket
import sys
import time

import uvloop

SOCKET_GLOB = "/tmp/hivemind-*.sock"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
    # hivemind's helper processes run event loops of their own, whose exception handlers we cannot
    # set: filter their "Unhandled exception in client_connected_cb" reports at the logger instead
    # (the filter is inherited when they fork)
    logging.getLogger("asyncio").addFilter(_drop_stream_resets)
    # hivemind's averager logs the traceback of a round that found no group (a replica died) on its
    # last try; node.averaging reports the same failure in one line, so drop the duplicate
    logging.getLogger("hivemind.averaging.averager").addFilter(_drop_expected_averaging_failures)


def run_command(coro, *errors: type) -> int:
    """Run a command's coroutine under uvloop. A bad address, an unreachable peer (and `errors`) is the
    user's to fix: one line on stderr and exit code 2, not a traceback."""
    from node.dht import AddressError  # (hivemind: not while building --help)
    try:
        return uvloop.run(coro)
    except (AddressError, ConnectionError, *errors) as e:
        coro.close()
        print(f"error: {e}", file=sys.stderr)
        return 2


def stop_event_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so the node leaves through its normal shutdown path."""
    loop.set_exception_handler(_quiet_stream_resets)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


class SocketJanitor:
    """hivemind leaves /tmp/hivemind-*.sock files behind. Remove the ones that appeared while this
    process ran and that nobody listens on any more (never another live process's socket)."""

    def __init__(self):
        self.before = set(glob.glob(SOCKET_GLOB))
        self.started = time.time()

    def sweep(self) -> int:
        removed = 0
        for path in set(glob.glob(SOCKET_GLOB)) - self.before:
            try:
                if os.stat(path).st_mtime < self.started - 1 or _listening(path):
                    continue
                os.unlink(path)
                removed += 1
            except OSError:
                continue
        return removed


def _listening(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.2)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _is_stream_reset(exc) -> bool:
    """p2pd connections to stream handlers that close before sending anything (a peer reset its
    stream, or the daemon is stopping), and handlers cancelled at shutdown, surface from hivemind's
    bindings as loop errors: expected, not errors."""
    return isinstance(exc, (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError))


def _quiet_stream_resets(loop, context) -> None:
    if _is_stream_reset(context.get("exception")):
        return
    loop.default_exception_handler(context)


def _drop_stream_resets(record: logging.LogRecord) -> bool:
    return not (record.exc_info and _is_stream_reset(record.exc_info[1]))


def _drop_expected_averaging_failures(record: logging.LogRecord) -> bool:
    from hivemind.averaging.matchmaking import MatchmakingException
    from hivemind.averaging.partition import AllreduceException
    from hivemind.p2p import P2PDaemonError, P2PHandlerError

    expected = (AllreduceException, MatchmakingException, P2PDaemonError, P2PHandlerError)
    return not (record.exc_info and isinstance(record.exc_info[1], expected))


async def close_hivemind(p2p=None, dht=None, *extra) -> None:
    """Shut down in the order that avoids hivemind's exit hangs: our p2p replica, helpers, the DHT."""
    if p2p is not None:
        try:
            await p2p.shutdown()
        except Exception:
            pass
    for part in extra:
        if part is not None:
            try:
                part.shutdown()
            except Exception:
                pass
    if dht is not None:
        dht.shutdown()


def resolve_device(name: str):
    """The torch device `--device` names (auto: CUDA when usable, else CPU); a device this machine
    lacks exits with one line."""
    import torch  # not at module level: the commands import this module while building --help
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {name}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but this machine has no usable CUDA GPU")
    return dev


def identity_peer_id(path: str) -> str:
    """The libp2p peer id of an identity file, creating the file if it does not exist yet."""
    from hivemind.p2p import P2P, PeerID  # (--help must not load hivemind)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        P2P.generate_identity(path)
    with open(path, "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()
