"""Prometheus metrics of one node, on its own registry (several nodes may share a process in tests).

Every node (head = stage 0, and every stage replica) serves them on `--metrics-port` (0: off).
Names follow Prometheus conventions: base units in the name (`_seconds`, `_bytes`), `_total` for
counters, no unit for ratios. Which role updates what:

    resbm_node_info                         both   version, stage, peer id, fingerprint, run id
    resbm_tokens_total, resbm_samples_total both   tokens / sequences that went through this stage
    resbm_tokens_per_second                 both   head: wall-clock training throughput; stage: per compute-second
    resbm_wire_bytes_total{boundary,direction,pass}        both   payload bytes of codes/gradients on the wire
    resbm_full_width_bytes_total{boundary,direction,pass}  both   what those tensors would take at width d in bf16
    resbm_compression_ratio                 both   full-width / wire bytes, over the node's lifetime
    resbm_frame_bytes_total{direction}      both   every RPC byte incl. headers
    resbm_rpc_duration_seconds{method}      stage  server-side latency of forward / backward / loss / step
    resbm_call_duration_seconds{stage,method}  head   client-side latency of calls to each stage
    resbm_queue_depth                       stage  requests waiting for or in compute
    resbm_train_loss, resbm_val_loss        head
    resbm_replicas{stage}                   head   replicas per stage seen in the DHT
    resbm_retries_total{stage}, resbm_bans_total{stage}   head   calls retried / replicas banned after failures
    resbm_rejected_payloads_total{reason}   stage  bad requests refused, by reason ("banned": from a banned peer)
    resbm_peer_bans_total                   stage  peers refused for a while after repeated bad requests
    resbm_averaging_rounds_total, resbm_averaging_failures_total, resbm_averaging_group_size,
    resbm_averaging_max_change              stage  replica averaging (robust CenteredClip all-reduce)
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _total(counter) -> float:
    """Sum of a (labelled) counter's `_total` samples."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


class NodeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.info = Info("resbm_node", "Node identity: version, stage, peer id, run fingerprint", registry=r)
        self.tokens = Counter("resbm_tokens_total", "Tokens processed (forward passes through this node's stage)",
                              registry=r)
        self.samples = Counter("resbm_samples_total", "Sequences processed", registry=r)
        self.tokens_per_second = Gauge("resbm_tokens_per_second", "Recent tokens per second", registry=r)
        self.rpc_seconds = Histogram("resbm_rpc_duration_seconds", "Server-side handling time per RPC",
                                     ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.call_seconds = Histogram("resbm_call_duration_seconds", "Client-side time of calls to other stages",
                                      ["stage", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.wire_bytes = Counter("resbm_wire_bytes_total", "Payload bytes of codes and gradients on the wire",
                                  ["boundary", "direction", "pass"], registry=r)
        self.full_width_bytes = Counter("resbm_full_width_bytes_total",
                                        "bf16 bytes the same tensors would take at full hidden width d",
                                        ["boundary", "direction", "pass"], registry=r)
        self.frame_bytes = Counter("resbm_frame_bytes_total", "All RPC bytes (frames incl. headers and metadata)",
                                   ["direction"], registry=r)
        self.compression = Gauge("resbm_compression_ratio",
                                 "Full-width bf16 bytes / wire payload bytes (lifetime of this node)", registry=r)
        self.compression.set_function(self._compression_ratio)  # computed at scrape time from the counters
        self.train_loss = Gauge("resbm_train_loss", "Training loss of the last step (nats/token)", registry=r)
        self.val_loss = Gauge("resbm_val_loss", "Last validation loss (nats/token)", registry=r)
        self.step = Gauge("resbm_optimizer_step", "Last optimizer step applied", registry=r)
        self.steps = Counter("resbm_optimizer_steps_total", "Optimizer steps applied", registry=r)
        self.queue = Gauge("resbm_queue_depth", "Requests waiting for or in compute", registry=r)
        self.replicas = Gauge("resbm_replicas", "Replicas seen per stage (from DHT records)", ["stage"], registry=r)
        self.avg_rounds = Counter("resbm_averaging_rounds_total", "Successful replica averaging rounds", registry=r)
        self.avg_failures = Counter("resbm_averaging_failures_total", "Failed replica averaging rounds", registry=r)
        self.avg_group_size = Gauge("resbm_averaging_group_size", "Replicas in the last averaging round", registry=r)
        self.avg_change = Gauge("resbm_averaging_max_change",
                                "Largest change of any parameter in the last averaging round (bounded by the "
                                "robust aggregation)", registry=r)
        self.retries = Counter("resbm_retries_total", "Calls retried on another replica", ["stage"], registry=r)
        self.bans = Counter("resbm_bans_total", "Replicas banned after a failure", ["stage"], registry=r)
        self.rejected = Counter("resbm_rejected_payloads_total", "Requests rejected, by reason", ["reason"],
                                registry=r)
        self.peer_bans = Counter("resbm_peer_bans_total", "Peers refused for a while after repeated bad requests",
                                 registry=r)
        self.dropped_grads = Counter("resbm_discarded_gradients_total",
                                     "Accumulated gradients discarded because their step was abandoned", registry=r)
        self._server = None

    def _compression_ratio(self) -> float:
        wire = _total(self.wire_bytes)
        return _total(self.full_width_bytes) / wire if wire else 0.0

    def serve(self, port: int, host: str = "127.0.0.1"):
        if port:
            try:
                self._server = start_http_server(port, addr=host, registry=self.registry)
            except OSError as e:
                raise ConnectionError(f"cannot serve /metrics on {host}:{port}: {e}") from e
        return self

    def count_payload(self, nbytes: int, boundary: int, direction: str, pass_: str, tokens: int, d_model: int):
        """One code or gradient on the wire, and what it would have cost in bf16 at full width d."""
        self.wire_bytes.labels(str(boundary), direction, pass_).inc(nbytes)
        self.full_width_bytes.labels(str(boundary), direction, pass_).inc(2 * d_model * tokens)

    def close(self):
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            self._server = None
