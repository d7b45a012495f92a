"""Names that a detach could not remove go as soon as their last holder has (docs/design.md
§9): after a holder's death that let our last call finish, and on a retest schedule of
their own, never one that another name grew."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import mpefd_entries, python
from mpeventfd import EventFD, _janitor, _registry

# A fresh interpreter: an eventfd, and a 200 MB child looping on writes; the parent catches
# the child stopped inside its section (its lock held), has it killed 0.1 s later while its
# own last call waits for that lock, closes at once, and exits.  A large process takes
# milliseconds to close its files after its death has woken the waiter (exit_mm before
# exit_files): the parent's liveness test then still finds the child's fds.
DYING_HOLDER = textwrap.dedent("""
    import os, signal, sys, threading, time
    import mpeventfd as m
    e = m.EventFD(0 if sys.argv[1] == "write" else 5)  # (both final calls take the lock)
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


@pytest.mark.slow
@pytest.mark.parametrize("call", ["write", "read"])
@pytest.mark.parametrize("run", range(3))
def test_names_go_when_the_last_call_finished_because_a_holder_died(call: str,
                                                                   run: int) -> None:
    """The parent's last call finishes only because the holder died; it closes and exits
    at once.  The names go within 1 s of that exit (they once stayed in /dev/shm for good,
    in 4 of 6 runs, until a later sweep)."""
    before = mpefd_entries()
    out = python(DYING_HOLDER, call, timeout=60)
    assert out.returncode == 0, out.stderr
    exited = time.monotonic()
    while mpefd_entries() - before and time.monotonic() - exited < 1.0:
        time.sleep(0.01)
    assert not mpefd_entries() - before, "names left after every holder exited"


def test_a_new_pending_name_is_retested_on_its_own_schedule() -> None:
    """While one name stays rightly pending (a dup of its state fd kept here), the
    janitor's retests of it back off to 1 s; a second eventfd whose holder exits is still
    gone within 100 ms of that exit (a shared back-off once made it wait up to 1 s)."""
    first = EventFD(0)
    assert first._core is not None
    first_name = _registry.name_of(first._core)
    kept = os.dup(first.fds[0])  # an fd of the first eventfd stays: its names must stay
    try:
        first.close()
        janitor = _registry.current().janitor
        deadline = time.monotonic() + 10
        while True:  # its own schedule has grown to the full second
            with janitor.cond:
                grown = [p.interval for p in janitor.pending.values()]
            if grown == [_janitor.LAST_RETEST]:
                break
            assert time.monotonic() < deadline, "the first name never reached its last step"
            time.sleep(0.05)
        second = EventFD(0)
        second.set_inheritable(True)
        assert second._core is not None
        name = _registry.name_of(second._core)
        holder = subprocess.Popen(  # holds the fds, never attaches
            [sys.executable, "-c", "import sys; sys.stdin.read()"], pass_fds=second.fds,
            stdin=subprocess.PIPE)
        second.close()
        assert any(n.startswith(name) for n in mpefd_entries())  # pending: the child holds it
        time.sleep(0.05)  # (a moment: its own retests have begun)
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
        exited = time.monotonic()
        while any(n.startswith(name) for n in mpefd_entries()):
            assert time.monotonic() - exited < 0.1, "the second name waited out another's back-off"
            time.sleep(0.002)
        assert any(n.startswith(first_name) for n in mpefd_entries())  # rightly still there
    finally:
        os.close(kept)
    deadline = time.monotonic() + 5
    while mpefd_entries() and time.monotonic() < deadline:  # (the first goes now too)
        time.sleep(0.01)
