"""How closely a rule's update follows backprop: per-block cosine with autograd's BP gradient.

Both are measured at the same weights, on the same batch, in training mode (batch norm normalises
with the batch's statistics, as in a training step) and from the same random state, CPU and CUDA
(the same dropout masks). Measuring changes nothing (:func:`unchanged`): the weights, every buffer
(the network's batch-norm statistics, those of the rule's own modules, its tallies), the gradients,
the rule's bookkeeping, the modules' training flags and torch's random state are as they were before.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .base import Rule


def bp_gradients(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Autograd's gradient of the rule's task loss, per trainable block, at the current weights."""
    rule.net.train()
    layers = rule.net.layers
    params = [list(layer.parameters()) for layer in layers]
    with rule.net.statistics_kept():  # restored after the backward pass, which reads them
        loss = rule.task_loss(rule.net(x), y)
        grads = torch.autograd.grad(loss, [p for group in params for p in group])
    flat, i = [], 0
    for group in params:
        flat.append(torch.cat([g.reshape(-1) for g in grads[i:i + len(group)]]))
        i += len(group)
    return flat


#: Plain attributes of a rule that a measurement may rebind (counters, the last batch seen) and that
#: :func:`unchanged` puts back; containers are covered by the rule's checkpointed ``extra_state``.
_PLAIN = (bool, int, float, str, tuple, type(None))


@contextlib.contextmanager
def unchanged(rule: Rule) -> Iterator[None]:
    """Whatever runs inside leaves ``rule`` as it was: every parameter and buffer (batch-norm statistics of
    the network and of the rule's own modules, non-persistent tallies), the gradients, the rule's
    checkpointed bookkeeping (``extra_state``), its plain attributes and every module's training flag."""
    tensors = [(t, t.detach().clone()) for t in (*rule.parameters(), *rule.buffers())]
    grads = [(p, p.grad) for p in rule.parameters()]
    extra = copy.deepcopy(rule.extra_state())
    plain = {k: v for k, v in vars(rule).items() if isinstance(v, _PLAIN)}
    modes = [(m, m.training) for m in rule.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in tensors:
                tensor.copy_(value)
        for p, grad in grads:
            p.grad = grad
        if not _same(extra, rule.extra_state()):  # only then: loading rebinds what a caller may hold
            rule.load_extra_state(extra)
        for key, kept in plain.items():
            if vars(rule).get(key) is not kept:
                setattr(rule, key, kept)
        for module, training in modes:
            module.training = training


def _same(a: Any, b: Any) -> bool:
    """Equal plain containers, tensors compared by value (shape, dtype and elements)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return type(a) is type(b) and a == b


def alignment(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Cosine between ``rule.update_directions`` and the BP gradient, per block (hidden blocks, then head)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with unchanged(rule), torch.random.fork_rng(devices=devices):
        cpu, cuda = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
        reference = bp_gradients(rule, x, y)
        torch.set_rng_state(cpu)  # the rule's update draws the dropout masks BP's gradient drew
        for device, state in zip(devices, cuda):
            torch.cuda.set_rng_state(state, device)
        directions = rule.update_directions(x, y)
    return [F.cosine_similarity(d.double(), r.double(), dim=0).item() for d, r in zip(directions, reference)]
