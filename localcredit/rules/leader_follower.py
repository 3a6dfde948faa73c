"""Leader-follower neural networks: lfnn-l (BP-free) and lfnn (plus a global backpropagated loss).

Yin et al. 2023, "Emergent leadership in self-organizing neural networks" / LFNN, arXiv 2310.07885.
After every hidden block a worker head gives N workers x C logits o_1..o_N: by default one linear
map from all of the block's units to the N*C logits (``worker_head=dense``); with
``worker_head=grouped`` worker j is a linear classifier on its own contiguous group of the units
(a literal reading of "a worker is a group of units that makes its own class prediction", about
F*N*C / (F*C) = N times cheaper, but it learned worse here: docs/lfnn.md). Per sample:
l_j = CE(o_j, y); the k = ceil(delta N) workers with the lowest l_j are the leaders, the rest
follow; j* is the best leader. The block and its worker head minimise

    L_lead + follower_weight * L_follow,   L_lead = mean over leaders of l_j,
    L_follow = mean over followers of (1/C) ||o_i - sg(o_j*)||^2.

lfnn-l detaches every block's input, so these losses are all a block ever learns from. lfnn adds
``global_weight`` x the network's cross-entropy, backpropagated end to end. In both, the head is
trained by its own cross-entropy on the detached last hidden output and makes the predictions.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nets.layers import ReplacedWeightLayers, WeightOp, weight_op
from .base import StepFigures, option, register
from .local_loss import LocalLossRule, block_features, feature_size


@dataclass
class LeaderFollowerConfig:
    workers: int = option(32, "workers N per hidden block (each predicts all C classes)")
    delta: float = option(0.7, "leader fraction: ceil(delta * workers) leaders per sample")
    follower_weight: float = option(1.0, "weight of the follower loss against the leader loss")
    worker_head: Literal["dense", "grouped"] = option(
        "dense", "dense: one Linear(F, N*C) through which every worker reads all F features of its block "
                 "(F*N*C weights); grouped: worker j is a linear classifier on its own contiguous group of the "
                 "features (F*C weights, the first F mod N workers read one more; N times cheaper, learned "
                 "worse in our tests: docs/lfnn.md)")

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


def _run_slices(runs: list[tuple[int, int]]) -> Iterator[tuple[slice, slice, int, int]]:
    """Per run of n equal groups of g features: its features' slice, its workers' slice, n and g."""
    start = first = 0
    for n, g in runs:
        yield slice(start, start + n * g), slice(first, first + n), n, g
        start, first = start + n * g, first + n


class _GroupedLogits(torch.autograd.Function):
    """(B, F) features -> (N, C, B) logits of the grouped workers, with a backward that writes each
    gradient once.

    The features are transposed once so that every group is a contiguous (g, B) block of rows and
    each run of equal groups is one batched matmul. Autograd's own backward of those slices would
    zero-fill a full-size gradient per slice and hand back a transposed (strided) view, on which the
    block's ReLU backward runs several times slower: here the groups' input gradients go straight
    into one (F, B) buffer, transposed back once.
    """

    @staticmethod
    def forward(ctx, features, bias, runs, *weights):
        columns = features.t().contiguous()  # (F, B)
        out = features.new_empty(bias.shape[0], bias.shape[1], features.shape[0])  # (N, C, B)
        for (features_of, workers_of, n, g), weight in zip(_run_slices(runs), weights):
            torch.baddbmm(bias[workers_of], weight, columns[features_of].view(n, g, -1), out=out[workers_of])
        ctx.runs = runs
        ctx.save_for_backward(columns, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        columns, *weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_columns = torch.empty_like(columns) if ctx.needs_input_grad[0] else None
        grad_weights = []
        for (features_of, workers_of, n, g), weight in zip(_run_slices(ctx.runs), weights):
            rows, grads = columns[features_of].view(n, g, -1), grad_out[workers_of]
            if grad_columns is not None:
                torch.bmm(weight.transpose(1, 2), grads, out=grad_columns[features_of].view(n, g, -1))
            grad_weights.append(torch.bmm(grads, rows.transpose(1, 2)))
        grad_features = grad_columns.t().contiguous() if grad_columns is not None else None
        return grad_features, grad_out.sum(2, keepdim=True), None, *grad_weights


class GroupedWorkerHead(nn.Module):
    """N workers, worker j a linear classifier Linear(g_j, C) on its own contiguous group of g_j features.

    F = N q + r features: the first r workers read q + 1 of them, the others q. The output equals
    that of a Linear(F, N*C) whose weight is zero outside the blocks (worker j's C rows, group j's
    columns), at F*C multiply-adds per sample instead of F*N*C: each run of equal group sizes is one
    batched matmul. Every worker is initialised as nn.Linear(g_j, C) would be.
    """

    def __init__(self, features: int, workers: int, classes: int):
        super().__init__()
        if features < workers:
            raise UserError(f"worker_head=grouped needs at least one feature per worker: a block has {features} "
                            f"features for {workers} workers (lower workers, or use worker_head=dense)")
        q, r = divmod(features, workers)
        #: (workers, features per worker) of each run of equal groups, in feature order
        self.runs = [(n, g) for n, g in ((r, q + 1), (workers - r, q)) if n > 0]
        self.weights = nn.ParameterList()  # per run (n, C, g): worker i's nn.Linear weight is [i]
        biases = []
        for n, g in self.runs:
            bound = 1 / math.sqrt(g)  # nn.Linear's default initialisation for fan-in g
            self.weights.append(nn.Parameter(torch.empty(n, classes, g).uniform_(-bound, bound)))
            biases.append(torch.empty(n, classes, 1).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.cat(biases))  # (N, C, 1): broadcasts over the batch

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) features -> (B, N, C) logits, a view of an (N, C, B) tensor: ``worker_losses`` takes
        that layout as it is."""
        return _GroupedLogits.apply(features, self.bias, self.runs, *self.weights).permute(2, 0, 1)


def worker_losses(worker_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, N, C) logits -> (B, N) cross-entropy of every worker on every sample, in one call; ``y`` is
    class indices (B,) or target probabilities (B, C)."""
    batch, workers, classes = worker_logits.shape
    soft = y.is_floating_point()
    # Classes on dim 1, as cross_entropy takes (B, C, d) inputs: log-softmax over a last dimension
    # of size C = 10 is several times slower on CPU. A grouped head's logits are an (N, C, B) tensor
    # already: taken as N samples of B positions, they need no copy.
    by_worker = worker_logits.permute(1, 2, 0)
    if by_worker.is_contiguous():
        target = y.t().expand(workers, classes, batch) if soft else y.expand(workers, batch)
        return F.cross_entropy(by_worker, target, reduction="none").t()
    target = y[:, :, None].expand(batch, classes, workers) if soft else y[:, None].expand(batch, workers)
    return F.cross_entropy(worker_logits.transpose(1, 2), target, reduction="none")


def select_leaders(losses: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the k lowest-loss workers: (B, N) boolean leader mask and (B,) index of the best one."""
    losses = losses.detach()
    chosen = losses.topk(k, dim=1, largest=False, sorted=False)  # sorting them costs more than the selection
    mask = torch.zeros_like(losses, dtype=torch.bool).scatter_(1, chosen.indices, True)
    return mask, chosen.indices.gather(1, chosen.values.argmin(1, keepdim=True)).view(-1)


def leader_follower_loss(worker_logits: torch.Tensor, y: torch.Tensor, k: int, follower_weight: float,
                         active_classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L_lead + follower_weight * L_follow averaged over the batch, and the (B, N) leader mask.

    With a task head, ``worker_logits`` come with the inactive classes masked (:meth:`Rule.masked_scores`:
    every worker has the same score there, so they add nothing to ||o_i - o_j*||) and ``active_classes``
    counts each sample's active classes, (B,) or one for all: the C of L_follow's 1/C. ``y``: class
    indices (B,) or target probabilities (B, C).
    """
    batch, workers, classes = worker_logits.shape
    losses = worker_losses(worker_logits, y)
    leaders, best = select_leaders(losses, k)
    # Each mean (over the k leaders or N - k followers, then over the batch) as one sum and one scale.
    loss = (losses * leaders).sum() / (k * batch)
    if workers > k and follower_weight > 0:
        best_logits = worker_logits.detach().gather(1, best.view(batch, 1, 1).expand(batch, 1, classes))
        distance = (worker_logits - best_logits).square().sum(2)  # C * (1/C)||o_i - sg(o_j*)||^2
        if active_classes is None:
            loss = loss + (distance * ~leaders).sum() * (follower_weight / (classes * (workers - k) * batch))
        else:
            per_sample = (distance * ~leaders).sum(1) / active_classes
            loss = loss + per_sample.sum() * (follower_weight / ((workers - k) * batch))
    return loss, leaders


@register("lfnn-l")
class LeaderFollowerLocal(LocalLossRule):
    """LFNN-l (Yin et al. 2023): BP-free leader-follower worker losses per block; nothing crosses blocks."""

    Config = LeaderFollowerConfig
    # Set in __init__ (a submodule and a buffer): declared for the type checker, as nn.Module's
    # attribute lookup is typed Tensor | Module.
    worker_heads: nn.ModuleList
    leader_counts: torch.Tensor

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        n, c = self.config.workers, net.num_classes
        if self.config.worker_head == "grouped":
            heads = [GroupedWorkerHead(feature_size(shape), n, c) for shape in net.hidden_shapes()]
        else:
            heads = [nn.Linear(feature_size(shape), n * c) for shape in net.hidden_shapes()]
        self.worker_heads = nn.ModuleList(heads)
        # Leadership bookkeeping: this epoch's per-worker leader counts (a tensor, no sync per step)
        # and, per finished epoch, each worker's leader frequency (plain lists, checkpointed).
        self.register_buffer("leader_counts", torch.zeros(len(net.blocks), n), persistent=False)
        self.counted_samples = 0
        self.leader_frequency_log: list[list[list[float]]] = []  # epoch -> block -> worker

    # ----- the losses -----------------------------------------------------------------------
    def worker_logits(self, l: int, h: torch.Tensor) -> torch.Tensor:
        # (B, N*C) from a dense head, (B, N, C) from a grouped one
        return self.worker_heads[l](block_features(h)).reshape(len(h), self.config.workers, self.net.num_classes)

    def block_loss(self, l: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, active = self.worker_logits(l, h), self.output_mask(y)
        if y.is_floating_point():
            y = self.target_distribution(y, logits.dtype)
        loss, leaders = leader_follower_loss(self.masked_scores(logits), y, self.config.leaders,
                                             self.config.follower_weight, None if active is None else active.sum(-1))
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


class _WeightLayerCall:
    """One call of a weight layer during an lfnn step: its output, and the local loss's gradient there."""

    __slots__ = ("output", "local_gradient")

    def __init__(self):
        self.output: torch.Tensor | None = None
        self.local_gradient: torch.Tensor | None = None


class _Passes:
    """Which backward pass is running: the worker loss's (into one block) or the global one."""

    local = False


class _SharedWeightGradient(torch.autograd.Function):
    """y = op(x; W, b) whose weight gradient adds its block's worker-loss gradient to the global one.

    In the worker-loss pass only the input gradient is computed (it carries the worker loss to the
    block's lower layers; nothing is asked below the block). In the global pass the input gradient
    is the global loss's alone, and dL/dW is computed once from (global + local) output gradient:
    a weight gradient is linear in the output gradient, so this is the sum of the two passes' dL/dW.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, call: _WeightLayerCall, passes: _Passes, op: WeightOp, module: nn.Module):
        ctx.save_for_backward(x, weight)
        ctx.call, ctx.passes, ctx.op, ctx.module = call, passes, op, module
        return op.forward(module, x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        op, module = ctx.op, ctx.module
        grad_x = op.input_gradient(module, x, weight, grad_out) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        if not ctx.passes.local and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            local = ctx.call.local_gradient
            grad_weight, grad_bias = op.parameter_gradients(module, x, grad_out if local is None else grad_out + local)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _recorded_forward(calls: dict[nn.Module, list[_WeightLayerCall]], passes: _Passes, name: str,
                      module: nn.Module, op: WeightOp, x: torch.Tensor) -> torch.Tensor:
    call = _WeightLayerCall()
    call.output = _SharedWeightGradient.apply(x, module.weight, module.bias, call, passes, op, module)
    calls[module].append(call)  # the list of the module's block
    return call.output


@register("lfnn")
class LeaderFollower(LeaderFollowerLocal):
    """LFNN (Yin et al. 2023): lfnn-l's worker losses plus a global cross-entropy backpropagated end to end.

    One forward pass keeps the graph from the input to the logits. Each block's worker loss reaches
    that block and its worker head only, and the global loss every block. The worker loss is
    backpropagated as far as the outputs of the block's weight layers (Linear, Conv; and into its
    other parameters, such as batch norm's, and the worker head); the global pass then computes each
    weight layer's dL/dW once, from the sum of both output gradients, instead of a second time
    (the weight gradients are the bulk of a backward pass). A block whose input carries no graph
    (the first: its input is the data) has nothing below it to keep its worker loss from, so that
    loss simply joins the global backward pass.
    """

    Config = GlobalLeaderFollowerConfig
    local = False  # its global loss is backpropagated through every block

    @contextmanager
    def _shared_weight_gradients(self) -> Iterator[tuple[list[list[_WeightLayerCall]], _Passes]]:
        """While inside, the hidden blocks' registered weight layers record their calls (per block)."""
        hidden = range(len(self.net.blocks))
        calls: list[list[_WeightLayerCall]] = [[] for _ in hidden]
        block_calls = {module: calls[l] for l in hidden for module in self.net.layers[l].modules()}
        passes = _Passes()
        with ReplacedWeightLayers(((name, module) for l in hidden for name, module in self.net.layers[l].named_modules()),
                                  functools.partial(_recorded_forward, block_calls, passes)):
            try:
                yield calls, passes
            finally:
                # A call holds its output, whose autograd node holds the call (ctx.call): a cycle through
                # C++ that Python's collector cannot see, which kept every step's layer outputs and
                # local gradients alive (7.8 GB per process on the conv suite's vgg, and growing).
                for call in itertools.chain.from_iterable(calls):
                    call.output = call.local_gradient = None

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        total = x.new_zeros(())
        with_global = x.new_zeros(())  # worker losses of blocks fed by a tensor without a graph
        with self._shared_weight_gradients() as (calls, passes):
            for l, h_in, h in self.net.walk(x):
                if l == len(self.net.blocks):
                    break  # h is the logits
                loss = self.block_loss(l, h, y)
                if h_in.requires_grad:
                    self._worker_loss_backward(loss, self.net.layers[l], self.worker_heads[l], calls[l], passes)
                else:
                    # Nothing below to keep the worker loss from: it rides the global pass whole, and the
                    # block's other layers (activations, pooling) are backpropagated once, not twice.
                    with_global = with_global + loss
                total += loss.detach()
            head_loss = self.class_loss(h, y)
            # The head's own loss (as in lfnn-l) reaches the head only; the global copy reaches every block.
            head_loss.backward(inputs=list(self.net.layers[-1].parameters()), retain_graph=True)
            (self.config.global_weight * head_loss + with_global).backward()
        total += (1 + self.config.global_weight) * head_loss.detach()
        return {"loss": total.detach(), "head_loss": head_loss.detach()}

    @staticmethod
    def _worker_loss_backward(loss: torch.Tensor, block: nn.Module, worker_head: nn.Module,
                              calls: list[_WeightLayerCall], passes: _Passes) -> None:
        """The worker loss's gradient at the block's weight-layer outputs (kept for the global pass),
        and into its other parameters and the worker head (accumulated now)."""
        # The weights and biases that get their worker-loss gradient in the global pass, from the calls
        in_weight_layers = {id(p) for m in block.modules() if weight_op(m) is not None
                            for p in (m.weight, m.bias) if p is not None}
        others = [p for p in (*block.parameters(), *worker_head.parameters())
                  if p.requires_grad and id(p) not in in_weight_layers]
        outputs: list[torch.Tensor] = []
        for call in calls:
            assert call.output is not None  # recorded by this step's forward; cleared only after the step
            outputs.append(call.output)
        passes.local = True
        try:
            grads = torch.autograd.grad(loss, [*outputs, *others], retain_graph=True, allow_unused=True)
        finally:
            passes.local = False
        for call, grad in zip(calls, grads):
            call.local_gradient = grad
        for p, grad in zip(others, grads[len(outputs):]):
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad + grad
