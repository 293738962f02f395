"""Swarm-wide figures from one `status` snapshot (node/status.py), and the Prometheus gauges of
`resbm-node monitor`. Pure functions of the snapshot: no network, so they are tested directly.

    resbm_swarm_run_config_found            1 if the last read found the run config, 0 while it is missing
    resbm_swarm_info{run_id,fingerprint,version}   the run the monitor watches (value 1)
    resbm_swarm_stages                      stages of the run config
    resbm_swarm_replicas{stage,role}        live serving replicas; every stage 0..n-1, 0 for none
    resbm_swarm_stages_without_replica      stages with 0 replicas (training waits for them)
    resbm_swarm_trainers, resbm_swarm_nodes, resbm_swarm_relayed_nodes
    resbm_swarm_stage_throughput{stage}     microbatches/s the stage's replicas advertise, summed
    resbm_swarm_stage_tokens_per_second{stage}     the same in tokens
    resbm_swarm_slowest_stage, resbm_swarm_slowest_stage_tokens_per_second   the pipeline's bound
    resbm_swarm_step_max{stage}, resbm_swarm_step_min{stage}   newest and oldest step of its replicas
    resbm_swarm_replica_distance_max{stage}   how far its replicas were from their group's mean, at the worst
    resbm_swarm_fingerprint_nodes{fingerprint,current}, resbm_swarm_fingerprints   per run config
    resbm_swarm_version_nodes{version}, resbm_swarm_versions   per protocol version
    resbm_swarm_ignored_records{reason}     records left out (stale, unsigned, other run, not serving)
    resbm_swarm_last_update_timestamp_seconds, resbm_swarm_reads_total, resbm_swarm_read_failures_total

Replica distance (how far a stage's replicas drift apart) is not exported: no record carries it.
"""
from __future__ import annotations

from collections import Counter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# records whose fields say nothing trustworthy about a live node: left out of fingerprints/versions
UNTRUSTED = ("malformed", "unsigned or foreign-owned", "stale")


def _stage_summary(stage: dict) -> dict:
    reps = stage["replicas"]
    steps = [r["step"] for r in reps if r.get("step") is not None]
    tokens = [r.get("tokens_per_s") for r in reps]
    return {"stage": stage["stage"], "role": stage["role"], "replicas": len(reps),
            "relayed": sum(bool(r.get("relayed")) for r in reps),
            "throughput": sum(r.get("throughput") or 0.0 for r in reps),
            "tokens_per_s": None if None in tokens else sum(tokens),  # None: no run config to convert with
            "step_max": max(steps, default=None), "step_min": min(steps, default=None),
            # how far apart its replicas are: the largest distance from its group's mean at a last round
            "distance_max": max((r["distance"] for r in reps if r.get("distance") is not None), default=None),
            "max_age_s": max((r.get("age_s") or 0.0 for r in reps), default=None)}


def _nodes_seen(snap: dict) -> dict[str, dict]:
    """peer id -> its record's fields, for every signed, fresh record (live or not, of any run)."""
    seen = {r["peer_id"]: r for s in snap["stages"] for r in s["replicas"]}
    for r in snap["ignored_records"]:
        if r.get("reason") not in UNTRUSTED and r.get("peer_id"):
            seen.setdefault(r["peer_id"], r)
    return seen


def summarize(snap: dict) -> dict:
    """What the monitor exports and shows, from `status.snapshot`'s document."""
    stages = [_stage_summary(s) for s in snap["stages"]]
    # trainers advertise 0 (they compute stage 0 for their own microbatches only): the bound is a served stage
    slowest = min((s for s in stages if s["stage"] > 0), key=lambda s: (s["throughput"], s["stage"]), default=None)
    seen = _nodes_seen(snap)
    return {"stages": stages, "n_stages": snap["n_stages"],
            "trainers": stages[0]["replicas"] if stages else 0,
            "nodes": sum(s["replicas"] for s in stages),
            "relayed": sum(s["relayed"] for s in stages),
            "missing": [s["stage"] for s in stages if not s["replicas"]],
            "slowest": slowest,
            "fingerprints": dict(Counter(r["fingerprint"] for r in seen.values() if r.get("fingerprint"))),
            "versions": dict(Counter(r["version"] for r in seen.values() if r.get("version") is not None)),
            "ignored": dict(Counter(r.get("reason", "?") for r in snap["ignored_records"]))}


def _gauge(name: str, doc: str, labels=(), rows=()) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    for *values, value in rows:
        g.add_metric([str(v) for v in values], float(value))
    return g


def _stage_families(stages: list[dict]) -> list:
    per = lambda key: [(s["stage"], s[key]) for s in stages if s[key] is not None]  # noqa: E731
    return [
        _gauge("resbm_swarm_replicas", "Live serving replicas per stage (0: nobody serves it)", ("stage", "role"),
               [(s["stage"], s["role"], s["replicas"]) for s in stages]),
        _gauge("resbm_swarm_stage_throughput", "Microbatches per second the stage's replicas advertise, summed",
               ("stage",), per("throughput")),
        _gauge("resbm_swarm_stage_tokens_per_second", "Tokens per second the stage's replicas advertise, summed",
               ("stage",), per("tokens_per_s")),
        _gauge("resbm_swarm_step_max", "Highest optimizer step a replica of the stage announces", ("stage",),
               per("step_max")),
        _gauge("resbm_swarm_step_min", "Lowest optimizer step a replica of the stage announces", ("stage",),
               per("step_min")),
        _gauge("resbm_swarm_replica_distance_max", "Largest relative distance of a replica of the stage from its "
               "averaging group's mean, at its last round (records)", ("stage",), per("distance_max")),
    ]


def families(snap: dict, summary: dict, reads: int, failures: int, last_update: float | None) -> list:
    """Every metric family of the monitor for one snapshot and its summary."""
    s, slowest = summary, summary["slowest"]
    current = snap["fingerprint"]
    out = [
        _gauge("resbm_swarm_run_config_found", "1 if the last read found the run config",
               rows=[(snap["error"] is None,)]),
        _gauge("resbm_swarm_info", "The run this monitor watches", ("run_id", "fingerprint", "version"),
               [(snap["run_id"], current or "", snap["version"] if snap["version"] is not None else "", 1)]),
        _gauge("resbm_swarm_stages", "Stages of the run config", rows=[(s["n_stages"],)]),
        _gauge("resbm_swarm_stages_without_replica", "Stages nobody serves", rows=[(len(s["missing"]),)]),
        _gauge("resbm_swarm_trainers", "Live trainers (stage 0 replicas)", rows=[(s["trainers"],)]),
        _gauge("resbm_swarm_nodes", "Live serving nodes, trainers included", rows=[(s["nodes"],)]),
        _gauge("resbm_swarm_relayed_nodes", "Live nodes reachable only through a relay", rows=[(s["relayed"],)]),
        *_stage_families(s["stages"]),
        _gauge("resbm_swarm_fingerprint_nodes", "Nodes per run config fingerprint (current: the watched run's)",
               ("fingerprint", "current"),
               [(fp, str(fp == current).lower(), n) for fp, n in s["fingerprints"].items()]),
        _gauge("resbm_swarm_fingerprints", "Distinct run config fingerprints among the nodes (1: all agree)",
               rows=[(len(s["fingerprints"]),)]),
        _gauge("resbm_swarm_version_nodes", "Nodes per protocol version", ("version",), list(s["versions"].items())),
        _gauge("resbm_swarm_versions", "Distinct protocol versions among the nodes (1: all agree)",
               rows=[(len(s["versions"]),)]),
        _gauge("resbm_swarm_ignored_records", "Stage records left out, by reason", ("reason",),
               list(s["ignored"].items())),
    ]
    if slowest is not None:
        out.append(_gauge("resbm_swarm_slowest_stage", "The served stage advertising the least throughput",
                          rows=[(slowest["stage"],)]))
        if slowest["tokens_per_s"] is not None:
            out.append(_gauge("resbm_swarm_slowest_stage_tokens_per_second", "Tokens per second the slowest "
                              "stage advertises: the most the pipeline can train", rows=[(slowest["tokens_per_s"],)]))
    if last_update is not None:
        out.append(_gauge("resbm_swarm_last_update_timestamp_seconds", "Unix time of the last successful read",
                          rows=[(last_update,)]))
    out.append(CounterMetricFamily("resbm_swarm_reads", "DHT reads of the swarm's records", value=reads))
    out.append(CounterMetricFamily("resbm_swarm_read_failures", "DHT reads that failed (the last picture stays)",
                                   value=failures))
    return out
