"""Each continual-learning strategy against its paper's definition, and the one property every strategy keeps:
a rule that does not back-propagate still does not (no block's update depends on the blocks above it)."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from localcredit.continual import strategies
from localcredit.continual.memory import SampleBuffer
from localcredit.continual.scenarios import make_stream
from localcredit.continual.strategies.base import Batch, rule_update, task_samples, trainable
from localcredit.continual.strategies.ewc import diagonal_fisher
from localcredit.errors import UserError
from localcredit.experiment import RunSpec, build_rule

from .conftest import subset


@pytest.fixture(scope="module")
def small(fashion):
    return subset(fashion, 2_000, 500)


def setup(data, scenario="split-class", rule="bp", strategy="naive", hidden=(32,), tasks=5, seed=0, **options):
    stream = make_stream(data, scenario, tasks)
    learner = build_rule(RunSpec(rule=rule, data="fashion-mnist", hidden=list(hidden), seed=seed),
                         replace(data, num_classes=stream.outputs))
    chosen = strategies.get(strategy)(strategies.get(strategy).Config(**options), learner, stream, seed=seed)
    return stream, learner, chosen


def train_briefly(rule, stream, strategy, task, steps=5, batch=32):
    """A few steps of ``task`` through the strategy's hooks, as the runner takes them."""
    hook = lambda r, stats: strategy.adjust_gradients(r)  # noqa: E731
    rule.gradient_hooks.append(hook)
    strategy.begin_task(task)
    samples = strategy.training_set(task)
    for s in range(steps):
        b = strategy.batch(Batch(samples.x[s * batch:(s + 1) * batch], samples.y[s * batch:(s + 1) * batch],
                                 samples.task[s * batch:(s + 1) * batch]), task)
        rule.restrict_outputs(stream.training_mask(b.task, task.index))
        rule.step(b.x, b.y)
        strategy.after_step(rule)
    rule.gradient_hooks.remove(hook)
    rule.restrict_outputs(None)


# ----- EWC and online EWC -----------------------------------------------------------------------------
def test_ewc_fisher_is_the_mean_squared_per_sample_gradient_of_the_log_likelihood(small):
    stream, rule, ewc = setup(small, "split-task", strategy="ewc", fisher_samples=6, fisher_labels="true")
    task = stream.tasks[1]
    generator_state = ewc.generator.get_state()
    estimate = diagonal_fisher(ewc, task, ewc.config)
    ewc.generator.set_state(generator_state)
    index = torch.randperm(len(task.data.y_train), generator=ewc.generator)[:6]
    params = trainable(rule)
    expected = [torch.zeros_like(p) for p in params]
    for i in index:
        logits = rule.net(task.data.x_train[i:i + 1])[:, [2, 3]]  # the task's own head
        loss = F.cross_entropy(logits, task.data.y_train[i:i + 1] - 2)
        for e, g in zip(expected, torch.autograd.grad(loss, params, allow_unused=True)):
            e.add_(g.square() if g is not None else 0)
    assert all(torch.allclose(f, e / 6, atol=1e-7) for f, e in zip(estimate, expected))


def test_ewc_adds_lambda_fisher_times_distance_per_finished_task(small):
    stream, rule, ewc = setup(small, strategy="ewc", strength=3.0, fisher_samples=20)
    ewc.end_task(stream.tasks[0])
    params = trainable(rule)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    ewc.end_task(stream.tasks[1])
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    for p in params:
        p.grad = torch.ones_like(p)
    ewc.adjust_gradients(rule)
    for k, p in enumerate(params):
        penalty = sum(f[k] * (p - a[k]) for f, a in zip(ewc.fishers, ewc.anchors))
        assert torch.allclose(p.grad, 1 + 3.0 * penalty, atol=1e-6)


def test_online_ewc_keeps_one_decayed_fisher_and_the_latest_anchor(small):
    stream, rule, online = setup(small, strategy="online-ewc", gamma=0.5, fisher_samples=20)
    online.end_task(stream.tasks[0])
    first = [f.clone() for f in online.fisher]
    with torch.no_grad():
        trainable(rule)[0].add_(0.05)
    state = online.generator.get_state()
    new = diagonal_fisher(online, stream.tasks[1], online.config)
    online.generator.set_state(state)
    online.end_task(stream.tasks[1])
    assert all(torch.allclose(f, 0.5 * a + b) for f, a, b in zip(online.fisher, first, new))
    assert all(torch.equal(a, p) for a, p in zip(online.anchor, trainable(rule)))


# ----- SI ---------------------------------------------------------------------------------------------
def test_si_path_integral_and_importance_follow_zenke(small):
    stream, rule, si = setup(small, "split-task", strategy="si", c=0.5, xi=0.1)
    start = [p.detach().clone() for p in trainable(rule)]
    expected_path = [torch.zeros_like(p) for p in start]
    task = stream.tasks[0]
    hook = lambda r, stats: si.adjust_gradients(r)  # noqa: E731
    rule.gradient_hooks.append(hook)
    rule.restrict_outputs(task.outputs)
    for s in range(4):
        x, y = task.data.x_train[s * 16:(s + 1) * 16], task.data.y_train[s * 16:(s + 1) * 16]
        before = [p.detach().clone() for p in trainable(rule)]
        rule.step(x, y)
        own_update = si._update  # the rule's update before the penalty
        for path, g, b, p in zip(expected_path, own_update, before, trainable(rule)):
            path.add_(-g * (p.detach() - b))
        si.after_step(rule)
    rule.gradient_hooks.remove(hook)
    assert all(torch.allclose(a, b) for a, b in zip(si.path, expected_path))
    si.end_task(task)
    for importance, path, s0, p in zip(si.importance, expected_path, start, trainable(rule)):
        assert torch.allclose(importance, path / ((p.detach() - s0).square() + 0.1))
    # the next task's penalty gradient: 2 c Omega (theta - theta*)
    with torch.no_grad():
        for p in trainable(rule):
            p.add_(0.02)
    for p in trainable(rule):
        p.grad = torch.zeros_like(p)
    si.adjust_gradients(rule)
    for importance, p in zip(si.importance, trainable(rule)):
        assert torch.allclose(p.grad, 2 * 0.5 * importance * 0.02, atol=1e-6)


# ----- LwF --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["split-class", "split-domain"])
def test_lwf_targets_mix_the_label_with_the_old_models_tempered_outputs(small, scenario):
    stream, rule, lwf = setup(small, scenario, strategy="lwf", temperature=2.0)
    lwf.end_task(stream.tasks[0])
    task = stream.tasks[1]
    x, y = task.data.x_train[:8], task.data.y_train[:8]
    target = lwf.batch(Batch(x, y, torch.full((8,), 1)), task).y
    assert target.shape == (8, stream.outputs) and torch.allclose(target.sum(1), torch.ones(8))
    old = [0, 1] if scenario == "split-class" else [0, 1]
    soft = F.softmax(lwf.teacher(x)[:, old] / 2.0, dim=1)
    w = 1 / 2  # task 1 (0-based): t / (t + 1)
    expected = torch.zeros(8, stream.outputs)
    expected[:, old] = w * soft
    expected[torch.arange(8), y] += 1 - w
    assert torch.allclose(target, expected, atol=1e-6)
    # the teacher is a frozen copy: training the rule further leaves its outputs as they were
    before = lwf.teacher(x).clone()
    train_briefly(rule, stream, lwf, task, steps=2)
    assert torch.equal(lwf.teacher(x), before)


# ----- memories: replay and A-GEM ---------------------------------------------------------------------
def test_class_balanced_memory_shares_its_size_equally(small):
    stream = make_stream(small, "split-class", 5)
    memory = SampleBuffer(100, "class-balanced", torch.Generator().manual_seed(0))
    for task in stream.tasks[:3]:
        memory.add(task_samples(task))
        counts = torch.bincount(memory.y, minlength=10)[:2 * (task.index + 1)]
        assert len(memory) <= 100 and counts.min() == counts.max() == 100 // (2 * (task.index + 1))


def test_reservoir_memory_stays_full_and_keeps_every_task(small):
    stream = make_stream(small, "split-task", 5)
    memory = SampleBuffer(50, "reservoir", torch.Generator().manual_seed(0))
    for task in stream.tasks:
        memory.add(task_samples(task))
    assert len(memory) == 50 and memory.seen == len(small.y_train) and len(memory.task.unique()) >= 3


def test_replay_adds_memory_samples_to_each_batch_after_the_first_task(small):
    stream, rule, replay = setup(small, strategy="replay", size=40, replay_batch=10)
    first = stream.tasks[0]
    batch = Batch(first.data.x_train[:16], first.data.y_train[:16], torch.zeros(16, dtype=torch.long))
    assert replay.batch(batch, first) is batch  # nothing stored yet
    replay.end_task(first)
    mixed = replay.batch(batch, stream.tasks[1])
    assert len(mixed.y) == 26 and set(mixed.y[16:].tolist()) <= {0, 1}


def test_agem_projects_an_update_that_conflicts_with_the_memory(small):
    stream, rule, agem = setup(small, "split-task", strategy="agem", size=60, reference_batch=60)
    agem.end_task(stream.tasks[0])
    agem.begin_task(stream.tasks[1])
    reference_state = agem.generator.get_state()
    for p in trainable(rule):
        p.grad = torch.randn_like(p)
    reference = agem.memory.sample(60)
    g_ref = rule_update(rule, reference.x, reference.y, stream.training_mask(reference.task, 1))
    g = [p.grad.clone() for p in trainable(rule)]
    dot = sum((a * b).sum() for a, b in zip(g, g_ref))
    agem.generator.set_state(reference_state)
    agem.adjust_gradients(rule)
    projected = [p.grad for p in trainable(rule)]
    if dot < 0:
        norm = sum(r.square().sum() for r in g_ref)
        assert all(torch.allclose(p, a - dot / norm * r, atol=1e-6) for p, a, r in zip(projected, g, g_ref))
        assert abs(sum((p * r).sum() for p, r in zip(projected, g_ref))) < 1e-4
    else:
        assert all(torch.equal(p, a) for p, a in zip(projected, g))
    # the other sign: an update that conflicts is always projected
    for p, r in zip(trainable(rule), g_ref):
        p.grad = -r.clone()
    agem.generator.set_state(reference_state)
    agem.adjust_gradients(rule)
    assert all(p.grad.abs().max() < 1e-5 for p in trainable(rule))


# ----- every strategy ---------------------------------------------------------------------------------
SCENARIO_OF = {"lwf": "split-class"}
#: small memories and Fisher samples: the property does not depend on their size
SMALL = {"ewc": {"fisher_samples": 10}, "online-ewc": {"fisher_samples": 10}, "replay": {"size": 60},
         "agem": {"size": 60, "reference_batch": 30}}


@pytest.mark.parametrize("strategy", sorted(strategies.available()))
def test_a_bp_free_rule_stays_bp_free_under_every_strategy(small, strategy):
    """local-random's first block learns from its own fixed classifier: under any strategy, its update must
    not change when the blocks above it change (no gradient, penalty or projection reaches across)."""
    stream, rule, chosen = setup(small, SCENARIO_OF.get(strategy, "split-task"), rule="local-random",
                                 strategy=strategy, hidden=(32, 32), **SMALL.get(strategy, {}))
    train_briefly(rule, stream, chosen, stream.tasks[0], steps=3)
    chosen.end_task(stream.tasks[0])
    other_rule, other = copy.deepcopy(rule), copy.deepcopy(chosen)
    other.rule = other_rule
    with torch.no_grad():  # change every block above the first (and the head)
        for layer in other_rule.net.layers[1:]:
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
    first_block = []
    for r, s in ((rule, chosen), (other_rule, other)):
        train_briefly(r, stream, s, stream.tasks[1], steps=2)
        first_block.append([p.detach().clone() for p in r.net.layers[0].parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*first_block)), f"{strategy}: block 1's update saw the blocks above"


@pytest.mark.parametrize("option,expect", [
    ({"strength": -1.0}, "strength"),
    ({"fisher_samples": 0}, "fisher_samples"),
])
def test_bad_strategy_values_are_refused(small, option, expect):
    with pytest.raises(UserError, match=expect):
        strategies.strategy_config("ewc", [f"{k}={v}" for k, v in option.items()])
