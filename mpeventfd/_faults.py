"""Test-only fault injection: act at a named step of an operation (issue 4).

Production code calls ``if _faults.ARMED: _faults.hit("write.commit")`` at every step where a
death or an exception matters.  ``ARMED`` is False unless a test arms the hook, so the cost
is one global load and a branch.

Arm it in-process with :func:`arm`, or for a child process before it imports mpeventfd with
the environment variable ``MPEVENTFD_FAULT="<step>=<action>[@<n>]"`` (act at the n-th hit,
default 1).  Actions:

``kill``       SIGKILL this process (a death at that instruction)
``stop``       SIGSTOP this process (a stopped, not dead, holder)
``exit``       ``os._exit(86)`` (no finalizers, like a multiprocessing fork child)
``raise``      raise ``KeyboardInterrupt`` (an exception from a signal handler)
``pause``      write the step name to the fd in ``MPEVENTFD_FAULT_FD`` and sleep 30 s
``errno:<n>``  raise ``OSError(n)`` (a failing system call)

In-process tests may also pass a callable as the action: it is called with the step name
(for example to block a thread inside a critical section until the test lets it go).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

ARMED = False
_step = ""
_action: str | Callable[[str], None] = ""
_countdown = 0

STEPS = (
    # write(): after the mutex, the dirty mark, the pipe byte, the commit, the posts.
    "write.locked", "write.dirty", "write.pipe", "write.commit", "write.posted",
    "write.before_unlock", "write.unlocked",
    # read(): the same, with the drain after the commit.
    "read.locked", "read.dirty", "read.commit", "read.drained", "read.posted",
    "read.before_unlock", "read.unlocked",
    # A blocked read()/write(): registration, the wait step, the accounting after it.
    "wait.registered", "wait.step", "wait.consumed", "wait.polled", "wait.accounted",
    # The fast mutex: after the ENTERING store, after the token is taken, after the post;
    # an elected prover, and a takeover of a dead holder's token.
    "mutex.entering", "mutex.taken", "mutex.posted", "recover.elected", "recover.takeover",
    # Repair of a dead holder's half-done update.
    "repair.start", "repair.slots", "repair.pipe", "repair.posted", "repair.done",
    # Construction, attach and detach.
    "create.file", "create.fallocate", "create.mmap", "create.pipe", "create.published",
    "create.sem_r", "create.sem_w", "create.sem_m", "create.lockfile",
    "attach.validated", "attach.sems", "attach.private", "attach.slot",
    "detach.closed", "detach.unlinking",
)


def arm(step: str, action: str | Callable[[str], None], nth: int = 1) -> None:
    """Act with ``action`` the ``nth`` time ``step`` is reached in this process."""
    global ARMED, _step, _action, _countdown
    if step not in STEPS:
        raise ValueError(f"unknown fault step {step!r}")
    _step, _action, _countdown = step, action, nth
    ARMED = True


def disarm() -> None:
    """Turn the hook off."""
    global ARMED
    ARMED = False


def hit(step: str) -> None:
    """Called at ``step``; acts if the hook is armed for it."""
    global _countdown
    if step != _step:
        return
    _countdown -= 1
    if _countdown:
        return
    disarm()
    _act(step, _action)


def _act(step: str, action: str | Callable[[str], None]) -> None:
    if callable(action):
        action(step)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "exit":
        os._exit(86)
    elif action == "raise":
        raise KeyboardInterrupt(f"fault injected at {step}")
    elif action == "pause":
        os.write(int(os.environ["MPEVENTFD_FAULT_FD"]), step.encode() + b"\n")
        time.sleep(30)
    elif action.startswith("errno:"):
        code = int(action.split(":", 1)[1])
        raise OSError(code, f"{os.strerror(code)} (fault injected at {step})")
    else:
        raise ValueError(f"unknown fault action {action!r}")


def _from_environment() -> None:
    spec = os.environ.get("MPEVENTFD_FAULT", "")
    if not spec:
        return
    step, _, action = spec.partition("=")
    action, _, nth = action.partition("@")
    arm(step, action, int(nth or 1))


_from_environment()
