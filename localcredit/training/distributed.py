"""Training on several processes with torch.distributed: data parallel, and a decoupled block pipeline.

Two layouts, both behind the Trainer's :class:`~localcredit.training.trainer.Parallelism` seam:

* :class:`DataParallel` (``--parallel data``, every rule). ``--batch-size`` stays the global batch:
  every process takes the same global slice of the epoch's order and keeps its share of it.
  The gradients are averaged across processes, weighted by share, in buckets
  (:class:`GradientBuckets`) whose all-reduces start while the rule is still computing: as soon as
  the rule says a bucket's gradients are final (``Rule.gradients_final``: after each layer's local
  loss, or per parameter during one backward pass), else when its credit assignment returns.
  Before its optimisers step (``Rule.gradient_hooks``) every bucket and the step's logged figures
  are reduced. Every process then applies the same update to the same weights, so
  the run is the single-process run up to float rounding -- except that batch norm normalises
  over each process's share of the batch (as DDP without SyncBatchNorm); its running statistics
  are averaged across processes after every epoch.
* :class:`BlockPipeline` (``--parallel blocks``, local rules only). Each process owns a contiguous
  group of layers (balanced by the FLOPs of their local steps; the head goes with the last group)
  and their optimisers. Process k receives micro-batch i's activations from k-1, trains its
  layers on it, sends its output on to k+1 and moves to micro-batch i+1 without waiting for the
  send. Nothing travels backwards: a local layer only ever needs its own input, computed by the
  layers below with their weights of that moment -- exactly what the sequential rule feeds it,
  so the pipeline computes the sequential rule's updates (batch-norm statistics included: each
  stage owns its blocks' statistics). After each epoch every owner broadcasts its layers
  (weights, buffers and optimiser state), and process 0 evaluates and checkpoints.

Processes come either from ``--procs K`` (:func:`spawn`: K processes started here, rendezvous
through a TCPStore this process hosts on a free port) or from ``torchrun`` (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in the environment). Backend: gloo on CPU, nccl on CUDA. Every wait
is bounded by ``--dist-timeout``; a process that fails reports one line naming its rank and its
error, and the launcher ends the others, so a failure never becomes a hang.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from .. import rules
from ..errors import UserError
from ..rules.base import Rule, StepFigures
from .runfiles import STOP_SIGNALS, Interrupted, keep_stop_signals, noted_stop_signal
from .trainer import (AGREE_EVERY, Diverged, EpochProgress, Parallelism, Trainer, check_step_sizes, smallest_step,
                    step_sizes)

DEFAULT_TIMEOUT_S = 120.0
#: A bucket of a one-off all-reduce (batch-norm statistics); a 784-1000-1000-10 MLP fits in one.
BUCKET_BYTES = 32 * 2**20
#: A bucket of the gradient all-reduce of a data-parallel step: small enough that the first buckets
#: start (and travel) while the rule computes the rest, large enough that each all-reduce's fixed
#: cost is paid rarely. A bucket closes before the parameter that would take it past this size, so
#: one big weight (a 784x1000 layer: 3.1 MB) gets a bucket of its own.
GRADIENT_BUCKET_BYTES = 2**20
#: Sends a pipeline process may leave in flight before it waits for the oldest: enough to keep
#: computing while the activations travel, few enough that a slow next stage holds it back.
SEND_WINDOW = 2
#: Receives posted ahead of use, so micro-batch i+1 arrives while micro-batch i is computed.
RECEIVE_AHEAD = 2
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
@dataclass(frozen=True)
class Rank:
    """This process's place in the group."""

    rank: int
    world: int
    device: torch.device
    timeout: timedelta


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


# ----- shared pieces ---------------------------------------------------------------------------
def broadcast_state(rule: Rule, src: int = 0) -> None:
    """Make every process hold process ``src``'s weights and buffers (they were built from the same
    seed; this guards against a device that rounds differently)."""
    with torch.no_grad():
        for tensor in rule.state_dict().values():
            if isinstance(tensor, torch.Tensor):
                dist.broadcast(tensor, src=src)


def all_reduce_flat(tensors: Sequence[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """Sum ``scale * t`` across processes for every tensor, in few flat all-reduces (buckets).

    Returns new tensors (views into the reduced buckets), shaped like the inputs.
    """
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for bucket in _buckets(tensors, BUCKET_BYTES):
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        flat.mul_(scale)
        dist.all_reduce(flat)
        offset = 0
        for i in bucket:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].view_as(tensors[i])
            offset += n
    return out  # type: ignore[return-value]


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> list[list[int]]:
    """Consecutive tensors of one dtype and device, up to ``limit`` bytes per bucket (a bigger tensor alone)."""
    buckets: list[list[int]] = []
    size, kind = 0, None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if not buckets or (t.dtype, t.device) != kind or size + nbytes > limit:
            buckets.append([])
            size, kind = 0, (t.dtype, t.device)
        buckets[-1].append(i)
        size += nbytes
    return buckets


# ----- data parallel ---------------------------------------------------------------------------
class _Agreeing(Parallelism):
    """What both layouts share: deciding together, between steps, whether to checkpoint or stop, and
    each process's own part of a checkpoint.

    A signal may reach the processes at different steps, and only process 0's clock counts for
    --checkpoint-every, so every AGREE_EVERY steps each process posts what it wants (checkpoint?
    signal?) in an asynchronous MAX all-reduce and reads the previous one's outcome: every process
    acts on the same outcome at the same step, and no process waits (the pipeline's stages stay
    decoupled). A stop is seen at most 2 * AGREE_EVERY steps after the signal.
    """

    def __init__(self, place: Rank, backend: str):
        self.place, self.backend = place, backend
        self.writer = place.rank == 0
        self._pending: tuple[torch.Tensor, Any] | None = None
        self._stream_restored = False  # a checkpoint gave this process its own random stream back

    def _post(self, wants: tuple[int, int]) -> None:
        flags = torch.tensor(wants, dtype=torch.int64, device=self.place.device)
        self._pending = (flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True))

    def _outcome(self) -> tuple[int, int]:
        if self._pending is None:
            return (0, 0)
        flags, work = self._pending
        self._pending = None
        work.wait(self.place.timeout)
        checkpoint, signum = flags.tolist()
        return int(checkpoint), int(signum)

    def agree(self, wants: tuple[int, int], steps_done: int) -> tuple[int, int] | None:
        if steps_done % AGREE_EVERY:
            return None
        decided = self._outcome()
        if not decided[1]:  # a stop ends the polling here, in every process alike
            self._post((0 if decided[0] else wants[0], wants[1]))  # a checkpoint decided now is not wanted again
        return decided

    def settle(self, wants: tuple[int, int]) -> tuple[int, int]:
        earlier = self._outcome()
        self._post(wants)
        now = self._outcome()
        return max(earlier[0], now[0]), max(earlier[1], now[1])

    def checkpoint_extra(self, trainer: Trainer, progress: EpochProgress | None) -> dict[str, Any]:
        # Every process's own random streams (dropout draws differ between processes), by rank.
        own = {"torch_rng": torch.get_rng_state()}
        if self.place.device.type == "cuda":
            own["cuda_rng"] = torch.cuda.get_rng_state(self.place.device)
        gathered: list[Any] = [None] * self.place.world
        dist.all_gather_object(gathered, own)
        return {"ranks": gathered}

    def load_checkpoint_extra(self, trainer: Trainer, extra: dict[str, Any]) -> None:
        ranks = extra.get("ranks") or []
        # Resumed with another process count: process 0's stream, which attach() separates again.
        if len(ranks) == self.place.world:
            own = ranks[self.place.rank]
            torch.set_rng_state(own["torch_rng"].cpu())
            if "cuda_rng" in own and self.place.device.type == "cuda":
                torch.cuda.set_rng_state(own["cuda_rng"].cpu(), self.place.device)
            self._stream_restored = True

    def separate_random_streams(self) -> None:
        """Give each process its own random stream (dropout masks, any random draw of a step), so that the
        shares of a batch do not draw the same masks. Called after the weights are built from the seed
        and shared; process 0 keeps the stream one process would have, process r > 0 is seeded from that
        stream and r (CPU and CUDA). A resumed process whose checkpoint held its stream keeps that one."""
        if self._stream_restored or self.place.rank == 0:
            return
        torch.manual_seed(rank_seed(torch.get_rng_state(), self.place.rank))


def rank_seed(state: torch.Tensor, rank: int) -> int:
    """The seed of process ``rank``'s own random stream: a number drawn from the shared stream ``state``
    (the same in every process), plus ``rank``: different in every process, the same in every run."""
    generator = torch.Generator()
    generator.set_state(state)
    return int(torch.randint(0, 2**62, (1,), generator=generator)) + rank


@dataclass
class _Bucket:
    """Consecutive parameters (in the order the rule finishes them) whose gradients travel together."""

    params: list[torch.nn.Parameter]
    waiting: int = 0  # parameters not yet announced final this step
    flat: torch.Tensor | None = None  # what is being reduced: the one gradient itself, or a copy of all
    in_place: bool = False  # flat is the bucket's one gradient
    had_grad: list[bool] | None = None  # which parameters had a gradient when the reduction started
    work: Any = None


class GradientBuckets:
    """A data-parallel step's gradient all-reduce, started bucket by bucket while the rule computes.

    The rule's trainable parameters, in the order its step finishes their gradients
    (``Rule.gradient_order``), are cut into buckets of up to GRADIENT_BUCKET_BYTES. When the rule
    announces gradients final (``Rule.gradients_final``) and that completes a bucket, the bucket's
    share-weighted gradients start an asynchronous all-reduce -- unless an earlier bucket is still
    incomplete: buckets start strictly in order, so every process issues the same collectives in
    the same order whatever the timing. :meth:`finish` starts the rest (what the rule did not
    announce, and parameters without a gradient, reduced as zeros and left without one), reduces
    the step's logged figures alongside, waits, and puts the sums into ``.grad``.
    """

    def __init__(self, rule: Rule, place: Rank):
        self.device = place.device
        trainable = [p for p in rule.parameters() if p.requires_grad]
        ordered = _unique([*rule.gradient_order(), *trainable])  # whatever the order left out goes last
        self.buckets = [_Bucket(params) for params in _fill_buckets(ordered, GRADIENT_BUCKET_BYTES)]
        self.bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket.params}
        self.active = False
        self.share = 1.0
        self._announced: set[int] = set()
        self._next = 0  # the first bucket not started yet

    def begin(self, share: float) -> None:
        """A step starts; this process holds ``share`` of the global batch."""
        self.active, self.share, self._next = True, share, 0
        self._announced.clear()
        for bucket in self.buckets:
            bucket.waiting = len(bucket.params)

    def final(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Listener of ``Rule.gradients_final``: start every bucket that is now complete, in order."""
        if not self.active:  # a backward outside a training step (e.g. an alignment probe)
            return
        for p in params:
            b = self.bucket_of.get(id(p))
            if b is not None and id(p) not in self._announced:
                self._announced.add(id(p))
                self.buckets[b].waiting -= 1
        while self._next < len(self.buckets) and self.buckets[self._next].waiting == 0:
            self._start(self.buckets[self._next])
            self._next += 1

    def finish(self, stats: StepFigures) -> None:
        """Reduce what is left and the logged figures; write the averaged gradients; the step is over.

        The reduced figures stay 0-dim tensors on the device: the Trainer reads them (and waits for
        the device) only every few steps.
        """
        for bucket in self.buckets[self._next:]:
            self._start(bucket)
        keys = sorted(stats)
        # float64: a handful of numbers, and the log keeps the single-process precision.
        figures = torch.stack([_float64_on(self.device, stats[k]) for k in keys])
        figures.mul_(self.share)
        figures_work = dist.all_reduce(figures, async_op=True)
        _wait_all([bucket.work for bucket in self.buckets] + [figures_work])
        for bucket in self.buckets:
            self._settle(bucket)
        stats.update(zip(keys, figures.unbind()))
        self.active = False

    @torch.no_grad()
    def _start(self, bucket: _Bucket) -> None:
        grads = [p.grad for p in bucket.params]
        bucket.had_grad = [g is not None for g in grads]
        bucket.in_place = len(grads) == 1 and grads[0] is not None
        if bucket.in_place:
            bucket.flat = grads[0]  # one gradient: reduced where it is, no copy there and back
        else:
            bucket.flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                     for g, p in zip(grads, bucket.params)])
        bucket.flat.mul_(self.share)
        bucket.work = dist.all_reduce(bucket.flat, async_op=True)

    @staticmethod
    def _settle(bucket: _Bucket) -> None:
        for p, had in zip(bucket.params, bucket.had_grad):
            changed = p.grad is not bucket.flat if bucket.in_place else (p.grad is not None) != had
            if changed:  # a broken promise must not pass silently: it would split the processes' weights
                raise RuntimeError(f"a gradient of shape {tuple(p.shape)} changed after the rule announced it final "
                                   f"(Rule.gradients_final)")
        if not bucket.in_place:  # the averaged gradients become views into the reduced copy
            offset = 0
            for p, had in zip(bucket.params, bucket.had_grad):
                if had:  # the same parameters lack a gradient in every process, and keep lacking it
                    p.grad = bucket.flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        bucket.flat = bucket.work = bucket.had_grad = None


def _float64_on(device: torch.device, figure: float | torch.Tensor) -> torch.Tensor:
    """A logged figure as a 0-dim float64 tensor on ``device``, made there: a float is filled in by a
    kernel rather than copied from the host (such a copy can wait for the device)."""
    if isinstance(figure, torch.Tensor):
        return figure.detach().to(device, torch.float64)
    return torch.full((), figure, dtype=torch.float64, device=device)


def _wait_all(works: Sequence[Any]) -> None:
    """Wait for every asynchronous collective, even after one failed, then raise the first failure.

    No reduction may be left in flight when a process ends (gloo aborts the process at exit, in
    the middle of its error report, otherwise). Each wait is bounded by the process group's
    timeout (``--dist-timeout``), whose error names the backend.
    """
    failure: Exception | None = None
    for work in works:
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 -- re-raised below, after the others are done
            failure = failure or exc
    if failure is not None:
        raise failure


def _unique(params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """``params`` without repeats, first occurrence kept."""
    return list({id(p): p for p in params}.values())  # a dict keeps each key where it first came


def _fill_buckets(params: Sequence[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters of one dtype and device, up to ``limit`` bytes per bucket (a bigger
    parameter alone)."""
    return [[params[i] for i in bucket] for bucket in _buckets([p.detach() for p in params], limit)]


class DataParallel(_Agreeing):
    """Every process runs the whole rule on its share of each global batch; updates are averaged."""

    def __init__(self, place: Rank, backend: str):
        super().__init__(place, backend)
        self._share = 1.0 / place.world
        self._own_statistics: list[torch.Tensor] | None = None  # from a mid-epoch checkpoint
        self.buckets: GradientBuckets | None = None

    def attach(self, trainer: Trainer) -> None:
        rule = trainer.rule
        broadcast_state(rule)
        self.separate_random_streams()
        if self._own_statistics is not None:  # the broadcast gave every process process 0's statistics
            with torch.no_grad():
                for buffer, saved in zip(_float_buffers(rule), self._own_statistics, strict=True):
                    buffer.copy_(saved)
            self._own_statistics = None
        if self.buckets is not None:  # attached before (a second fit): one set of buckets listens
            rule.final_gradient_listeners.remove(self.buckets.final)
        self.buckets = GradientBuckets(rule, self.place)
        rule.final_gradient_listeners.append(self.buckets.final)
        if self.average not in rule.gradient_hooks:
            rule.gradient_hooks.append(self.average)

    def step(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        # Contiguous shares of the global batch (augmented as a whole, so every process sees the
        # single-process images); uneven shares are weighted by their size, so a mean loss over
        # the global batch is reproduced exactly.
        x_share, y_share = x.tensor_split(self.place.world)[self.place.rank], y.tensor_split(self.place.world)[self.place.rank]
        self._share = len(y_share) / len(y)
        if self.buckets is not None:
            self.buckets.begin(self._share)
        return trainer.rule.step(x_share, y_share)

    def average(self, rule: Rule, stats: StepFigures) -> None:
        """Gradient hook: the share-weighted mean of every process's update and logged figures."""
        assert self.buckets is not None, "attach() installs this hook and the buckets together"
        if not self.buckets.active:  # a rule.step that did not come through step() above
            self.buckets.begin(self._share)
        self.buckets.finish(stats)

    def finish_epoch(self, trainer: Trainer) -> None:
        average_statistics(trainer.rule)

    def checkpoint_extra(self, trainer: Trainer, progress: EpochProgress | None) -> dict[str, Any]:
        extra = super().checkpoint_extra(trainer, progress)
        if progress is not None:  # mid-epoch, each process's batch-norm statistics are still its own
            statistics: list[Any] = [None] * self.place.world
            dist.all_gather_object(statistics, [b.cpu() for b in _float_buffers(trainer.rule)])
            for entry, buffers in zip(extra["ranks"], statistics):
                entry["buffers"] = buffers
        return extra

    def load_checkpoint_extra(self, trainer: Trainer, extra: dict[str, Any]) -> None:
        super().load_checkpoint_extra(trainer, extra)
        ranks = extra.get("ranks") or []
        if len(ranks) == self.place.world and "buffers" in ranks[self.place.rank]:
            self._own_statistics = ranks[self.place.rank]["buffers"]  # applied after attach's broadcast

    def describe(self) -> dict[str, Any]:
        return {"mode": "data", "procs": self.place.world, "backend": self.backend}


def _float_buffers(rule: Rule) -> list[torch.Tensor]:
    return [b for b in rule.net.buffers() if b.is_floating_point()]


def average_statistics(rule: Rule) -> None:
    """Average the network's floating-point buffers (batch-norm running statistics) across processes.

    Each process normalised over its share of every batch, as DDP does without SyncBatchNorm (which
    torch runs on GPUs only), so each kept its own running estimates; after the average every
    process evaluates, checkpoints and resumes the same network.
    """
    buffers = _float_buffers(rule)
    if not buffers:
        return
    with torch.no_grad():
        for buffer, mean in zip(buffers, all_reduce_flat(buffers, 1.0 / dist.get_world_size())):
            buffer.copy_(mean)


# ----- block pipeline --------------------------------------------------------------------------
def probe_layers(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> tuple[list[int], list[tuple[int, ...]]]:
    """Per layer: FLOPs of its local step on ``x`` (forward and backward, auxiliary heads included)
    and the per-sample shape of its output.

    Measured on a copy of the rule, so the real one keeps no gradients and no tallies.
    """
    probe = copy.deepcopy(rule)
    costs, shapes, h = [], [], x
    for l in range(len(probe.net.layers)):
        with FlopCounterMode(display=False) as counter:
            h, loss = probe.block_step_loss(l, h, y)
            if loss is not None:
                loss.backward()
        costs.append(counter.get_total_flops())
        shapes.append(tuple(h.shape[1:]))
    return costs, shapes


def partition(costs: Sequence[float], parts: int) -> list[range]:
    """Split layers 0..n-1 into ``parts`` contiguous, non-empty groups minimising the largest cost."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} layers into {parts} groups")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @lru_cache(maxsize=None)
    def best(start: int, k: int) -> tuple[float, tuple[int, ...]]:
        if k == 1:
            return prefix[n] - prefix[start], (n,)
        options = []
        for end in range(start + 1, n - k + 2):
            rest, cuts = best(end, k - 1)
            options.append((max(prefix[end] - prefix[start], rest), (end, *cuts)))
        return min(options)

    _, cuts = best(0, parts)
    starts = (0, *cuts[:-1])
    return [range(a, b) for a, b in zip(starts, cuts)]


def grouped_partition(costs: Sequence[float], groups: Sequence[range], parts: int) -> list[range]:
    """:func:`partition` of the layers that never cuts a group (a module that learns as one)."""
    stages = partition([sum(costs[l] for l in group) for group in groups], parts)
    return [range(groups[stage[0]][0], groups[stage[-1]][-1] + 1) for stage in stages]


class Inbox:
    """Activations from the previous stage, with receives posted ahead of use."""

    def __init__(self, src: int, shapes: list[tuple[int, ...]], dtype: torch.dtype, place: Rank, first_step: int = 0):
        self.src, self.shapes, self.dtype, self.place = src, shapes, dtype, place
        self.first_step = first_step  # a resumed epoch starts at this step
        self.pending: deque[tuple[torch.Tensor, Any]] = deque()
        self.posted = 0
        for _ in range(RECEIVE_AHEAD):
            self._post()

    def _post(self) -> None:
        if self.posted < len(self.shapes):
            buffer = torch.empty(self.shapes[self.posted], dtype=self.dtype, device=self.place.device)
            # The tag is the micro-batch's step: a message can only land in its own buffer.
            self.pending.append((buffer, dist.irecv(buffer, src=self.src, tag=self.first_step + self.posted)))
            self.posted += 1

    def take(self) -> torch.Tensor:
        buffer, work = self.pending.popleft()
        work.wait(self.place.timeout)
        self._post()
        return buffer


class Outbox:
    """Activations to the next stage, sent asynchronously with at most SEND_WINDOW in flight."""

    def __init__(self, dst: int, place: Rank):
        self.dst, self.place = dst, place
        self.pending: deque[tuple[torch.Tensor, Any]] = deque()

    def send(self, h: torch.Tensor, step: int) -> None:
        h = h.contiguous()  # kept referenced until the send completes, so its memory is not reused
        self.pending.append((h, dist.isend(h, dst=self.dst, tag=step)))
        while len(self.pending) > SEND_WINDOW:
            self._wait_oldest()

    def drain(self) -> None:
        while self.pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        _, work = self.pending.popleft()
        work.wait(self.place.timeout)


class BlockPipeline(_Agreeing):
    """Each process trains a contiguous group of a local rule's layers; activations flow forward only."""

    def __init__(self, place: Rank, backend: str):
        super().__init__(place, backend)
        self.stages: list[range] = []
        self.costs: list[int] = []
        self.output_shapes: list[tuple[int, ...]] = []

    @property
    def own(self) -> range:
        return self.stages[self.place.rank]

    def attach(self, trainer: Trainer) -> None:
        rule = trainer.rule
        if not rule.local:
            raise UserError(f"--parallel blocks needs a local rule; {rule.name!r} is not local")
        if len(rule.optimizers) != len(rule.net.layers):
            raise RuntimeError(f"rule {rule.name!r} is marked local but does not have one optimiser per layer")
        broadcast_state(rule)
        probe = slice(0, trainer.config.batch_size)
        self.costs, self.output_shapes = probe_layers(rule, trainer.x_train[probe], trainer.y_train[probe])
        self.separate_random_streams()
        self.stages = grouped_partition(self.costs, rule.layer_groups(), self.place.world)

    # ----- one epoch ---------------------------------------------------------------------------
    def train_epoch(self, trainer: Trainer, progress: EpochProgress) -> None:
        rule, rank, epoch, first = trainer.rule, self.place.rank, progress.epoch, progress.steps_done
        rule.net.train()
        in_use = rule.layers_in_use()
        own = [l for l in self.own if l < in_use]
        steps = trainer.steps_per_epoch
        batches = trainer.epoch_batches(epoch, first)
        inbox = self._inbox(rule, own, batches, trainer.x_train.dtype, first)
        outbox = Outbox(rank + 1, self.place) if rank + 1 < self.place.world and self.stages[rank + 1][0] < in_use else None
        sums = _EpochSums(self.place.device, _own_entry(progress.totals, rank, self.place.world))
        # A stage with no layer in use idles through the steps, only taking part in the decisions.
        inputs = trainer.training_batches(epoch, first) if own else itertools.repeat((None, None))
        bar = trainer.progress_bar(epoch, steps, first)
        start = time.perf_counter()
        for step, (x, y) in zip(range(first, steps), inputs):
            if own:
                h = inbox.take() if inbox is not None else x
                self._micro_batch(rule, own, h, y, step, outbox, sums)
            bar.update()
            progress.steps_done = step + 1
            trainer.at_step_boundary(progress, time.perf_counter() - start, totals=lambda: self._partial_sums(sums))
        bar.close()
        if outbox is not None:
            outbox.drain()
        totals, first_bad = sums.reduce(rule)
        seconds = progress.seconds + time.perf_counter() - start  # the reduce waited for the slowest stage
        self._sum_block_counters(rule)
        if first_bad < steps:
            raise Diverged(epoch + 1, int(first_bad) + 1, "the loss")
        if totals["nonfinite_weights"]:
            raise Diverged(epoch + 1, steps, "a weight")
        stats = {"loss": totals["loss"] / steps}
        if totals["head_steps"]:
            stats["head_loss"] = totals["head_loss"] / totals["head_steps"]
        trainer.record_epoch(epoch, seconds, stats)

    def _partial_sums(self, sums: "_EpochSums") -> dict[str, Any]:
        """Every stage's sums so far, by rank: a resumed stage continues its own (the same float sums)."""
        gathered: list[Any] = [None] * self.place.world
        dist.all_gather_object(gathered, sums.own_entry())
        return {"per_rank": gathered}

    def checkpoint_extra(self, trainer: Trainer, progress: EpochProgress | None) -> dict[str, Any]:
        if progress is not None:  # mid-epoch: gather every stage's layers and tallies, as an epoch's end does
            self._sum_block_counters(trainer.rule)
            self.finish_epoch(trainer)
        return super().checkpoint_extra(trainer, progress)

    def _inbox(self, rule: Rule, own: list[int], batches: list[torch.Tensor], dtype: torch.dtype,
               first_step: int) -> Inbox | None:
        if self.place.rank == 0 or not own:
            return None
        shape = self.output_shapes[own[0] - 1]  # the output of the layer below my first
        return Inbox(self.place.rank - 1, [(len(b), *shape) for b in batches], dtype, self.place, first_step)

    @staticmethod
    def _micro_batch(rule: Rule, own: list[int], h: torch.Tensor, y: torch.Tensor, step: int,
                     outbox: Outbox | None, sums: "_EpochSums") -> None:
        rule.zero_grad()
        step_loss = h.new_zeros(())
        for l in own:
            h, loss = rule.block_step_loss(l, h, y)
            if l == own[-1] and outbox is not None:
                outbox.send(h, step)  # the next stage starts while this one runs its backward passes
            if loss is not None:
                loss.backward()
                step_loss += loss.detach()
                if l == len(rule.net.blocks):
                    sums.add_head(loss.detach())
        for l in own:
            rule.optimizers[l].step()
        sums.add_step(step, step_loss)

    def _sum_block_counters(self, rule: Rule) -> None:
        for counter in rule.block_counters():
            with torch.no_grad():
                for row in range(len(counter)):
                    if row not in self.own:
                        counter[row] = 0  # another stage's tally: counted there
                dist.all_reduce(counter)

    # ----- after an epoch: every process gets every layer --------------------------------------
    def finish_epoch(self, trainer: Trainer) -> None:
        rule = trainer.rule
        for owner, layers in enumerate(self.stages):
            payload = [_layers_state(rule, layers) if owner == self.place.rank else None]
            dist.broadcast_object_list(payload, src=owner, device=self._object_device())
            if owner != self.place.rank:
                _load_layers_state(rule, payload[0])

    def _object_device(self) -> torch.device | None:
        return self.place.device if self.backend == "nccl" else None

    def describe(self) -> dict[str, Any]:
        return {"mode": "blocks", "procs": self.place.world, "backend": self.backend,
                "stages": [list(stage) for stage in self.stages], "layer_flops": self.costs}


class _EpochSums:
    """An epoch's logged figures of one stage, kept on the device (no sync per step) until the end."""

    def __init__(self, device: torch.device, resumed: list[float] | None = None):
        # float64: an epoch's sum of float32 losses keeps the precision of the single-process log.
        loss, head_loss, head_steps, first_bad = resumed or (0.0, 0.0, 0.0, float("inf"))
        self.loss = torch.tensor(loss, dtype=torch.float64, device=device)
        self.head_loss = torch.tensor(head_loss, dtype=torch.float64, device=device)
        self.head_steps = torch.tensor(head_steps, dtype=torch.float64, device=device)
        self.first_bad = torch.tensor(first_bad, dtype=torch.float64, device=device)

    def own_entry(self) -> list[float]:
        """This stage's sums as plain floats (exact: they are float64), for a mid-epoch checkpoint."""
        return [t.item() for t in (self.loss, self.head_loss, self.head_steps, self.first_bad)]

    def add_step(self, step: int, loss: torch.Tensor) -> None:
        self.loss += loss
        bad = ~torch.isfinite(loss)
        self.first_bad = torch.where(bad, torch.clamp(self.first_bad, max=step), self.first_bad)

    def add_head(self, loss: torch.Tensor) -> None:
        self.head_loss += loss
        self.head_steps += 1

    def reduce(self, rule: Rule) -> tuple[dict[str, float], float]:
        nonfinite = sum(int(not torch.isfinite(p).all()) for p in rule.parameters())
        totals = torch.stack([self.loss, self.head_loss, self.head_steps,
                              torch.tensor(float(nonfinite), dtype=torch.float64, device=self.loss.device)])
        dist.all_reduce(totals)
        dist.all_reduce(self.first_bad, op=dist.ReduceOp.MIN)
        loss, head_loss, head_steps, nonfinite_weights = totals.tolist()
        return ({"loss": loss, "head_loss": head_loss, "head_steps": head_steps,
                 "nonfinite_weights": nonfinite_weights}, self.first_bad.item())


def _own_entry(totals: dict[str, Any], rank: int, world: int) -> list[float] | None:
    """This stage's share of a resumed epoch's sums (None: the epoch starts afresh)."""
    per_rank = totals.get("per_rank") or []
    return per_rank[rank] if len(per_rank) == world else None


def _layers_state(rule: Rule, layers: range) -> dict[str, Any]:
    """The weights (with their auxiliary heads), buffers (batch-norm statistics) and optimiser states
    of ``layers``, on the CPU."""
    groups = rule.parameter_groups()
    owned = {id(p) for l in layers for p in groups[l]}
    params = {name: p.detach().cpu() for name, p in rule.named_parameters() if id(p) in owned}
    owned_buffers = {id(b) for l in layers for b in rule.net.layers[l].buffers()}
    buffers = {name: b.cpu() for name, b in rule.named_buffers() if id(b) in owned_buffers}
    optimizers = {l: _to_cpu(rule.optimizers[l].state_dict()) for l in layers}
    return {"params": params, "buffers": buffers, "optimizers": optimizers}


def _load_layers_state(rule: Rule, state: dict[str, Any]) -> None:
    named = {**dict(rule.named_parameters()), **dict(rule.named_buffers())}
    with torch.no_grad():
        for name, value in {**state["params"], **state["buffers"]}.items():
            named[name].copy_(value)
    for l, saved in state["optimizers"].items():
        rule.optimizers[l].load_state_dict(saved)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
