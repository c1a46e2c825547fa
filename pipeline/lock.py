"""One driver per output folder: a lock file, `<output>/_lock`, held while a job runs.

The lock is a small JSON record {pid, host, started_at} created with O_CREAT | O_EXCL, so of two drivers that
start on one folder exactly one creates it; the other stops with `OutputLockedError` (exit status 2 from the
job), naming the holder, before it touches any file. The holder removes the lock when it leaves
`hold_output_lock`: at the end of the job, on an error, on Ctrl-C.

A driver killed outright (SIGKILL, a lost machine) leaves its lock behind. The next driver on the same host
takes it over when the recorded process is gone: no such pid, a zombie, or a pid that now belongs to a process
started after the lock was taken. A lock from another host is never judged stale, because that host's processes
cannot be seen from here; the message says which file to delete once that driver is known to be gone.

Only local folders (plain paths and file:// URIs) are locked. pyarrow's remote filesystems (s3://, gs://,
hdfs://) offer no create-if-absent, so a job writing there takes no lock: one driver per remote folder is then
the user's to ensure.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from pipeline.inputs import InputError, split_uri

LOCK_NAME = "_lock"
# A lock file that cannot be parsed is another driver writing it (it writes right after creating it), unless it
# is older than this: then its writer died between the two.
UNREADABLE_GRACE_S = 10.0
# A pid's process counts as the lock's owner only if it started no later than this after the lock was taken
# (the clock-tick rounding of /proc start times).
START_TIME_SLACK_S = 1.0


class OutputLockedError(InputError):
    """Another driver holds the output folder's lock."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: a process on a host, since a wall-clock time (seconds since the epoch)."""

    pid: int
    host: str
    started_at: float

    @classmethod
    def this_process(cls) -> LockOwner:
        return cls(os.getpid(), socket.gethostname(), time.time())

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        """The owner a lock file records, or None when it is not (yet) a complete record."""
        try:
            record = json.loads(text)
            return cls(int(record["pid"]), str(record["host"]), float(record["started_at"]))
        except (ValueError, TypeError, KeyError):
            return None

    def to_text(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"pid {self.pid} on {self.host}, since {since}"

    def is_gone(self) -> bool:
        """Whether the owner has surely ended: only decidable on its own host (elsewhere: False)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)  # signal 0: nothing is sent, only whether the pid exists
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # it exists, under another user
        state, started = _process_state(self.pid)
        if state == "Z":
            return True  # ended, not yet reaped by its parent
        return started is not None and started > self.started_at + START_TIME_SLACK_S  # a reused pid


def _process_state(pid: int) -> tuple[str | None, float | None]:
    """(state letter, start time in seconds since the epoch) of a process, from Linux's /proc; (None, None)
    where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
        with open("/proc/stat") as file:
            boot_time = next(float(line.split()[1]) for line in file if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None, None
    # "pid (command) state ppid ...": the command may hold spaces and parentheses, so split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start_ticks = fields[0], int(fields[19])  # fields 3 and 22 of proc_pid_stat(5)
    return state, boot_time + start_ticks / os.sysconf("SC_CLK_TCK")


def local_folder(location: str) -> str | None:
    """The local path of an output location, or None for a remote filesystem (which is not locked)."""
    filesystem, path = split_uri(location)
    return path if isinstance(filesystem, pafs.LocalFileSystem) else None


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read()
    except FileNotFoundError:
        return None


def acquire_lock(path: str, location: str) -> LockOwner:
    """Create the lock file at `path` for this process, taking over a stale one; OutputLockedError when a
    live driver holds it. `location` is the output as the user gave it, for the message."""
    owner = LockOwner.this_process()
    for _ in range(3):  # a stale lock is removed, then the create is tried again
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = _read(path)
            if text is None:
                continue  # released meanwhile
            holder = LockOwner.parse(text)
            if holder is None:
                if time.time() - os.path.getmtime(path) < UNREADABLE_GRACE_S:
                    raise OutputLockedError(
                        f"output {location!r} is being locked by another driver just now ({path}); choose "
                        "another --output, or wait for that driver to finish"
                    ) from None
            elif not holder.is_gone():
                raise OutputLockedError(
                    f"output {location!r} is in use by another driver ({holder.describe()}); wait for it to "
                    f"finish or choose another --output (if that driver is gone, delete {path})"
                ) from None
            if _read(path) == text:  # still the stale lock just judged, not a newer driver's
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(owner.to_text())
        return owner
    raise OutputLockedError(f"output {location!r}: other drivers keep taking its lock ({path}); try again")


def release_lock(path: str, owner: LockOwner) -> None:
    """Remove the lock file if it is still `owner`'s."""
    if _read(path) == owner.to_text():
        os.unlink(path)


@contextmanager
def hold_output_lock(location: str) -> Iterator[str | None]:
    """Hold `<location>/_lock` for the duration of the block (creating the folder); yields the lock's path, or
    None for a remote output, which is not locked."""
    folder = local_folder(location)
    if folder is None:
        yield None
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"output {location!r} is a file; give a folder")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    owner = acquire_lock(path, location)
    try:
        yield path
    finally:
        release_lock(path, owner)
