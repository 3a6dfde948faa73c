"""Peak memory of one training step, counted the same way for every rule, on CPU and on CUDA.

Autograd's saved tensors are not the whole story: GAIT-prop, TP and NAN keep their activations
in Python lists, FA's fixed matrices are not activations at all, and a process's peak RSS is
dominated by the data set. :class:`StepMemoryMeter` therefore watches every tensor operation of a
step (a ``TorchDispatchMode``, which sees the forward, the autograd engine's backward and the
optimisers alike) and keeps the ledger of the *storages* the step creates:

* a storage is **new** when an operation returns it and it is neither the storage of one of the
  operation's inputs (a view, an in-place result) nor one that existed before the first measured
  step (weights, buffers such as fixed feedback matrices, optimiser state, the batches and so the
  data set they are views of): those are never counted. One meter watches a run of steps, so what
  a step leaves for later ones (GAIT-prop's LU factors) counts in every step while it is alive;
* a new storage is counted once, with its full size, however many views share it, from the
  operation that made it until the moment it is freed (a weakref finalizer on the storage, which
  torch keeps alive exactly as long as its memory, whoever holds it: a Python list, autograd's
  saved tensors, a C++ cache);
* new storages still alive after the step that are a parameter's ``.grad`` or optimiser state are
  left out of the whole ledger (``zero_grad(set_to_none=True)`` makes every step allocate its
  gradients anew; they are the gradients, not what the rule needs to compute them);
* a step's figure, ``peak_bytes``, is the largest total of counted storages alive at one time
  during that step.

What it does not see: scratch memory a kernel allocates and frees inside itself (convolution
workspaces) and the allocator's rounding and caching. On CUDA, :func:`measure_step` reports
``torch.cuda.max_memory_allocated`` during the step minus the allocation before it beside the
ledger as a cross-check; that figure sees everything the caching allocator hands out, gradients
included, so it should lie at or above ``peak_bytes`` by about the gradients' size.
"""

from __future__ import annotations

import gc
import itertools
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MB = 2**20


def storage_key(tensor: torch.Tensor) -> int | None:
    """The identity of the memory under ``tensor`` (shared by all its views), None when it has none."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse, nested and other storage-less tensors
        return None


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class StepMemoryMeter(TorchDispatchMode):
    """The ledger of storages created while the mode is active (see the module docstring).

    ``existing``: tensors whose storages predate the measurement and must never be counted even
    if an operation hands them back without taking them as input.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}  # storage key -> (serial, bytes) of new storages alive now
        self.events: list[tuple[int, int]] = []  # (serial, +bytes at creation / -bytes when freed), in order
        self._finalizers: list[weakref.finalize] = []
        self._serials = itertools.count()
        self.existing: set[int] = set()
        for tensor in existing:
            self._note_existing(tensor)

    def _note_existing(self, tensor: torch.Tensor) -> None:
        key = storage_key(tensor)
        if key is None or key in self.existing:
            return
        self.existing.add(key)
        # A storage freed in the step (last step's gradients) leaves its address to a new one: forget the key then.
        self._finalizers.append(weakref.finalize(tensor.untyped_storage(), self.existing.discard, key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(t) for t in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            self._note(tensor, inputs)
        return out

    def _note(self, tensor: torch.Tensor, inputs: set[int | None]) -> None:
        key = storage_key(tensor)
        if key is None or key in inputs or key in self.existing or key in self.live:
            return
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        if size == 0:
            return
        serial = next(self._serials)
        self.live[key] = (serial, size)
        self.events.append((serial, size))
        # Bound to key and serial only: the finalizer must not keep the storage alive itself.
        self._finalizers.append(weakref.finalize(storage, self._freed, key, serial, size))

    def _freed(self, key: int, serial: int, size: int) -> None:
        if self.live.get(key, (None,))[0] == serial:
            del self.live[key]
            self.events.append((serial, -size))

    def close(self) -> None:
        """Stop listening to frees (call after the ledger is read; finalizers of survivors are dropped)."""
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()

    def peak_bytes(self, start: int = 0, stop: int | None = None, leave_out: Iterable[int] = ()) -> int:
        """The largest total of new storages alive at one time between ledger positions ``start`` and
        ``stop`` (``len(events)`` when a step began and ended), storages with serials ``leave_out`` not counted."""
        skipped = set(leave_out)
        live = 0
        peak = None
        for position, (serial, change) in enumerate(self.events[:stop]):
            if serial not in skipped:
                live += change
            if position >= start:
                peak = live if peak is None else max(peak, live)
        return live if peak is None else peak

    def survivors(self, keys: set[int]) -> tuple[list[int], int]:
        """(serials, total bytes) of new storages alive now whose key is in ``keys``."""
        chosen = [(serial, size) for key, (serial, size) in self.live.items() if key in keys]
        return [serial for serial, _ in chosen], sum(size for _, size in chosen)


def gradient_and_state_tensors(rule: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter's ``.grad`` and every optimiser's state tensors: what a step keeps beyond its activations."""
    grads = [p.grad for p in rule.parameters() if p.grad is not None]
    states = [t for optimizer in getattr(rule, "optimizers", []) for t in _tensors(list(optimizer.state.values()))]
    return grads + states


def _keys(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {key for key in map(storage_key, tensors) if key is not None}


@dataclass
class StepMemory:
    """One step's memory (bytes); see the module docstring for what each figure holds."""

    #: the largest total of tensors made by training steps alive at one time during this step,
    #: gradients and optimiser state left out
    peak_bytes: int
    #: gradients and optimiser state the step created, alive after it (left out of peak_bytes)
    gradient_bytes: int
    #: other tensors made by training steps still alive after this one: what the rule carries from
    #: step to step (factorisations, caches); they count in every step's peak_bytes while alive
    kept_bytes: int
    #: CUDA only: max_memory_allocated during the step minus memory_allocated before it (None on CPU)
    cuda_peak_bytes: int | None = None


def measure_steps(rule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[StepMemory]:
    """Run ``rule.step`` on each batch under one :class:`StepMemoryMeter`; the memory of each step.

    One meter watches all the steps, so what an early step leaves for later ones (a factorisation
    refreshed every few steps) is counted in every step it is alive in; what existed before the
    first step (weights, buffers, fixed feedback matrices, optimiser state, the data) is never counted.
    """
    gc.collect()  # storages of earlier work held in reference cycles must not die inside a measured step
    # What exists now is left out of later collections: a full one over torch's heap takes ~0.5 s,
    # one over the objects the steps make a few ms.
    gc.freeze()
    meter = StepMemoryMeter([*rule.state_dict(keep_vars=True).values(), *gradient_and_state_tensors(rule),
                             *(t for batch in batches for t in batch)])
    steps: list[tuple[StepMemory, tuple[int, int]]] = []
    left_out: set[int] = set()
    try:
        with meter:
            for x, y in batches:
                steps.append(_one_step(rule, x, y, meter, left_out))
    finally:
        meter.close()
        gc.unfreeze()
    # Peaks are read at the end: gradients of the last step are known to be gradients only then.
    for figure, (start, stop) in steps:
        figure.peak_bytes = meter.peak_bytes(start, stop, left_out)
    return [figure for figure, _ in steps]


def _one_step(rule, x: torch.Tensor, y: torch.Tensor, meter: StepMemoryMeter,
              left_out: set[int]) -> tuple[StepMemory, tuple[int, int]]:
    """One step's figures but its peak, and its window (ledger positions) to read the peak from later."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
    start = len(meter.events)
    rule.step(x, y)
    gc.collect()  # what only a reference cycle kept is not kept by the step
    serials, gradient_bytes = meter.survivors(_keys(gradient_and_state_tensors(rule)))
    left_out.update(serials)  # out of every step's figure, before and after this one: they are gradients
    _, alive_bytes = meter.survivors(set(meter.live))
    figure = StepMemory(peak_bytes=0, gradient_bytes=gradient_bytes, kept_bytes=alive_bytes - gradient_bytes)
    window = (start, len(meter.events))
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        figure.cuda_peak_bytes = torch.cuda.max_memory_allocated(x.device) - before
    return figure, window


def step_memory(rule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], warmup: int = 2) -> dict[str, Any]:
    """Memory figures (MB) of ``rule.step``: the largest of each over ``batches`` after ``warmup`` steps.

    The warm-up steps are measured too (what they leave behind counts later) but not reported: they
    create the optimiser state and pick kernels. Taking the largest step covers rules whose steps
    are not all alike (GAIT-prop refactorises its layers every few steps).
    """
    if len(batches) <= warmup:
        raise ValueError(f"step_memory needs more than {warmup} batches, got {len(batches)}")
    figures = measure_steps(rule, batches)[warmup:]
    result = {"step_memory_mb": max(f.peak_bytes for f in figures) / MB,
              "step_gradient_mb": max(f.gradient_bytes for f in figures) / MB,
              "step_kept_mb": max(f.kept_bytes for f in figures) / MB}
    if figures[0].cuda_peak_bytes is not None:
        cuda_peaks = [f.cuda_peak_bytes for f in figures if f.cuda_peak_bytes is not None]
        assert len(cuda_peaks) == len(figures)  # one device for all the batches: every step has a CUDA peak
        result["cuda_step_peak_mb"] = max(cuda_peaks) / MB
    return result


__all__ = ["StepMemoryMeter", "StepMemory", "measure_steps", "step_memory", "storage_key"]
