"""Names that a detach could not remove go as soon as their last holder has (docs/design.md
§9): after a holder's death that let our last call finish, and on a retest schedule of
their own, never one that another name grew."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from helpers import mpefd_entries, python, wait_until
from mpeventfd import EventFD, _janitor, _liveness, _registry

# A fresh interpreter: an eventfd, and a 200 MB child looping on writes; the parent catches
# the child stopped inside its section (its lock held), has it killed 0.1 s later while its
# own last call waits for that lock, closes at once, and exits.  A large process takes
# milliseconds to close its files after its death has woken the waiter (exit_mm before
# exit_files): the parent's liveness test then still finds the child's fds.
DYING_HOLDER = textwrap.dedent("""
    import os, signal, sys, threading, time
    import mpeventfd as m
    from mpeventfd import _registry
    e = m.EventFD(0 if sys.argv[1] == "write" else 5)  # (both final calls take the lock)
    print(_registry.name_of(e._core), flush=True)
    holder = os.fork()
    if holder == 0:
        ballast = b"\\1" * (200 << 20)  # a large process exits slowly
        while True:
            e.write(0)
    while True:  # catch the holder stopped inside its section
        os.kill(holder, signal.SIGSTOP)
        time.sleep(0.005)
        try:
            e.write(0, timeout=0.05)
        except TimeoutError:
            break
        os.kill(holder, signal.SIGCONT)
        time.sleep(0.002)
    threading.Timer(0.1, os.kill, (holder, signal.SIGKILL)).start()
    if sys.argv[1] == "write":
        e.write(1)  # returns once the holder has died
    else:
        assert e.read() == 5  # the same
    e.close()  # then exit at once
    """)


def _reapers_of(name: str) -> list[int]:
    """The reaper processes (``python -m mpeventfd reap -- NAME...``) left in charge of
    ``name``: each removes its names once the last fd of them anywhere has closed."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # (gone meanwhile)
        if b"reap" in argv and b"--" in argv and name.encode() in argv:
            pids.append(int(entry))
    return pids


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("call", ["write", "read"])
@pytest.mark.parametrize("run", range(3))
def test_names_go_when_the_last_call_finished_because_a_holder_died(call: str,
                                                                   run: int) -> None:
    """The parent's last call finishes only because the holder died; it closes and exits
    at once.  The names go without anybody's help: the parent's exit removes them (waiting
    out the dying holder up to a second), or leaves them to a reaper that removes them
    once the holder's last fd has closed.  Once the parent and its reaper have exited,
    whenever that is on a loaded machine, nothing of the eventfd may be left (the names
    once stayed in /dev/shm for good, in 4 of 6 runs, until a later sweep)."""
    before = mpefd_entries()
    out = python(DYING_HOLDER, call)
    assert out.returncode == 0, out.stderr
    name = out.stdout.split()[0]
    for pid in _reapers_of(name):  # (started before the parent exited, if at all)
        wait_until(functools.partial(_exited, pid), timeout=30)
    assert not mpefd_entries() - before, "names left after every holder exited"


class _RecordedWaits:
    """The janitor's condition, with every wait it makes recorded: its timeout, and the
    interval the watched name's schedule had then (None while that name is not pending)."""

    def __init__(self, janitor: _janitor.Janitor) -> None:
        self.janitor, self.cond = janitor, janitor.cond
        self.watched = ""
        self.waits: list[tuple[float | None, float | None]] = []

    def __enter__(self) -> bool:
        return self.cond.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.cond.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:  # notify, notify_all: the condition's own
        return getattr(self.cond, name)

    def wait(self, timeout: float | None = None) -> bool:
        p = self.janitor.pending.get(self.watched)  # (the lock is held)
        self.waits.append((timeout, None if p is None else p.interval))
        return self.cond.wait(timeout)


def test_a_new_pending_name_is_retested_on_its_own_schedule(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While one name stays rightly pending (a dup of its state fd kept here), the
    janitor's retests of it back off to 1 s; a second eventfd whose holder exits is still
    gone at its own next retest, 10 ms after its first (a shared back-off once made it wait
    up to 1 s).

    Counted, not timed.  Every retest is recorded with the interval its name's schedule
    had then, and the janitor is held inside the second name's first (failed) retest until
    the holder has exited, so the next one must remove it; every wait the janitor makes
    while the second name is pending is recorded too, and none may outlast that name's
    interval: from the holder's exit the janitor waited 10 ms at most, not the first name's
    second, before the retest that removed it."""
    janitor = _registry.current().janitor
    retests: list[tuple[str, float, bool]] = []  # name, its interval then, gone
    release = threading.Event()
    hold: list[str] = []  # the name whose first failed retest holds the janitor
    real_retest = _liveness.retest
    waits = _RecordedWaits(janitor)

    def recorded(name: str) -> bool:
        with janitor.cond:
            p = janitor.pending.get(name)
            interval = p.interval if p is not None else -1.0
        gone = real_retest(name)
        with janitor.cond:
            retests.append((name, interval, gone))
        if not gone and hold == [name]:
            hold.clear()
            release.wait(30)
        return gone

    def of(name: str) -> list[tuple[float, bool]]:
        with janitor.cond:
            return [(interval, gone) for n, interval, gone in retests if n == name]

    def intervals() -> list[float]:
        with janitor.cond:
            return [p.interval for p in janitor.pending.values()]

    monkeypatch.setattr(janitor, "cond", waits)
    monkeypatch.setattr(_liveness, "retest", recorded)
    first = EventFD(0)
    assert first._core is not None
    first_name = _registry.name_of(first._core)
    kept = os.dup(first.fds[0])  # an fd of the first eventfd stays: its names must stay
    try:
        first.close()
        wait_until(lambda: intervals() == [_janitor.LAST_RETEST])  # 5 ms, doubling to 1 s
        second = EventFD(0)
        second.set_inheritable(True)
        assert second._core is not None
        name = _registry.name_of(second._core)
        hold.append(name)
        waits.watched = name
        holder = subprocess.Popen(  # holds the fds, never attaches
            [sys.executable, "-c", "import sys; sys.stdin.read()"], pass_fds=second.fds,
            stdin=subprocess.PIPE)
        try:
            second.close()
            assert any(n.startswith(name) for n in mpefd_entries())  # pending: the child's
            wait_until(lambda: len(of(name)) == 1)  # its first retest failed: held there
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
            release.set()
        wait_until(lambda: len(of(name)) == 2)
        first_steps = _janitor.FIRST_RETEST, 2 * _janitor.FIRST_RETEST
        assert of(name) == [(first_steps[0], False), (first_steps[1], True)], of(name)
        assert not any(n.startswith(name) for n in mpefd_entries())
        with janitor.cond:
            longest = [(t, iv) for t, iv in waits.waits if iv is not None and
                       (t is None or t > iv + 1e-9)]
        assert not longest, f"waits (timeout, the second name's interval): {longest}"
        assert intervals() == [_janitor.LAST_RETEST]  # the first's, unchanged by the second
        assert any(n.startswith(first_name) for n in mpefd_entries())  # rightly still there
    finally:
        release.set()
        os.close(kept)
    deadline = time.monotonic() + 5
    while mpefd_entries() and time.monotonic() < deadline:  # (the first goes now too)
        time.sleep(0.01)


# A fresh interpreter: three eventfds whose fds a child each holds (never attached, so each
# name is left alone at our detach), all still open when it exits.
THREE_HELD = textwrap.dedent("""
    import subprocess, sys
    import mpeventfd as m
    from mpeventfd import _registry
    gate = int(sys.argv[1])
    kept = []
    for _ in range(3):
        e = m.EventFD(0)
        e.set_inheritable(True)
        holder = subprocess.Popen(
            [sys.executable, "-c", "import os, sys; os.read(int(sys.argv[1]), 1)",
             str(gate)], pass_fds=(*e.fds, gate), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)  # (our output's end comes with our exit)
        print(_registry.name_of(e._core), holder.pid, flush=True)
        kept.append(e)  # detached by the exit
    """)


def test_the_exit_sees_all_its_pending_names_through_at_once() -> None:
    """The exit's pass collects every name it could not remove and then hands them all to
    one reaper (after one shared wait for dying peers): once, each name added during the
    pass was seen through on its own, with a reaper (and a wait of up to a second) each."""
    before = mpefd_entries()
    gate_r, gate_w = os.pipe()
    holders: list[int] = []
    reapers: set[int] = set()
    try:
        try:
            out = python(THREE_HELD, str(gate_r), pass_fds=(gate_r,))
        finally:
            os.close(gate_r)
        assert out.returncode == 0, out.stderr
        lines = [line.split() for line in out.stdout.splitlines()]
        names = [name for name, _ in lines]
        holders = [int(pid) for _, pid in lines]
        assert len(names) == 3
        of_name = {name: _reapers_of(name) for name in names}  # (the holders keep them)
        reapers = {pid for pids in of_name.values() for pid in pids}
        assert len(reapers) == 1, of_name  # one reaper, not one per name
        assert all(len(p) == 1 for p in of_name.values()), of_name
        assert all(any(n.startswith(name) for n in mpefd_entries()) for name in names)
    finally:
        os.close(gate_w)  # the holders exit; then the reaper removes the names
        for pid in holders + sorted(reapers):
            wait_until(functools.partial(_exited, pid), timeout=30)
    assert not mpefd_entries() - before, "names left after every holder exited"
