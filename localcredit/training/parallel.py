"""What both multi-process layouts share: a process's place in the group, the agreement between steps
on checkpoints and stops, the random streams, and collectives over the whole network.

The layouts are :class:`~localcredit.training.data_parallel.DataParallel` and
:class:`~localcredit.training.block_parallel.BlockPipeline`; processes are started by
:mod:`localcredit.training.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..rules.base import Rule
from .progress import EpochProgress
from .trainer import AGREE_EVERY, Parallelism, Trainer

#: A bucket of a one-off all-reduce (batch-norm statistics); a 784-1000-1000-10 MLP fits in one.
BUCKET_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Rank:
    """This process's place in the group."""

    rank: int
    world: int
    device: torch.device
    timeout: timedelta



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


# ----- what both layouts share: agreeing between steps, own random streams ----------------
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

