"""Prometheus metrics of one node, on its own registry (several nodes may share a process in tests).

Every node (trainers = stage 0, and every stage replica) serves them on `--metrics-port` (0: off).
Names follow Prometheus conventions: base units in the name (`_seconds`, `_bytes`), `_total` for
counters, no unit for ratios. Which role updates what:

    resbm_node_info                         both   version, stage, peer id, fingerprint, run id
    resbm_tokens_total, resbm_samples_total both   tokens / sequences that went through this stage
    resbm_train_tokens_per_second           trainer tokens trained per second of wall-clock time (last 10 steps)
    resbm_compute_tokens_per_second         stage  tokens per second of this stage's own compute (its capacity)
    resbm_wire_bytes_total{boundary,direction,pass}        both   whole RPC messages that crossed a boundary
                                                                  (tensors, metadata, protobuf framing)
    resbm_code_bytes_total{boundary,direction,pass}        both   of which codec bytes of codes, gradients, token ids
    resbm_full_width_bytes_total{boundary,direction,pass}  both   what those tensors would take at width d in bf16
    resbm_compression_ratio{boundary}       both   full-width / wire bytes per boundary, measured (lifetime)
    resbm_nominal_compression_ratio{codec,code_width}  both  what the run config promises: 2d / codec bytes per token
    resbm_frame_bytes_total{direction}      both   every RPC message byte, training or not
    resbm_rpc_duration_seconds{method}      stage  server-side latency of forward / train / state
    resbm_call_duration_seconds{stage,method}  caller client-side latency of train calls to its next stage
    resbm_staleness_updates                 both   updates this replica applied between a microbatch's forward
                                                   and its backward here (0: exact; >0: recomputed forward)
    resbm_skipped_microbatches_total        trainer microbatches no route finished (applied on no stage 0)
    resbm_duplicate_microbatches_total      stage  backwards of a microbatch already added here (a rerouted walk):
                                                   answered, not added again
    resbm_queue_depth                       stage  requests waiting for or in compute
    resbm_train_loss, resbm_val_loss        trainer (only nodes that compute a loss export one)
    resbm_replicas{stage}                   all    replicas per stage seen in the DHT
    resbm_retries_total{stage}, resbm_bans_total{stage}   caller calls retried / replicas banned after failures
    resbm_next_hop_calls_total{replica}   caller train calls each next-stage replica answered (the routing slots)
    resbm_rejected_payloads_total{reason}   stage  bad requests refused, by reason ("banned": from a banned peer)
    resbm_peer_bans_total                   stage  peers refused for a while after repeated bad requests
    resbm_averaging_rounds_total{kind}, resbm_averaging_failures_total, resbm_averaging_group_size,
    resbm_averaging_max_change              stage  replica averaging (robust CenteredClip all-reduce)
    resbm_averaging_partial_rounds_total{kind}, resbm_averaging_received_fraction, resbm_averaging_bytes_total,
    resbm_averaging_round_seconds           stage  rounds that got only part of their fragment back, and sizes
                                                   (kind: anchored, 2-bit changes; full, 8-bit parameters)
    resbm_replica_distance                  both   ||group average - own parameters|| / ||own||, at the last round
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from protocol.codec import bytes_per_token

AVERAGING_KINDS = ("anchored", "full")  # an averaging round's two kinds (node/averaging.py)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _total_where(counter, **labels) -> float:
    """Sum of a labelled counter's `_total` samples whose labels match."""
    return sum(s.value for m in counter.collect() for s in m.samples
               if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()))


class NodeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.info = Info("resbm_node", "Node identity: version, stage, peer id, run fingerprint", registry=r)
        self.tokens = Counter("resbm_tokens_total", "Tokens processed (forward passes through this node's stage)",
                              registry=r)
        self.samples = Counter("resbm_samples_total", "Sequences processed", registry=r)
        self.train_tokens_per_second = Gauge("resbm_train_tokens_per_second",
                                             "Tokens trained per second of wall-clock time (trainers)", registry=r)
        self.compute_tokens_per_second = Gauge("resbm_compute_tokens_per_second",
                                               "Tokens per second of this stage's own compute (its capacity)",
                                               registry=r)
        self.rpc_seconds = Histogram("resbm_rpc_duration_seconds", "Server-side handling time per RPC",
                                     ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.call_seconds = Histogram("resbm_call_duration_seconds", "Client-side time of calls to other stages",
                                      ["stage", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.staleness = Histogram("resbm_staleness_updates", "Updates applied here between a microbatch's "
                                   "forward and its backward", buckets=(0, 1, 2, 4, 8, 16), registry=r)
        self.duplicates = Counter("resbm_duplicate_microbatches_total", "Backwards of a microbatch already added "
                                  "here (a rerouted walk), not added again", registry=r)
        self.skipped = Counter("resbm_skipped_microbatches_total", "Microbatches no route finished (trainers)",
                               registry=r)
        self.wire_bytes = Counter("resbm_wire_bytes_total", "Whole RPC messages (tensors, metadata, framing) that "
                                  "crossed a stage boundary", ["boundary", "direction", "pass"], registry=r)
        self.code_bytes = Counter("resbm_code_bytes_total", "Codec bytes of codes, gradients and token ids in them",
                                  ["boundary", "direction", "pass"], registry=r)
        self.full_width_bytes = Counter("resbm_full_width_bytes_total",
                                        "bf16 bytes the same tensors would take at full hidden width d",
                                        ["boundary", "direction", "pass"], registry=r)
        self.frame_bytes = Counter("resbm_frame_bytes_total", "All RPC bytes (frames incl. headers and metadata)",
                                   ["direction"], registry=r)
        self.compression = Gauge("resbm_compression_ratio", "Full-width bf16 bytes / whole message bytes that "
                                 "crossed the boundary (measured, lifetime of this node)", ["boundary"], registry=r)
        self.nominal_compression = Gauge("resbm_nominal_compression_ratio", "What the run config promises: "
                                         "2 d / codec bytes per token", ["codec", "code_width"], registry=r)
        self.train_loss = self.val_loss = None  # only nodes that compute a loss export one (enable_loss)
        self.step = Gauge("resbm_optimizer_step", "Last optimizer step applied by this replica", registry=r)
        self.steps = Counter("resbm_optimizer_steps_total", "Optimizer steps applied", registry=r)
        self.queue = Gauge("resbm_queue_depth", "Requests waiting for or in compute", registry=r)
        self.replicas = Gauge("resbm_replicas", "Replicas seen per stage (from DHT records)", ["stage"], registry=r)
        self._averaging_metrics(r)
        self.retries = Counter("resbm_retries_total", "Calls retried on another replica", ["stage"], registry=r)
        self.next_hop_calls = Counter("resbm_next_hop_calls_total", "Train calls each replica of the next stage "
                                      "answered (peer id)", ["replica"], registry=r)
        self.bans = Counter("resbm_bans_total", "Replicas banned after a failure", ["stage"], registry=r)
        self.rejected = Counter("resbm_rejected_payloads_total", "Requests rejected, by reason", ["reason"],
                                registry=r)
        self.peer_bans = Counter("resbm_peer_bans_total", "Peers refused for a while after repeated bad requests",
                                 registry=r)
        self._server = None

    def _averaging_metrics(self, r: CollectorRegistry) -> None:
        """Replica averaging's metrics (node/averaging.py)."""
        self.avg_rounds = Counter("resbm_averaging_rounds_total", "Complete replica averaging rounds, by kind "
                                  "(anchored: 2-bit changes since the shared anchor; full: 8-bit parameters)",
                                  ["kind"], registry=r)
        self.avg_failures = Counter("resbm_averaging_failures_total", "Failed replica averaging rounds", registry=r)
        self.avg_partial = Counter("resbm_averaging_partial_rounds_total", "Averaging rounds in which only part of "
                                   "the fragment came back (the rest kept local values), by kind", ["kind"], registry=r)
        for kind in AVERAGING_KINDS:  # exported at 0 before the first round of each kind
            self.avg_rounds.labels(kind)
            self.avg_partial.labels(kind)
        self.avg_received = Gauge("resbm_averaging_received_fraction", "Fraction of its fragment the last averaging "
                                  "round got back (1: complete)", registry=r)
        self.avg_bytes = Counter("resbm_averaging_bytes_total", "Payload bytes replica averaging sent plus received "
                                 "(8-bit parts and deltas, before libp2p framing)", registry=r)
        self.avg_seconds = Gauge("resbm_averaging_round_seconds", "Duration of the last averaging round's all-reduce",
                                 registry=r)
        self.avg_group_size = Gauge("resbm_averaging_group_size", "Replicas in the last averaging round", registry=r)
        self.avg_change = Gauge("resbm_averaging_max_change",
                                "Largest change of any parameter in the last averaging round (bounded by the "
                                "robust aggregation)", registry=r)
        self.replica_distance = Gauge("resbm_replica_distance", "Relative L2 distance of this replica's parameters "
                                      "from its averaging group's mean, measured at the last round", registry=r)

    def enable_loss(self) -> "NodeMetrics":
        self.train_loss = Gauge("resbm_train_loss", "Training loss of the last step (nats/token)",
                                registry=self.registry)
        self.val_loss = Gauge("resbm_val_loss", "Last validation loss (nats/token)", registry=self.registry)
        return self

    def set_nominal(self, run) -> None:
        cfg, tokens = run.model, run.train.microbatch_size * run.model.seq_len  # tokens per message
        per_token = (bytes_per_token(cfg.wire_codec, cfg.code_width, tokens)
                     + bytes_per_token(cfg.wire_codec_bwd, cfg.code_width, tokens)) / 2
        codecs = cfg.wire_codec if cfg.wire_codec == cfg.wire_codec_bwd else f"{cfg.wire_codec}/{cfg.wire_codec_bwd}"
        self.nominal_compression.labels(codecs, str(cfg.code_width)).set(2 * cfg.d_model / per_token)

    def serve(self, port: int, host: str = "127.0.0.1"):
        if port:
            try:
                self._server = start_http_server(port, addr=host, registry=self.registry)
            except OSError as e:
                raise ConnectionError(f"cannot serve /metrics on {host}:{port}: {e}") from e
        return self

    def count_boundary(self, message_bytes: int, code_bytes: int, boundary: int, direction: str, pass_: str,
                       tokens: int, d_model: int) -> None:
        """One message that crossed `boundary`: its whole size, its codec bytes, and what its tensor
        would have cost in bf16 at full width d; the boundary's measured ratio follows."""
        labels = (str(boundary), direction, pass_)
        self.wire_bytes.labels(*labels).inc(message_bytes)
        self.code_bytes.labels(*labels).inc(code_bytes)
        self.full_width_bytes.labels(*labels).inc(2 * d_model * tokens)
        wire = _total_where(self.wire_bytes, boundary=str(boundary))
        full = _total_where(self.full_width_bytes, boundary=str(boundary))
        self.compression.labels(str(boundary)).set(full / wire if wire else 0.0)

    def close(self):
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            self._server = None
