"""Shared fixtures: every test is guarded against leaked names, fds and processes."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mpeventfd import _lifecycle, _names
from mpeventfd._probe import PLATFORM

# Figures the reliability tests produce, printed at the end of the run (README "Reliability").
FIGURES: dict[str, list[float]] = {}


KILLED_STEPS: set[str] = set()


def record(name: str, value: float) -> None:
    FIGURES.setdefault(name, []).append(value)


def record_kill(step: str) -> None:
    """A test SIGKILLed a process at the named ``step`` (README "Reliability")."""
    KILLED_STEPS.add(step)


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background job (`cmd &`, nohup, a CI runner's script) with SIGINT
    # ignored (POSIX "Asynchronous Lists"), and Python then leaves it ignored instead of
    # raising KeyboardInterrupt (docs of the signal module, "Python installs a small number
    # of signal handlers by default").  The signal tests assert KeyboardInterrupt from real
    # SIGINTs, so the suite must not depend on how it was started: restore Python's own.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES and not KILLED_STEPS:
        return
    terminalreporter.section("mpeventfd reliability figures")
    if KILLED_STEPS:
        from mpeventfd import _faults

        terminalreporter.write_line(
            f"named steps killed: {len(KILLED_STEPS)} of {len(_faults.STEPS)} "
            f"(never killed: {', '.join(sorted(set(_faults.STEPS) - KILLED_STEPS)) or '-'})")
    for name, values in sorted(FIGURES.items()):
        ordered = sorted(values)
        median = ordered[len(ordered) // 2]
        if "seconds" in name and ordered[-1] < 1:
            terminalreporter.write_line(
                f"{name.replace('seconds', 'ms')}: n={len(values)} median={median * 1e3:.3f} "
                f"max={ordered[-1] * 1e3:.3f}")
            continue
        terminalreporter.write_line(
            f"{name}: n={len(values)} sum={sum(values):.0f} median={median:.4f} "
            f"max={ordered[-1]:.4f}"
        )


@pytest.fixture(params=["robust", "byte"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per lock kind: the robust mutex, and the kernel byte lock.

    Eventfds created inside the test use that kind (fork children inherit the choice).
    Where robust mutexes do not exist (or MPEVENTFD_PORTABLE forces the macOS paths) only
    the byte lock runs.
    """
    name: str = request.param
    if name == "robust" and not PLATFORM.robust_mutex:
        pytest.skip("no robust mutexes here")
    monkeypatch.setattr(_lifecycle, "default_mutex", _lifecycle.LOCK_KINDS[name])
    return name


def mpefd_entries() -> set[str]:
    """Every ``mpefd-`` name of this user in the state and semaphore directories."""
    return {f"{name}{kind}" for name, kind in _lifecycle.entries()}


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


def _settle(before: set[str], deadline: float) -> set[str]:
    # Names whose last holder just exited are removed by the janitor's retest within
    # moments; give it a bounded time before calling them leaked.
    while True:
        gc.collect()
        left = mpefd_entries() - before
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    """Fail a test that leaves new mpefd- names, more open fds, or live children behind."""
    gc.collect()
    names_before = mpefd_entries()
    fds_before = open_fds()
    yield
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
        child.join(5)
    assert not children, f"test left child processes running: {children}"
    from helpers import reap_leftovers

    forked = reap_leftovers()
    assert not forked, f"test left forked children unreaped: {forked}"
    # A test that handed an eventfd to a live process started multiprocessing's resource
    # sharer thread; stop it, or every later fork warns about forking a threaded process.
    from multiprocessing import resource_sharer

    resource_sharer.stop(timeout=5)
    left = _settle(names_before, time.monotonic() + 5)
    assert not left, f"test leaked named objects: {sorted(left)}"
    gc.collect()
    extra = open_fds() - fds_before
    # An fd can be briefly open in a helper thread (the janitor's liveness test).
    deadline = time.monotonic() + 2
    while extra and time.monotonic() < deadline:
        time.sleep(0.02)
        extra = open_fds() - fds_before
    assert not extra, f"test leaked fds: {sorted(extra)} -> " + ", ".join(
        _describe(fd) for fd in sorted(extra)
    )


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Belt and braces for the CI run: nothing of ours may survive the suite.
    _lifecycle.sweep(skip_attached=False)
    assert _names.PREFIX
