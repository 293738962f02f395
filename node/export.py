"""`resbm-node export` (all stages -> one safetensors file) and `resbm-node generate`."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop

from node.args import add_connect_args
from node.run_config import chosen_run_id
from node.runtime import close_hivemind, resolve_device
from swarm.config import ConfigError, RunConfig


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="gather every stage into one safetensors file",
                       description="Gather all stages, from a live swarm (--initial-peers) or from checkpoint "
                                   "files (--checkpoints), into one safetensors file that `train-local "
                                   "--init-from` and `generate` load.")
    add_connect_args(p)
    p.add_argument("--checkpoints", nargs="*", default=None, metavar="PATH",
                   help="stage checkpoint files or folders (the newest per stage is used)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--allow-mixed-steps", action="store_true",
                   help="export even if the stages' states are from different steps (default: refuse)")
    p.add_argument("--wait-consistent", type=float, default=60.0, metavar="S",
                   help="live swarm: retry this long for every stage to be at one step (default 60)")
    p.set_defaults(func=export_main)
    g = sub.add_parser("generate", help="sample text from an exported model")
    g.add_argument("--model", required=True, help="a .safetensors file written by `export`")
    g.add_argument("--prompt", default="def ")
    g.add_argument("--tokens", type=int, default=200, help="tokens to generate (bytes, for a byte-level run)")
    g.add_argument("--tokenizer", default=None,
                   help="the run's tokenizer (default: the path or hf: name its config records; its hash is checked)")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=generate_main)


def states_from_checkpoints(paths) -> tuple:
    """(RunConfig, stage -> model state, stage -> step) from checkpoint files: the newest step that
    every stage has a file of, else the newest of each stage (which export then refuses unless
    --allow-mixed-steps)."""
    from swarm.checkpoint import load  # (torch: not while building --help)
    from swarm.export import common_step
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.pt")) if p.is_dir() else [p]
    by_stage: dict[int, dict[int, dict]] = {}
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
        by_stage.setdefault(state["stage"], {})[state["step"]] = state
    if run is None:
        raise SystemExit("error: no stage checkpoints found")
    step = common_step({k: set(states) for k, states in by_stage.items()})
    best = {k: states[step] if step is not None else states[max(states)] for k, states in by_stage.items()}
    return run, {k: s["model"] for k, s in best.items()}, {k: s["step"] for k, s in best.items()}


async def _newest_state(p2p, run, records: list[dict]) -> dict | None:
    from node.state_sync import download_state
    for rec in sorted(records, key=lambda r: -r["step"]):
        try:
            return await download_state(p2p, run, rec["stage"], rec["peer_id"])
        except Exception as e:
            print(f"stage {rec['stage']}: {rec['peer_id']} failed ({e}); trying another replica", file=sys.stderr)
    return None


async def consistent_states(dht, p2p, run, wait_s: float, allow_mixed: bool):
    """Every stage's state, at one step if possible: all stages are fetched again until they agree
    or `wait_s` runs out (then export names the stages that disagree)."""
    from node.announce import read_stage_records
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        records = await read_stage_records(dht, run)
        stages = range(run.model.n_stages)
        # all at once: with one trainer the stages step within one microbatch's walk of each other, so
        # concurrent requests most likely land between two of their steps
        fetched = await asyncio.gather(*(_newest_state(p2p, run, records.get(k, [])) for k in stages))
        states = {k: s["model"] for k, s in zip(stages, fetched) if s is not None}
        steps = {k: s["step"] for k, s in zip(stages, fetched) if s is not None}
        if allow_mixed or len(set(steps.values())) <= 1 or asyncio.get_running_loop().time() > deadline:
            return states, steps
        await asyncio.sleep(0.2)


async def states_from_swarm(args) -> tuple:
    from node.announce import resolve_run_config  # (hivemind: not while building --help)
    from node.dht import start_dht
    run_id = chosen_run_id(args.run_id, None)
    dht = start_dht(run_id, args.initial_peers, host=args.host)
    p2p = None
    try:
        p2p = await dht.replicate_p2p()
        run = await resolve_run_config(dht, run_id)
        states, steps = await consistent_states(dht, p2p, run, args.wait_consistent, args.allow_mixed_steps)
        return run, states, steps
    finally:
        await close_hivemind(p2p, dht)


def export_main(args) -> int:
    from swarm.export import MixedSteps, check_one_step, save_export
    try:
        run, states, steps = _gather(args)
        if not args.allow_mixed_steps:
            check_one_step(steps)
    except MixedSteps as e:
        raise SystemExit(f"error: {e}")
    try:
        save_export(args.out, run, states, steps)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"exported {len(states)} stages (steps {steps}) of run {run.run_id} ({run.fingerprint}) to {args.out}",
          file=sys.stderr)
    return 0


def _gather(args):
    if args.checkpoints:
        return states_from_checkpoints(args.checkpoints)
    elif args.initial_peers:
        from node.dht import AddressError
        try:
            return uvloop.run(states_from_swarm(args))
        except (AddressError, ConnectionError) as e:
            raise SystemExit(f"error: {e}")
    raise SystemExit("error: give --initial-peers (live swarm) or --checkpoints (files)")


def generate_main(args) -> int:
    from swarm.export import generate, load_export
    try:
        run, model, steps = load_export(args.model, device=str(resolve_device(args.device)))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load {args.model}: {e}")
    model.eval()
    tok = run_tokenizer(run, args.tokenizer)
    prompt = [int(i) for i in tok.encode_documents([args.prompt])[0]]
    if tok.eos is not None and prompt and prompt[-1] == tok.eos:
        prompt = prompt[:-1]  # the encoder closes every document; a prompt goes on
    out = generate(model, prompt, args.tokens, args.temperature, args.top_k, args.seed,
                   start_id=tok.eos if tok.eos is not None else 10)
    sys.stdout.write(args.prompt + tok.decode(out) + "\n")
    return 0


def run_tokenizer(run, spec: str | None):
    """The tokenizer a run was trained with (from its config, or a local copy), checked by hash."""
    from swarm.tokenizer import load_tokenizer
    d = run.data
    try:
        tok = load_tokenizer(spec or d.tokenizer)
    except ConfigError as e:
        raise SystemExit(f"error: {e} (pass --tokenizer with a local copy of the run's tokenizer)")
    if d.tokenizer_hash and tok.content_hash != d.tokenizer_hash:
        raise SystemExit(f"error: tokenizer {spec or d.tokenizer} has hash {tok.content_hash}, the run was trained "
                         f"with {d.tokenizer} (hash {d.tokenizer_hash})")
    return tok
