"""The macOS/BSD code paths, forced on Linux with MPEVENTFD_PORTABLE=1, and lock kinds.

There the lock is a kernel byte lock with classic ``fcntl`` locks on a lock file, waits are
``trywait`` with a back-off (no timed semaphore wait), and names must fit macOS's 31 bytes.
Processes that would take an eventfd's lock in different ways must never share it.
"""

from __future__ import annotations

import sys
import textwrap

from helpers import python

PORTABLE = {"MPEVENTFD_PORTABLE": "1"}


def test_portable_paths_wait_without_a_busy_loop_and_use_short_names() -> None:
    """Without a timed semaphore wait a blocked call polls with a back-off: it must sleep.

    Measured on the blocked thread alone, over the call's own timeout (no sleep of the
    test's): its CPU time (``thread_time`` counts only the time it ran, never time spent
    in a run queue, so load does not inflate it) stays under 0.2 s for at least 1 s
    blocked, and every sleep it made (voluntary context switches, ``RUSAGE_THREAD``) was
    paid for by under 2 ms of CPU.  A correct poll costs a small fraction of that per
    sleep; a busy loop sleeps never and spends its whole share of a CPU, which on a loaded
    machine can stay under 0.2 s but never under 2 ms per sleep.
    """
    code = textwrap.dedent(
        """
        import os, resource, sys, time
        from mpeventfd import EventFD, MAX_VALUE, _core, _names
        from mpeventfd._probe import PLATFORM
        assert PLATFORM.portable and PLATFORM.poll_waits
        assert PLATFORM.carrier == _core.CARRIER_FILE and PLATFORM.mutex_kind == _core.MUTEX_BYTE
        efd = EventFD(0)
        name = efd.handle.split(":")[1]
        names = [_names.sem_name(name, k) for k in "rw"]
        assert all(len(n.encode()) <= 31 for n in names), names
        assert os.path.exists(_names.lock_path(name))
        efd.write(MAX_VALUE)

        def usage():  # this thread's CPU time and voluntary context switches (sleeps)
            return time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw

        t0, (cpu0, sleeps0) = time.monotonic(), usage()
        try:
            efd.write(1, timeout=1.0)  # a blocked writer: it must poll, not spin
        except TimeoutError:
            pass
        else:
            raise AssertionError("the write did not block")
        cpu1, sleeps1 = usage()
        cpu, sleeps = cpu1 - cpu0, sleeps1 - sleeps0
        assert time.monotonic() - t0 >= 0.95  # it did wait (a lower bound)
        assert cpu < 0.2, cpu
        assert cpu < 0.002 * max(sleeps, 1), (cpu, sleeps)
        assert efd.read() == MAX_VALUE
        efd.close()
        print("ok")
        """
    )
    out = python(code, env=PORTABLE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout


def test_portable_recovery_from_a_killed_writer() -> None:
    """A writer dies holding the byte lock after its commit, before its post: the reader
    blocked at 0 goes on at its first look after the death, within one wait step (100 ms
    in a main thread), and repairs.

    Ordered by the reader's registration; proved by the reader's counters, not a clock (a
    1 s wall-clock bound failed on a loaded machine): it read 1 before its own deadline,
    consumed no post, and took the lock after exactly one look, the first that could
    find the value (every earlier look found 0)."""
    code = textwrap.dedent(
        """
        import os, time
        from mpeventfd import EventFD, _faults
        efd = EventFD(0)
        r, w = os.pipe()
        reader = os.fork()
        if reader == 0:
            s0 = efd._core.stats()
            got = efd.read(timeout=5)
            s1 = efd._core.stats()
            os.write(w, f"{got} {s1['woken'] - s0['woken']} "
                        f"{s1['looks_locked'] - s0['looks_locked']}\\n".encode())
            os._exit(0)
        deadline = time.monotonic() + 10
        while efd._core.stats()["waiting_r"] != 1:  # the reader sleeps at 0
            assert time.monotonic() < deadline, "the reader never blocked"
            time.sleep(0.002)
        repairs = efd._core.stats()["repairs"]
        pid = os.fork()
        if pid == 0:
            _faults.arm("write.commit", "kill")  # dies holding the lock, after the commit
            efd.write(1)
            os._exit(3)
        os.waitpid(pid, 0)
        _, status = os.waitpid(reader, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        got, woken, looked = map(int, os.read(r, 100).split())
        assert got == 1  # before its own deadline
        assert woken == 0  # the post died with the writer
        assert looked == 1  # its first look after the death found the value
        assert efd._core.stats()["repairs"] == repairs + 1
        efd.close()
        print("ok")
        """
    )
    out = python(code, env=PORTABLE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout


ATTACH = textwrap.dedent(
    """
    import sys
    from mpeventfd import StateError, from_handle
    try:
        from_handle(sys.argv[1]).close()
        print("attached")
    except StateError as e:
        print("refused:", e)
    """
)


def _cross(creator: dict[str, str], attacher: dict[str, str]) -> str:
    """Create an eventfd in one process and attach to it from an exec'd child of it."""
    code = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from mpeventfd import EventFD
        env = dict(os.environ)
        env.pop("MPEVENTFD_PORTABLE", None)
        env.update({attacher!r})
        with EventFD(0, 0) as efd:
            out = subprocess.run([sys.executable, "-c", {ATTACH!r}, efd.handle],
                                 pass_fds=efd.fds, env=env, capture_output=True, text=True,
                                 timeout=100)  # (a hang guard, inside python()'s)
        print(out.stdout + out.stderr)
        """
    )
    out = python(code, env=creator)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_process_that_would_lock_another_way_refuses_to_attach() -> None:
    """A robust-mutex eventfd is refused by a process forced onto the macOS paths, and a
    lock-file eventfd by a Linux one: their locks would not exclude each other.  (Only
    the second direction was refused once.)"""
    native: dict[str, str] = {"MPEVENTFD_PORTABLE": "0"}
    got = _cross(native, PORTABLE)
    assert "refused:" in got, got
    assert "MPEVENTFD_PORTABLE" in got, got
    got = _cross(PORTABLE, native)
    assert "refused:" in got, got
    assert "lock file" in got, got
    assert "attached" in _cross(PORTABLE, PORTABLE)
    assert "attached" in _cross(native, native)
    assert sys.platform.startswith("linux")
