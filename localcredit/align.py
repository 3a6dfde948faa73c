"""How closely a rule's update follows backprop: per-block cosine with autograd's BP gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rules.base import Rule


def bp_gradients(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Autograd's gradient of the rule's task loss, per trainable block, at the current weights."""
    rule.net.train()
    layers = rule.net.layers
    params = [list(layer.parameters()) for layer in layers]
    loss = rule.task_loss(rule.net(x), y)
    grads = torch.autograd.grad(loss, [p for group in params for p in group])
    flat, i = [], 0
    for group in params:
        flat.append(torch.cat([g.reshape(-1) for g in grads[i:i + len(group)]]))
        i += len(group)
    return flat


def alignment(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Cosine between ``rule.update_directions`` and the BP gradient, per block (hidden blocks, then head)."""
    reference = bp_gradients(rule, x, y)
    directions = rule.update_directions(x, y)
    return [F.cosine_similarity(d.double(), r.double(), dim=0).item() for d, r in zip(directions, reference)]
