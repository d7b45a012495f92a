"""Many threads of one process on shared handles, the GIL on or off (docs/design.md §7).

CI runs this file on the free-threaded build with the GIL off, and once more with the C core
built with ThreadSanitizer.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from helpers import forks_beside_threads, python
from mpeventfd import EFD_SEMAPHORE, EventFD, recv_eventfd, send_eventfd

THREADS = 8
SECONDS = 2.0


class Ledger:
    """What the threads did that changed the counter: every call that returned."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.written = self.read = self.closed = self.ebadf = self.forks = 0

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


def _another_handle(efd: EventFD) -> EventFD:
    """A second handle on the same eventfd in this process (as a receiver gets one)."""
    a, b = socket.socketpair()
    try:
        send_eventfd(a, efd)
        return recv_eventfd(b)
    finally:
        a.close()
        b.close()


async def _aread_briefly(efd: EventFD) -> int:
    try:
        return await asyncio.wait_for(efd.aread(), 0.005)
    except TimeoutError:
        return 0


def _worker(seed: int, handles: list[EventFD], guard: threading.Lock, ledger: Ledger,
            deadline: float) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        with guard:
            k = rng.randrange(len(handles))
            h = handles[k]
        what = rng.random()
        try:
            if what < 0.40:
                v = rng.randint(1, 3)
                h.write(v)
                ledger.add(written=v)
            elif what < 0.75:
                ledger.add(read=h.read(timeout=0))
            elif what < 0.80:
                h.peek()
            elif what < 0.88:
                ledger.add(read=asyncio.run(_aread_briefly(h)))
            elif what < 0.95:
                # Replace a handle: the old one closes under the other threads' calls.
                fresh = _another_handle(h)
                with guard:
                    old, handles[k] = handles[k], fresh
                old.close()
                ledger.add(closed=1)
            else:
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        h.write(5)
                    except OSError:
                        code = 9  # (closed by another thread before the fork: no write)
                    os._exit(code)
                status = os.waitpid(pid, 0)[1]
                if os.waitstatus_to_exitcode(status) == 0:
                    ledger.add(written=5, forks=1)
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
            ledger.add(ebadf=1)  # the handle was closed by another thread first


@forks_beside_threads
def test_threads_write_read_close_fork_and_aread_on_shared_handles() -> None:
    """8 threads for 2 s: every write that returned is counted once, every read too, a
    handle closed under other threads' calls only makes them fail with EBADF, and fork
    children and event loops of every thread work on the same eventfd."""
    efd = EventFD(0, EFD_SEMAPHORE)
    handles = [efd] + [_another_handle(efd) for _ in range(3)]
    guard = threading.Lock()
    ledger = Ledger()
    deadline = time.monotonic() + SECONDS
    threads = [threading.Thread(target=_worker, args=(seed, handles, guard, ledger, deadline))
               for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    left = handles[0].peek()
    for h in handles[1:]:
        h.close()
    handles[0].close()
    assert ledger.written - ledger.read == left
    assert ledger.closed > 0
    assert ledger.forks > 0


def test_the_core_keeps_the_gil_off() -> None:
    """mpeventfd._core declares Py_MOD_GIL_NOT_USED: on a free-threaded CPython, importing
    it leaves the GIL off (posix_ipc, which declares nothing, is replaced by a stand-in
    here, since its own import turns the GIL on unless PYTHON_GIL=0)."""
    if not hasattr(sys, "_is_gil_enabled") or "t" not in sys.abiflags:
        pytest.skip("not a free-threaded CPython")
    out = python(textwrap.dedent("""
        import sys, types
        stand_in = types.ModuleType("posix_ipc")
        stand_in.SEMAPHORE_TIMEOUT_SUPPORTED = True
        class ExistentialError(Exception): pass
        stand_in.ExistentialError = ExistentialError
        sys.modules["posix_ipc"] = stand_in
        import mpeventfd._core
        print(sys._is_gil_enabled())
        """), env={"PYTHON_GIL": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stderr
    assert "RuntimeWarning" not in out.stderr


def test_a_second_interpreter_is_refused_with_a_clear_error(tmp_path: object) -> None:
    """The C core keeps a process's state (fork generations, the cores a fork child walks):
    a sub-interpreter's import of it is refused with an ImportError that says so, never
    half-shared.  (posix_ipc is replaced by a stand-in: it refuses sub-interpreters too.)"""
    for name in ("_interpreters", "_xxsubinterpreters"):  # 3.13+, 3.12
        if importlib.util.find_spec(name):
            break
    else:
        pytest.skip("no sub-interpreters module in this CPython")
    result = os.path.join(str(tmp_path), "result")
    script = textwrap.dedent(f"""
        import sys, types
        sys.path[:0] = {sys.path!r}
        stand_in = types.ModuleType("posix_ipc")
        stand_in.SEMAPHORE_TIMEOUT_SUPPORTED = True
        class ExistentialError(Exception): pass
        stand_in.ExistentialError = ExistentialError
        sys.modules["posix_ipc"] = stand_in
        try:
            import mpeventfd._core
            text = "imported"
        except ImportError as e:
            text = "refused: " + str(e)
        with open({result!r}, "w") as f:
            f.write(text)
        """)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import mpeventfd
            import {name} as interpreters
            interp = interpreters.create()
            interpreters.run_string(interp, {script!r})
            """)],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with open(result) as f:
        text = f.read()
    assert text.startswith("refused:"), text
    assert "mpeventfd._core" in text, text
