"""Keeping a job's log readable: no messages that alarm without cause, no progress-bar fragments in a file.

Ray 2.60's core worker logs an error the first time a process creates a restartable actor whose constructor
arguments are object references: `E ... core_worker.cc ... has constructor arguments in the object store and
max_restarts > 0` (the restart would fail if those objects were lost, ray-project/ray#53727). Ray Data's actor
pools always create their actors so: the operator puts its DataContext and its map function (with its
constructor arguments) in the object store itself and passes the references, whatever the arguments' size
(ray-project/ray#57733). Those objects stay referenced by the operator for the whole run, so the generation
actors' restarts do work (tests/test_pipeline_faults.py kills them). Ray logs this message once per process:
`absorb_actor_restart_warning` spends that once on an idle probe actor of its own (no CPU; it lives as long as
the driver, since ending an actor still being created makes Ray log another error), with the driver's stderr
captured, and hands every other captured byte back to stderr.

Progress: outside a terminal (a Ray job's log, a pipe) Ray Data writes its progress as log lines by itself,
while a bar drawn outside the executor (its Parquet sampling bar) would come out as carriage-return fragments.
`draws_bars` says which case a driver is in.
"""

from __future__ import annotations

import os
import sys
import tempfile

import ray

RESTART_WARNING = b"has constructor arguments in the object store and max_restarts > 0"
_probes: list = []  # the probe actor's handle, held for the life of the process


@ray.remote(num_cpus=0, max_restarts=1)
class _RestartWarningProbe:
    """A restartable actor created with an object reference: what makes Ray log the message, once."""

    def __init__(self, value: int) -> None:
        self.value = value


def absorb_actor_restart_warning() -> None:
    """Spend Ray's once-per-process restart warning on a probe actor (see the module docstring). Needs a
    connected Ray; later calls in the same process do nothing (Ray's once is per process, across clusters)."""
    if _probes:
        return
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)  # the core worker writes to file descriptor 2, past sys.stderr
        try:
            _probes.append(_RestartWarningProbe.remote(ray.put(0)))  # logged synchronously, inside the call
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
        captured.seek(0)
        others = [line for line in captured.read().splitlines(keepends=True) if RESTART_WARNING not in line]
    if others:
        os.write(2, b"".join(others))


def draws_bars() -> bool:
    """Whether progress bars can be drawn: stdout is a terminal (else progress goes out as log lines)."""
    return sys.stdout.isatty()
