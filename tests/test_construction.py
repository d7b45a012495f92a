"""Construction fails cleanly at every step: the error propagates, nothing is left behind."""

from __future__ import annotations

import errno
import os

import pytest

from helpers import mpefd_entries, open_fds
from mpeventfd import EventFD, _core, _faults
from mpeventfd._probe import PLATFORM

# The steps this configuration goes through: the lock file only where the byte locks live
# on one (no OFD locks).
CREATE_STEPS = [
    s for s in _faults.PY_STEPS if s.startswith("create.")
    and (s != "create.lockfile" or PLATFORM.carrier == _core.CARRIER_FILE)
]


@pytest.mark.parametrize("step", CREATE_STEPS)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EMFILE])
def test_failure_after_each_construction_step_leaves_nothing(step: str, code: int) -> None:
    names, fds = mpefd_entries(), open_fds()
    _faults.arm(step, f"errno:{code}")
    try:
        with pytest.raises(OSError) as info:
            EventFD(3)
    finally:
        _faults.disarm()
    assert info.value.errno == code
    assert mpefd_entries() == names
    assert open_fds() == fds


@pytest.mark.parametrize("step", CREATE_STEPS)
def test_keyboardinterrupt_at_each_construction_step_leaves_nothing(step: str) -> None:
    names, fds = mpefd_entries(), open_fds()
    _faults.arm(step, "raise")
    try:
        with pytest.raises(KeyboardInterrupt):
            EventFD()
    finally:
        _faults.disarm()
    assert mpefd_entries() == names
    assert open_fds() == fds


@pytest.mark.skipif(not PLATFORM.fallocate, reason="this path sizes by writing zeros")
def test_real_fallocate_failure_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    names = mpefd_entries()
    with pytest.raises(OSError) as info:
        EventFD()
    assert info.value.errno == errno.ENOSPC
    assert mpefd_entries() == names


@pytest.mark.skipif(not PLATFORM.pipe2, reason="this path has no pipe2")
def test_real_pipe_failure_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fds(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pipe2", no_fds)
    names = mpefd_entries()
    with pytest.raises(OSError) as info:
        EventFD()
    assert info.value.errno == errno.EMFILE
    assert mpefd_entries() == names


def test_many_create_close_cycles_leave_nothing() -> None:
    names, fds = mpefd_entries(), open_fds()
    for i in range(300):
        with EventFD(i % 3) as efd:
            efd.write(1)
    assert mpefd_entries() == names
    assert open_fds() == fds
