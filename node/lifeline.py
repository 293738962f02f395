"""Processes die with their parent, however the parent dies (kill -9 and the OOM killer included).

Two mechanisms, because one does not fit every child:
  * `parent_death_preexec` (Popen preexec_fn): the kernel's PR_SET_PDEATHSIG. Used for the nodes that
    `resbm-node local` starts: they get SIGTERM, which they handle by shutting down cleanly.
  * `watch_parent` (called inside a forked hivemind helper, the DHT and averager processes): a thread
    that polls the parent pid. A plain death signal does not fit there: the helpers inherit the
    node's SIGTERM handler (so SIGTERM is ignored), and SIGKILL would leave the DHT process's own
    child, p2pd (a Go binary hivemind starts, no hook of ours runs in it), orphaned. The watcher
    SIGKILLs the helper's descendants (p2pd) first, then exits.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when the thread that forked it exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_death_preexec(sig: int = signal.SIGTERM):
    """A Popen preexec_fn: the child gets `sig` when this process dies (also if it already died).
    The kernel fires on the exit of the *thread* that forked: start children from a thread that
    lives as long as they should (the main thread, as `local` does)."""
    parent = os.getpid()

    def hook() -> None:
        set_parent_death_signal(sig)
        if os.getppid() != parent:  # died between fork and prctl: the kernel will not tell us
            os.kill(os.getpid(), sig)
    return hook


def descendants(pid: int) -> list[int]:
    """Pids of every process below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_descendants(pid: int) -> None:
    for child in descendants(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def watch_parent(parent_pid: int, poll_s: float = 0.25) -> threading.Thread:
    """In a forked helper: once `parent_pid` is no longer our parent, SIGKILL our descendants and exit."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        kill_descendants(os.getpid())
        os._exit(1)

    thread = threading.Thread(target=watch, name="lifeline", daemon=True)
    thread.start()
    return thread
