"""exec: a ``subprocess`` child re-attaches to an eventfd with ``efd.handle``.

An eventfd is close-on-exec by default, like ``os.eventfd``.  To give it to an exec'd program,
make it inheritable, pass its fds with ``pass_fds=efd.fds`` and its ``handle`` (a short
string naming those fds) on the command line or in the environment; the child calls
``from_handle(handle)`` and has the same eventfd.  Here the child is this script again, run
with ``child HANDLE``: it writes to the eventfd and exits, and the parent reads the value.

Run it with ``python examples/exec_handle.py``; it prints the handle and what the parent read,
and exits 0 when that is what the child wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys

from mpeventfd import EventFD, from_handle

# Seconds, against a hang only: on a loaded machine a fresh interpreter has taken more
# than 30 s to start and run its few lines.
GUARD = 120.0

VALUE = 7


def child(handle: str) -> int:
    """The exec'd program: re-attach through the handle, write VALUE."""
    with from_handle(handle) as efd:
        efd.write(VALUE)
    return 0


def parent() -> int:
    with EventFD() as efd:
        efd.set_inheritable(True)  # only for the exec below; pass_fds picks which fds go
        try:
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "child", efd.handle],
                pass_fds=efd.fds,
                timeout=GUARD,
                check=False,
            )
        finally:
            efd.set_inheritable(False)
        got = efd.read(timeout=1)
        print(f"child re-attached with {efd.handle!r} and wrote {VALUE}; parent read {got}")
    return 0 if got == VALUE and done.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if argv[1:2] == ["child"]:
        return child(argv[2])
    return parent()


if __name__ == "__main__":
    raise SystemExit(main())
