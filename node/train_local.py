"""`resbm-node train-local`: the whole staged model in one process (the reference for the swarm)."""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import replace

from node.args import add_run_args, add_setting_flags, run_config_from_args
from node.progress import Progress, RunLog, human_bytes, write_summary
from node.runtime import resolve_device
from node.settings import DeviceSettings, TrainerSettings
from swarm.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("train-local", help="train the whole staged model in one process (reference)",
                       description="Train all stages in one process with exactly the swarm's math "
                                   "(codec included). Ctrl-C saves a checkpoint and exits.")
    add_run_args(p, command="train-local")
    add_setting_flags(p, [DeviceSettings], ["device", "precision", "activation_checkpointing"], "train-local")
    add_setting_flags(p, [TrainerSettings], ["eval_every"], "train-local")
    p.add_argument("--checkpoint", default="runs/train-local.pt", help="checkpoint path ('' to disable)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--init-from", default=None, help="start from the weights of a `resbm-node export` file "
                                                     "(its config replaces the model flags)")
    p.add_argument("--json-out", default=None, help="write a JSON summary here")
    p.set_defaults(func=main)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def main(args) -> int:
    from swarm.local_trainer import param_overhead, wire_stats  # (torch: not while building --help)
    trainer, run, device = _build(args)
    ws = wire_stats(run.model)
    _describe(trainer, run, device, ws)
    log_ = RunLog(run.train.batch_size * run.model.seq_len)
    stopped = _train(args, trainer, run, ws, log_)
    if not log_.losses and run.train.steps:
        print("no step completed", file=sys.stderr)
        return 130 if stopped else 1
    if args.checkpoint and log_.losses:
        trainer.save(args.checkpoint)
        print(f"checkpoint written: {args.checkpoint} (step {trainer.step})", file=sys.stderr)
    if stopped:
        print(f"stopped by {stopped} at step {trainer.step}; resume with --resume", file=sys.stderr)
    val = trainer.evaluate()
    summary = {"command": "train-local", "config": run.wire_dict(), "fingerprint": run.fingerprint,
               **log_.summary(), "step": trainer.step, "val_loss": val,
               **ws, "param_overhead": param_overhead(run.model), "device": str(device), "stopped_by": stopped}
    trained = f"train loss {log_.losses[0]:.3f} -> {log_.losses[-1]:.3f}, " if log_.losses else ""
    print(f"done: {summary['steps_completed']} steps, {trained}val loss {val:.4f} nats/token, "
          f"{summary['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    write_summary(args.json_out, summary)
    return 130 if stopped else 0


def _build(args):
    """(LocalTrainer, run config, device): from the flags, an export file or a checkpoint."""
    from swarm.data import open_corpus  # (torch: not while building --help)
    from swarm.export import load_export
    from swarm.local_trainer import LocalTrainer
    run = run_config_from_args(args)
    steps = run.train.steps
    device = resolve_device(args.device)
    exported = None
    if args.init_from:
        exported, model, _ = load_export(args.init_from)
        run = replace(exported, train=replace(exported.train, steps=steps))
    try:
        corpus = open_corpus(run)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    trainer = LocalTrainer(run, corpus, device=str(device), precision=args.precision,
                           activation_checkpointing=args.activation_checkpointing)
    if exported is not None:
        trainer.model.load_state_dict(model.state_dict())
        print(f"initialised from {args.init_from} (run {run.run_id}, fingerprint {run.fingerprint})", file=sys.stderr)
    if args.resume:
        trainer.resume(args.checkpoint)
        print(f"resumed from {args.checkpoint} at step {trainer.step}", file=sys.stderr)
    return trainer, run, device


def _describe(trainer, run, device, ws: dict) -> None:
    """Print what trains and what a boundary costs (`ws`: swarm.local_trainer.wire_stats)."""
    corpus = trainer.corpus
    print(f"train-local: d={run.model.d_model} layers={run.model.n_layers} stages={run.model.n_stages} "
          f"boundary={run.model.boundary} b={ws['code_width']} codec={ws['wire_codec']} "
          f"optimizer={run.train.optimizer} device={device} data={corpus.name} ({corpus.tokens('train')} "
          f"train tokens, vocab {run.model.vocab_size}) fingerprint={run.fingerprint}",
          file=sys.stderr)
    print(f"wire per boundary: {ws['wire_bytes_per_token_fwd']} B/token fwd, {ws['wire_bytes_per_token_bwd']} B/token "
          f"bwd; {ws['compression_vs_bf16']:.1f}x smaller than bf16 at full width d", file=sys.stderr)


def _train(args, trainer, run, ws: dict, log_: RunLog) -> str | None:
    """Train --steps steps (validation, checkpoints, the status line); returns what stopped it early
    (SIGINT, SIGTERM) or None."""
    start_step, steps = trainer.step, run.train.steps
    wire_per_token = (ws["wire_bytes_per_token_fwd"] + ws["wire_bytes_per_token_bwd"]) * (run.model.n_stages - 1)
    bar = Progress(steps)
    # SIGINT explicitly too: a process started in the background inherits it ignored.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_stop),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        while trainer.step < start_step + steps:
            t0 = time.perf_counter()
            loss = trainer.train_step()
            log_.add(loss, time.perf_counter() - t0)
            if args.eval_every and trainer.step % args.eval_every == 0:
                log_.val_curve.append((trainer.step, trainer.evaluate()))
            if args.checkpoint and args.save_every and trainer.step % args.save_every == 0:
                trainer.save(args.checkpoint)
            tps = log_.tokens_per_s(last=10)
            bar.update(trainer.step - start_step, {
                "loss": f"{loss:.3f}", "val": f"{log_.val_curve[-1][1]:.3f}" if log_.val_curve else "-",
                "tok/s": f"{tps:.0f}", "wire": f"{human_bytes(tps * wire_per_token)}/s",
                "B/tok": ws["wire_bytes_per_token_fwd"]})
    except (KeyboardInterrupt, _Stop) as e:
        return "SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
    finally:
        bar.close()
        for s, h in previous.items():
            signal.signal(s, h)
    return None
