"""Continual learning: metric formulas, the three scenarios' streams, learning, determinism, resume, the CLI."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from localcredit.cli import main
from localcredit.continual import strategies
from localcredit.continual.metrics import average_accuracy, backward_transfer, forgetting
from localcredit.continual.runner import ContinualRun, Loop, evaluate
from localcredit.continual.scenarios import make_stream
from localcredit.data.base import Dataset
from localcredit.errors import UserError
from localcredit.experiment import RunSpec, build_rule
from localcredit.training.progress import Diverged
from localcredit.training.runfiles import CHECKPOINT, RESULT, Interrupted

from .conftest import fashion_data, subset
from .learning import Breakage, break_rule, learning_case

# R[t][i]: accuracy on task i after training task t.
MATRIX = [[0.9, 0.1, 0.2],
          [0.6, 0.8, 0.1],
          [0.5, 0.7, 0.95]]


def test_metrics_on_a_hand_made_matrix():
    assert average_accuracy(MATRIX) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # task 1: best 0.9 -> 0.5; task 2: best 0.8 -> 0.7
    assert forgetting(MATRIX) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert backward_transfer(MATRIX) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    improving = [[0.5, 0.0], [0.9, 0.8]]  # task 1 improved while task 2 was learned
    assert forgetting(improving) == pytest.approx(0.5 - 0.9)  # negative: nothing forgotten
    assert backward_transfer(improving) == pytest.approx(0.4)
    assert forgetting([[0.7]]) is None and backward_transfer([[0.7]]) is None


@pytest.fixture(scope="module")
def small(fashion):
    return subset(fashion, 3_000, 1_000)


def with_marker_image(data: Dataset) -> Dataset:
    """The data with its first training image replaced by one whose pixels are all different.

    Real images have many equal (background) pixels, so only such a marker pins a permutation down.
    """
    x_train = data.x_train.clone()
    x_train[0] = torch.arange(x_train[0].numel(), dtype=x_train.dtype).reshape(x_train[0].shape)
    return replace(data, x_train=x_train)


# ----- streams ----------------------------------------------------------------------------------------
def test_permuted_stream_permutes_features_consistently(small):
    marked = with_marker_image(small)
    stream = make_stream(marked, "permuted", 3, seed=5)
    assert stream.kind == "domain" and stream.outputs == 10
    orders = []
    for task in stream.tasks:
        assert task.data.x_train.shape == small.x_train.shape and stream.head(task.index, 2) is None
        # Recover the permutation from the marker image and check it on every other image of both splits.
        order = task.data.x_train[0].flatten().long()
        assert sorted(order.tolist()) == list(range(order.numel()))
        assert torch.equal(task.data.x_train[1:].flatten(1), marked.x_train[1:].flatten(1)[:, order])
        assert torch.equal(task.data.x_test.flatten(1), marked.x_test.flatten(1)[:, order])
        assert torch.equal(task.data.y_train, small.y_train) and torch.equal(task.data.y_test, small.y_test)
        orders.append(order)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    again = make_stream(marked, "permuted", 3, seed=5)
    assert all(torch.equal(a.data.x_test, b.data.x_test) for a, b in zip(stream.tasks, again.tasks))


def test_the_three_split_scenarios_as_van_de_ven_defines_them(small):
    task_il, domain_il, class_il = (make_stream(small, s, 5) for s in ("split-task", "split-domain", "split-class"))
    for stream in (task_il, domain_il, class_il):
        assert [t.classes for t in stream.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
        assert sum(len(t.data.x_train) for t in stream.tasks) == len(small.x_train)
    # task-IL: ten outputs, each task answers among its own two
    assert task_il.outputs == 10 and task_il.head(3, 0) == [6, 7]
    assert set(task_il.tasks[3].data.y_train.unique().tolist()) == {6, 7}
    # domain-IL: two outputs shared by every task ("first or second class of the pair"), no task id
    assert domain_il.outputs == 2 and domain_il.head(3, 4) is None
    assert set(domain_il.tasks[3].data.y_train.unique().tolist()) == {0, 1}
    assert torch.equal(domain_il.tasks[3].data.y_test + 6, task_il.tasks[3].data.y_test)
    # class-IL: one head that grows with the classes seen so far
    assert class_il.outputs == 10 and class_il.head(0, 1) == [0, 1, 2, 3] and class_il.head(4, 4) == list(range(10))


def test_a_task_il_batch_that_mixes_tasks_gets_one_head_per_sample(small):
    stream = make_stream(small, "split-task", 5)
    assert stream.training_mask(torch.tensor([2, 2]), 2) == [4, 5]
    mask = stream.training_mask(torch.tensor([2, 0, 4]), 2)
    assert mask.shape == (3, 10) and mask[0].nonzero().flatten().tolist() == [4, 5]
    assert mask[1].nonzero().flatten().tolist() == [0, 1] and mask[2].nonzero().flatten().tolist() == [8, 9]
    class_il = make_stream(small, "split-class", 5)
    assert class_il.training_mask(torch.tensor([2, 0]), 2) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("tasks", [3, 4, 10, 0])
def test_tasks_that_do_not_split_the_classes_equally_are_refused(small, tasks):
    with pytest.raises(UserError, match="--tasks"):
        make_stream(small, "split-class", tasks)


def test_task_head_restricts_predictions_to_the_task(small):
    rule = build_rule(RunSpec(rule="bp", data="fashion-mnist", hidden=[32]), small)
    stream = make_stream(small, "split-task", 5)
    rule.restrict_outputs(stream.head(3, 3))
    assert set(rule.predict(small.x_test).unique().tolist()) <= {6, 7}
    rule.restrict_outputs(None)
    assert 0 <= evaluate(rule, stream.tasks[3], stream.head(3, 3)) <= 1


# ----- learning ---------------------------------------------------------------------------------------
def continual_run(data: Dataset, scenario: str, tasks: int = 2, rule: str = "bp", strategy: str = "naive",
                  seed: int = 1, steps: int = 60, broken: Breakage | None = None, hidden: int = 128,
                  out=None, **strategy_options) -> ContinualRun:
    stream = make_stream(data, scenario, tasks, seed=seed)
    sized = replace(data, num_classes=stream.outputs)
    learner = break_rule(build_rule(RunSpec(rule=rule, data="fashion-mnist", hidden=[hidden], seed=seed), sized),
                         broken)
    config = strategies.get(strategy).Config(**strategy_options)
    chosen = strategies.get(strategy)(config, learner, stream, seed=seed)
    loop = Loop(steps_per_task=steps, batch_size=64, seed=seed, curve_every=0, progress=False)
    return ContinualRun(learner, stream, chosen, loop, out_dir=out, fingerprint={"rule": rule, "seed": seed})


#: floor of each task's accuracy right after it was trained (benchmarks/learning_floors.py, bp, 60 steps of 64 per
#: task; the suite runs seed 1). min / median over seeds 0-4 x 1, 2 threads: permuted 0.762 / 0.781,
#: split-class 0.823 / 0.857, split-domain 0.825 / 0.859, split-task 0.823 / 0.857; sign-flipped bp: <= 0.175
TWO_TASK_FLOORS = {"permuted": 0.72, "split-class": 0.78, "split-domain": 0.78, "split-task": 0.78}


def two_task_matrix(data: Dataset, scenario: str, seed: int = 1, broken: Breakage | None = None) -> list:
    return continual_run(data, scenario, seed=seed, broken=broken).run()["accuracy_matrix"]


def two_task_floor_figure(scenario: str, seed: int, broken: Breakage | None = None) -> float:
    """What the floor is held against: the lower of the two tasks' accuracies right after training them."""
    try:
        matrix = two_task_matrix(subset(fashion_data(), 3_000, 1_000), scenario, seed, broken)
    except Diverged:  # only a broken rule gets here: its weights are no longer numbers
        return 0.0
    return min(matrix[0][0], matrix[1][1])


for _scenario, _floor in TWO_TASK_FLOORS.items():
    learning_case(f"test_continual::two-tasks[{_scenario}]", _floor)(
        lambda seed, broken=None, scenario=_scenario: two_task_floor_figure(scenario, seed, broken))


@pytest.mark.parametrize("scenario", TWO_TASK_FLOORS)
def test_two_task_run_learns_and_is_deterministic(small, scenario):
    matrix = two_task_matrix(small, scenario)
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    floor = TWO_TASK_FLOORS[scenario]
    assert matrix[0][0] >= floor and matrix[1][1] >= floor, matrix
    if scenario == "split-class":
        assert matrix[1][0] < 0.5, "class-incremental fine-tuning should forget the first pair"
    assert two_task_matrix(small, scenario) == matrix


# ----- never lose a run -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", sorted(strategies.available()))
def test_a_run_stopped_mid_task_resumes_to_the_uninterrupted_matrix(small, tmp_path, strategy):
    scenario = "split-task" if strategy != "lwf" else "split-class"
    options = {"replay": {"size": 200}, "agem": {"size": 200, "reference_batch": 64}, "ewc": {"fisher_samples": 30},
               "online-ewc": {"fisher_samples": 30}}.get(strategy, {})
    straight = continual_run(small, scenario, tasks=5, strategy=strategy, steps=12, hidden=32, **options).run()
    stopped = continual_run(small, scenario, tasks=5, strategy=strategy, steps=12, hidden=32, out=tmp_path,
                            **options)
    after_step = stopped.strategy.after_step

    def stop_in_task_3(rule):
        after_step(rule)
        if stopped.task == 2 and stopped.step == 4:
            signal.raise_signal(signal.SIGTERM)  # noted; the run checkpoints after this step and stops

    stopped.strategy.after_step = stop_in_task_3
    with pytest.raises(Interrupted):
        stopped.run()
    assert (tmp_path / CHECKPOINT).exists() and len(stopped.matrix) == 2
    resumed = continual_run(small, scenario, tasks=5, strategy=strategy, steps=12, hidden=32, out=tmp_path,
                            **options).run(resume=True)
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
    assert resumed["train_loss_per_task"] == straight["train_loss_per_task"]


def continual_command(data: str, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "localcredit", "continual", "--rule", "bp", "--data", data, "--scenario",
            "permuted", "--tasks", "10", "--steps-per-task", "40", "--hidden", "32", "--strategy", "replay",
            "--strategy-set", "size=300", "--threads", "1", "--quiet", "--checkpoint-every", "off", "--out",
            str(out), *extra]


@pytest.mark.slow
def test_sigterm_in_task_3_of_10_exits_143_and_resume_gives_the_uninterrupted_matrix(fashion_3k_npz, tmp_path):
    straight = subprocess.Popen(continual_command(fashion_3k_npz, tmp_path / "straight"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = subprocess.Popen(continual_command(fashion_3k_npz, tmp_path / "stopped"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "stopped" / CHECKPOINT
    while not checkpoint.exists() or torch.load(checkpoint, weights_only=False)["task"] < 2:
        assert stopped.poll() is None, stopped.communicate()[1]
        time.sleep(0.02)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("localcredit: stopped by SIGTERM") and "--resume" in err
    partial = json.loads((tmp_path / "stopped" / RESULT).read_text())
    assert partial["status"] == "interrupted" and partial["interrupted_at"]["task"] >= 3
    resumed = subprocess.run([*continual_command(fashion_3k_npz, tmp_path / "stopped"), "--resume"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert straight.wait(timeout=120) == 0, straight.stderr.read()
    final, reference = (json.loads((tmp_path / o / RESULT).read_text()) for o in ("stopped", "straight"))
    assert len(final["accuracy_matrix"]) == 10 and final["accuracy_matrix"] == reference["accuracy_matrix"]


# ----- the command line -------------------------------------------------------------------------------
def cli(out, *extra: str) -> list[str]:
    return ["continual", "--rule", "dfa", "--data", "fashion-mnist", "--limit-train", "2000", "--hidden", "64",
            "--scenario", "split-task", "--tasks", "5", "--steps-per-task", "10", "--curve-every", "5", "--out",
            str(out), "--quiet", *extra]


def test_cli_writes_the_run_spec_matrix_curve_and_plots(tmp_path):
    out = tmp_path / "out"
    assert main(cli(out, "--strategy", "si", "--strategy-set", "c=2")) == 0
    result = json.loads((out / RESULT).read_text())
    assert len(result["accuracy_matrix"]) == 5 and result["strategy"] == "si" and result["strategy_config"]["c"] == 2
    assert {"average_accuracy", "forgetting", "backward_transfer", "command", "accuracy_curve"} <= set(result)
    assert [p["step"] for p in result["accuracy_curve"][:3]] == [0, 5, 10]
    assert (out / "accuracy_matrix.png").stat().st_size > 1000 and (out / "accuracy_curve.png").stat().st_size > 1000
    # config.yaml repeats the run exactly
    again = tmp_path / "again"
    assert main(["continual", "--config", str(out / "config.yaml"), "--out", str(again), "--quiet"]) == 0
    assert json.loads((again / RESULT).read_text())["accuracy_matrix"] == result["accuracy_matrix"]
    # the same command again must not replace the finished run; --resume keeps it as it is
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(cli(out, "--strategy", "si", "--strategy-set", "c=2")) == 2
    assert main(cli(out, "--strategy", "si", "--strategy-set", "c=2", "--resume")) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_strategies_command_lists_every_strategy_with_its_options(capsys):
    assert main(["strategies", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert set(listing) == {"naive", "joint", "ewc", "online-ewc", "si", "lwf", "replay", "agem"}
    assert {o["name"] for o in listing["ewc"]["options"]} == {"strength", "fisher_samples", "fisher_labels"}
    assert listing["lwf"]["scenarios"] == ["domain", "class"]


@pytest.mark.parametrize("argv,expect", [
    (["--scenario", "rotated"], "scenario"),
    (["--scenario", "split-class", "--tasks", "3"], "does not split"),
    (["--scenario", "permuted", "--tasks", "0"], "--tasks"),
    (["--scenario", "split-class", "--strategy", "ewk"], "did you mean 'ewc'"),
    (["--scenario", "split-class", "--strategy", "ewc", "--strategy-set", "lambda=5"], "unknown option 'lambda'"),
    (["--scenario", "split-class", "--strategy", "si", "--strategy-set", "c=lots"], "not a valid float"),
    (["--scenario", "split-task", "--strategy", "lwf"], "does not apply to split-task"),
    (["--scenario", "split-class", "--strategy", "replay", "--strategy-set", "size=100000"], "larger than the data"),
    (["--scenario", "split-class", "--augment", "flip"], "unrecognized arguments: --augment"),
    (["--scenario", "split-class", "--epochs", "2"], "unrecognized arguments: --epochs"),
    (["--scenario", "split-class", "--steps-per-task", "0"], "--steps-per-task"),
])
def test_bad_continual_input_is_one_line_exit_2_nothing_written(argv, expect, capsys, tmp_path):
    out = tmp_path / "out"
    code = main(["continual", "--rule", "bp", "--data", "fashion-mnist", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()


def test_a_config_that_sets_a_train_only_option_is_refused(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("rule: bp\ndata: fashion-mnist\nscenario: split-class\naugment: crop:2\n")
    assert main(["continual", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "does not use --augment" in capsys.readouterr().err
