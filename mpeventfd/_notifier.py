"""The notifier pipe: its read end is ``fileno()``, readable exactly while the counter is > 0.

Both ends are ``O_NONBLOCK``.  The pipe holds one byte while the counter is > 0, never one
byte per write: a pipe holds about 64 KiB, and a writer must never block on it
(linux-eventfd-semantics C4).  The read end is shared with users, who may drain it or make it
blocking (``os.set_blocking`` acts on the one shared description); the library therefore
never trusts it to be non-blocking, and never blocks on it while holding the mutex
(design-review M3).
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import termios

from ._probe import PLATFORM

_BYTE = b"\x01"
SCRATCH_LEN = 4096
_SCRATCH = bytearray(SCRATCH_LEN)


def create() -> tuple[int, int]:
    """Create a non-blocking, close-on-exec pipe; return ``(read_end, write_end)``."""
    if PLATFORM.pipe2:
        return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # No pipe2 (macOS): os.pipe() already makes both ends non-inheritable (PEP 446).
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        os.set_blocking(w, False)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w


def signal_ready(w: int) -> None:
    """Make the read end readable.  A full pipe already is, so ``EAGAIN`` is success."""
    try:
        os.write(w, _BYTE)
    except BlockingIOError:
        pass


def drain(r: int) -> None:
    """Empty the pipe without ever blocking, even if a user made the read end blocking."""
    if PLATFORM.rwf_nowait:
        # RWF_NOWAIT is per call: EAGAIN on an empty pipe whatever O_NONBLOCK says (E11).
        while True:
            try:
                if os.preadv(r, [_SCRATCH], -1, os.RWF_NOWAIT) < len(_SCRATCH):
                    return
            except BlockingIOError:
                return
    # Portable: read only what FIONREAD promises is there, so read(2) cannot block.
    while (n := pending(r)) > 0:
        try:
            os.read(r, min(n, len(_SCRATCH)))
        except BlockingIOError:
            return


def drain_own(fd: int) -> None:
    """Empty the pipe through a description of our own that no user can make blocking.

    Plain reads until one comes back short: ``RWF_NOWAIT`` is refused (``EOPNOTSUPP``) on a
    pipe opened through ``/proc/self/fd``, and is not needed there.
    """
    while True:
        try:
            if len(os.read(fd, SCRATCH_LEN)) < SCRATCH_LEN:
                return
        except BlockingIOError:
            return


def pending(r: int) -> int:
    """Return how many bytes the pipe holds (``FIONREAD``)."""
    buf = array.array("i", [0])
    fcntl.ioctl(r, termios.FIONREAD, buf, True)
    return buf[0]


def wait_readable(r: int, seconds: float) -> bool:
    """Wait at most ``seconds`` for the read end to become readable.

    ``select``/``poll`` follow PEP 475: a handler that returns lets the wait go on, and a
    handler's exception propagates, so no signal needs masking here.  ``select`` cannot
    take fds above ``FD_SETSIZE`` (1024); ``poll`` can.
    """
    if r < 1024:
        return bool(select.select([r], (), (), seconds)[0])
    p = select.poll()
    p.register(r, select.POLLIN)
    return bool(p.poll(seconds * 1000))
