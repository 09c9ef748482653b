"""Child process groups: the launchers (`--gpus`, `--wan-sp`, `--wan-gpus`) start each child as the leader of its own
session so that stopping it stops everything it started (torchrun's ranks, pytest's workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def set_parent_death_signal() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if its parent dies without cleaning up (killed with SIGKILL, say)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start_group(command: list[str], **popen) -> subprocess.Popen:
    """`command` as the leader of a new session (so kill_group reaches all it starts), ended with its parent."""
    return subprocess.Popen(command, start_new_session=True,
                            preexec_fn=set_parent_death_signal if sys.platform == "linux" else None, **popen)


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a child's whole process group (it leads its own session): nothing it started survives it."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 30.0) -> None:
    """`first` to the child's group, `grace` seconds to finish (write what it has), then SIGKILL to what is left."""
    kill_group(proc.pid, first)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
    kill_group(proc.pid)
