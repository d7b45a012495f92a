"""Random SIGKILL storm (issue 4): 4 writers with an ack log, 1 reader, 300 kills, drain.

Each writer logs its intent before ``write(v)`` and an ack after it; a killed writer's last
call is in flight, applied wholly or not at all.  At the end::

    sum(read) + final == sum(acked) + (the sum of some subset of the in-flight values)

and nothing may hang.
"""

from __future__ import annotations

import fcntl
import functools
import os
import random
import select
import signal
import time

import pytest

from figures import record
from helpers import FORKED, fork_child, reap
from mpeventfd import EventFD

WRITERS = 4
KILLS = 300


def _writer(efd: EventFD, log: int, seed: float) -> int:
    rng = random.Random(seed)
    while True:
        v = rng.randint(1, 1000)
        os.write(log, b"I%d\n" % v)  # lines below PIPE_BUF: atomic, never torn by a kill
        efd.write(v)
        os.write(log, b"A%d\n" % v)


def _reader(efd: EventFD, log: int, stop: int) -> int:
    while not select.select([stop], [], [], 0)[0]:
        try:
            v = efd.read(timeout=0.05)
        except TimeoutError:
            continue
        os.write(log, b"R%d\n" % v)
    return 0


class Log:
    """Collects the lines of every log pipe; keeps the pipes drained so nobody blocks."""

    def __init__(self) -> None:
        self.pipes: dict[int, bytes] = {}
        self.lines: dict[int, list[str]] = {}

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            # One page: a writer blocks on its log after ~800 lines, instead of filling
            # 64 KiB (13,000 lines to parse) between two kills.
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        os.set_blocking(r, False)
        self.pipes[r] = b""
        self.lines[r] = []
        return r, w

    def drain(self) -> None:
        for r in list(self.pipes):
            while True:
                try:
                    chunk = os.read(r, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                *done, rest = (self.pipes[r] + chunk).split(b"\n")
                self.pipes[r] = rest
                self.lines[r] += [line.decode() for line in done]


    def drain_until_exit(self, pid: int, timeout: float) -> int:
        """Reap ``pid`` while keeping every log drained: a child blocked writing to a full
        log pipe would never look at its stop pipe (the reader once hung so, for 30 s,
        when the parent was kept off the CPU between its last drain and the stop)."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            assert time.monotonic() < deadline, f"child {pid} did not exit in {timeout} s"
            select.select(list(self.pipes), [], [], 0.01)  # (bounded: woken by new lines)


def subset_sums(values: list[int]) -> set[int]:
    sums = {0}
    for v in values:
        sums |= {s + v for s in sums}
    return sums


@pytest.mark.slow
def test_random_sigkill_storm_loses_and_duplicates_nothing(backend: str) -> None:
    rng = random.Random(20261127)
    log = Log()
    stop_r, stop_w = os.pipe()
    writer_logs = [log.pipe() for _ in range(WRITERS)]
    reader_log = log.pipe()
    try:
        _storm(rng, log, stop_r, stop_w, writer_logs, reader_log)
    finally:  # (also when it fails: a leak would fail the next test too)
        for fd in [stop_r, stop_w, *(x for pair in [*writer_logs, reader_log] for x in pair)]:
            os.close(fd)


def _storm(rng: random.Random, log: Log, stop_r: int, stop_w: int,
           writer_logs: list[tuple[int, int]], reader_log: tuple[int, int]) -> None:
    with EventFD(0) as efd:
        reader = fork_child(lambda: _reader(efd, reader_log[1], stop_r))
        writers = [fork_child(functools.partial(_writer, efd, w, rng.random()))
                   for _, w in writer_logs]
        t0 = time.monotonic()
        try:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.001, 0.01))  # a random moment, not an ordering
                k = rng.randrange(WRITERS)
                os.kill(writers[k], signal.SIGKILL)
                reap(writers[k])
                log.drain()
                seed = rng.random()
                writers[k] = fork_child(functools.partial(_writer, efd, writer_logs[k][1], seed))
            for k in range(WRITERS):
                os.kill(writers[k], signal.SIGKILL)
                reap(writers[k])
            os.write(stop_w, b"x")
            assert log.drain_until_exit(reader, 30) == 0
            FORKED.discard(reader)
        finally:
            for pid in [*writers, reader]:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        elapsed = time.monotonic() - t0
        log.drain()
        final = efd.peek()
        acked = in_flight_total = 0
        in_flight: list[int] = []
        for r, _ in writer_logs:
            pending: int | None = None
            for line in log.lines[r]:
                if line[0] == "I":
                    if pending is not None:  # the previous incarnation died mid-call
                        in_flight.append(pending)
                    pending = int(line[1:])
                else:
                    assert pending == int(line[1:])
                    acked += pending
                    pending = None
            if pending is not None:
                in_flight.append(pending)
        in_flight_total = sum(in_flight)
        read = sum(int(line[1:]) for line in log.lines[reader_log[0]])
        excess = read + final - acked
        assert 0 <= excess <= in_flight_total
        assert excess in subset_sums(in_flight), (excess, in_flight)
        record("storm kills survived", KILLS)
        record("storm seconds", elapsed)
