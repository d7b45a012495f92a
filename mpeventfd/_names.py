"""Names of the objects of one eventfd, derived from its random 128-bit id.

The id is encoded in base64url (22 characters), not hex: ``/mpefd-`` plus 22 characters plus
``-r`` is 31 bytes, the longest semaphore name macOS accepts (PSEMNAMLEN).
"""

from __future__ import annotations

import base64
import os
import re
import secrets

from ._probe import PLATFORM, SEM_NAME_MAX

PREFIX = "mpefd-"
NAME_RE = re.compile(r"[A-Za-z0-9_-]{22}")
# Every file that belongs to some eventfd in the state directory, by kind.
FILE_RE = re.compile(r"mpefd-([A-Za-z0-9_-]{22})(|\.lock|\.tmp)")
SEM_FILE_RE = re.compile(r"sem\.mpefd-([A-Za-z0-9_-]{22})-([rw])")


def new_id() -> bytes:
    """Return 16 unguessable bytes (``secrets``, not posix_ipc's ``rand()``)."""
    return secrets.token_bytes(16)


def encode(ident: bytes) -> str:
    """Return the 22-character name of an id."""
    return base64.urlsafe_b64encode(ident).rstrip(b"=").decode("ascii")


def state_path(name: str) -> str:
    """The state file (the shared memory)."""
    return os.path.join(PLATFORM.state_dir, PREFIX + name)


def temp_path(name: str) -> str:
    """Where a state file is built when the OS cannot build it unnamed."""
    return state_path(name) + ".tmp"


def lock_path(name: str) -> str:
    """The lock file of the portable backend."""
    return state_path(name) + ".lock"


def sem_name(name: str, kind: str) -> str:
    """The semaphore for blocked readers (``kind='r'``) or writers (``'w'``)."""
    full = f"/{PREFIX}{name}-{kind}"
    assert len(full.encode()) <= SEM_NAME_MAX
    return full


def sem_file(name: str, kind: str) -> str:
    """Where the OS shows that semaphore as a file, or ``""``."""
    if not PLATFORM.sem_dir:
        return ""
    return os.path.join(PLATFORM.sem_dir, f"sem.{PREFIX}{name}-{kind}")


def decode(name: str) -> bytes:
    """Return the id bytes of a 22-character name (``ValueError`` if it is not one)."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"not an mpeventfd id: {name!r}")
    return base64.urlsafe_b64decode(name + "==")
