"""The decoupled block pipeline (``--parallel blocks``, local rules only) on several processes.

* :class:`BlockPipeline` (``--parallel blocks``, local rules only). Each process owns a contiguous
group of layers (balanced by the FLOPs of their local steps; the head goes with the last group)
and their optimisers. Process k receives micro-batch i's activations from k-1, trains its
layers on it, sends its output on to k+1 and moves to micro-batch i+1 without waiting for the
send. Nothing travels backwards: a local layer only ever needs its own input, computed by the
layers below with their weights of that moment -- exactly what the sequential rule feeds it,
so the pipeline computes the sequential rule's updates (batch-norm statistics included: each
stage owns its blocks' statistics). After each epoch every owner broadcasts its layers
(weights, buffers and optimiser state), and process 0 evaluates and checkpoints.
"""

from __future__ import annotations

import copy
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UserError
from ..nets.flops import balanced_split
from ..rules.base import Rule
from .parallel import Rank, _Agreeing, broadcast_state
from .progress import Diverged, EpochProgress
from .trainer import Trainer

#: Sends a pipeline process may leave in flight before it waits for the oldest: enough to keep
#: computing while the activations travel, few enough that a slow next stage holds it back.
SEND_WINDOW = 2
#: Receives posted ahead of use, so micro-batch i+1 arrives while micro-batch i is computed.
RECEIVE_AHEAD = 2


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
    sizes = balanced_split(costs, parts)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [range(a, a + size) for a, size in zip(starts, sizes)]


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
        trainer.train_epoch(progress, work=lambda trainer, progress, bar: _StageWork(self, trainer, progress))

    def _partial_sums(self, sums: _EpochSums) -> dict[str, Any]:
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
                assert payload[0] is not None  # the owner's state, broadcast
                _load_layers_state(rule, payload[0])

    def _object_device(self) -> torch.device | None:
        return self.place.device if self.backend == "nccl" else None

    def describe(self) -> dict[str, Any]:
        return {"mode": "blocks", "procs": self.place.world, "backend": self.backend,
                "stages": [list(stage) for stage in self.stages], "layer_flops": self.costs}


class _StageWork:
    """One pipeline stage's epoch: each micro-batch's input from the stage below (the batch itself on the
    first), the rule's local step loop on this stage's layers in use, the output on to the stage above. A
    stage with no layer in use idles through the steps, only taking part in the decisions."""

    def __init__(self, pipeline: BlockPipeline, trainer: Trainer, progress: EpochProgress):
        self.pipeline, self.trainer, self.progress = pipeline, trainer, progress
        rule, place, rank, first = trainer.rule, pipeline.place, pipeline.place.rank, progress.steps_done
        rule.net.train()
        in_use = rule.layers_in_use()
        self.own = [l for l in pipeline.own if l < in_use]
        self.inbox = pipeline._inbox(rule, self.own, trainer.epoch_batches(progress.epoch, first),
                                     trainer.x_train.dtype, first)
        above = rank + 1 < place.world and pipeline.stages[rank + 1][0] < in_use
        self.outbox = Outbox(rank + 1, place) if above else None
        self.sums = _EpochSums(place.device, _own_entry(progress.totals, rank, place.world))

    def batches(self) -> Iterable[tuple[torch.Tensor | None, torch.Tensor | None]]:
        if not self.own:
            return itertools.repeat((None, None))
        return self.trainer.training_batches(self.progress.epoch, self.progress.steps_done)

    def run_step(self, step: int, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        if not self.own:
            return
        h = self.inbox.take() if self.inbox is not None else x
        assert h is not None and y is not None  # a stage with layers in use gets the real batches
        rule, outbox = self.trainer.rule, self.outbox
        rule.zero_grad()
        # The next stage starts on the output while this one runs its backward passes.
        send = (lambda out: outbox.send(out, step)) if outbox is not None else None
        _, figures = rule.train_layers(self.own, h, y, on_output=send)
        for l in self.own:
            rule.optimizers[l].step()
        self.sums.add_step(step, figures["loss"])
        if "head_loss" in figures:
            self.sums.add_head(figures["head_loss"])

    def summed(self) -> dict[str, Any]:
        return self.pipeline._partial_sums(self.sums)

    def end(self) -> dict[str, float]:
        """The figures summed over the stages; the weights checked (the reduce waits for the slowest stage)."""
        if self.outbox is not None:
            self.outbox.drain()
        rule, epoch, steps = self.trainer.rule, self.progress.epoch, self.trainer.steps_per_epoch
        totals, first_bad = self.sums.reduce(rule)
        self.pipeline._sum_block_counters(rule)
        if first_bad < steps:
            raise Diverged(epoch + 1, int(first_bad) + 1, "the loss")
        if totals["nonfinite_weights"]:
            raise Diverged(epoch + 1, steps, "a weight")
        stats = {"loss": totals["loss"] / steps}
        if totals["head_steps"]:
            stats["head_loss"] = totals["head_loss"] / totals["head_steps"]
        return stats


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
