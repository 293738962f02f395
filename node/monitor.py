"""`resbm-node monitor`: one process that watches the whole swarm from the DHT and serves it to
Prometheus (/metrics, swarm-wide gauges: node/monitor_metrics.py), to people (/, an HTML page:
node/monitor_page.py) and to scripts (/json). Nodes behind NAT cannot be scraped; their records
can be read, so this is the one target that sees every node.

It joins the DHT in client mode (it reads, answers no DHT request, serves no stage) and reads the
records every --period seconds with the same filter as `status` (node/status.py snapshot). Any live
peer's address works as --initial-peers, and once connected it learns the others: it keeps reading
when the peer it started from (e.g. the bootstrap) dies."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from node.args import add_monitoring_args, positive_seconds
from node.monitor_metrics import families, summarize
from node.monitor_page import render_page
from node.runtime import SocketJanitor, close_hivemind, run_command, setup_logging, stop_event_on_signals
from node.status import DEFAULT_RUN_IDS, add_reader_args, resolve_run_id, snapshot

log = logging.getLogger("resbm.monitor")


def add_parser(sub) -> None:
    p = sub.add_parser("monitor", help="serve swarm-wide Prometheus gauges and a status page, read from the DHT",
                       description="Join the DHT as a client (serving nothing), read the run config and the "
                                   "signed stage records every --period seconds, and serve them on "
                                   "--metrics-port: /metrics (Prometheus), / (HTML page), /json.")
    add_reader_args(p)
    p.add_argument("--period", type=positive_seconds, default=5.0, metavar="S",
                   help="read the records every S seconds (nodes refresh theirs every 5 s by default)")
    add_monitoring_args(p)
    p.set_defaults(func=main)


class SwarmView:
    """The latest picture, shared by the reading loop and the HTTP threads: one dict, swapped whole."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.reads = self.failures = 0
        self.current = {"snap": None, "summary": None, "last_update": None}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def update(self, snap: dict) -> None:
        self.reads += 1
        self.current = {"snap": snap, "summary": summarize(snap), "last_update": time.time()}

    def failed(self, error: Exception) -> None:
        self.reads += 1
        self.failures += 1
        log.warning("could not read the swarm's records (%s: %s); serving the last picture", type(error).__name__,
                    error)

    def collect(self):  # prometheus_client collector interface
        now = self.current
        if now["snap"] is None:
            return []
        return families(now["snap"], now["summary"], self.reads, self.failures, now["last_update"])

    def page(self) -> str:
        now = self.current
        return render_page(now["snap"], now["summary"], now["last_update"], max(2.0, self.period_s))

    def json(self) -> str:
        return json.dumps({**self.current, "reads": self.reads, "failures": self.failures})


def _handler(view: SwarmView):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype = generate_latest(view.registry), CONTENT_TYPE_LATEST
            elif path in ("/", "/index.html"):
                body, ctype = view.page().encode(), "text/html; charset=utf-8"
            elif path == "/json":
                body, ctype = view.json().encode(), "application/json"
            else:
                self.send_error(404, "try /, /metrics or /json")
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):  # one line per scrape would flood the log
            log.debug("http: " + fmt, *args)
    return Handler


def serve_http(view: SwarmView, host: str, port: int) -> ThreadingHTTPServer:
    """/metrics, / and /json on host:port, from a daemon thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_cls = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    try:
        server = server_cls((host, port), _handler(view))
    except OSError as e:
        raise ConnectionError(f"cannot serve the monitor on {host}:{port}: {e}") from e
    threading.Thread(target=server.serve_forever, name="monitor-http", daemon=True).start()
    return server


async def watch(dht, run_id: str, view: SwarmView, stop: asyncio.Event, config_timeout: float) -> None:
    """Read the swarm every period until `stop`; a failed read keeps the last picture (its age shows)."""
    while not stop.is_set():
        try:
            snap = await asyncio.wait_for(snapshot(dht, run_id, config_timeout), timeout=config_timeout + 60)
            view.update(snap)
        except Exception as e:
            view.failed(e)
        config_timeout = 0.0
        try:
            await asyncio.wait_for(stop.wait(), view.period_s)
        except asyncio.TimeoutError:
            pass


def main(args) -> int:
    setup_logging(args.verbose)
    if not 0 < args.metrics_port < 65536:
        print("error: monitor serves its gauges and page over HTTP: give --metrics-port PORT (1-65535)",
              file=sys.stderr)
        return 2
    from node.dht import AddressError, parse_initial_peers
    try:
        parse_initial_peers(args.initial_peers)  # a typo fails here, before anything is served
    except AddressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_command(_main(args))


async def _main(args) -> int:
    from node.dht import start_dht
    janitor = SocketJanitor()
    stop = stop_event_on_signals(asyncio.get_running_loop())
    view = SwarmView(args.period)
    server = serve_http(view, args.metrics_host, args.metrics_port)  # first: a taken port fails before the DHT
    dht = None
    try:
        dht = start_dht(args.run_id or DEFAULT_RUN_IDS[0], args.initial_peers, host=args.host, client_mode=True)
        run_id = await resolve_run_id(dht, args.run_id, args.timeout)
        print(f"monitor of run {run_id!r}: http://{args.metrics_host}:{args.metrics_port}/ "
              f"(/metrics for Prometheus, /json)", file=sys.stderr, flush=True)
        await watch(dht, run_id, view, stop, args.timeout if args.run_id else 0.0)
        return 0
    finally:
        server.shutdown()
        server.server_close()
        await close_hivemind(None, dht)
        janitor.sweep()
