"""`resbm-node export` (all stages -> one safetensors file) and `resbm-node generate`."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path


def add_parsers(sub) -> None:
    from node.args import add_connect_args
    p = sub.add_parser("export", help="gather every stage into one safetensors file",
                       description="Gather all stages, from a live swarm (--initial-peers) or from checkpoint "
                                   "files (--checkpoints), into one safetensors file that `train-local "
                                   "--init-from` and `generate` load.")
    add_connect_args(p)
    p.add_argument("--checkpoints", nargs="*", default=None, metavar="PATH",
                   help="stage checkpoint files or folders (the newest per stage is used)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.set_defaults(func=export_main)
    g = sub.add_parser("generate", help="sample text from an exported model")
    g.add_argument("--model", required=True, help="a .safetensors file written by `export`")
    g.add_argument("--prompt", default="def ")
    g.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=generate_main)


def states_from_checkpoints(paths) -> tuple:
    """(RunConfig, stage -> model state, stage -> step) from the newest checkpoint of every stage."""
    from swarm.checkpoint import load
    from swarm.config import RunConfig
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.pt")) if p.is_dir() else [p]
    best: dict[int, dict] = {}
    run = None
    for f in files:
        try:
            state = load(f)
        except ValueError as e:
            print(f"skipping {f}: {e}", file=sys.stderr)
            continue
        if "config" not in state or "stage" not in state:
            print(f"skipping {f}: not a stage checkpoint", file=sys.stderr)
            continue
        this = RunConfig.from_wire_dict(state["config"])
        if run is not None and this.fingerprint != run.fingerprint:
            raise SystemExit(f"error: {f} belongs to run {this.fingerprint}, others to {run.fingerprint}")
        run = this
        k = state["stage"]
        if k not in best or state["step"] > best[k]["step"]:
            best[k] = state
    if run is None:
        raise SystemExit("error: no stage checkpoints found")
    return run, {k: s["model"] for k, s in best.items()}, {k: s["step"] for k, s in best.items()}


async def states_from_swarm(args) -> tuple:
    from node.announce import read_stage_records
    from node.args import chosen_run_id, resolve_run_config
    from node.dht import start_dht
    from node.runtime import close_hivemind
    from node.state_sync import download_state
    run_id = chosen_run_id(args.run_id, None)
    dht = start_dht(run_id, args.initial_peers, host=args.host)
    p2p = None
    try:
        p2p = await dht.replicate_p2p()
        run = await resolve_run_config(dht, run_id)
        records = await read_stage_records(dht, run)
        states, steps = {}, {}
        for k in range(run.model.n_stages):
            for rec in sorted(records.get(k, []), key=lambda r: -r["step"]):
                try:
                    state = await download_state(p2p, run, k, rec["peer_id"])
                except Exception as e:
                    print(f"stage {k}: {rec['peer_id']} failed ({e}); trying another replica", file=sys.stderr)
                    continue
                states[k], steps[k] = state["model"], state["step"]
                break
        return run, states, steps
    finally:
        await close_hivemind(p2p, dht)


def export_main(args) -> int:
    from swarm.export import save_export
    if args.checkpoints:
        run, states, steps = states_from_checkpoints(args.checkpoints)
    elif args.initial_peers:
        import uvloop
        from node.dht import AddressError
        try:
            run, states, steps = uvloop.run(states_from_swarm(args))
        except (AddressError, ConnectionError) as e:
            raise SystemExit(f"error: {e}")
    else:
        raise SystemExit("error: give --initial-peers (live swarm) or --checkpoints (files)")
    try:
        save_export(args.out, run, states, steps)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"exported {len(states)} stages (steps {steps}) of run {run.run_id} ({run.fingerprint}) to {args.out}",
          file=sys.stderr)
    return 0


def generate_main(args) -> int:
    from node.args import resolve_device
    from swarm.export import generate, load_export
    try:
        run, model, steps = load_export(args.model, device=str(resolve_device(args.device)))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load {args.model}: {e}")
    model.eval()
    out = generate(model, args.prompt.encode(), args.tokens, args.temperature, args.top_k, args.seed)
    sys.stdout.write(args.prompt + out.decode("utf-8", errors="replace") + "\n")
    return 0
