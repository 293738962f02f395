"""`resbm-node train-local`: the whole staged model in one process (the reference for the swarm)."""
from __future__ import annotations

import json
from dataclasses import replace
import signal
import sys
import time
from pathlib import Path

from node.args import add_run_args, add_setting_flags, run_config_from_args
from node.progress import Progress, human_bytes
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
    from swarm.data import open_corpus
    from swarm.trainer import LocalTrainer, param_overhead, wire_stats
    run = run_config_from_args(args)
    steps = run.train.steps
    device = resolve_device(args.device)
    exported = None
    if args.init_from:
        from swarm.export import load_export
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
    ws = wire_stats(run.model)
    print(f"train-local: d={run.model.d_model} layers={run.model.n_layers} stages={run.model.n_stages} "
          f"boundary={run.model.boundary} b={ws['code_width']} codec={ws['wire_codec']} "
          f"optimizer={run.train.optimizer} device={device} data={corpus.name} ({corpus.tokens('train')} "
          f"train tokens, vocab {run.model.vocab_size}) fingerprint={run.fingerprint}",
          file=sys.stderr)
    print(f"wire per boundary: {ws['wire_bytes_per_token_fwd']} B/token fwd, {ws['wire_bytes_per_token_bwd']} B/token "
          f"bwd; {ws['compression_vs_bf16']:.1f}x smaller than bf16 at full width d", file=sys.stderr)
    tokens_per_step = run.train.batch_size * run.model.seq_len
    bar = Progress(steps)
    losses, val_losses, times = [], [], []
    # SIGINT explicitly too: a process started in the background inherits it ignored.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_stop),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    stopped = None
    start_step = trainer.step
    try:
        while trainer.step < start_step + steps:
            t0 = time.perf_counter()
            losses.append(trainer.train_step())
            times.append(time.perf_counter() - t0)
            done = trainer.step - start_step
            if args.eval_every and trainer.step % args.eval_every == 0:
                val_losses.append((trainer.step, trainer.evaluate()))
            if args.checkpoint and args.save_every and trainer.step % args.save_every == 0:
                trainer.save(args.checkpoint)
            recent = times[-10:]
            tps = tokens_per_step * len(recent) / sum(recent)
            wire_bps = tps * (ws["wire_bytes_per_token_fwd"] + ws["wire_bytes_per_token_bwd"]) * (run.model.n_stages - 1)
            bar.update(done, {"loss": f"{losses[-1]:.3f}",
                              "val": f"{val_losses[-1][1]:.3f}" if val_losses else "-",
                              "tok/s": f"{tps:.0f}", "wire": f"{human_bytes(wire_bps)}/s",
                              "B/tok": ws["wire_bytes_per_token_fwd"]})
    except (KeyboardInterrupt, _Stop) as e:
        stopped = "SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
    finally:
        bar.close()
        for s, h in previous.items():
            signal.signal(s, h)
    if not losses and steps:
        print("no step completed", file=sys.stderr)
        return 130 if stopped else 1
    if args.checkpoint and losses:
        trainer.save(args.checkpoint)
        print(f"checkpoint written: {args.checkpoint} (step {trainer.step})", file=sys.stderr)
    if stopped:
        print(f"stopped by {stopped} at step {trainer.step}; resume with --resume", file=sys.stderr)
    val = trainer.evaluate()
    summary = {
        "command": "train-local", "config": run.wire_dict(), "fingerprint": run.fingerprint,
        "steps_completed": trainer.step - start_step, "step": trainer.step,
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None, "val_loss": val,
        "tokens_per_s": tokens_per_step * len(times) / sum(times) if times else 0.0,
        "step_time_s": sum(times) / len(times) if times else None, **ws, "param_overhead": param_overhead(run.model),
        "loss_curve": losses, "val_curve": val_losses, "device": str(device), "stopped_by": stopped,
    }
    trained = f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}, " if losses else ""
    print(f"done: {summary['steps_completed']} steps, {trained}val loss {val:.4f} nats/token, "
          f"{summary['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    return 130 if stopped else 0
