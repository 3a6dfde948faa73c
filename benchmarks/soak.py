"""Soak test of interruptions: kill a run at random moments, resume it each time, compare the end.

For each case, one uninterrupted run gives the reference. Then the same command is started, stopped
at a random moment by one of

* ``kill -9`` of its whole process group (what a crash or an out-of-memory kill does to a job),
* SIGTERM to the main process only (what `kill PID` does; it must reach every process of a run),
* SIGTERM to the process group (what a cluster scheduler does before it pre-empts a job),

and restarted with ``--resume``, until it has been stopped N times in the middle of its work. Whenever a
try reaches the end, its final numbers are compared with the reference and the next try starts the run
afresh (``--overwrite``). They must be equal exactly: test accuracy per epoch and training loss per
epoch for ``train``; every run's accuracy and alignment columns of results.csv for ``bench``.

    python benchmarks/soak.py --out results/soak            # all cases, the committed figures
    python benchmarks/soak.py --cases single --kills 3      # a quick look

Writes OUT/soak.json (every kill: when, how, the exit code) and OUT/README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    # A local rule with leader counts, batch norm, dropout, augmentation and a cosine schedule, one process.
    "single": ["train", "--rule", "lfnn", "--data", "fashion-mnist", "--arch", "vgg", "--channels", "8,M,16,M",
               "--hidden", "32", "--dropout", "0.1", "--augment", "crop:2,flip", "--lr-schedule", "cosine",
               "--limit-train", "6000", "--epochs", "3", "--batch-size", "50", "--checkpoint-every", "20",
               "--threads", "1"],
    # The block pipeline: two processes, each training its layers of lfnn-l.
    "blocks": ["train", "--rule", "lfnn-l", "--data", "fashion-mnist", "--hidden", "256,256", "--procs", "2",
               "--parallel", "blocks", "--limit-train", "12000", "--epochs", "3", "--batch-size", "50",
               "--checkpoint-every", "40"],
    # Data parallel bp on a batch-norm conv net with dropout: each process's statistics and random stream.
    "data": ["train", "--rule", "bp", "--data", "fashion-mnist", "--arch", "vgg", "--channels", "4,M,8,M",
             "--hidden", "16", "--dropout", "0.1", "--procs", "2", "--limit-train", "6000", "--epochs", "3",
             "--batch-size", "50", "--checkpoint-every", "20"],
    # A whole benchmark suite: its runs, tuning choices, alignment and report.
    "bench": ["bench", "--suite", "smoke", "--rules", "bp,local-random,lfnn-l,dfa", "--seeds", "1", "--workers", "1",
              "--threads", "1"],
}
HOW = ("kill -9 (group)", "SIGTERM (main process)", "SIGTERM (group)")
FINISHED = "none (finished first)"
COMPARED_CSV_COLUMNS = ("stage", "rule", "label", "seed", "lr", "status", "accuracy", "accuracy_per_epoch",
                        "alignment_init", "alignment_final")


def command(argv: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "localcredit", *argv, "--quiet", "--out", str(out)]


def run_to_end(argv: list[str], out: Path, resume: bool) -> float:
    start = time.monotonic()
    done = subprocess.run(command(argv, out) + (["--resume"] if resume else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command(argv, out))} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return time.monotonic() - start


def stop_at_random(argv: list[str], out: Path, resume: bool, within_s: float, rng: random.Random) -> dict:
    """Start the command, stop it after a random time by a random method; what happened."""
    process = subprocess.Popen(command(argv, out) + (["--resume"] if resume else ["--overwrite"]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    delay = rng.uniform(0.5, within_s)
    how = rng.choice(HOW)
    try:
        process.wait(timeout=delay)  # finished before the kill: the run is complete
        if process.returncode != 0:
            raise SystemExit(f"a try failed by itself ({process.returncode}): {process.stderr.read().strip()[-500:]}")
        return {"after_s": round(delay, 2), "how": FINISHED, "exit": process.returncode}
    except subprocess.TimeoutExpired:
        pass
    if how == "kill -9 (group)":
        os.killpg(process.pid, signal.SIGKILL)
    elif how == "SIGTERM (main process)":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate()
    time.sleep(0.2)
    # After a SIGTERM every process of the run must have ended by itself once the main one has.
    left_behind = how != "kill -9 (group)" and _group_alive(process.pid)
    _kill_group(process.pid)  # nothing of this try may keep running into the next one
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return {"after_s": round(delay, 2), "how": how, "exit": process.returncode, "last_line": last[:200],
            "processes_left_behind": left_behind}


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, ended but not yet reaped, do not count)."""
    listing = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return any(not state.startswith("Z") for state in listing.split())


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def final_numbers(case: str, out: Path) -> dict:
    if case == "bench":
        with open(out / "results.csv") as handle:
            rows = [{k: row[k] for k in COMPARED_CSV_COLUMNS} for row in csv.DictReader(handle)]
        return {"rows": rows}
    result = json.loads((out / "result.json").read_text())
    return {k: result[k] for k in ("status", "test_accuracy", "test_accuracy_per_epoch", "train_loss_per_epoch")}


def soak(case: str, kills: int, root: Path, rng: random.Random) -> dict:
    argv = CASES[case]
    reference, soaked = root / case / "reference", root / case / "soaked"
    for folder in (reference, soaked):
        shutil.rmtree(folder, ignore_errors=True)
    seconds = run_to_end(argv, reference, resume=False)
    expected = final_numbers(case, reference)
    print(f"{case}: reference run took {seconds:.1f} s", flush=True)
    events, verdicts, started = [], [], False
    while sum(e["exit"] != 0 for e in events) < kills:
        # Up to half the reference's time: most tries are stopped, a few get to the end.
        event = stop_at_random(argv, soaked, resume=started, within_s=max(1.0, seconds / 2), rng=rng)
        if event["exit"] == 0:  # got to the end (a signal during its last moments changes nothing then)
            event["how"] = FINISHED if event["how"] == FINISHED else f"{event['how']}, too late: finished"
        events.append(event)
        started = event["exit"] != 0
        if not started:
            verdicts.append(final_numbers(case, soaked) == expected)
        print(f"{case}: try {len(events)}: {event['how']} after {event['after_s']} s -> exit {event['exit']}", flush=True)
    run_to_end(argv, soaked, resume=True)
    verdicts.append(final_numbers(case, soaked) == expected)
    same = all(verdicts)
    print(f"{case}: {sum(verdicts)} of {len(verdicts)} completed runs identical to the uninterrupted one", flush=True)
    return {"case": case, "command": "localcredit " + shlex.join(argv), "reference_seconds": round(seconds, 1),
            "kills": kills, "events": events, "completed_runs": len(verdicts), "identical_runs": sum(verdicts),
            "identical": same, "final": expected if case != "bench" else "see results.csv"}


def write_readme(out: Path, report: list[dict], invocation: str) -> None:
    lines = ["# Soak: runs killed at random moments and resumed", "",
             f"`{invocation}` (2-core CPU, other work on the machine; timings are not the point).", "",
             "| case | command | stops | kill -9 | SIGTERM main | SIGTERM group "
             "| completed runs identical to the uninterrupted one |",
             "|---|---|---|---|---|---|---|"]
    for entry in report:
        hows = [e["how"] for e in entry["events"] if e["exit"] != 0]
        verdict = f"{entry['identical_runs']} of {entry['completed_runs']}"
        lines.append(f"| {entry['case']} | `{entry['command']}` | {entry['kills']} | {hows.count(HOW[0])} | "
                     f"{hows.count(HOW[1])} | {hows.count(HOW[2])} | {verdict if entry['identical'] else f'**{verdict}**'} |")
    exits = sorted({str(e["exit"]) for entry in report for e in entry["events"]})
    lines += ["", f"Exit codes seen: {', '.join(exits)} (0: the try got to the end; 143: SIGTERM handled, checkpoint "
                  "written; -9: killed; -15: SIGTERM to a single process still loading its data, before it could keep "
                  "the signal: nothing to save).",
              "Every try is in soak.json: when it was stopped, how, its exit code and last line."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/soak")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--kills", type=int, default=10, help="stops per case (bench: half as many)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/soak", help="where the runs themselves go")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = [soak(case, args.kills if case != "bench" else max(1, args.kills // 2), Path(args.work), rng)
              for case in cases]
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    write_readme(out, report, "python benchmarks/soak.py " + shlex.join(sys.argv[1:]))
    if not all(entry["identical"] for entry in report):
        raise SystemExit("some resumed runs differ from the uninterrupted ones; see soak.json")


if __name__ == "__main__":
    main()
