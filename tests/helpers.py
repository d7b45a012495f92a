"""Helpers for tests with real processes: bounded waits, always-reaped children."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

import pytest

from mpeventfd import _core, _liveness, _registry

FORK = multiprocessing.get_context("fork")
TIMEOUT = 20.0
# A whole interpreter's run (``python``): it starts and imports before doing anything, and
# beside another suite's 1,024 blocked processes a free-threaded one once needed more than
# TIMEOUT for a call that refuses at once.  Only a hang guard: nothing is judged by it.
INTERPRETER_HANG = 120.0


@contextlib.contextmanager
def reaped(*procs: BaseProcess) -> Iterator[None]:
    """Join every process on the way out; kill whatever is still alive after 5 s."""
    try:
        yield
    finally:
        deadline = time.monotonic() + 5
        for p in procs:
            if p.pid is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)


@contextlib.contextmanager
def long_steps(seconds: float = 3600.0) -> Iterator[None]:
    """Waits in threads other than the main one take steps of ``seconds`` (``_core._step``):
    a wait that outlasts the test comes back by a post, a signal or its deadline, never by
    a step's look, so a test can count the posts it consumed.  (A fork child inherits it.)"""
    old = _core._step(seconds)
    try:
        yield
    finally:
        _core._step(old)


def start(target: Callable[..., Any], *args: Any, ctx: Any = FORK) -> BaseProcess:
    p: BaseProcess = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def finish(p: BaseProcess, timeout: float = TIMEOUT) -> int:
    """Join ``p`` within ``timeout`` and return its exit code (fail on a hang)."""
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join(5)
        raise AssertionError(f"{p} did not finish within {timeout} s")
    assert p.exitcode is not None
    return p.exitcode


def wait_readable(fd: int, timeout: float = TIMEOUT) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# Children forked by fork_child and not reaped yet: the leak guard kills and reaps what a
# test (a failing one, typically) left behind, and fails the test for it.
FORKED: set[int] = set()


def fork_child(body: Callable[[], int | None]) -> int:
    """``os.fork`` a child that runs ``body`` and leaves through ``os._exit``."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body() or 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    FORKED.add(pid)
    return pid


def reap(pid: int, timeout: float = TIMEOUT) -> int:
    """waitpid with a deadline; SIGKILL and fail if the child does not exit in time."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            FORKED.discard(pid)
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            FORKED.discard(pid)
            raise AssertionError(f"child {pid} did not exit within {timeout} s")
        time.sleep(0.005)


def python(code: str, *args: str, env: dict[str, str] | None = None,
           pass_fds: tuple[int, ...] = (), timeout: float = INTERPRETER_HANG,
           close_fds: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` to completion (fails the test on a hang)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=full_env, pass_fds=pass_fds,
        capture_output=True, text=True, timeout=timeout, close_fds=close_fds,
    )


def blocked_in_poll(pid: int) -> bool:
    """True while ``pid``'s main thread sleeps in ``select``/``poll`` (proc_pid_wchan(5))."""
    with open(f"/proc/{pid}/wchan") as f:
        return f.read().startswith(("poll_schedule_timeout", "do_select", "do_sys_poll"))


class LineReader:
    """Lines that children write to a pipe, read with a deadline."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self._buf = b""

    def line(self, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0, "no line arrived in time"
            assert wait_readable(self.r, left), "no line arrived in time"
            self._buf += os.read(self.r, 4096)
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


# For tests that fork beside threads on purpose (a fork while another thread operates):
# from 3.12 os.fork() warns that the child of a threaded process may deadlock.
forks_beside_threads = pytest.mark.filterwarnings(
    r"ignore:This process \(pid=\d+\) is multi-threaded:DeprecationWarning"
)


def stats(efd: Any) -> dict[str, int]:
    """The shared accounting words of an open eventfd (waiters, posts, dirty, ...)."""
    core = efd._core
    assert core is not None
    result: dict[str, int] = core.stats()
    return result


def shared_word(efd: Any, field: str, value: int | None = None) -> int:
    """Read (or overwrite) one word of the shared page, as a foreign process could.

    ``field`` names an ``OFFSET_*`` of ``mpeventfd._core``.  Goes through the state file,
    whose pages the kernel shares with every mapping of it.
    """
    from mpeventfd import _core

    offset = getattr(_core, f"OFFSET_{field.upper()}")
    fd = efd.fds[0]
    old = int.from_bytes(os.pread(fd, 8, offset), sys.byteorder)
    if value is not None:
        os.pwrite(fd, value.to_bytes(8, sys.byteorder), offset)
    return old


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (bounded) until ``cond()`` holds: a registration count, a process state."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def sleeping(pid: int) -> bool:
    """True while ``pid``'s main thread sleeps (state S in proc_pid_stat(5))."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "S"


def reap_leftovers() -> list[int]:
    """Reap every fork_child child; SIGKILL those still running and return their pids."""
    running = []
    for pid in sorted(FORKED):
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                continue  # it had exited: only unreaped
            running.append(pid)
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass  # reaped elsewhere already
    FORKED.clear()
    return running


# -- what the leak guard counts ---------------------------------------------------------------


def janitor_ended(timeout: float) -> bool:
    """Have this process's janitor retest its pending names at once, and wait until its
    thread has ended (True), or ``timeout`` passed with some name still in use (False).

    A test that ends with names pending (removed meanwhile by a sweep, say) leaves the
    thread waiting for a retest up to ``_janitor.LAST_RETEST`` away; a later test's fork
    would then copy a threaded process, which 3.12+ warns of (``os.fork`` docs)."""
    janitor = _registry.current().janitor
    deadline = time.monotonic() + timeout
    with janitor.cond:
        thread = janitor.thread
        for pending in janitor.pending.values():
            pending.due = 0.0
        janitor.cond.notify_all()
        if not janitor.cond.wait_for(lambda: janitor.thread is None, timeout):
            return False
    if thread is not None:
        thread.join(max(0.0, deadline - time.monotonic()))  # (its last steps, after the lock)
    return thread is None or not thread.is_alive()


def mpefd_entries() -> set[str]:
    """Every ``mpefd-`` name of this user in the state and semaphore directories."""
    return {f"{name}{kind}" for name, kind in _liveness.entries()}


def open_fds() -> set[int]:
    """This process's open fds, without the one listdir used and multiprocessing's own."""
    listed = {int(fd) for fd in os.listdir("/proc/self/fd")}
    return {fd for fd in listed if _is_open(fd)} - infrastructure_fds()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def infrastructure_fds() -> set[int]:
    """fds that multiprocessing keeps for the life of the process once first used.

    The forkserver's alive pipe, the resource tracker's pipe and the resource sharer's
    listening socket are started on demand and never closed; they are not ours.
    """
    from multiprocessing import forkserver, resource_sharer, resource_tracker

    fds: set[int] = set()
    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None:
        fds.add(alive)
    tracker = getattr(resource_tracker._resource_tracker, "_fd", None)
    if tracker is not None:
        fds.add(tracker)
    sharer = getattr(resource_sharer, "_resource_sharer", None)
    listener = getattr(sharer, "_listener", None)
    if listener is not None:
        fds.add(listener._listener._socket.fileno())
    return fds
