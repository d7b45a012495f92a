"""Functions with the names and signatures of ``os.eventfd``, ``os.eventfd_read`` and
``os.eventfd_write``, so code written for the ``os`` module runs unchanged on mpeventfd.

One deliberate difference: like every call in mpeventfd, these follow PEP 475 (a signal
whose handler returns normally does not interrupt them), while the ``os`` functions raise
``InterruptedError`` (docs/linux-eventfd.md R46).
"""

from __future__ import annotations

import errno

from . import _registry
from ._errors import oserror
from ._eventfd import EFD_CLOEXEC, EventFD


def eventfd(initval: int = 0, flags: int = EFD_CLOEXEC) -> EventFD:
    """Create an eventfd; the same as ``EventFD(initval, flags)``.

    Unlike ``os.eventfd`` this returns an object, not an int; pass the object (or its
    ``fileno()``) to :func:`eventfd_read` and :func:`eventfd_write`.
    """
    return EventFD(initval, flags)


def eventfd_read(fd: EventFD | int) -> int:
    """Read an eventfd, given the object or the ``fileno()`` of a live one in this process.

    Raises:
        ValueError: ``fd`` is a negative int.
        OSError: ``EBADF`` if ``fd`` is not the ``fileno()`` of a live EventFD here.
    """
    return _resolve(fd).read()


def eventfd_write(fd: EventFD | int, value: int) -> None:
    """Add ``value`` to an eventfd, given the object or its ``fileno()``; see ``write``."""
    _resolve(fd).write(value)


def _resolve(fd: EventFD | int) -> EventFD:
    if isinstance(fd, EventFD):
        return fd
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"fd must be an EventFD or an int, not {type(fd).__name__}")
    if fd < 0:
        raise ValueError("file descriptor cannot be a negative integer")
    core = _registry.current().by_fileno.get(fd)
    if core is None or core.closed:
        raise oserror(errno.EBADF, f"fd {fd} is not the fileno() of a live EventFD")
    return EventFD._from_core(core, owner=False)
