"""Moving an eventfd to another process: multiprocessing, ``SCM_RIGHTS`` and exec handles.

An eventfd travels as its three fds (state file, pipe read end, pipe write end).  The state
fd's open file description carries the presence lock, so the eventfd lives while any copy
exists anywhere, also inside a socket message in flight (SPEC §3, §4; R3).  Every receiving
path makes the fds non-inheritable at once (design-review L3): Python 3.11's
``socket.recv_fds`` and ``multiprocessing.reduction.recvfds`` ignore ``MSG_CMSG_CLOEXEC``
and return inheritable fds, so ``recvmsg`` is called directly.
"""

from __future__ import annotations

import array
import os
import re
import socket
import struct
from multiprocessing import reduction
from typing import Any

from . import _lifecycle, _names
from ._errors import StateError
from ._eventfd import EventFD
from ._probe import PLATFORM

MSG_MAGIC = b"MPEFDMSG"
MSG_VERSION = 1
NFDS = 3
# magic, version, number of fds, the 16-byte id: network order, so any peer can parse it.
_HEADER = struct.Struct("!8sHH16s")
# Room for more fds than we expect, so a sender that attached extra ones is noticed (and
# its fds closed) rather than truncated silently.
_MAX_FDS = 16
_HANDLE = re.compile(r"mpefd1:([A-Za-z0-9_-]{22}):(\d{1,10}):(\d{1,10}):(\d{1,10})")


# -- multiprocessing ------------------------------------------------------------------------


def _reduce(efd: EventFD) -> tuple[Any, tuple[Any, ...]]:
    """Pickle for multiprocessing: the fds travel as ``DupFd`` (SPEC §3).

    Under a spawning ``Popen`` the fds go to the child with its other inherited fds; between
    live processes (``Queue``, ``Pipe``, ``Pool``) the resource sharer sends them over
    ``SCM_RIGHTS`` when the receiver unpickles.
    """
    core = efd._live()
    dups = [reduction.DupFd(fd) for fd in (core.state_fd, core.rfd, core.wfd)]
    return _rebuild, (MSG_VERSION, core.ident, *dups)


def _rebuild(version: int, ident: bytes, *dups: Any) -> EventFD:
    if version != MSG_VERSION or len(dups) != NFDS:
        raise StateError(f"pickled EventFD of an unknown format (version {version})")
    fds: list[int] = []
    try:
        for dup in dups:
            fds.append(dup.detach())  # noqa: PERF401 (one at a time: undo on failure)
        for fd in fds:
            os.set_inheritable(fd, False)
    except BaseException:
        _close_all(fds)
        raise
    core = _lifecycle.attach(fds[0], fds[1], fds[2], expect=ident)
    return EventFD._from_core(core)


reduction.register(EventFD, _reduce)


# -- SCM_RIGHTS -----------------------------------------------------------------------------


def send_eventfd(sock: socket.socket, efd: EventFD) -> None:
    """Send an eventfd over a connected ``AF_UNIX`` socket in one ``sendmsg``.

    The receiver calls :func:`recv_eventfd`.  Once this returns, the sender may close its
    handle, or exit: the message in flight keeps the eventfd alive, as it would a kernel
    eventfd.

    Raises:
        TypeError: ``sock`` is not a socket or ``efd`` not an EventFD.
        ValueError: ``sock`` is not an ``AF_UNIX`` socket.
        OSError: ``EBADF`` if ``efd`` is closed; errors of ``sendmsg``.
    """
    _check_socket(sock)
    if not isinstance(efd, EventFD):
        raise TypeError(f"efd must be an EventFD, not {type(efd).__name__}")
    core = efd._live()
    header = _HEADER.pack(MSG_MAGIC, MSG_VERSION, NFDS, core.ident)
    rights = array.array("i", (core.state_fd, core.rfd, core.wfd)).tobytes()
    sent = sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    if sent < len(header):
        sock.sendall(header[sent:])  # a stream socket may take the bytes in pieces


def recv_eventfd(sock: socket.socket) -> EventFD:
    """Receive an eventfd sent by :func:`send_eventfd`; its fds are non-inheritable.

    Raises:
        EOFError: the peer closed the connection first.
        ValueError: a malformed message (wrong magic, version or fd count, truncated
            control data, fds that are not an mpeventfd's); every fd received is closed.
        OSError: errors of ``recvmsg``; a name removed from outside.
    """
    _check_socket(sock)
    stream = sock.type == socket.SOCK_STREAM
    want = _HEADER.size if stream else _HEADER.size + 1
    msg, ancdata, flags, _ = sock.recvmsg(
        want, socket.CMSG_SPACE(_MAX_FDS * 4), PLATFORM.cmsg_cloexec
    )
    fds = _collect_fds(ancdata)
    try:
        if not PLATFORM.cmsg_cloexec:
            for fd in fds:
                os.set_inheritable(fd, False)
        if flags & socket.MSG_CTRUNC:
            raise StateError("control data was truncated: the message carried too many fds")
        if not msg and not fds:
            if sock.type == socket.SOCK_DGRAM:
                raise StateError("empty datagram: not an mpeventfd message")
            raise EOFError("the peer closed the connection before sending an eventfd")
        if stream:
            msg += _recv_exact(sock, _HEADER.size - len(msg))
        ident = _parse_header(msg, len(fds))
    except BaseException:
        _close_all(fds)
        raise
    core = _lifecycle.attach(fds[0], fds[1], fds[2], expect=ident)
    return EventFD._from_core(core)


def _check_socket(sock: object) -> None:
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    if sock.family != socket.AF_UNIX:
        raise ValueError("eventfds travel over AF_UNIX sockets only (SCM_RIGHTS)")


def _collect_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
    return fds


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise StateError("the message ended inside its header")
        data += chunk
    return data


def _parse_header(msg: bytes, nfds: int) -> bytes:
    if len(msg) != _HEADER.size:
        raise StateError(f"message of {len(msg)} bytes is not an mpeventfd header")
    magic, version, count, ident = _HEADER.unpack(msg)
    if magic != MSG_MAGIC:
        raise StateError("not an mpeventfd message (bad magic)")
    if version != MSG_VERSION:
        raise StateError(f"mpeventfd message version {version} is not {MSG_VERSION}")
    if count != NFDS or nfds != NFDS:
        raise StateError(f"message carries {nfds} fds (header says {count}), expected {NFDS}")
    return bytes(ident)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- exec -----------------------------------------------------------------------------------


def from_handle(handle: str) -> EventFD:
    """Re-attach, in an exec'd child, to the eventfd whose ``handle`` the parent passed.

    The child must have inherited the fds (``Popen(..., pass_fds=efd.fds)`` with
    ``EFD_CLOEXEC`` off or ``set_inheritable(True)``).  The handle is untrusted input:
    anything malformed, forged, or naming fds that are not that eventfd's raises
    ``ValueError`` and touches nothing.  On success the handle takes over those fds and
    makes them non-inheritable.

    Raises:
        TypeError: ``handle`` is not a str.
        ValueError: malformed or forged handle (:class:`StateError` for forged fds).
        OSError: a name of the eventfd was removed from outside.
    """
    if not isinstance(handle, str):
        raise TypeError(f"handle must be a str, not {type(handle).__name__}")
    m = _HANDLE.fullmatch(handle)
    if m is None:
        raise ValueError("not an mpeventfd handle")
    fds = [int(x) for x in m.group(2, 3, 4)]
    if max(fds) > 2**31 - 1:
        raise ValueError("fd number out of range in handle")
    ident = _names.decode(m.group(1))
    core = _lifecycle.attach(fds[0], fds[1], fds[2], expect=ident, own=False)
    efd = EventFD._from_core(core)
    efd.set_inheritable(False)
    return efd
