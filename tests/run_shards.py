"""Run the test suite as two pytest processes side by side, one torch thread each (what `make test` runs).

The suite's networks are small: one torch thread per process uses a core as well as two threads do,
so two processes on a 2-core machine finish the suite in a little over half the time of one process
with two threads. The test files are dealt into the shards by their last measured durations
(tests/durations.json, rewritten by a complete run with --record; a new file counts as the median); each
shard's output is printed whole when it ends, and the exit code is the worse of the two.

    python tests/run_shards.py                # the whole suite
    python tests/run_shards.py --record       # the same, and tests/durations.json from this run
    python tests/run_shards.py --shards 1     # one process (the plain `python -m pytest`, one thread)
    python tests/run_shards.py -- -m "not slow"   # arguments after -- go to both pytest processes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DURATIONS = TESTS / "durations.json"


def deal(files: list[str], durations: dict[str, float], shards: int) -> list[list[str]]:
    """Longest first, each file to the shard with the least work so far."""
    default = statistics.median(durations.values()) if durations else 1.0
    loads = [0.0] * shards
    dealt: list[list[str]] = [[] for _ in range(shards)]
    for name in sorted(files, key=lambda f: -durations.get(f, default)):
        k = loads.index(min(loads))
        dealt[k].append(name)
        loads[k] += durations.get(name, default)
    return dealt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="rewrite tests/durations.json from this run")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to every pytest process")
    args = parser.parse_args()
    files = sorted(p.name for p in TESTS.glob("test_*.py"))
    durations = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    env = {**os.environ, "LOCALCREDIT_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    running = []
    for shard in deal(files, durations, args.shards):
        log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--durations=0", "--durations-min=0.2",
                   *(str(TESTS / f) for f in shard), *args.pytest_args]
        running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=TESTS.parent), log))
    codes = []
    measured: dict[str, float] = {}
    for process, log in running:
        codes.append(process.wait())
        log.seek(0)
        text = log.read()
        print(text, end="", flush=True)
        measured.update(file_durations(text))
    seconds = time.monotonic() - started
    print(f"{len(running)} pytest processes side by side: {seconds:.0f} s wall, exit codes {codes}")
    if args.record and all(code == 0 for code in codes) and not args.pytest_args:
        DURATIONS.write_text(json.dumps(dict(sorted(measured.items())), indent=1) + "\n")
    return max(codes, key=lambda c: c != 0)


def file_durations(text: str) -> dict[str, float]:
    """Seconds per test file from pytest's --durations=0 lines ("1.23s call tests/test_x.py::name")."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("s") and "::" in parts[2]:
            try:
                seconds = float(parts[0][:-1])
            except ValueError:
                continue
            name = Path(parts[2].split("::")[0]).name
            totals[name] = round(totals.get(name, 0.0) + seconds, 2)
    return totals


if __name__ == "__main__":
    sys.exit(main())
