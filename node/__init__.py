"""The resbm-node process: CLI, stage serving over hivemind, metrics, checkpoints, signals.

Map of node/, commands first; a command uses the runtime below it, never the other way round.

Commands (one module per `resbm-node` subcommand; imported while building --help: no torch or
hivemind at module level)
    cli.py            the entry point: every subcommand's parser, RESBM_* variables and --config-file under the flags
    args.py           flags generated from the config dataclasses (run: swarm/config.py, node: settings.py)
    join.py           `join`: one replica of a stage (stage 0: a trainer); hands JoinSettings to lifecycle.py
    bootstrap.py      `bootstrap`: the DHT meeting point that publishes the run config
    local_swarm.py    `local`: a whole multi-process swarm on this machine (Swarm: also the benches' and tests')
    train_local.py    `train-local`: the whole model in one process, the reference the swarm is checked against
    status.py         `status`: the stages x replicas table from the DHT records
    monitor.py        `monitor`: swarm-wide Prometheus gauges and a status page (monitor_metrics.py, monitor_page.py)
    export.py         `export` (every stage into one safetensors file) and `generate`

Settings and run config
    settings.py       every node setting, one dataclass per component, defaults written once
    run_config.py     the run config file (--config, --save-config) and the run id

A node's runtime
    lifecycle.py      a node's life: joining -> loading -> serving -> draining (-> moving), one loop
    dht.py            starting the DHT peer: addresses, reachability and NAT relays
    announce.py       DHT records: our stage record, everyone's (RecordView, the one record filter), the run config
    record_store.py   refreshing a record we own at its key's holders, walking only when they may have changed
    request_gate.py   every call's checks (contract, uid, envelope, size), refusals, bans, message counts
    stage_server.py   serving a stage: decode codes, compute in one worker thread, call the next stage
    admission.py      who gets a stage's compute and state when many ask at once
    client.py         calling a replica: requests built from protocol/contract.py, replies checked
    route.py          the next hop of a microbatch: pick a replica (swarm/routing.py), call it, reroute
    trainer.py        a trainer's window of microbatches in flight: draw, walk the route, apply the gradient
    training_run.py   a trainer's run: steps, validation, status line and summary
    averaging.py      replicas of a stage average their parameters in the background
    group_keys.py     averaging matchmaking's reads of its group key, paced, walking only to the key's holders
    state_sync.py     where a stage's state comes from at start (a live replica, a checkpoint) and checkpoints
    metrics.py        the node's Prometheus metrics
    progress.py       the status line, the run's curves and the summary JSON
    runtime.py        process plumbing: logging, signals, devices, identities, hivemind shutdown
    lifeline.py       child processes die with their parent
"""
