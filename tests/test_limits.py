"""Resource limits: EMFILE at every step of construction, ENOSPC never SIGBUS."""

from __future__ import annotations

import errno
import functools
import os
import resource
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import fork_child, mpefd_entries, open_fds, reap
from mpeventfd import EventFD


def _construct_with_free_fds(free: int) -> int:
    """Child: leave exactly ``free`` fds available, construct, and classify the outcome."""
    names, fds = mpefd_entries(), open_fds()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(fds) + 64, hard))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        if e.errno != errno.EMFILE:
            return 5
    for _ in range(free + 1):
        os.close(filler.pop())
    before = open_fds()  # listing /proc/self/fd needs one fd itself
    spare = os.open("/dev/null", os.O_RDONLY)  # now exactly `free` fds are available
    try:
        efd = EventFD(1)
    except OSError as e:
        os.close(spare)
        if e.errno != errno.EMFILE:
            return 2
        leftover = open_fds() != before or mpefd_entries() != names
        return 3 if leftover else 10  # EMFILE, nothing left behind
    os.close(spare)
    for fd in filler:
        os.close(fd)
    ok = efd.read(timeout=1) == 1
    efd.close()
    return 11 if ok else 4


def test_emfile_at_every_step_of_construction() -> None:
    outcomes = []
    for free in range(10):
        outcomes.append(reap(fork_child(functools.partial(_construct_with_free_fds, free))))
        if outcomes[-1] == 11:
            break
    # Every short supply failed cleanly with EMFILE, and enough fds succeeded.
    assert outcomes[-1] == 11, outcomes
    assert set(outcomes[:-1]) == {10}, outcomes
    assert len(outcomes) >= 3  # construction needs several fds at once: each was exercised


FILL_AND_CREATE = textwrap.dedent(
    """
    import errno, os, sys
    sys.path.insert(0, sys.argv[1])
    from mpeventfd import EventFD
    fd = os.open("/dev/shm/filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    os.close(fd)
    try:
        EventFD()
    except OSError as e:
        print("errno", e.errno)
        sys.exit(0 if e.errno == errno.ENOSPC else 1)
    print("created")
    sys.exit(1)
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="mounting a tiny tmpfs over /dev/shm needs root and unshare(1)")
def test_dev_shm_full_gives_enospc_never_sigbus() -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (f"mount -t tmpfs -o size=64k tmpfs /dev/shm && "
              f"exec {sys.executable} -c '{FILL_AND_CREATE}' {repo}")
    try:
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                             capture_output=True, text=True, timeout=60)
    except OSError as e:  # pragma: no cover - a sandbox without mount namespaces
        pytest.skip(f"unshare is not usable here: {e}")
    if "Operation not permitted" in out.stderr:  # pragma: no cover
        pytest.skip(f"no permission for a private mount namespace: {out.stderr.strip()}")
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)  # 135 = SIGBUS
    assert "errno 28" in out.stdout
