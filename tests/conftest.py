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

from figures import FIGURES, KILLED_STEPS
from helpers import janitor_ended, mpefd_entries, open_fds
from mpeventfd import EventFD, _create, _names, _registry
from mpeventfd._probe import PLATFORM


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
    monkeypatch.setattr(EventFD, "_mutex_kind", _create.LOCK_KINDS[name])
    return name


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
    assert janitor_ended(5), (
        f"the janitor still retests names in use: {sorted(_registry.current().janitor.pending)}")
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
    _registry.sweep(skip_attached=False)
    assert _names.PREFIX
