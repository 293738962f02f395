"""`resbm-node local`: a whole swarm on this machine (bootstrap, N trainers, S-1 stages x K replicas), each
node its own process on loopback, trained on the embedded corpus, then shut down cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from node.args import add_run_args, add_setting_flags, run_config_from_args
from node.lifeline import parent_death_preexec
from node.progress import write_summary
from node.run_config import save_config_file
from node.runtime import identity_peer_id
from node.settings import TrainerSettings
from swarm.config import LOCAL_RUN_ID, ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("local", help="run a whole swarm on this machine (the main job)",
                       description="Start a bootstrap and one process per node on loopback, train, write a "
                                   "checkpoint and a JSON summary, and shut everything down cleanly.")
    add_run_args(p, skip=("trainers",), command="local")  # local makes its trainers' ids
    p.add_argument("--replicas", type=int, default=1, help="replicas of every stage after stage 0")
    p.add_argument("--trainers", type=int, default=1, help="trainers (stage 0 replicas), each feeding its share")
    add_setting_flags(p, [TrainerSettings], ["eval_every"], "local")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="node i serves /metrics on 127.0.0.1:P+i (trainers first); 0: off")
    p.add_argument("--json-out", default=None, help="write the run summary JSON here")
    p.add_argument("--run-dir", default=None, help="logs, configs and checkpoints (default runs/local-<time>)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per node (0: cores / nodes)")
    p.add_argument("--run-id", default=LOCAL_RUN_ID)
    p.set_defaults(func=main)


# Nodes started here (local swarms, benchmark labs) keep NAT helpers off unless the caller's `extra`
# says otherwise (the last flag wins): AutoNAT probes and relay service would add traffic that
# measurements count, and a lab's private addresses would look like home NAT to `auto`.
PINNED = ("--reachability", "off")
# nodes on one machine talk over loopback: their link is the machine's memory, so averaging is not
# paced to a 10 Mbit/s guess (a flag, or the variable set by the user, still wins)
LOOPBACK_LINK = {"RESBM_LINK_MBIT": "1000"}


class Swarm:
    """The processes of a swarm on this machine; every one in its own process group, ended by group id.
    Every node reads the run config from one file, run_dir/config.json (the file `bootstrap
    --save-config` writes), never from a command line rebuilt from it.
    Benchmarks reuse it, e.g. with `wrap` putting a node into a network namespace."""

    def __init__(self, run_dir: Path, threads: int, run):
        self.run_dir, self.threads, self.run = run_dir, threads, run
        self.config_file = save_config_file(run, run_dir / "config.json")
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], inherit_stderr: bool = False, wrap=None) -> subprocess.Popen:
        log = self.run_dir / f"{name}.log"
        out = None if inherit_stderr else open(log, "w")
        env = {**LOOPBACK_LINK, **os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "node.cli", *argv]
        if argv[0] == "join":
            cmd += ["--threads", str(self.threads)]
        # own session (ended by group id), and SIGTERM (a clean shutdown) if this process dies, even by kill -9
        proc = subprocess.Popen(wrap(cmd) if wrap else cmd, stdout=out, stderr=out, env=env,
                                start_new_session=True, preexec_fn=parent_death_preexec(signal.SIGTERM), cwd=Path(__file__).resolve().parent.parent)
        self.procs.append((name, proc, log))
        return proc

    def start_bootstrap(self, host: str = "127.0.0.1", wrap=None, timeout: float = 60, extra=()) -> list[str]:
        addr_file = self.run_dir / "bootstrap.addr"
        self.start("bootstrap", ["bootstrap", "--config", str(self.config_file), "--host", host,
                                 "--addr-file", str(addr_file), *PINNED, *extra], wrap=wrap)
        self.wait_for_line("bootstrap", "is up", timeout)
        return addr_file.read_text().split()

    def join_argv(self, name: str, stage: int, peers: list[str], host: str = "127.0.0.1", extra=()) -> list[str]:
        return ["join", "--stage", str(stage), "--initial-peers", *peers, "--config", str(self.config_file),
                "--host", host,
                "--identity", str(self.run_dir / f"{name}.id"), "--checkpoint-dir", str(self.run_dir / "checkpoints"),
                *PINNED, *extra]

    def start_stage(self, name: str, stage: int, peers: list[str], host: str = "127.0.0.1", extra=(), wrap=None):
        return self.start(name, self.join_argv(name, stage, peers, host, extra), wrap=wrap)

    def start_trainer(self, i: int, peers: list[str], steps: int, host: str = "127.0.0.1", extra=(),
                      inherit_stderr: bool = False, wrap=None):
        """Trainer i (stage 0), writing its summary to run_dir/trainer<i>.json."""
        name = f"trainer{i}"
        return self.start(name, self.join_argv(name, 0, peers, host, ["--steps", str(steps), "--json-out",
                                                                      str(self.run_dir / f"{name}.json"), *extra]),
                          inherit_stderr=inherit_stderr, wrap=wrap)

    def wait_for_line(self, name: str, text: str, timeout: float) -> None:
        _, proc, log = next(p for p in self.procs if p[0] == name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and text in log.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail(log)}")
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not become ready in {timeout:.0f}s:\n{tail(log)}")

    def kill(self, name: str) -> None:
        """Crash a node: SIGKILL its whole process group (as if its machine died)."""
        _, proc, _ = next(p for p in self.procs if p[0] == name)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

    def stop(self, grace: float = 20.0) -> None:
        stop_processes([proc for _, proc, _ in self.procs], grace)


def terminate(procs, grace: float) -> None:
    """SIGTERM each live process in turn (a node stops its own hivemind helpers in order, a trainer
    finishes its step and writes its summary), then wait up to `grace` seconds for them all."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def stop_processes(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM each node's main process, last started first, wait, then SIGKILL whatever is left in
    its process group: no orphan p2pd or workers."""
    terminate(reversed(procs), grace)
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)  # the group may still hold hivemind helpers
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _tokenize(run) -> None:
    """Fill the token cache once here, not in every trainer at once; bad data fails before any node starts."""
    from swarm.data import open_corpus
    try:
        open_corpus(run)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def main(args) -> int:
    run_dir = Path(args.run_dir or f"runs/local-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    run = run_config_from_args(args, args.run_id)  # validates the config before anything starts
    if args.replicas < 1 and run.model.n_stages > 1:
        raise SystemExit(f"error: --replicas {args.replicas} can never train: every stage after stage 0 needs at "
                         f"least one replica")
    if args.trainers < 1:
        raise SystemExit(f"error: --trainers {args.trainers} can never train: the swarm needs at least one trainer")
    # Only our trainers may drive training: their identities exist before the run config is published.
    ids = tuple(identity_peer_id(str(run_dir / f"trainer{i}.id")) for i in range(args.trainers))
    run = replace(run, train=replace(run.train, trainers=ids))
    _tokenize(run)
    n_nodes = args.trainers + (run.model.n_stages - 1) * args.replicas
    threads = args.threads or max(1, (os.cpu_count() or 1) // n_nodes)
    swarm = Swarm(run_dir, threads, run)
    metrics_ports: dict[str, int] = {}

    def port(i: int, name: str) -> list[str]:
        if not args.metrics_port:
            return []
        metrics_ports[name] = args.metrics_port + i
        return ["--metrics-port", str(args.metrics_port + i)]
    print(f"local swarm: {args.trainers} trainer(s), {run.model.n_stages - 1} stages x {args.replicas} replicas "
          f"({n_nodes} nodes + bootstrap), "
          f"boundary {run.model.boundary} b={run.model.code_width}, logs in {run_dir}", file=sys.stderr)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    trainers = []
    try:
        peers = swarm.start_bootstrap()
        node = args.trainers
        for stage in range(1, run.model.n_stages):
            for r in range(args.replicas):
                swarm.start_stage(f"stage{stage}-{r}", stage, peers, extra=port(node, f"stage{stage}-{r}"))
                node += 1
        for name, _, _ in swarm.procs[1:]:
            swarm.wait_for_line(name, "serving", 120)
        extra = ["--eval-every", str(args.eval_every)]  # (the data is in the run config file)
        # trainer 0 shows its progress line here; the others write logs
        trainers = [swarm.start_trainer(i, peers, run.train.steps, inherit_stderr=i == 0, extra=extra + port(i, f"trainer{i}"))
                    for i in range(args.trainers)]
        exit_code = max(_wait(p) for p in trainers)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the swarm", file=sys.stderr)
        for p in trainers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in trainers:
            _wait(p, timeout=60)
        exit_code = 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        exit_code = 1
    finally:
        swarm.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return _summarize(args, run_dir, swarm, exit_code, metrics_ports)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _wait(proc: subprocess.Popen, timeout: float | None = None) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return 1


def _summarize(args, run_dir: Path, swarm: Swarm, exit_code: int, metrics_ports: dict) -> int:
    """Trainer 0's summary, with every trainer's own figures beside it."""
    found = [run_dir / f"trainer{i}.json" for i in range(args.trainers) if (run_dir / f"trainer{i}.json").exists()]
    if not found:
        print(f"no summary: no trainer wrote one (exit code {exit_code}); logs in {run_dir}", file=sys.stderr)
        return exit_code or 1
    summaries = [json.loads(f.read_text()) for f in found]
    summary = summaries[0]
    # a trainer that finished first may have left before trainer 0 asked it: its own entry is exact
    own = {t["peer_id"]: next((n for n in t["nodes"] if n["peer_id"] == t["peer_id"]), None) for t in summaries}
    listed = {n["peer_id"] for n in summary["nodes"]}
    summary["nodes"] = [{**n, **own[n["peer_id"]]} if own.get(n["peer_id"]) else n
                        for n in summary["nodes"]] + [n for p, n in own.items() if n and p not in listed]
    summary.update(command="local", replicas=args.replicas, trainers=[
        {k: s.get(k) for k in ("peer_id", "steps_completed", "train_loss_last", "tokens_per_s", "skipped_microbatches",
                               "recomputed_microbatches")} for s in summaries])
    # trainers feed in parallel, none waits for another: the swarm's rate is the sum of theirs
    summary["swarm_tokens_per_s"] = sum(s.get("tokens_per_s") or 0.0 for s in summaries)
    summary["run_dir"] = str(run_dir)
    summary["exit_codes"] = {name: proc.returncode for name, proc, _ in swarm.procs}
    summary["pids"] = {name: proc.pid for name, proc, _ in swarm.procs}  # each one leads its own session
    if metrics_ports:
        summary["metrics_ports"] = metrics_ports
    write_summary(args.json_out, summary)
    print(f"summary: {summary['steps_completed']} steps, loss {summary['train_loss_first']} -> "
          f"{summary['train_loss_last']}, val {summary['val_loss']}, {summary['swarm_tokens_per_s']:.0f} tokens/s (all trainers), "
          f"{summary['measured_wire_bytes_per_token_fwd']:.2f} B/token/hop fwd "
          f"({summary['measured_compression_vs_bf16']:.0f}x vs bf16 at width d)", file=sys.stderr)
    return exit_code
