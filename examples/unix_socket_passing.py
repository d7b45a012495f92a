"""fd passing: hand an eventfd to an unrelated process over a Unix socket path.

The parent listens on a filesystem socket in a temporary directory and starts a fresh
interpreter (this script again, with ``client PATH``) that shares nothing with it: no fork,
no inherited fds.  The client connects, receives the eventfd with ``recv_eventfd()``, writes
to it and exits; the parent sends it with ``send_eventfd()`` (one ``sendmsg`` carrying the
fds as ``SCM_RIGHTS``) and reads what the client wrote.  The socket and its directory are
removed at the end.

Run it with ``python examples/unix_socket_passing.py``; it prints what the parent read and
exits 0 when that is what the client wrote.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

from mpeventfd import EventFD, recv_eventfd, send_eventfd

# Seconds, against a hang only: on a loaded machine a fresh interpreter has taken more
# than 30 s to start and run its few lines.
GUARD = 120.0

VALUE = 42


def client(path: str) -> int:
    """The unrelated process: connect, receive the eventfd, write VALUE, exit."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(GUARD)
        sock.connect(path)
        with recv_eventfd(sock) as efd:
            efd.write(VALUE)
    return 0


def server() -> int:
    with tempfile.TemporaryDirectory() as tmp, EventFD() as efd:
        path = os.path.join(tmp, "efd.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(1)
            listener.settimeout(GUARD)
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "client", path])
            try:
                conn, _ = listener.accept()
                with conn:
                    send_eventfd(conn, efd)
                got = efd.read(timeout=GUARD)
                code = proc.wait(timeout=GUARD)
            finally:
                if proc.poll() is None:  # only if something went wrong
                    proc.kill()
                    proc.wait()
    print(f"client (pid {proc.pid}) received the eventfd over {os.path.basename(path)} "
          f"and wrote {VALUE}; the server read {got}")
    return 0 if got == VALUE and code == 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if argv[1:2] == ["client"]:
        return client(argv[2])
    return server()


if __name__ == "__main__":
    raise SystemExit(main())
