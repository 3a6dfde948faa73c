"""How closely a rule's update follows backprop: per-block cosine with autograd's BP gradient.

Both are measured at the same weights, on the same batch, in training mode (batch norm normalises
with the batch's statistics, as in a training step) and from the same random state (the same
dropout masks). Measuring changes nothing: batch-norm statistics and torch's random state are as
they were before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rules.base import Rule


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


def alignment(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Cosine between ``rule.update_directions`` and the BP gradient, per block (hidden blocks, then head)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        state = torch.get_rng_state()
        reference = bp_gradients(rule, x, y)
        torch.set_rng_state(state)
        directions = rule.update_directions(x, y)
    return [F.cosine_similarity(d.double(), r.double(), dim=0).item() for d, r in zip(directions, reference)]
