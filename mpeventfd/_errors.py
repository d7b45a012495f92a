"""Exceptions and errno helpers shared by every module."""

from __future__ import annotations

import errno
import os


class StateError(ValueError):
    """The shared state of an eventfd is corrupt, foreign, or of another layout version.

    Raised instead of ever touching memory outside the mapping or trusting a field that is
    out of range (docs/design.md, I14).  A subclass of :class:`ValueError` because the data, not the
    call, is wrong.
    """


def oserror(code: int, detail: str = "") -> OSError:
    """Build the ``OSError`` subclass Python itself would raise for ``code``.

    ``OSError(EAGAIN, ...)`` becomes ``BlockingIOError``, ``OSError(ETIMEDOUT, ...)``
    ``TimeoutError`` and so on, exactly like a failed system call.
    """
    message = os.strerror(code)
    if detail:
        message = f"{message}: {detail}"
    return OSError(code, message)


def closed_error() -> OSError:
    """The error every operation on a closed handle raises, as on a closed fd."""
    return oserror(errno.EBADF, "the EventFD is closed")
