"""Command line: ``python -m mpeventfd {demo,bench,ls,cleanup,reap}``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; return the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mpeventfd",
        description="Linux eventfd semantics across processes, on any POSIX system.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    sub.add_parser("demo", help="a short tour: processes signalling through one eventfd")
    bench = sub.add_parser("bench", help="measure against os.eventfd, os.pipe and multiprocessing")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions (for CI)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="draw the ratios (needs matplotlib)")
    bench.add_argument("--only", metavar="IDS", help="comma-separated workloads, e.g. P1,P3")
    sub.add_parser("ls", help="list this user's eventfds: id, counter, flags, pids holding it")
    cleanup = sub.add_parser("cleanup", help="remove eventfds no process holds any more")
    cleanup.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    reap = sub.add_parser("reap", help="wait for the last holder of an eventfd, then remove it "
                          "(started by mpeventfd itself)")
    reap.add_argument("names", nargs="+", metavar="name", help="an eventfd's 22-character id")
    args = parser.parse_args(argv)

    if args.command == "reap":
        import threading

        from . import _liveness, _names

        for name in args.names:
            _names.decode(name)  # (well-formed ids, nothing else)
        # One waiter per name: each wait ends when that eventfd's last fd closes.
        done: list[bool] = []
        waiters = [threading.Thread(target=lambda n=name: done.append(_liveness.reap_when_free(n)))
                   for name in args.names]
        for t in waiters:
            t.start()
        for t in waiters:
            t.join()
        return 0 if all(done) and len(done) == len(args.names) else 1

    if args.command == "demo":
        from ._cli.demo import run

        return run()
    if args.command == "bench":
        from ._cli.bench import run as bench_run

        return bench_run(quick=args.quick, json_path=args.json, plot_path=args.plot,
                         only=args.only)
    from ._cli.tools import cleanup_command, ls_command

    if args.command == "ls":
        return ls_command(sys.stdout)
    return cleanup_command(sys.stdout, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
