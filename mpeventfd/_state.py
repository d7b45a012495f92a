"""Layout of the shared state file, and validation of a mapping before anyone trusts it.

The state file is an array of native, 8-byte aligned unsigned words.  Every word is read and
written through a ``memoryview`` cast to ``'Q'``, so each store is one aligned 8-byte
``memcpy``: a process killed mid-update leaves either the old or the new value, never a torn
one (``'<Q'`` would store byte by byte; SPEC §5.2).

=====  ============================================================================
word   meaning
=====  ============================================================================
0      magic (``MAGIC``)
1      layout version
2      file size in bytes
3-4    the 128-bit id (raw bytes)
5      EFD_SEMAPHORE (0/1), fixed at creation
6      shared non-blocking mode (0/1), the analogue of O_NONBLOCK on the one description
7      dirty: a holder may have died between two related updates; the next one repairs
8      the committed counter (0 .. MAX_VALUE)
9-12   wake-up accounting: W_r, P_r, W_w, P_w (registered waiters, unaccounted posts)
13-14  st_dev/st_ino of the notifier pipe (both ends share one inode)
15     repairs done (diagnostics)
16     number of slots; 17: slots ever claimed (high-water mark)
18     pid of the creator (diagnostics)
19-20  st_ino of the two semaphores where the OS shows them as files (else 0)
21-22  st_dev/st_ino of the lock file (portable backend only, else 0)
23-24  fast mutex: recovery request generation and the last one resolved (hints only)
25     the mutex backend: 0 = kernel byte lock, 1 = fast (semaphore, lock-protocol §4)
26     st_ino of the mutex semaphore where the OS shows it as a file (else 0)
27     scratch word (the kernel backend's release stores here; nobody reads it)
32-    slots, one per process that waits or takes the fast mutex: pid, w_r, w_w, and the
       process's mutex word ``seq << 8 | phase`` (phase IDLE, ENTERING or ASIDE)
=====  ============================================================================
"""

from __future__ import annotations

import mmap
import os
import sys

from ._errors import StateError

MAGIC = 0x3156_4446_4550_4D00  # b"\0MPEFDV1" read as a little-endian word
VERSION = 2  # 2: the kernel byte locks live on the notifier pipe (_lock)
MAX_VALUE = 2**64 - 2

W_MAGIC, W_VERSION, W_SIZE, W_ID = 0, 1, 2, 3
W_FLAGS, W_NONBLOCK, W_DIRTY, W_COUNTER = 5, 6, 7, 8
W_WR, W_PR, W_WW, W_PW = 9, 10, 11, 12
W_PIPE_DEV, W_PIPE_INO, W_EPOCH, W_NSLOTS, W_HWM, W_CREATOR = 13, 14, 15, 16, 17, 18
W_SEM_R_INO, W_SEM_W_INO, W_LOCK_DEV, W_LOCK_INO = 19, 20, 21, 22
W_REQ, W_RESOLVED, W_BACKEND, W_SEM_M_INO, W_SCRATCH = 23, 24, 25, 26, 27
HEADER_WORDS = 32
SLOT_WORDS = 4
S_PID, S_WR, S_WW, S_LOCK = 0, 1, 2, 3
# Phases of a slot's mutex word (lock-protocol §4, "§5'").
IDLE, ENTERING, ASIDE = 0, 1, 2
BACKEND_KERNEL, BACKEND_FAST = 0, 1
NSLOTS = 1024
SIZE = (HEADER_WORDS + NSLOTS * SLOT_WORDS) * 8  # 33,024 bytes: under SPEC §7 P8's 64 KiB
ID_BYTES = slice(W_ID * 8, W_ID * 8 + 16)

# Byte offsets of kernel locks.  They are lock ranges, not data: a byte-range lock may lie
# beyond the end of the file (fcntl(2)).  One mutex byte, then one liveness byte per slot.
MUTEX_BYTE = 0
ELECTION_BYTE = 1
LIVENESS_BASE = 4096


def slot_word(slot: int, field: int) -> int:
    """Return the word index of ``field`` in ``slot``."""
    return HEADER_WORDS + slot * SLOT_WORDS + field


class Mapping:
    """A shared mapping of a state file with its word view.

    ``words`` is the only way the library touches shared memory.  After a fork the child
    calls :meth:`renew`: the parent's view object is released in the child, so an operation
    that a fork interrupted inside its critical section raises instead of storing stale
    values (design-review S4).
    """

    __slots__ = ("mm", "words")

    def __init__(self, fd: int) -> None:
        flags, prot = mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        if sys.version_info >= (3, 13):
            # Before 3.13 the mmap object keeps a dup of the fd for resize(), one more fd
            # per process than SPEC §7 P8 allows; 3.13 lets it go (gh-78502).
            self.mm = mmap.mmap(fd, SIZE, flags, prot, trackfd=False)
        else:
            self.mm = mmap.mmap(fd, SIZE, flags, prot)
        self.words = memoryview(self.mm).cast("Q")

    def renew(self) -> None:
        """Replace the word view (fork child); the old view raises on any later use."""
        old = self.words
        self.words = memoryview(self.mm).cast("Q")
        old.release()

    def close(self) -> None:
        """Unmap.  Safe on a half-built object and idempotent."""
        self.words.release()
        self.mm.close()

    def ident(self) -> bytes:
        """Return the 16 raw id bytes."""
        return bytes(self.mm[ID_BYTES])


def initialise(
    m: Mapping, ident: bytes, semaphore: bool, nonblock: bool, initval: int, backend: int
) -> None:
    """Write a fresh header; the magic goes last, so a half-written header never validates."""
    w = m.words
    w[W_BACKEND] = backend
    m.mm[ID_BYTES] = ident
    w[W_VERSION] = VERSION
    w[W_SIZE] = SIZE
    w[W_FLAGS] = int(semaphore)
    w[W_NONBLOCK] = int(nonblock)
    w[W_COUNTER] = initval
    w[W_NSLOTS] = NSLOTS
    w[W_CREATOR] = os.getpid()
    w[W_MAGIC] = MAGIC


# (word, largest valid value) for every field a peer could have corrupted.
_BOUNDS = (
    (W_FLAGS, 1),
    (W_NONBLOCK, 1),
    (W_DIRTY, 1),
    (W_COUNTER, MAX_VALUE),
    (W_HWM, NSLOTS),
    (W_BACKEND, BACKEND_FAST),
)


def validate(m: Mapping, file_size: int) -> None:
    """Raise :class:`StateError` unless the mapping holds a header this version understands."""
    if file_size != SIZE:
        raise StateError(f"state file has {file_size} bytes, expected {SIZE}")
    w = m.words
    if w[W_MAGIC] != MAGIC:
        raise StateError("not an mpeventfd state file (bad magic)")
    if w[W_VERSION] != VERSION:
        raise StateError(f"state layout version {w[W_VERSION]} is not {VERSION}")
    if w[W_SIZE] != SIZE or w[W_NSLOTS] != NSLOTS:
        raise StateError("state header records a foreign size or slot count")
    for word, limit in _BOUNDS:
        if w[word] > limit:
            raise StateError(f"state header word {word} is out of range ({w[word]})")
