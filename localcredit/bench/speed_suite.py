"""``localcredit bench --suite speed [--quick]``: every rule's step time beside the arithmetic it must do.

For each network (the MLP 784-1000-1000-10, the conv suite's VGG and ResNet-20) every registered
rule is built on it -- or, for a rule that cannot train it (gaitprop, tp, itp invert their layers),
on the network it needs, with BP on that same network beside it (:func:`~localcredit.bench.plan.entries`,
as the other suites do) -- and then, in one process, on the same batches:

1. **memory**: the step memory of :mod:`localcredit.bench.memory` (the most memory of tensors made by a
   step alive at one time; weights, gradients and optimiser state left out), largest over a few steps;
2. **FLOPs**: each of a few further steps counted by :func:`localcredit.bench.flops.step_flops` (matmuls,
   convolutions, solves; elementwise work not: see that module). The median step goes with the median
   time; the mean (periodic refactorisations amortised) is in ``speed-details.json``;
3. **time**, for each thread count (1 and all cores): rounds in which every rule takes one step on the
   round's batch, the starting rule rotating from round to round, so that whatever the machine does
   meanwhile (other jobs, frequency changes) falls on every rule alike; warm-up rounds first, then the
   timed ones (:func:`localcredit.bench.probe.timed_step_ms`).

Per rule, against BP on the network the rule trains: ``time_ratio`` (median step time / BP's),
``flop_ratio`` (median step FLOPs / BP's), ``overhead`` = time_ratio / flop_ratio (1: the rule costs
what its arithmetic costs, as BP does; above 1: time that its matmuls do not explain -- elementwise
work, Python, host waits, allocations), ``memory_ratio``, and the spread of the per-round ratios
(quartiles of the rule's step time over BP's in the same round). Benchmarks, not tests: figures carry
their command, date, load average and thread count, and mean something only on a quiet machine.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import rules
from ..data import Dataset, load
from ..errors import UserError
from ..experiment import RunSpec, build_rule
from ..nets.architectures import NetSpec
from ..rules.base import Rule
from .flops import StepFlops, step_flops
from .memory import step_memory
from .plan import CONV, REFERENCE, Entry, Suite, entries, entry_network
from .probe import timed_step_ms
from .time_split import TimeSplit, mean_split, profile_step

#: The networks, named as speed.json names them; each a plan Suite for its network and for what the
#: rules that cannot train it train instead (the conv suite's invertible-conv for the GAIT family).
NETWORKS: dict[str, Suite] = {
    "mlp": Suite("mlp", "MLP 784-1000-1000-10 (gaitprop, tp, itp: invertible 1000,1000, BP beside them)",
                 network=NetSpec(arch="mlp", hidden=[1000, 1000])),
    "vgg": Suite("vgg", f"the conv suite's VGG: {CONV.network.channels} + hidden {CONV.network.hidden}, batch norm "
                        "(gaitprop, tp, itp: invertible-conv 7,4,1, BP beside them)",
                 network=CONV.network, fallback_archs=CONV.fallback_archs, networks=CONV.networks),
    "resnet": Suite("resnet", "ResNet-20 (CIFAR ResNet, 16-32-64 channels; gaitprop, tp, itp: invertible-conv 7,4,1, "
                              "BP beside them)",
                    network=NetSpec(arch="resnet", depth=20), fallback_archs=CONV.fallback_archs,
                    networks=CONV.networks),
}


@dataclass(frozen=True)
class SpeedSuite:
    """What the speed suite measures: its networks, batch and how many steps of each kind."""

    name: str
    description: str
    networks: Mapping[str, Suite] = field(default_factory=lambda: NETWORKS)
    batch_size: int = 128
    warmup: int = 5  # untimed rounds per thread count
    steps: int = 50  # timed rounds per thread count
    flop_steps: int = 16  # counted steps per rule (GAIT-prop refactorises every 8 steps by default)
    memory_steps: int = 4  # measured steps per rule, the first two warming up
    split_steps: int = 6  # profiled steps per rule (time_split.py), after the timed rounds, at the first thread count
    threads: tuple[int, ...] | None = None  # None: 1 and every core


SPEED = SpeedSuite("speed", "every rule on the MLP 1000x2, the conv suite's VGG and ResNet-20, batch 128: 5 warm-up "
                            "and 50 timed interleaved rounds at 1 thread and at all threads")
QUICK = SpeedSuite("speed-quick", "the same networks and columns, batch 32, 1 warm-up and 5 timed rounds at 1 thread: "
                                  "a check that the machinery runs, not figures to quote",
                   batch_size=32, warmup=1, steps=5, flop_steps=3, memory_steps=2, split_steps=2, threads=(1,))


def get_speed_suite(quick: bool) -> SpeedSuite:
    return QUICK if quick else SPEED


#: ``guard(rule)``: a context manager entered around each timed step (not around the waits for the device)
StepGuard = Callable[[Rule], AbstractContextManager[Any]]


@dataclass
class SpeedOptions:
    """One run of a speed suite: what the command line (or ``benchmarks/gpu_speed.py``) chose."""

    suite: SpeedSuite
    out: Path
    rule_names: Sequence[str] | None = None  # default: every registered rule
    threads: int | None = None  # one thread count instead of the suite's
    device: str = "cpu"
    data: str | None = "fashion-mnist"  # None: random images of Fashion-MNIST's shape (the arithmetic is the same)
    command: str = ""
    progress: bool = True
    overwrite: bool = False
    guard: StepGuard | None = None


RESULTS, SPEED_JSON, DETAILS_JSON = "RESULTS.md", "speed.json", "speed-details.json"


@dataclass
class Row:
    """One rule on one network: what was measured, and against which BP."""

    key: str  # its name in speed.json
    entry: Entry
    reference: str  # key of the BP row it is compared with
    rule: Rule | None = None
    error: str | None = None
    memory_mb: float | None = None
    flops: StepFlops | None = None
    ms: dict[int, list[float]] = field(default_factory=dict)  # thread count -> timed steps (ms)
    split: TimeSplit | None = None  # where a profiled step's time went


def thread_counts(options: SpeedOptions) -> list[int]:
    if options.threads is not None:
        if options.threads < 1:
            raise UserError(f"--threads must be at least 1, got {options.threads}")
        return [options.threads]
    if options.suite.threads is not None:
        return list(options.suite.threads)
    return sorted({1, os.cpu_count() or 1})


def run_speed(options: SpeedOptions) -> dict[str, Any]:
    """Measure every network of the suite; write RESULTS.md, speed.json and speed-details.json into ``options.out``."""
    names = list(options.rule_names) if options.rule_names is not None else list(rules.available())
    for name in names:
        rules.get(name)  # an unknown name is a one-line UserError before anything runs
    threads = thread_counts(options)
    if (options.out / SPEED_JSON).exists() and not options.overwrite:
        raise UserError(f"{options.out} already holds a speed run ({SPEED_JSON}); add --overwrite to replace it")
    suite = options.suite
    device = torch.device(options.device)
    rounds = len(threads) * (suite.warmup + suite.steps)
    data = images(options.data, (suite.memory_steps + suite.flop_steps + rounds + suite.split_steps) * suite.batch_size)
    started = datetime.datetime.now(datetime.timezone.utc)
    networks: dict[str, dict[str, Any]] = {}
    original_threads = torch.get_num_threads()
    try:
        with _subnormals_flushed():
            for network, net_suite in suite.networks.items():
                networks[network] = measure_network(network, net_suite, names, data, device, threads, options)
    finally:
        torch.set_num_threads(original_threads)
    report = {"suite": suite.name, "description": suite.description, "command": options.command,
              "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(device),
              "data": options.data or "synthetic", "batch_size": suite.batch_size, "warmup_rounds": suite.warmup,
              "timed_rounds": suite.steps, "flop_steps": suite.flop_steps, "memory_steps": suite.memory_steps,
              "threads": threads, "networks": networks}
    files = write_results(options.out, report)
    failed = [f"{network}/{key}" for network, result in networks.items()
              for key, row in result["rules"].items() if row.get("error")]
    return {"files": files, "failed": failed, "report": report}


def images(name: str | None, count: int) -> Dataset:
    """``count`` training images (repeated when the set is smaller) of Fashion-MNIST or of random values."""
    if name is None:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(count, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (count,), generator=generator)
        return Dataset(name="synthetic", x_train=x, y_train=y, x_test=x[:1], y_test=y[:1], num_classes=10)
    data = load(name)
    if not isinstance(data, Dataset):
        raise UserError(f"the speed suite needs data that fits in memory; {name} does not")
    index = torch.arange(count) % len(data.x_train)
    return Dataset(name=data.name, x_train=data.x_train[index], y_train=data.y_train[index],
                   x_test=data.x_test[:1], y_test=data.y_test[:1], num_classes=data.num_classes)


@contextlib.contextmanager
def _subnormals_flushed() -> Iterator[None]:
    """As ``localcredit train`` runs by default (--flush-denormal on): the steps timed are the steps trained."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def machine(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    return f"{where}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}"


def _say(options: SpeedOptions, text: str) -> None:
    if options.progress:
        print(f"speed: {text}", file=sys.stderr, flush=True)


def _failure(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "localcredit" in f.filename]
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}{where}"


def plan_rows(suite: Suite, names: Sequence[str]) -> list[Row]:
    """The rows of one network: each rule on it (or on the network it needs) and BP on every network used."""
    chosen = entries(names, suite.arch, suite.fallback_archs)
    named = [e.name for e in chosen]

    def key(entry: Entry) -> str:
        return entry.name if named.count(entry.name) == 1 or entry.arch == suite.arch else f"{entry.name} [{entry.arch}]"

    keys = {entry: key(entry) for entry in chosen}
    return [Row(keys[e], e, keys[Entry(REFERENCE, e.arch)]) for e in chosen]


def measure_network(network: str, suite: Suite, names: Sequence[str], data: Dataset, device: torch.device,
                    threads: Sequence[int], options: SpeedOptions) -> dict[str, Any]:
    """Memory, FLOPs and interleaved step times of every row of one network; its part of speed-details.json."""
    speed = options.suite
    b = speed.batch_size
    batches = [(data.x_train[i * b:(i + 1) * b].to(device), data.y_train[i * b:(i + 1) * b].to(device))
               for i in range(len(data.x_train) // b)]
    memory_batches = batches[:speed.memory_steps]
    flop_batches = batches[speed.memory_steps:speed.memory_steps + speed.flop_steps]
    timed = batches[speed.memory_steps + speed.flop_steps:len(batches) - speed.split_steps]
    profiled = batches[len(batches) - speed.split_steps:]
    rows = plan_rows(suite, names)
    _say(options, f"{network}: {len(rows)} rows; the memory and FLOPs of each")
    torch.set_num_threads(threads[0])  # nothing is timed here
    gc.collect()
    for row in rows:
        try:
            spec = RunSpec(rule=row.entry.rule, data="fashion-mnist", **asdict(entry_network(row.entry, suite)),
                           options=list(row.entry.options), batch_size=b, seed=0)
            row.rule = build_rule(spec, data).to(device)
            row.rule.start_epoch(0, 1)  # the steps of a run's first epoch (a layer-wise schedule needs it)
            warmup = min(2, len(memory_batches) - 1)
            # step_memory's own full collection then sees only what came since (a full one over torch's
            # heap takes ~0.3 s a rule); it unfreezes everything when done.
            gc.freeze()
            row.memory_mb = step_memory(row.rule, memory_batches, warmup=warmup)["step_memory_mb"]
            row.flops = step_flops(row.rule, flop_batches)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 -- its row says what failed; the other rules still run
            row.rule, row.error = None, _failure(exc)
    loads: dict[int, dict[str, float]] = {}
    rounds = speed.warmup + speed.steps
    for i, count in enumerate(threads):
        torch.set_num_threads(count)
        gc.collect()
        loads[count] = {"before": os.getloadavg()[0]}
        _say(options, f"{network}: {speed.warmup} + {speed.steps} interleaved rounds at {count} thread(s)")
        interleave(rows, timed[i * rounds:(i + 1) * rounds], speed.warmup, count, options.guard)
        loads[count]["after"] = os.getloadavg()[0]
    torch.set_num_threads(threads[0])
    _say(options, f"{network}: where the time goes ({speed.split_steps} profiled steps per rule)")
    if device.type == "cpu":  # CUDA kernels run after their launch: the host's profile would not time them
        split_rounds(rows, profiled)
    result = {"description": suite.description, "arch": suite.arch, "load_average": loads,
              "rules": figures(rows, threads)}
    for row in rows:
        row.rule = None  # free the networks before the next ones are built
    return result


def interleave(rows: Sequence[Row], batches: Sequence[tuple[torch.Tensor, torch.Tensor]], warmup: int, threads: int,
               guard: StepGuard | None) -> None:
    """Round r: every working rule steps batch r, starting with rule r mod n; rounds from ``warmup`` on are timed."""
    for row in rows:
        row.ms[threads] = []
    for r, (x, y) in enumerate(batches):
        working = [row for row in rows if row.rule is not None]
        shift = r % max(1, len(working))
        for row in working[shift:] + working[:shift]:
            rule = row.rule
            assert rule is not None  # only working rows were picked
            try:
                ms = timed_step_ms(rule, x, y, guard(rule) if guard is not None else None)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 -- as in measure_network
                row.rule, row.error = None, _failure(exc)
                continue
            if r >= warmup:
                row.ms[threads].append(ms)


def split_rounds(rows: Sequence[Row], batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each row's ``split``: one profiled step of every working rule per batch, in rotating order as the
    timed rounds are, after one discarded profile (the profiler's first session in a process is slower)."""
    splits: dict[str, list[TimeSplit]] = {row.key: [] for row in rows}
    for r, (x, y) in enumerate([*batches[:1], *batches]):
        working = [row for row in rows if row.rule is not None]
        shift = r % max(1, len(working))
        for row in (working[shift:] + working[:shift]) if r else working[:1]:
            assert row.rule is not None  # only working rows were picked
            try:
                split = profile_step(row.rule, x, y)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 -- as in measure_network
                row.rule, row.error = None, _failure(exc)
                continue
            if r:
                splits[row.key].append(split)
    for row in rows:
        row.split = mean_split(splits[row.key]) if splits[row.key] else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _priced_overhead(row: Row, ref: Row) -> float | None:
    """(time in priced operations / BP's) / (FLOPs / BP's), from the profiled steps: 1 when the rule's
    arithmetic runs as fast per FLOP as BP's."""
    if row.split is None or ref.split is None or row.flops is None or ref.flops is None:
        return None
    return _ratio(_ratio(row.split.priced_ms, ref.split.priced_ms), _ratio(row.flops.median, ref.flops.median))


def figures(rows: Sequence[Row], threads: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per row: its own figures and its ratios to its BP row (at every thread count; the headline at the first)."""
    by_key = {row.key: row for row in rows}
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        ref = by_key[row.reference]
        flops, ref_flops = row.flops, ref.flops
        steps = len(flops.per_step) if flops is not None else 0
        item: dict[str, Any] = {
            "rule": row.entry.rule, "arch": row.entry.arch, "compared_with": row.reference, "error": row.error,
            "step_memory_mb": row.memory_mb,
            "flops_per_step": flops.median if flops is not None else None,
            "flops_per_step_mean": flops.mean if flops is not None else None,
            "flops_by_op_per_step": {op: v / steps for op, v in sorted(flops.count.by_op.items())} if flops else None,
            "aten_ops_per_step": flops.count.calls / steps if flops else None,
            "uncounted_ops_per_step": ({op: n / steps for op, n in sorted(flops.count.uncounted.items())}
                                       if flops else None),
            "uncounted_elements_per_step": flops.count.uncounted_elements / steps if flops else None,
            "memory_ratio": _ratio(row.memory_mb, ref.memory_mb),
            "flop_ratio": _ratio(flops.median if flops else None, ref_flops.median if ref_flops else None),
            "flop_ratio_mean": _ratio(flops.mean if flops else None, ref_flops.mean if ref_flops else None),
            "aten_ops_ratio": _ratio(flops.count.calls if flops else None, ref_flops.count.calls if ref_flops else None),
            "time_split": row.split.as_dict() if row.split is not None else None,
            "priced_overhead": _priced_overhead(row, ref),
            "by_threads": {},
        }
        for count in threads:
            ms, ref_ms = row.ms.get(count, []), ref.ms.get(count, [])
            timing: dict[str, Any] = {"timed_steps": len(ms), "ms_median": statistics.median(ms) if ms else None,
                                      "ms_mean": statistics.fmean(ms) if ms else None}
            per_round = [a / b for a, b in zip(ms, ref_ms) if b > 0]
            both = bool(ms) and bool(ref_ms) and row.error is None and ref.error is None
            timing["time_ratio"] = statistics.median(ms) / statistics.median(ref_ms) if both else None
            timing["time_ratio_mean"] = statistics.fmean(ms) / statistics.fmean(ref_ms) if both else None
            quartiles = statistics.quantiles(per_round, n=4) if both and len(per_round) >= 2 else None
            timing["per_round_ratio_q1"], timing["per_round_ratio_q3"] = quartiles[::2] if quartiles else (None, None)
            timing["overhead"] = _ratio(timing["time_ratio"], item["flop_ratio"])
            item["by_threads"][count] = timing
        first = item["by_threads"][threads[0]] if threads else {}
        item["time_ratio"], item["overhead"] = first.get("time_ratio"), first.get("overhead")
        out[row.key] = item
    return out


# ----- the report ----------------------------------------------------------------------------------
HEADLINE = ("time_ratio", "flop_ratio", "overhead", "memory_ratio")


def _split_table(rules_: dict[str, dict[str, Any]], threads: int) -> list[str]:
    """The 'where the time goes' table of one network (empty when nothing was profiled)."""
    rows = [(key, row) for key, row in rules_.items() if row.get("time_split")]
    if not rows:
        return []
    lines = [f"Where the time goes, {threads} thread(s), profiled steps (see below): ms per step", "",
             "| rule | vs | FLOPs | overhead | priced ms | priced overhead | unpriced ms | outside ms "
             "| largest unpriced operations (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, row in rows:
        split = row["time_split"]
        top = ", ".join(f"{name.removeprefix('aten::')} {ms:.1f}"
                        for name, ms in list(split["unpriced_top_ms"].items())[:4])
        lines.append(f"| `{key}` | {row['compared_with']} | {_cell(row['flop_ratio'])} | {_cell(row['overhead'])} | "
                     f"{_cell(split['priced_ms'], 1)} | {_cell(row['priced_overhead'])} | "
                     f"{_cell(split['unpriced_ms'], 1)} | {_cell(split['outside_ms'], 1)} | {top} |")
    return lines + [""]


def write_results(out: Path, report: dict[str, Any]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    headline = {network: {key: {k: row[k] for k in HEADLINE} for key, row in result["rules"].items()}
                for network, result in report["networks"].items()}
    (out / SPEED_JSON).write_text(json.dumps(headline, indent=1) + "\n")
    (out / DETAILS_JSON).write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / RESULTS).write_text(markdown(report))
    return [RESULTS, SPEED_JSON, DETAILS_JSON]


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    threads = report["threads"]
    lines = [
        "# Step cost against arithmetic: every rule against BP (`bench --suite speed`)", "",
        f"Command: `{report['command']}`  ", f"Date: {report['date']}; {report['machine']}; data: {report['data']}, "
        f"batch {report['batch_size']}; threads: {', '.join(map(str, threads))}.  ",
        f"Suite `{report['suite']}`: {report['description']}.", "",
        f"Every rule steps the same batches in one process: per thread count {report['warmup_rounds']} warm-up and "
        f"{report['timed_rounds']} timed rounds, each round one step of every rule, the starting rule rotating. "
        f"Before them, {report['memory_steps']} steps measure the step memory and {report['flop_steps']} more "
        "count the FLOPs. Ratios are to BP on the network the rule trains (the `vs` column). "
        "**time** = median step time / BP's; **FLOPs** = median step FLOPs / BP's; **overhead** = time / FLOPs "
        "(1: as much time per FLOP as BP); **memory** = step memory / BP's; **spread** = quartiles of the "
        "per-round ratio (the rule's step time over BP's in the same round); **ops** = aten operations per step / "
        "BP's (per-op overhead).", "",
    ]
    if report["suite"] != "speed":
        lines += [f"**{report['suite']}: a check that the machinery runs, not figures to quote.**", ""]
    for network, result in report["networks"].items():
        lines += [f"## {network}: {result['description']}", ""]
        for count in threads:
            load = result["load_average"].get(count, {})
            lines += [f"### {count} thread{'s' if count > 1 else ''} (1-minute load average "
                      f"{_cell(load.get('before'))} before, {_cell(load.get('after'))} after)", "",
                      "| rule | network | vs | time | FLOPs | overhead | memory | spread (q1-q3) | ops | ms/step "
                      "| MFLOP/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for key, row in result["rules"].items():
                t = row["by_threads"].get(count, {})
                spread = (f"{t['per_round_ratio_q1']:.2f}-{t['per_round_ratio_q3']:.2f}"
                          if t.get("per_round_ratio_q1") is not None else "-")
                flops = row["flops_per_step"]
                if row["error"]:
                    lines.append(f"| `{key}` | {row['arch']} | {row['compared_with']} | failed: {row['error']} "
                                 "| | | | | | | |")
                    continue
                lines.append(
                    f"| `{key}` | {row['arch']} | {row['compared_with']} | {_cell(t.get('time_ratio'))} | "
                    f"{_cell(row['flop_ratio'])} | {_cell(t.get('overhead'))} | {_cell(row['memory_ratio'])} | "
                    f"{spread} | {_cell(row['aten_ops_ratio'])} | {_cell(t.get('ms_median'), 1)} | "
                    f"{_cell(flops / 1e6 if flops is not None else None, 1)} |")
            lines.append("")
        lines += _split_table(result["rules"], threads[0])
        periodic = [(key, row) for key, row in result["rules"].items()
                    if row["flop_ratio_mean"] is not None and row["flop_ratio"]
                    and abs(row["flop_ratio_mean"] / row["flop_ratio"] - 1) > 0.01]
        if periodic:
            lines += ["Steps not all alike (periodic work: refactorisations); amortised over the counted and timed "
                      f"steps, at {threads[0]} thread(s):", "",
                      "| rule | FLOPs (mean) | time (mean) | overhead (means) |", "|---|---|---|---|"]
            for key, row in periodic:
                mean_time = row["by_threads"].get(threads[0], {}).get("time_ratio_mean")
                lines.append(f"| `{key}` | {_cell(row['flop_ratio_mean'])} | {_cell(mean_time)} | "
                             f"{_cell(_ratio(mean_time, row['flop_ratio_mean']))} |")
            lines.append("")
    lines += ["## Where the time goes", "",
              "Each rule's last steps run under `torch.profiler` (`localcredit/bench/time_split.py`): **priced** = "
              "milliseconds in the operations the FLOP count prices (matmuls, convolutions and their backward, "
              "solves, with the kernels they call); **unpriced** = the other aten operations (activations, batch "
              "norm, pooling, losses, the optimiser's update, copies, allocations); **outside** = the rest of the "
              "step's wall time (Python, the autograd engine, hooks, and the profiler's own cost per event, which "
              "grows with the operation count). **priced overhead** = (priced time / BP's) / (FLOPs / BP's): 1 when "
              "the rule's arithmetic runs as fast per FLOP as BP's. A rule whose overhead is above 1 while its "
              "priced overhead is near 1 spends the extra time in work the FLOP count leaves out, named in the "
              "last column. The profiler slows each step, so read the columns against BP's row, not against the "
              "interleaved milliseconds.", "",
              "## What the FLOPs count", "",
              "`localcredit/bench/flops.py` counts every aten operation of real steps (forward, backward, auxiliary "
              "heads, feedback matmuls, solves, optimisers) with torch's own FLOP formulas (matmuls, convolutions "
              "and their backward, attention) and formulas of its own for matrix-vector products, LU "
              "factorisations and solves, triangular solves, inverses and Cholesky. Not counted: elementwise "
              "operations and reductions (activations, batch norm, pooling, losses, target arithmetic, NAN's "
              "attention weights), the optimisers' updates, copies: memory-bound work whose time shows as overhead. "
              "`speed-details.json` holds per rule the FLOPs by operation, the aten operations per step and the "
              "elements the uncounted operations wrote.", ""]
    return "\n".join(lines)


__all__ = ["NETWORKS", "QUICK", "SPEED", "SpeedOptions", "SpeedSuite", "get_speed_suite", "run_speed"]
