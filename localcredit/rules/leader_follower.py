"""Leader-follower neural networks: lfnn-l (BP-free) and lfnn (plus a global backpropagated loss).

Yin et al. 2023, "Emergent leadership in self-organizing neural networks" / LFNN, arXiv 2310.07885.
After every hidden block a worker head gives N workers x C logits o_1..o_N. Per sample:
l_j = CE(o_j, y); the k = ceil(delta N) workers with the lowest l_j are the leaders, the rest
follow; j* is the best leader. The block and its worker head minimise

    L_lead + follower_weight * L_follow,   L_lead = mean over leaders of l_j,
    L_follow = mean over followers of (1/C) ||o_i - sg(o_j*)||^2.

lfnn-l detaches every block's input, so these losses are all a block ever learns from. lfnn adds
``global_weight`` x the network's cross-entropy, backpropagated end to end. In both, the head is
trained by its own cross-entropy on the detached last hidden output and makes the predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import option, register
from .local_classifier import LocalLossRule, block_features, feature_size


@dataclass
class LeaderFollowerConfig:
    workers: int = option(32, "workers N per hidden block (each predicts all C classes)")
    delta: float = option(0.7, "leader fraction: ceil(delta * workers) leaders per sample")
    follower_weight: float = option(1.0, "weight of the follower loss against the leader loss")

    def validate(self) -> None:
        if self.workers < 1:
            raise UserError(f"option workers must be at least 1, got {self.workers}")
        if not 0 < self.delta <= 1:
            raise UserError(f"option delta must be in (0, 1], got {self.delta}")
        if self.follower_weight < 0:
            raise UserError(f"option follower_weight must be >= 0, got {self.follower_weight}")

    @property
    def leaders(self) -> int:
        # The tolerance keeps delta*N that is an integer in exact arithmetic (0.7*10) from rounding up.
        return min(self.workers, math.ceil(self.delta * self.workers - 1e-9))


@dataclass
class GlobalLeaderFollowerConfig(LeaderFollowerConfig):
    global_weight: float = option(1.0, "weight of the network's cross-entropy, backpropagated end to end")

    def validate(self) -> None:
        super().validate()
        if self.global_weight < 0:
            raise UserError(f"option global_weight must be >= 0, got {self.global_weight}")


def worker_losses(worker_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, N, C) logits -> (B, N) cross-entropy of every worker on every sample, in one call."""
    batch, workers, classes = worker_logits.shape
    targets = y[:, None].expand(batch, workers).reshape(-1)
    return F.cross_entropy(worker_logits.reshape(-1, classes), targets, reduction="none").view(batch, workers)


def select_leaders(losses: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the k lowest-loss workers: (B, N) boolean leader mask and (B,) index of the best one."""
    ranked = losses.detach().topk(k, dim=1, largest=False, sorted=True).indices
    mask = torch.zeros_like(losses, dtype=torch.bool).scatter_(1, ranked, True)
    return mask, ranked[:, 0]


def leader_follower_loss(worker_logits: torch.Tensor, y: torch.Tensor, k: int,
                         follower_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L_lead + follower_weight * L_follow averaged over the batch, and the (B, N) leader mask."""
    batch, workers, _ = worker_logits.shape
    losses = worker_losses(worker_logits, y)
    leaders, best = select_leaders(losses, k)
    lead = (losses * leaders).sum(1) / k
    loss = lead.mean()
    if workers > k and follower_weight > 0:
        best_logits = worker_logits[torch.arange(batch, device=y.device), best].detach()
        distance = (worker_logits - best_logits[:, None]).pow(2).mean(2)  # (1/C)||o_i - sg(o_j*)||^2
        follow = (distance * ~leaders).sum(1) / (workers - k)
        loss = loss + follower_weight * follow.mean()
    return loss, leaders


@register("lfnn-l")
class LeaderFollowerLocal(LocalLossRule):
    """LFNN-l (Yin et al. 2023): BP-free leader-follower worker losses per block; nothing crosses blocks."""

    Config = LeaderFollowerConfig

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        n, c = self.config.workers, net.num_classes
        self.worker_heads = nn.ModuleList(nn.Linear(feature_size(shape), n * c) for shape in net.hidden_shapes())
        # Leadership bookkeeping: this epoch's per-worker leader counts (a tensor, no sync per step)
        # and, per finished epoch, each worker's leader frequency (plain lists, checkpointed).
        self.register_buffer("leader_counts", torch.zeros(len(net.blocks), n), persistent=False)
        self.counted_samples = 0
        self.leader_frequency_log: list[list[list[float]]] = []  # epoch -> block -> worker

    # ----- the losses -----------------------------------------------------------------------
    def worker_logits(self, l: int, h: torch.Tensor) -> torch.Tensor:
        return self.worker_heads[l](block_features(h)).view(len(h), self.config.workers, self.net.num_classes)

    def block_loss(self, l: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, leaders = leader_follower_loss(self.worker_logits(l, h), y, self.config.leaders,
                                             self.config.follower_weight)
        self.leader_counts[l] += leaders.sum(0)
        if l == 0:
            # Counted where every sample passes once, so a block pipeline counts on one process only.
            self.counted_samples += len(h)
        return loss

    def block_counters(self) -> list[torch.Tensor]:
        return [self.leader_counts]

    def auxiliary_parameters(self, l: int) -> list[nn.Parameter]:
        return list(self.worker_heads[l].parameters())

    # ----- leadership statistics ------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int) -> None:
        # Close the previous epoch; a resumed run rewrites the epochs it repeats.
        self.leader_frequency_log = self._close_epoch()[:epoch]
        self.leader_counts.zero_()
        self.counted_samples = 0

    def _close_epoch(self) -> list[list[list[float]]]:
        log = list(self.leader_frequency_log)
        if self.counted_samples:
            log.append((self.leader_counts / self.counted_samples).tolist())
        return log

    def extra_state(self) -> dict[str, Any]:
        # The epoch under way stays open (its counts so far), so a run resumed in its middle goes on counting.
        return {"leader_frequency_log": self.leader_frequency_log, "leader_counts": self.leader_counts.tolist(),
                "counted_samples": self.counted_samples}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.leader_frequency_log = state.get("leader_frequency_log", [])
        if "leader_counts" in state:
            self.leader_counts.copy_(torch.tensor(state["leader_counts"], dtype=self.leader_counts.dtype))
            self.counted_samples = int(state["counted_samples"])

    def statistics(self) -> dict[str, Any]:
        return leadership_statistics(self._close_epoch(), self.config.leaders, self.config.workers)


def leadership_statistics(log: list[list[list[float]]], k: int, workers: int) -> dict[str, Any]:
    """Per block and epoch: mean leader fraction, and how much the set of frequent leaders changed.

    A worker's leader frequency is the fraction of an epoch's training samples it led. Stability
    between consecutive epochs: ``top_k_overlap`` = |A_e ∩ A_{e-1}| / k where A_e is the set of the
    k most frequent leaders of epoch e, and ``frequency_correlation`` = Pearson correlation of the
    per-worker frequencies.
    """
    blocks = []
    for l in range(len(log[0]) if log else 0):
        freq = torch.tensor([epoch[l] for epoch in log])  # (epochs, workers)
        top = freq.topk(k, dim=1).indices
        overlap, correlation = [], []
        for e in range(1, len(freq)):
            overlap.append(len(set(top[e].tolist()) & set(top[e - 1].tolist())) / k)
            pair = torch.stack([freq[e], freq[e - 1]])
            correlation.append(torch.corrcoef(pair)[0, 1].nan_to_num(1.0).item())
        blocks.append({
            "mean_leader_fraction": freq.mean(1).tolist(),
            "min_worker_leader_frequency": freq.min(1).values.tolist(),
            "max_worker_leader_frequency": freq.max(1).values.tolist(),
            "top_k_overlap_with_previous_epoch": overlap,
            "frequency_correlation_with_previous_epoch": correlation,
            "leader_frequency_last_epoch": freq[-1].tolist(),
        })
    return {"workers": workers, "leaders_per_sample": k, "leadership_per_block": blocks}


@register("lfnn")
class LeaderFollower(LeaderFollowerLocal):
    """LFNN (Yin et al. 2023): lfnn-l's worker losses plus a global cross-entropy backpropagated end to end.

    One forward pass keeps the graph from the input to the logits; each block's worker loss is
    backpropagated into that block and its worker head only (``backward(inputs=...)``), and the
    global loss into every block.
    """

    Config = GlobalLeaderFollowerConfig
    local = False  # its global loss is backpropagated through every block

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        total = x.new_zeros(())
        for l, _, h in self.net.walk(x):
            if l == len(self.net.blocks):
                break  # h is the logits
            loss = self.block_loss(l, h, y)
            block = self.net.blocks[l]
            loss.backward(inputs=[*block.parameters(), *self.worker_heads[l].parameters()], retain_graph=True)
            total += loss.detach()
        head_loss = F.cross_entropy(h, y)
        # The head's own loss (as in lfnn-l) reaches the head only; the global copy reaches every block.
        head_loss.backward(inputs=list(self.net.head.parameters()), retain_graph=True)
        (self.config.global_weight * head_loss).backward()
        total += (1 + self.config.global_weight) * head_loss.detach()
        return {"loss": total.detach(), "head_loss": head_loss.detach()}
