"""Helpers for tests with real processes: bounded waits, always-reaped children."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

FORK = multiprocessing.get_context("fork")
TIMEOUT = 20.0


@contextlib.contextmanager
def reaped(*procs: BaseProcess) -> Iterator[None]:
    """Join every process on the way out; kill whatever is still alive after 5 s."""
    try:
        yield
    finally:
        deadline = time.monotonic() + 5
        for p in procs:
            if p.pid is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)


def start(target: Callable[..., Any], *args: Any, ctx: Any = FORK) -> BaseProcess:
    p: BaseProcess = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def finish(p: BaseProcess, timeout: float = TIMEOUT) -> int:
    """Join ``p`` within ``timeout`` and return its exit code (fail on a hang)."""
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join(5)
        raise AssertionError(f"{p} did not finish within {timeout} s")
    assert p.exitcode is not None
    return p.exitcode


def wait_readable(fd: int, timeout: float = TIMEOUT) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def fork_child(body: Callable[[], int | None]) -> int:
    """``os.fork`` a child that runs ``body`` and leaves through ``os._exit``."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body() or 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = TIMEOUT) -> int:
    """waitpid with a deadline; SIGKILL and fail if the child does not exit in time."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not exit within {timeout} s")
        time.sleep(0.005)


def python(code: str, *args: str, env: dict[str, str] | None = None,
           pass_fds: tuple[int, ...] = (), timeout: float = TIMEOUT,
           close_fds: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` to completion (fails the test on a hang)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=full_env, pass_fds=pass_fds,
        capture_output=True, text=True, timeout=timeout, close_fds=close_fds,
    )
