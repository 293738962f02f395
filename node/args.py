"""Command-line arguments shared by the subcommands that describe a run."""
from __future__ import annotations

import argparse

import torch

from protocol.codec import CODECS
from swarm.config import BOUNDARIES, OPTIMIZERS, ConfigError, ModelConfig, RunConfig, TrainConfig


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training (must match across the swarm)")
    g.add_argument("--d-model", type=int, default=256, help="hidden width d (default 256)")
    g.add_argument("--layers", type=int, default=4, help="transformer layers in total")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    g.add_argument("--stages", type=int, default=2, help="pipeline stages S")
    g.add_argument("--ratio", type=int, default=128, help="compression ratio: code width b = d / ratio")
    g.add_argument("--boundary", choices=BOUNDARIES, default="resbm", help="what crosses a stage boundary")
    g.add_argument("--codec", choices=CODECS, default="bf16", help="wire codec for codes and gradients")
    g.add_argument("--codec-bwd", choices=CODECS, default="", help="wire codec for gradients (default: --codec)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    g.add_argument("--microbatches", type=int, default=4, help="microbatches per step (pipelined in a swarm)")
    g.add_argument("--average-every", type=int, default=10, help="replicas of a stage average every N steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--trainer", action="append", default=[], metavar="PEER_ID",
                   help="peer id allowed to drive training (the head; see `resbm-node identity`); repeatable. "
                        "Without it any peer may send training calls: fine on a private network only")


def run_config_from_args(args) -> RunConfig:
    try:
        model = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, seq_len=args.seq_len,
                            n_stages=args.stages, ratio=args.ratio, boundary=args.boundary, codec=args.codec,
                            codec_bwd=args.codec_bwd, seed=args.seed)
        train = TrainConfig(optimizer=args.optimizer, lr=args.lr, warmup_steps=args.warmup,
                            batch_size=args.batch_size, microbatches=args.microbatches,
                            average_every=args.average_every, trainers=tuple(getattr(args, "trainer", [])),
                            steps=getattr(args, "steps", 0) or 0)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    return RunConfig(model=model, train=train, run_id=getattr(args, "run_id", "resbm"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but this machine has no usable CUDA GPU")
    return dev


def identity_peer_id(path: str) -> str:
    """The libp2p peer id of an identity file, creating the file if it does not exist yet."""
    import os
    from hivemind.p2p import P2P, PeerID
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        P2P.generate_identity(path)
    with open(path, "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()
