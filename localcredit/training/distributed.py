"""Training on several processes with torch.distributed: starting them, joining the group, reporting failures.

Two layouts, both behind the Trainer's :class:`~localcredit.training.trainer.Parallelism` seam:
:class:`~localcredit.training.data_parallel.DataParallel` (``--parallel data``, every rule) and
:class:`~localcredit.training.block_parallel.BlockPipeline` (``--parallel blocks``, local rules only);
what both share is in :mod:`localcredit.training.parallel`. This module plans a run (:func:`plan`,
:func:`check_run`), starts its processes and picks the layout (:func:`parallelism`).

Processes come either from ``--procs K`` (:func:`spawn`: K processes started here, rendezvous
through a TCPStore this process hosts on a free port) or from ``torchrun`` (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in the environment). Backend: gloo on CPU, nccl on CUDA. Every wait
is bounded by ``--dist-timeout``; a process that fails reports one line naming its rank and its
error, and the launcher ends the others, so a failure never becomes a hang.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import rules
from ..errors import UserError
from ..rules.base import Rule
from .block_parallel import BlockPipeline
from .config import check_step_sizes, smallest_step, step_sizes
from .data_parallel import DataParallel
from .parallel import Rank
from .progress import Diverged
from .runfiles import STOP_SIGNALS, Interrupted, keep_stop_signals, noted_stop_signal
from .trainer import Parallelism

DEFAULT_TIMEOUT_S = 120.0
#: A process whose failure is probably a consequence (a peer vanished, or an error that process 0
#: reports too) waits this long before it reports, so that the cause is reported first; the
#: launcher usually ends it in the meantime.
REPORT_DELAY_S = 1.0
MODES = ("data", "blocks")


# ----- planning: everything decided and validated before a process starts ---------------------
@dataclass(frozen=True)
class Launch:
    """How a run is laid out over processes."""

    procs: int
    mode: str  # "data" | "blocks"
    device: str  # "cpu", "cuda" or "cuda:N" (one process only)
    timeout_s: float = DEFAULT_TIMEOUT_S
    torchrun: bool = False  # this process is one of torchrun's; it reads its rank from the environment

    @property
    def distributed(self) -> bool:
        return self.procs > 1

    @property
    def spawns(self) -> bool:
        """This process starts the ranks itself (``--procs K``, not under torchrun)."""
        return self.distributed and not self.torchrun

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


def local_rules() -> list[str]:
    return sorted(name for name in rules.available() if rules.get(name).local)


def torchrun_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (or another env:// launcher)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def plan(procs: int | None, parallel: str | None, device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Launch:
    """Check the process options against each other and this machine; no data needed yet."""
    world = torchrun_world()
    if world is not None and procs is not None and procs != world:
        raise UserError(f"--procs {procs} disagrees with torchrun's {world} processes; leave --procs out under torchrun")
    procs = world if world is not None else (1 if procs is None else procs)
    if procs < 1:
        raise UserError(f"--procs must be at least 1, got {procs}")
    mode = parallel or "data"
    if mode not in MODES:
        raise UserError(f"unknown --parallel {mode!r}; choose data or blocks")
    if not timeout_s > 0:
        raise UserError(f"--dist-timeout must be positive, got {timeout_s}")
    if procs > 1 and device.startswith("cuda"):
        if device != "cuda":
            raise UserError(f"--device {device} names one GPU; with --procs use --device cuda (process r takes GPU r)")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", procs))
        if torch.cuda.device_count() < local:
            raise UserError(f"{local} processes on this machine need {local} GPUs; torch sees {torch.cuda.device_count()}")
    return Launch(procs=procs, mode=mode, device=device, timeout_s=timeout_s, torchrun=world is not None)


def check_run(launch: Launch, rule: Rule, train_samples: int, batch_size: int) -> None:
    """The checks that need the built rule and the data's size."""
    if launch.mode == "blocks":
        if not rule.local:
            raise UserError(f"--parallel blocks needs a local rule, whose blocks learn from local signals only "
                            f"({', '.join(local_rules())}); {rule.name!r} is not local")
        groups = len(rule.layer_groups())
        if launch.procs > groups:
            what = "layers (hidden blocks + head)" if groups == len(rule.net.layers) else "modules (groups of blocks + head)"
            raise UserError(f"--parallel blocks cannot split {groups} {what} over {launch.procs} processes; "
                            f"use --procs {groups} or fewer")
    each = smallest_step(rule)  # samples a step needs (per process under --parallel data): 2 with batch norm
    check_step_sizes(train_samples, batch_size, each)
    if launch.mode == "data" and launch.distributed:
        smallest, need = min(step_sizes(train_samples, batch_size, each)), launch.procs * each
        if smallest < need:
            why = f" ({each} each for batch norm)" if each > 1 else ""
            raise UserError(f"a step of {smallest} samples cannot be shared by {launch.procs} processes{why}; "
                            f"choose --batch-size/--limit-train so that every step has at least {need}")


# ----- processes: starting them, joining the group, reporting failures -------------------------
# (Rank, this process's place in the group, is in parallel.py: the layouts use it too.)
RankMain = Callable[..., None]  # fn(rank: Rank, *args)


def spawn(launch: Launch, fn: RankMain, *args: Any) -> int:
    """Run ``fn(rank, *args)`` in ``launch.procs`` new processes; return the run's exit code.

    A failed process has already reported itself on stderr; a process ended by a signal is
    reported here. When one fails, torch's process context ends the others at once.
    """
    timeout = timedelta(seconds=launch.timeout_s)
    # Ending the other processes after a failure is expected here, not worth a warning.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    # Port 0: the OS picks a free port, and holding the store here means no other run can take it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    context = mp.start_processes(_spawned_main, args=(launch, store.port, fn, args), nprocs=launch.procs,
                                 join=False, start_method="spawn")
    stops: list[int] = []
    try:
        with _forwarding_stop_signals(context, store, stops):
            while not context.join():
                pass
    except mp.ProcessExitedException as exc:
        if exc.signal_name and stops:  # a stop reached a process before it could keep it: still starting
            name = signal.Signals(stops[0]).name
            print(f"localcredit: stopped by {name} while the processes were starting: nothing new to save; "
                  f"run the same command again (with --resume if --out holds a checkpoint)", file=sys.stderr)
            return 128 + stops[0]
        if exc.signal_name:
            print(f"localcredit: error: rank {exc.error_index} was ended by {exc.signal_name}", file=sys.stderr)
            return 1
        return exc.exit_code
    except mp.ProcessRaisedException as exc:  # only what escaped run_rank's own reporting
        print(f"localcredit: error: rank {exc.error_index} failed: {_last_line(str(exc))}", file=sys.stderr)
        return 1
    return 0


#: Set in the launcher's store when a stop signal reached the launcher (see _end_unless_a_stop).
STOP_KEY = "localcredit/stop"
#: How long a spawned process waits before it asks the launcher whether a signal was a stop.
STOP_CONFIRM_S = 1.0


@contextlib.contextmanager
def _forwarding_stop_signals(context: Any, store: dist.TCPStore, stops: list[int]):
    """SIGTERM/SIGINT sent to the launcher reach every process, which stops cleanly (a scheduler may
    signal only the process it started); the launcher itself waits for them instead of dying."""
    def forward(signum: int, frame: Any) -> None:
        stops.append(signum)
        store.set(STOP_KEY, str(signum))
        for pid in context.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    with contextlib.ExitStack() as restore:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                restore.callback(signal.signal, sig, signal.signal(sig, forward))
        yield


def _spawned_main(index: int, launch: Launch, port: int, fn: RankMain, args: tuple) -> None:
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore; a process ended by the launcher could not
    # release it, and Python would warn about a leaked semaphore at exit. A thread lock suffices here.
    tqdm.set_lock(threading.RLock())
    keep_stop_signals(hook=lambda signum: threading.Thread(target=_end_unless_a_stop, args=(signum, port, launch),
                                                           daemon=True).start())
    sys.exit(run_rank(launch, fn, *args, rank=index, store_port=port))


def _end_unless_a_stop(signum: int, port: int, launch: Launch) -> None:
    """In a spawned process that got SIGTERM/SIGINT: was it a stop (it reached the launcher too), or the
    launcher ending the run because another process failed? A stop is left to the Trainer (a clean
    stop at the next agreed step); after a failure this process ends at once, saying nothing: the
    process that failed has said what happened."""
    time.sleep(STOP_CONFIRM_S)  # a signal to the whole group reaches the launcher at the same moment
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
        if store.check([STOP_KEY]):
            return
    except Exception:  # noqa: BLE001 -- the launcher is gone: the run is over either way
        pass
    os._exit(128 + signum)


def run_rank(launch: Launch, fn: RankMain, *args: Any, rank: int | None = None, store_port: int | None = None) -> int:
    """Join the group as ``rank`` (torchrun: from the environment), run ``fn``, return an exit code.

    Errors become one line on stderr: a user error exits 2, a divergence 1, anything else 1 with
    the rank and the exception named.
    """
    rank = int(os.environ["RANK"]) if rank is None else rank
    try:
        place = join_group(launch, rank, store_port)
        try:
            fn(place, *args)
        except Interrupted as exc:  # every process stopped at the same step; process 0 wrote the checkpoint
            if rank == 0:
                print(f"localcredit: {exc}", file=sys.stderr, flush=True)
            _leave_group()
            return exc.exit_code
        _leave_group()
        return 0
    except UserError as exc:
        return _report(f"localcredit: error: {exc}", 2, consequence=rank != 0)
    except Diverged as exc:
        return _report(f"localcredit: {exc}", 1, consequence=rank != 0)
    except Exception as exc:  # noqa: BLE001 -- every failure must end the run with a message
        if _is_communication_error(exc):  # most likely another process failed first
            message = f"localcredit: error: rank {rank} lost contact with the other processes: {_backend_message(exc)}"
            return _report(message, 1, consequence=True)
        message = f"localcredit: error: rank {rank} failed: {type(exc).__name__}: {_first_line(str(exc))}"
        return _report(message, 1, consequence=False)


def _leave_group() -> None:
    # Tear the group down together: a pipeline process that finished (and began to shut down)
    # while process 0 was still evaluating was seen to abort in gloo at exit ("terminate called
    # without an active exception", a few times in a hundred runs); the barrier is meant to keep
    # any process from exiting while a peer still holds the group.
    dist.barrier()
    dist.destroy_process_group()


def join_group(launch: Launch, rank: int, store_port: int | None = None) -> Rank:
    """init_process_group with a bounded timeout; pick this process's device."""
    timeout = timedelta(seconds=launch.timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local_rank}" if launch.device.startswith("cuda") else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if store_port is None:  # torchrun: env:// rendezvous
        dist.init_process_group(launch.backend, timeout=timeout)
    else:
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
        dist.init_process_group(launch.backend, store=store, rank=rank, world_size=launch.procs, timeout=timeout)
    return Rank(rank=rank, world=launch.procs, device=device, timeout=timeout)


def _report(message: str, code: int, consequence: bool) -> int:
    if consequence:
        time.sleep(REPORT_DELAY_S)
        if noted_stop_signal():
            # The launcher is ending the run (it signalled us) and the cause is reported. End as its
            # signal would have: at once, without the interpreter's teardown, in which gloo's threads
            # of the broken group abort with "terminate called without an active exception".
            sys.stderr.flush()
            os._exit(128 + noted_stop_signal())
    print(message, file=sys.stderr, flush=True)
    return code


#: gloo words a wait past the group's timeout in more than one way: "Timed out waiting ..." from a
#: blocking collective, "Application timeout caused pair closure" from an asynchronous one's wait().
TIMEOUT_WORDING = re.compile(r"timed out|timeout", re.IGNORECASE)


def _is_communication_error(exc: Exception) -> bool:
    # gloo reports a dead peer or a timeout as a plain RuntimeError, mostly naming its source file.
    text = str(exc)
    return isinstance(exc, dist.DistError) or bool(re.search(r"gloo|nccl|NCCL", text) or TIMEOUT_WORDING.search(text))


def _backend_message(exc: Exception) -> str:
    """'[.../pair.cc:553] Connection closed by peer [127.0.0.1]:26855. This is typically ...' -> its first sentence;
    a timeout however worded starts with 'Timed out'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(str(exc))).split(". ")[0]
    if TIMEOUT_WORDING.search(text) and not text.startswith("Timed out"):
        return f"Timed out ({text})"
    return text


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else "")[:300]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:300]


def parallelism(launch: Launch, place: Rank) -> Parallelism:
    return BlockPipeline(place, launch.backend) if launch.mode == "blocks" else DataParallel(place, launch.backend)

