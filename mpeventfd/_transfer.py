"""Moving an eventfd to another process: multiprocessing, ``SCM_RIGHTS`` and exec handles.

An eventfd travels as its three fds (state file, pipe read end, pipe write end).  The state
fd's open file description carries the presence lock, so the eventfd lives while any copy
exists anywhere, also inside a socket message in flight (docs/design.md §9, §10).  Every receiving
path makes the fds non-inheritable at once: Python 3.11's
``socket.recv_fds`` and ``multiprocessing.reduction.recvfds`` ignore ``MSG_CMSG_CLOEXEC``
and return inheritable fds, so ``recvmsg`` is called directly.
"""

from __future__ import annotations

import array
import os
import re
import select
import socket
import struct
import time
from multiprocessing import reduction
from typing import Any

from . import _attach, _names
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
_CMSG_ROOM = socket.CMSG_SPACE(_MAX_FDS * 4)
_START = 10  # magic and version: what must arrive with the fds
# How long recv_eventfd waits for the rest of a split header on a blocking socket that has
# no timeout of its own (a socket's timeout, when set, is the bound instead).
REST_TIMEOUT = 1.0
_HANDLE = re.compile(r"mpefd1:([A-Za-z0-9_-]{22}):(\d{1,10}):(\d{1,10}):(\d{1,10})")


# -- multiprocessing ------------------------------------------------------------------------


def _reduce(efd: EventFD) -> tuple[Any, tuple[Any, ...]]:
    """Pickle for multiprocessing: the fds travel as ``DupFd`` (docs/design.md §10).

    Under a spawning ``Popen`` the fds go to the child with its other inherited fds; between
    live processes (``Queue``, ``Pipe``, ``Pool``) the resource sharer sends them over
    ``SCM_RIGHTS`` when the receiver unpickles.
    """
    core = efd._live()
    core.arm()  # the fds go to a process that may poll them
    dups = [reduction.DupFd(fd) for fd in core.fds]
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
    core = _attach.attach(fds[0], fds[1], fds[2], expect=ident)
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
    core.arm()
    header = _HEADER.pack(MSG_MAGIC, MSG_VERSION, NFDS, core.ident)
    rights = array.array("i", core.fds).tobytes()
    sent = sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    if sent < len(header):
        sock.sendall(header[sent:])  # a stream socket may take the bytes in pieces


def recv_eventfd(sock: socket.socket) -> EventFD:
    """Receive an eventfd sent by :func:`send_eventfd`; its fds are non-inheritable.

    The message is untrusted.  Its fds arrive with its first bytes, which must hold the
    magic and version: anything else is refused at once.  If a stream socket delivers the
    rest of the header separately, the call waits for it only as long as the socket's
    timeout allows (:data:`REST_TIMEOUT` on a blocking socket without one, not at all on a
    non-blocking one).  Every fd the message brought is closed on every error.

    Raises:
        EOFError: the peer closed the connection before sending anything.
        ValueError: a malformed message (wrong magic, version or fd count, too short or
            incomplete in time, truncated control data, fds that are not an mpeventfd's).
        OSError: ``EMFILE``/``ENFILE`` if this process could not take the fds; errors of
            ``recvmsg``; a name removed from outside.
    """
    _check_socket(sock)
    stream = sock.type == socket.SOCK_STREAM
    want = _HEADER.size if stream else _HEADER.size + 1
    msg, ancdata, flags, _ = sock.recvmsg(want, _CMSG_ROOM, PLATFORM.cmsg_cloexec)
    fds = _collect_fds(ancdata)
    try:
        if not PLATFORM.cmsg_cloexec:  # (no MSG_CMSG_CLOEXEC: close the window at once)
            for fd in fds:
                os.set_inheritable(fd, False)
        if not msg and not fds:
            if sock.type == socket.SOCK_DGRAM:
                raise StateError("empty datagram: not an mpeventfd message")
            raise EOFError("the peer closed the connection before sending an eventfd")
        if flags & socket.MSG_CTRUNC:
            _explain_truncation(msg, len(fds), sock)
        if flags & socket.MSG_TRUNC:
            raise StateError("the message is longer than an mpeventfd header")
        _check_start(msg, len(fds))
        if stream and len(msg) < _HEADER.size:
            msg += _recv_rest(sock, _HEADER.size - len(msg), fds)
        ident = _parse_header(msg, len(fds))
    except BaseException:
        _close_all(fds)
        raise
    core = _attach.attach(fds[0], fds[1], fds[2], expect=ident)
    return EventFD._from_core(core)


def _check_start(msg: bytes, nfds: int) -> None:
    """Refuse at once what the first bytes and their fds already show is not ours.

    ``send_eventfd`` sends the whole header and the fds in one ``sendmsg``, so the magic
    and version always arrive with the fds.
    """
    if len(msg) < _START:
        raise StateError(f"a message of {len(msg)} bytes is too short to be an mpeventfd one")
    magic, version = struct.unpack_from("!8sH", msg)
    if magic != MSG_MAGIC:
        raise StateError("not an mpeventfd message (bad magic)")
    if version != MSG_VERSION:
        raise StateError(f"mpeventfd message version {version} is not {MSG_VERSION}")
    if nfds != NFDS:
        raise StateError(f"message carries {nfds} fds, expected {NFDS}")


def _recv_rest(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    """The rest of a header split by a stream socket, within the socket's own timeout.

    Never waits on a non-blocking socket; fds that come with the rest join ``fds`` (so
    they are counted, and closed on failure).
    """
    timeout = sock.gettimeout()
    if timeout == 0.0:
        raise StateError("the message arrived incomplete on a non-blocking socket")
    limit = REST_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + limit
    data = b""
    while len(data) < n:
        if not _readable(sock.fileno(), deadline - time.monotonic()):
            raise StateError(f"the rest of the message did not arrive within {limit:g} s")
        chunk, ancdata, _, _ = sock.recvmsg(n - len(data), _CMSG_ROOM,
                                            PLATFORM.cmsg_cloexec | socket.MSG_DONTWAIT)
        more = _collect_fds(ancdata)
        fds += more
        if not PLATFORM.cmsg_cloexec:
            for fd in more:
                os.set_inheritable(fd, False)
        if not chunk:
            raise StateError("the peer closed the connection inside the message")
        data += chunk
    return data


def _readable(fd: int, seconds: float) -> bool:
    if seconds <= 0:
        return False
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(seconds * 1000))


def _explain_truncation(msg: bytes, nfds: int, sock: socket.socket) -> None:
    """``MSG_CTRUNC``: the kernel dropped fds.  Our fault (out of fds) or the peer's?

    A receiver at its ``RLIMIT_NOFILE`` gets fewer fds than the header announces; a
    peer that sent more fds than there is room for fills the room.  Probing with one
    more fd while the received ones are still open tells the two apart.
    """
    if nfds < NFDS:
        try:
            os.close(os.dup(sock.fileno()))
        except OSError as e:
            raise OSError(e.errno, f"{os.strerror(e.errno or 0)}: the kernel dropped the "
                          "fds of an incoming eventfd: this process is out of fds") from None
    raise StateError("control data was truncated: the message carried more fds than an "
                     "eventfd has")


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


def _parse_header(msg: bytes, nfds: int) -> bytes:
    """The id from a whole header whose start ``_check_start`` has accepted."""
    if len(msg) != _HEADER.size:
        raise StateError(f"message of {len(msg)} bytes is not an mpeventfd header")
    _, _, count, ident = _HEADER.unpack(msg)
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
    core = _attach.attach(fds[0], fds[1], fds[2], expect=ident, own=False)
    efd = EventFD._from_core(core)
    efd.set_inheritable(False)
    core.arm()  # a handle's fds were inheritable: whoever else holds them may poll
    return efd
