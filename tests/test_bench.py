"""``python -m mpeventfd bench`` runs and reports what it claims to (never a timed test).

CI runs the quick benchmark for information only, so a bug in it would go unnoticed: this
runs a few workloads with their quick sizes and checks the report's structure and its
arithmetic, not any ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mpeventfd._cli.bench import BEST, MEDIAN, SIZES, Result

ROOT = Path(__file__).resolve().parent.parent


def test_ratio_of_best_is_best_over_best() -> None:
    res = Result("X", "t", "µs", "", samples={"mpeventfd": [3.0, 2.0, 9.0],
                                               "os.eventfd": [1.0, 0.5, 0.9]}, stat=BEST)
    assert res.values == {"mpeventfd": 2.0, "os.eventfd": 0.5}
    assert res.ratio_of("mpeventfd", "os.eventfd") == 4.0


def test_ratio_of_medians_pairs_the_repetitions() -> None:
    # Each repetition of mpeventfd ran right beside the matching one of the baseline: a slow
    # phase of the machine (the third pair) slows both, and the pairing cancels it.
    res = Result("X", "t", "µs", "", samples={"mpeventfd": [2.0, 2.2, 8.0],
                                               "os.eventfd": [1.0, 1.0, 4.1]})
    assert res.stat == MEDIAN
    assert res.values["mpeventfd"] == 2.2
    assert res.ratio_of("mpeventfd", "os.eventfd") == statistics.median([2.0, 2.2, 8.0 / 4.1])


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="the baselines need os.eventfd")
def test_quick_bench_reports_every_chosen_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "mpeventfd", "bench", "--quick", "--only", "P2,P7,P8,C",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    results = {r["id"]: r for r in report["results"]}
    assert list(results) == ["P2", "P7", "P8", "C"]
    p2 = results["P2"]
    reps = SIZES["P2"][1][0]
    assert set(p2["samples"]) - {"iceoryx2"} == {"mpeventfd", "os.eventfd", "os.pipe"}
    assert all(len(s) == reps for s in p2["samples"].values())
    assert p2["stat"] == BEST
    assert p2["values"]["mpeventfd"] == min(p2["samples"]["mpeventfd"])
    assert p2["ratio"] == pytest.approx(p2["values"]["mpeventfd"] / p2["values"]["os.eventfd"])
    assert p2["verdict"] in ("PASS", "MISS")
    assert results["C"]["verdict"] == "INFO"
    assert results["P8"]["values"]["fds that travel"] == 3
    for wid in ("P2", "P7", "C"):
        assert f"  {wid}: " in done.stdout


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="the baselines need os.eventfd")
def test_p9_judges_every_row_of_every_n(monkeypatch: pytest.MonkeyPatch) -> None:
    """P9 runs both kinds at each N and reports idle CPU, hand-off p99 and CPU per token,
    each with its own verdict (a small N here: the row's arithmetic, not its figures)."""
    from mpeventfd._cli import bench as _bench

    monkeypatch.setattr(_bench, "SCALE_N", (4,))
    monkeypatch.setattr(_bench, "IDLE_TARGET", {4: 0.02})
    monkeypatch.setattr(_bench, "_quick", True)
    res = _bench.p9(2, 20)
    assert [r.id for r in res.tail] == ["P9 idle N=4", "P9 p99 N=4", "P9 CPU N=4"]
    idle, p99, cpu = res.tail
    assert all(len(s) == 2 for r in res.tail for s in r.samples.values())
    assert idle.unit == "cores"
    assert idle.verdict == ("PASS" if idle.values["mpeventfd"] <= 0.02 else "MISS")
    assert p99.ratio == pytest.approx(p99.ratio_of("mpeventfd", "os.eventfd"))
    assert cpu.verdict == "INFO"
    assert res.verdict == ("MISS" if "MISS" in (idle.verdict, p99.verdict) else "PASS")


def _bench(args: list[str], prelude: str = "") -> tuple[int, str, str, int]:
    """Run the command line in a fresh interpreter: (status, stdout, stderr, its pid)."""
    code = f"{prelude}import sys\nfrom mpeventfd.__main__ import main\nsys.exit(main({args!r}))"
    with subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, proc.pid


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="the baselines need os.eventfd")
def test_iceoryx2_runs_beside_mpeventfd_where_its_api_fits_and_leaves_nothing(
        tmp_path: Path) -> None:
    pytest.importorskip("iceoryx2", reason="the peers extra is not installed")
    from mpeventfd._cli.peers import prefix

    out = tmp_path / "bench.json"
    status, _, err, pid = _bench(["bench", "--quick", "--only", "P1,P2,P3,P4", "--json",
                                  str(out)])
    assert status == 0, err
    report = json.loads(out.read_text())
    assert report["machine"]["iceoryx2"] not in ("not installed", "?")
    results = {r["id"]: r for r in report["results"]}
    for wid in ("P1", "P2", "P3"):
        samples = results[wid]["samples"]["iceoryx2"]
        assert len(samples) == SIZES[wid][1][0]
        assert all(s > 0 for s in samples)
        assert "x iceoryx2" in results[wid]["note"]
    assert "iceoryx2" not in results["P4"]["samples"]  # (not a counting event: peers.py)
    # Everything it made lived under a private root and prefix, removed after each run.
    left = [os.path.join(d, e) for d in {tempfile.gettempdir(), "/tmp"} for e in os.listdir(d)
            if e.startswith(prefix(pid))]
    if os.path.isdir("/dev/shm"):
        left += [e for e in os.listdir("/dev/shm") if e.startswith(prefix(pid))]
    assert not left


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="the baselines need os.eventfd")
def test_without_iceoryx2_its_rows_say_it_is_not_installed() -> None:
    # (None in sys.modules makes the import fail exactly as a missing package does)
    status, out, err, _ = _bench(["bench", "--quick", "--only", "P1,P8"],
                                 prelude="import sys\nsys.modules['iceoryx2'] = None\n")
    assert status == 0, err
    p1 = next(line for line in out.splitlines() if line.startswith("P1 "))
    p8 = next(line for line in out.splitlines() if line.startswith("P8 "))
    assert "not installed" in p1
    assert "not installed" not in p8
    assert "iceoryx2 not installed (pip install 'mpeventfd[peers]')" in out
