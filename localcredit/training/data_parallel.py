"""Data parallel (``--parallel data``, every rule) on several processes.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..nets.layout import in_layout_of
from ..rules.base import Rule, StepFigures
from .parallel import Rank, _Agreeing, _buckets, all_reduce_flat, broadcast_state
from .progress import EpochProgress
from .trainer import Trainer

#: A bucket of the gradient all-reduce of a data-parallel step: small enough that the first buckets
#: start (and travel) while the rule computes the rest, large enough that each all-reduce's fixed
#: cost is paid rarely. A bucket closes before the parameter that would take it past this size, so
#: one big weight (a 784x1000 layer: 3.1 MB) gets a bucket of its own.
GRADIENT_BUCKET_BYTES = 2**20


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
        only = grads[0] if len(grads) == 1 else None
        bucket.in_place = only is not None
        if only is not None:
            flat = only  # one gradient: reduced where it is, no copy there and back
        else:
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(grads, bucket.params)])
        bucket.flat = flat
        flat.mul_(self.share)
        bucket.work = dist.all_reduce(flat, async_op=True)

    @staticmethod
    def _settle(bucket: _Bucket) -> None:
        assert bucket.flat is not None and bucket.had_grad is not None  # _start set them
        for p, had in zip(bucket.params, bucket.had_grad):
            changed = p.grad is not bucket.flat if bucket.in_place else (p.grad is not None) != had
            if changed:  # a broken promise must not pass silently: it would split the processes' weights
                raise RuntimeError(f"a gradient of shape {tuple(p.shape)} changed after the rule announced it final "
                                   f"(Rule.gradients_final)")
        if not bucket.in_place:  # the averaged gradients become views into the reduced copy
            offset = 0
            for p, had in zip(bucket.params, bucket.had_grad):
                if had:  # the same parameters lack a gradient in every process, and keep lacking it
                    # In the parameter's own layout (a copy for a channels-last weight): torch's fused
                    # Adam reads a gradient's memory as if laid out as its parameter's, so a default-layout
                    # gradient of a channels-last weight would update the wrong entries.
                    p.grad = in_layout_of(bucket.flat[offset:offset + p.numel()].view_as(p), p)
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
