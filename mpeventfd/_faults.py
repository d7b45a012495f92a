"""Test-only fault injection: act at a named step (crash, signal and limit tests).

Two kinds of steps, one interface:

* Steps inside the C sections and waits (``_core.STEPS``: ``write.commit``, ``wait.step``,
  ...).  The C code pays one predictable branch per step while unarmed.  Actions: ``kill``
  (SIGKILL this process: a death at that instruction), ``stop`` (SIGSTOP: a stopped
  holder), ``exit`` (``_exit(86)``), ``signal:N`` (raise signal N: its Python handler runs
  once the C call returns or checks for signals), ``block:FD`` (wait there until a byte
  arrives on fd FD, or it closes: a thread held inside a section).
* Steps of the Python lifecycle (``PY_STEPS``: creation, attach, detach).  Actions:
  ``kill``, ``stop``, ``exit``, ``raise`` (``KeyboardInterrupt``), ``errno:N``
  (``OSError(N)``), or a callable, called with the step name.

Only the test suite arms it: nothing reads the environment, so no production process can
be made to act on a fault by accident.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from . import _core

ARMED = False
_step = ""
_action: str | Callable[[str], None] = ""
_countdown = 0

PY_STEPS = (
    "create.file", "create.fallocate", "create.mmap", "create.pipe", "create.published",
    "create.sem_r", "create.sem_w", "create.lockfile",
    "attach.validated", "attach.sems",
    "detach.closed", "detach.unlinking",
)
C_STEPS: tuple[str, ...] = tuple(_core.STEPS)
STEPS = C_STEPS + PY_STEPS


def arm(step: str, action: str | Callable[[str], None], nth: int = 1) -> None:
    """Act with ``action`` the ``nth`` time ``step`` is reached in this process."""
    global ARMED, _step, _action, _countdown
    if step in C_STEPS:
        if not isinstance(action, str):
            raise ValueError("a step inside the C core takes kill, stop, exit, signal:N, block:FD")
        name, _, arg = action.partition(":")
        _core._arm(step, name, int(arg or 0), nth)
        return
    if step not in PY_STEPS:
        raise ValueError(f"unknown fault step {step!r}")
    _step, _action, _countdown = step, action, nth
    ARMED = True


def disarm() -> None:
    """Turn every hook off."""
    global ARMED
    ARMED = False
    _core._disarm()


def hit(step: str) -> None:
    """Called at a Python ``step`` (``if _faults.ARMED``); acts if armed for it."""
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
    elif action.startswith("errno:"):
        code = int(action.split(":", 1)[1])
        raise OSError(code, f"{os.strerror(code)} (fault injected at {step})")
    else:
        raise ValueError(f"unknown fault action {action!r}")
