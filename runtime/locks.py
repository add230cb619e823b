"""The run folder's lock files and the non-blocking flock that refuses a folder in use, naming its holder.

Shared by ``gkdc run``'s one-node lock (runtime.launch), each node's lock of a multi-node run
(runtime.multinode) and a launched rank's check of them (runtime.worker). fcntl rather than a library: the
standard library's call is all it takes, and DeepSpeed needs POSIX anyway.
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import RunError

LOCK_FILE = ".lock"
#: environment variable naming the run that holds the lock (its line in the file), set for the ranks it starts
LOCK_ENV = "GKDC_RUN_LOCK"
#: the lock file a launched rank verifies; unset: ``LOCK_FILE`` (one node), ``.lock.node<R>`` for node R
LOCK_FILE_ENV = "GKDC_RUN_LOCK_FILE"


def lock_or_refuse(fh, mode: int, out: Path) -> None:
    """``fcntl.flock(fh, mode)`` without waiting; a lock held elsewhere is refused naming its holder (the text the
    holder wrote into the lock file). Shared by the launcher's lock and a directly started worker's."""
    import fcntl

    try:
        fcntl.flock(fh, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        raise RunError(f"{out} is in use by another gkdc run ({holder}); wait for it to finish or choose "
                       "another --out") from None
