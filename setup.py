"""Build mpeventfd's C core, probing the platform by compiling: the one place where it does.

Each probe is a small program that must compile *and link*.  Feature tests with ``#ifdef``
would fail silently on some of these: glibc's ``PTHREAD_MUTEX_ROBUST`` is an enum, not a
macro.  A found feature becomes a ``-DHAVE_...`` macro for ``mpeventfd/_core.c``; its
absence selects the portable path in the C file (the same paths that macOS takes).
Extra flags (a sanitizer build, say) come from the usual ``CFLAGS``/``LDFLAGS``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_HEADERS = """\
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <time.h>
"""

PROBES = {
    # A robust, process-shared pthread mutex (Linux, FreeBSD; not macOS, not OpenBSD).
    "HAVE_ROBUST_MUTEX": """
        pthread_mutexattr_t a; pthread_mutex_t m;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&m, &a);
        return pthread_mutex_consistent(&m);""",
    # Lock waits with a deadline on the monotonic clock (glibc >= 2.30).
    "HAVE_MUTEX_CLOCKLOCK": """
        pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER; struct timespec t = {0, 0};
        return pthread_mutex_clocklock(&m, CLOCK_MONOTONIC, &t);""",
    "HAVE_MUTEX_TIMEDLOCK": """
        pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER; struct timespec t = {0, 0};
        return pthread_mutex_timedlock(&m, &t);""",
    # Semaphore waits with a deadline: monotonic (glibc >= 2.30), else the wall clock
    # (POSIX), else none at all (macOS: trywait plus a back-off).
    "HAVE_SEM_CLOCKWAIT": """
        sem_t *s = sem_open("/x", 0); struct timespec t = {0, 0};
        return sem_clockwait(s, CLOCK_MONOTONIC, &t);""",
    "HAVE_SEM_TIMEDWAIT": """
        sem_t *s = sem_open("/x", 0); struct timespec t = {0, 0};
        return sem_timedwait(s, &t);""",
    # Byte-range locks that belong to an open file description (Linux >= 3.15).
    "HAVE_OFD_LOCKS": """
        struct flock f = {0}; return fcntl(0, F_OFD_SETLK, &f);""",
    # sem_getvalue works (macOS has the symbol but fails with ENOSYS; tests only).
    "HAVE_SEM_GETVALUE": """
        sem_t *s = sem_open("/x", 0); int v; return sem_getvalue(s, &v);""",
}

NO_COMPILER = """
mpeventfd builds a small C extension and needs a C compiler and the Python headers:
  Debian/Ubuntu: apt install gcc python3-dev      Fedora: dnf install gcc python3-devel
  macOS: xcode-select --install                  Alpine: apk add gcc musl-dev python3-dev
(or install a prebuilt wheel).  The compiler said: {error}
"""


class BuildExt(build_ext):
    """``build_ext`` that probes the platform first and explains a missing compiler."""

    def build_extensions(self) -> None:
        macros = self._probe()
        for ext in self.extensions:
            ext.define_macros += [(name, "1") for name in macros]
        super().build_extensions()

    def _probe(self) -> list[str]:
        cc = self.compiler
        tmp = tempfile.mkdtemp(prefix="mpefd-build-")
        found = []
        try:
            ok, error = self._try(cc, tmp, "compiler", "int main(void) { return 0; }")
            if not ok:
                raise SystemExit(NO_COMPILER.format(error=error))
            for name, body in PROBES.items():
                if self._try(cc, tmp, name, f"{_HEADERS}int main(void) {{{body}\n}}\n")[0]:
                    found.append(name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print("mpeventfd probes found:", ", ".join(found) or "nothing")
        return found

    @staticmethod
    def _try(cc: object, tmp: str, name: str, source: str) -> tuple[bool, str]:
        path = os.path.join(tmp, name + ".c")
        with open(path, "w") as f:
            f.write(source)
        try:
            objects = cc.compile([path], output_dir=tmp)  # type: ignore[attr-defined]
            # (link_executable ignores LDFLAGS, which a sanitizer build needs at link time)
            cc.link_executable(objects, name, output_dir=tmp,  # type: ignore[attr-defined]
                               libraries=["pthread"],
                               extra_postargs=os.environ.get("LDFLAGS", "").split())
        except Exception as e:  # CompileError, LinkError, or no compiler at all
            return False, str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        return True, ""


setup(
    ext_modules=[
        Extension(
            "mpeventfd._core",
            sources=["mpeventfd/_core.c"],
            extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            libraries=["pthread"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
