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
    code = textwrap.dedent(
        """
        import os, sys, time
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
        pid = os.fork()
        if pid == 0:
            efd.write(1, timeout=1.5)  # a blocked writer: it must poll, not spin
            os._exit(0)
        time.sleep(1.0)  # (measuring what waiting costs, not ordering anything)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        efd.read()
        os.waitpid(pid, 0)
        assert cpu < 0.2, cpu
        efd.close()
        print("ok")
        """
    )
    out = python(code, env=PORTABLE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout


def test_portable_recovery_from_a_killed_writer() -> None:
    code = textwrap.dedent(
        """
        import os, time
        from mpeventfd import EventFD, _faults
        efd = EventFD(0)
        reader = os.fork()
        if reader == 0:
            os._exit(0 if efd.read(timeout=5) == 1 else 1)
        pid = os.fork()
        if pid == 0:
            _faults.arm("write.commit", "kill")  # dies holding the lock, after the commit
            efd.write(1)
            os._exit(3)
        os.waitpid(pid, 0)
        t0 = time.monotonic()
        _, status = os.waitpid(reader, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert time.monotonic() - t0 < 1.0
        efd.close()
        print("ok")
        """
    )
    out = python(code, env=PORTABLE)
    assert out.returncode == 0, out.stdout + out.stderr


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
                                 timeout=30)
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
