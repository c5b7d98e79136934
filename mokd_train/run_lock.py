"""One `mokd-train` process per output directory, for the life of the run.

Two runs writing one directory would leave `config.json`, `checkpoint.pth` and `log.jsonl` from different runs.
The lock is an advisory `flock` on a file in the directory: the kernel releases it when its process ends, however
it ends (kill -9 included), so a lock left by a dead process never blocks a rerun. The file names the holder's
process id and host for the message. (`flock` may not lock across machines on some network file systems.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

from mokd.core.distributed import DistContext
from mokd.core.errors import MokdError, SharedMokdError

LOCK_NAME = ".mokd-train.lock"


@contextlib.contextmanager
def run_output_dir_lock(directory: Path, context: DistContext) -> Iterator[None]:
    """Rank 0 holds `directory`'s lock inside the block, and every rank learns whether it got it: a refused run
    ends on every rank with the same `MokdError` (printed by rank 0 only) instead of leaving the other ranks
    waiting in their first collective."""
    with contextlib.ExitStack() as held:
        refusal = ""
        if context.is_main:
            try:
                held.enter_context(output_dir_lock(directory))
            except MokdError as error:
                refusal = str(error)
        refusal = context.from_main(refusal)
        if refusal:
            raise SharedMokdError(refusal, printed=context.is_main)
        yield


@contextlib.contextmanager
def output_dir_lock(directory: Path) -> Iterator[None]:
    """Hold `directory`'s lock inside the block (one process; `run_output_dir_lock` for a torchrun run)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    handle = _acquire(path, directory)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter then finds the file gone and retries
        handle.close()


def _acquire(path: Path, directory: Path):
    """Lock the file now at `path`; retry if it was replaced while we waited (its holder released it)."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise MokdError(f"--output-dir {directory} is in use by another mokd-train run (process id and host: "
                            f"{holder}): wait for it to end or stop it, or choose another --output-dir") from None
        try:
            same_file = os.fstat(handle.fileno()).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return handle
        handle.close()
