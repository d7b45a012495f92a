"""mpeventfd: Linux eventfd semantics across processes, on any POSIX system.

A 64-bit counter in POSIX shared memory, POSIX named semaphores that wake blocked readers
and writers, a notifier pipe whose read end is ``fileno()``, and a mutex the kernel releases
when its holder dies.  ``README.md`` is the guide; ``docs/design.md`` explains the design.
"""

from __future__ import annotations

from ._errors import StateError
from ._eventfd import EFD_CLOEXEC, EFD_NONBLOCK, EFD_SEMAPHORE, MAX_VALUE, EventFD
from ._osfuncs import eventfd, eventfd_read, eventfd_write
from ._transfer import from_handle, recv_eventfd, send_eventfd

__all__ = (
    "EFD_CLOEXEC",
    "EFD_NONBLOCK",
    "EFD_SEMAPHORE",
    "MAX_VALUE",
    "EventFD",
    "StateError",
    "eventfd",
    "eventfd_read",
    "eventfd_write",
    "from_handle",
    "recv_eventfd",
    "send_eventfd",
)

__version__ = "0.2.0"

for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, int):
        _obj.__module__ = __name__
del _name, _obj
