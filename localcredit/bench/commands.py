"""The ``localcredit bench`` command: a suite's options checked and handed to its runner (bench/runner.py
for the train suites; continual_suite, speed_suite, modules_suite and claims_suite), and ``--estimate``'s
table. The parser is cli.py's, which dispatches here.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from ..errors import UserError
from ..experiment import resolve_device
from ..training.loggers import logger_problem
from ..training.runfiles import resume_command


def cmd_bench(args: argparse.Namespace) -> int:
    from .runner import BenchOptions, estimate, get_suite, run_bench, with_seeds

    names = [n.strip() for n in args.rules.split(",") if n.strip()] if args.rules is not None else None
    cores = os.cpu_count() or 1
    workers = max(1, min(4, cores)) if args.workers is None else args.workers
    threads = max(1, cores // max(workers, 1)) if args.threads is None else args.threads
    if problem := logger_problem(args.log):
        raise UserError(f"--log {problem}")
    if args.suite == "continual":
        return _bench_continual(args, names, workers, threads)
    if args.suite == "speed":
        return _bench_speed(args, names)
    if args.suite == "modules":
        return _bench_modules(args, names, workers, threads)
    if args.suite == "claims":
        return _bench_claims(args, names, workers, threads)
    if args.quick:
        raise UserError("--quick applies to --suite continual, speed, modules and claims (the train suites' short one "
                        "is --suite quick)")
    suite = with_seeds(get_suite(args.suite), args.seeds)
    cases = [n.strip() for n in args.cases.split(",") if n.strip()] if args.cases is not None else None
    if args.device is not None:
        resolve_device(args.device)  # a device this machine lacks is refused before any run starts
    options = BenchOptions(suite=suite, out=Path(args.out or f"runs/bench/{suite.name}"), rule_names=names,
                           cases=cases, **_pool(args, workers, threads))
    if args.estimate:
        return _print_estimate(estimate(options), workers)
    summary = run_bench(options)
    print(f"bench {suite.name}: {summary['trained']} runs trained, {summary['skipped']} already finished; "
          f"{options.out}/: {', '.join(summary['files'])}")
    return 0


def _pool(args: argparse.Namespace, workers: int, threads: int) -> dict:
    """The process-pool options (``bench.runner.PoolOptions``) of a bench command line, for every suite that has them."""
    return dict(workers=workers, threads=threads, progress=not args.quiet, command="localcredit " + shlex.join(args.argv),
                resume=args.resume, overwrite=args.overwrite, resume_hint=resume_command(args.argv), device=args.device,
                log=args.log)


def _bench_continual(args: argparse.Namespace, names: list[str] | None, workers: int, threads: int) -> int:
    """``bench --suite continual [--quick]``: every rule x strategy x split-MNIST scenario (bench/continual_suite.py)."""
    from .continual_suite import ContinualBenchOptions, get_continual_suite, run_continual_bench, with_seeds

    unused = [flag for flag, given in (("--cases", args.cases is not None), ("--device", args.device is not None),
                                       ("--estimate", args.estimate)) if given]
    if unused:
        raise UserError(f"{', '.join(unused)}: not for the continual suite (its runs train on the CPU; docs/bench.md "
                        f"gives its estimate)")
    suite = with_seeds(get_continual_suite(args.quick), args.seeds)
    options = ContinualBenchOptions(suite=suite, out=Path(args.out or f"runs/bench/{suite.name}"), rule_names=names,
                                    **_pool(args, workers, threads))
    summary = run_continual_bench(options)
    print(f"bench {suite.name}: {summary['trained']} runs trained, {summary['skipped']} already finished; "
          f"{options.out}/: {', '.join(summary['files'])}")
    return 0


def _bench_speed(args: argparse.Namespace, names: list[str] | None) -> int:
    """``bench --suite speed [--quick]``: every rule's step time, FLOPs and memory against BP, steps interleaved
    in this process (bench/speed_suite.py)."""
    from .speed_suite import SpeedOptions, get_speed_suite, run_speed

    unused = [flag for flag, given in (("--cases", args.cases is not None), ("--estimate", args.estimate),
                                       ("--seeds", args.seeds is not None), ("--workers", args.workers is not None),
                                       ("--resume", args.resume), ("--log", args.log != "none")) if given]
    if unused:
        raise UserError(f"{', '.join(unused)}: not for the speed suite (one process steps every rule in turn; "
                        f"docs/bench.md)")
    options = SpeedOptions(suite=get_speed_suite(args.quick), out=Path(args.out or "runs/bench/speed"),
                           rule_names=names, threads=args.threads,
                           device=resolve_device(args.device) if args.device is not None else "cpu",
                           command="localcredit " + shlex.join(args.argv), progress=not args.quiet,
                           overwrite=args.overwrite)
    summary = run_speed(options)
    failed = f"; failed: {', '.join(summary['failed'])}" if summary["failed"] else ""
    print(f"bench {options.suite.name}: {options.out}/: {', '.join(summary['files'])}{failed}")
    return 1 if summary["failed"] else 0


def _bench_modules(args: argparse.Namespace, names: list[str] | None, workers: int, threads: int) -> int:
    """``bench --suite modules [--quick]``: error and memory against K modules (bench/modules_suite.py)."""
    from .modules_suite import ModulesBenchOptions, get_modules_suite, run_modules_bench, with_seeds

    unused = [flag for flag, given in (("--cases", args.cases is not None), ("--estimate", args.estimate)) if given]
    if unused:
        raise UserError(f"{', '.join(unused)}: not for the modules suite (docs/bench.md gives its cost)")
    if args.device is not None:
        resolve_device(args.device)  # a device this machine lacks is refused before any run starts
    suite = with_seeds(get_modules_suite(args.quick), args.seeds)
    options = ModulesBenchOptions(suite=suite, out=Path(args.out or f"runs/bench/{suite.name}"), rule_names=names,
                                  **_pool(args, workers, threads))
    summary = run_modules_bench(options)
    print(f"bench {suite.name}: {summary['trained']} runs trained, {summary['skipped']} already finished; "
          f"{options.out}/: {', '.join(summary['files'])}")
    return 0


def _bench_claims(args: argparse.Namespace, names: list[str] | None, workers: int, threads: int) -> int:
    """``bench --suite claims [--quick] [--cases a,b]``: a verdict per claim of the seed papers (bench/claims_suite.py)."""
    from .claims_suite import ClaimsOptions, run_claims

    unused = [flag for flag, given in (("--rules", names is not None), ("--estimate", args.estimate)) if given]
    if unused:
        raise UserError(f"{', '.join(unused)}: not for the claims suite (its cases choose their rows; a --quick run's "
                        f"RESULTS.md estimates the full run's CPU time)")
    if args.device is not None:
        resolve_device(args.device)  # a device this machine lacks is refused before any run starts
    cases = [n.strip() for n in args.cases.split(",") if n.strip()] if args.cases is not None else None
    quick = "-quick" if args.quick else ""
    options = ClaimsOptions(out=Path(args.out or f"runs/bench/claims{quick}"), quick=args.quick, cases=cases,
                            seeds=args.seeds, **_pool(args, workers, threads))
    summary = run_claims(options)
    print(f"bench claims{' (quick)' if args.quick else ''}: {summary['trained']} runs trained, {summary['skipped']} "
          f"already finished, {summary['measured']} measurements; {options.out}/: {', '.join(summary['files'])}")
    return 0


def _print_estimate(rows: list[dict], workers: int) -> int:
    """One line per row of each case: its step time here and the CPU hours its planned runs need."""
    print(f"{'case':32s} {'row':28s} {'ms/step':>8s} {'steps':>9s} {'CPU hours':>9s}")
    for row in rows:
        print(f"{row['case']:32s} {row['row']:28s} {row['ms_per_step']:8.1f} {row['steps']:9d} {row['hours']:9.2f}")
    by_case: dict[str, float] = {}
    for row in rows:
        by_case[row["case"]] = by_case.get(row["case"], 0.0) + row["hours"]
    for case, hours in by_case.items():
        print(f"{case}: {hours:.2f} CPU hours, about {hours / workers:.2f} h wall with {workers} runs at a time")
    loads = [row["load_average_1min"] for row in rows]
    print(f"(one thread per step, 1-minute load average {min(loads):.1f}-{max(loads):.1f} while probing; "
          f"training steps only, first tuning grid included)")
    return 0
