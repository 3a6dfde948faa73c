"""A continual run as a specification: the command line, config.yaml and the bench all derive from it.

:class:`ContinualSpec` is a :class:`~localcredit.experiment.RunSpec` (rule, data, network, optimiser,
batch size, seed) plus the scenario, the strategy and the number of steps per task. The options of
``train``'s recipe that a stream of tasks has no use for (epochs, learning-rate schedules,
augmentation, evaluation every N epochs) are not offered, and a config file that sets them is
refused. From Python::

    from localcredit.continual.experiment import ContinualSpec, run_continual
    result = run_continual(ContinualSpec(rule="bp", data="mnist", scenario="split-class",
                                         strategy="replay", steps_per_task=2000), out="runs/cl")
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from .. import spec as options
from ..data.base import Dataset
from ..data.streaming import StreamedDataset
from ..errors import UserError
from ..experiment import LEADING, RunSpec, build_rule, load_data, read_config, run_info, validate, write_config
from ..rules.base import Rule
from ..spec import at_least, one_of, option
from ..training.progress import Diverged
from ..training.runfiles import RESULT, Interrupted, claim_out_dir, hold_run_folder, read_json, remove_temporaries
from . import strategies
from .plots import plot_run
from .runner import ContinualRun, Loop, save_result
from .scenarios import SCENARIOS, Stream, make_stream

#: RunSpec options a continual run does not use: not offered by `continual`, refused in its config files.
NOT_USED = ("epochs", "eval_every", "augment", "lr_schedule", "milestones", "lr_decay")


@dataclass(kw_only=True)
class ContinualSpec(RunSpec):
    """A continual run: a rule and network (RunSpec), a stream of tasks and a strategy."""

    TITLE: ClassVar[str] = "continual learning"

    scenario: str = option(MISSING, " | ".join(SCENARIOS), check=one_of(*SCENARIOS))
    tasks: int = option(5, "tasks in the stream (split: they must share the classes equally)", parse=int,
                        check=at_least(1))
    strategy: str = option("naive", "continual-learning strategy (see `localcredit strategies`)")
    strategy_options: list[str] = option([], "strategy option KEY=VALUE, repeatable (see `localcredit strategies`)",
                                         flag="--strategy-set", metavar="KEY=VALUE", repeated=True)
    steps_per_task: int = option(2000, "training steps per task (van de Ven et al.'s split-MNIST protocol: 2000)",
                                 parse=int, check=at_least(1))
    curve_every: int = option(50, "evaluate the tasks seen so far every N steps, for the accuracy curve (0: never)",
                              parse=int, check=at_least(0))
    curve_samples: int = option(1000, "test samples per task in those evaluations", parse=int, check=at_least(1))


def check_unused(spec: ContinualSpec) -> None:
    """A train-only option set to anything but its default is refused, not silently ignored."""
    for f in dataclasses.fields(RunSpec):
        if f.name in NOT_USED and getattr(spec, f.name) != options.default_of(f):
            raise UserError(f"continual does not use {options.flag_of(f)} (set to {getattr(spec, f.name)!r}): a task "
                            f"trains for --steps-per-task steps at a constant learning rate, without augmentation")


def continual_spec(config: str | Path | None, given: dict[str, Any]) -> ContinualSpec:
    """The run a config file describes, the command line's options (``given``) overriding it; checked."""
    values = read_config(config, ContinualSpec) if config is not None else {}
    values.update(given)
    missing = [f"--{name}" for name in (*LEADING, "scenario") if name not in values]
    if missing:
        raise UserError(f"{' and '.join(missing)} required (on the command line or in a --config file)")
    spec = ContinualSpec(**values)
    validate_continual(spec)
    return spec


def validate_continual(spec: ContinualSpec) -> Any:
    """Everything that needs no data: the run's options, the rule's and the strategy's; the strategy's Config."""
    validate(spec)
    check_unused(spec)
    return strategies.strategy_config(spec.strategy, spec.strategy_options)


def prepare_continual(spec: ContinualSpec) -> tuple[Stream, Rule, strategies.Strategy]:
    """The stream, the rule (its network sized to the scenario's outputs) and the strategy, all checked."""
    strategy_config = validate_continual(spec)
    data = load_data(spec)
    if isinstance(data, StreamedDataset):
        raise UserError(f"continual learning needs data that fits in memory; {spec.data} is streamed from disk")
    if spec.limit_train is not None:
        data = dataclasses.replace(data, x_train=data.x_train[:spec.limit_train], y_train=data.y_train[:spec.limit_train])
    stream = make_stream(data, spec.scenario, spec.tasks, seed=spec.seed)
    rule = build_rule(spec, Dataset(name=data.name, x_train=data.x_train[:1], y_train=data.y_train[:1],
                                    x_test=data.x_test[:1], y_test=data.y_test[:1], num_classes=stream.outputs))
    strategy = strategies.get(spec.strategy)(strategy_config, rule, stream, seed=spec.seed)
    if spec.batch_size > min(len(task.data.y_train) for task in stream.tasks):
        raise UserError(f"--batch-size {spec.batch_size} is larger than the smallest task's "
                        f"{min(len(task.data.y_train) for task in stream.tasks)} training samples")
    return stream, rule, strategy


def fingerprint(spec: ContinualSpec) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (not where the data lives, nor how often to plot)."""
    return {k: v for k, v in options.to_mapping(spec).items()
            if k not in ("data_root", "curve_samples", "log", *NOT_USED)}


def run_continual(spec: ContinualSpec, out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                  progress: bool = True, command: str | None = None, checkpoint_every: str = "10m",
                  resume_hint: str = "") -> dict[str, Any]:
    """Train the stream ``spec`` describes; with ``out``, write config.yaml, checkpoints, result.json and the
    plots there. An ``out`` holding a run is refused unless ``resume`` or ``overwrite``; a finished run
    resumed returns its result.json unchanged."""
    stream, rule, strategy = prepare_continual(spec)
    loop = Loop(steps_per_task=spec.steps_per_task, batch_size=spec.batch_size, seed=spec.seed,
                curve_every=spec.curve_every, curve_samples=spec.curve_samples, progress=progress,
                checkpoint_every=checkpoint_every, resume_hint=resume_hint)
    run = ContinualRun(rule, stream, strategy, loop, out_dir=out, fingerprint=fingerprint(spec), log=spec.log)
    info = {**run_info(spec, rule), "strategy_config": asdict(strategy.config), "outputs": stream.outputs,
            "task_classes": [task.classes for task in stream.tasks], "command": command or "run_continual"}
    for name in NOT_USED:
        info.pop(name, None)
    if out is None:
        return {**info, **run.run()}
    out = Path(out)
    claim_out_dir(out, resume, overwrite)
    with hold_run_folder(out):  # no other process works in `out` until this one has written its result
        remove_temporaries(out)
        if resume and (out / RESULT).exists() and read_json(out / RESULT).get("status") == "finished":
            print(f"{out} is finished; its result.json is kept as it is", flush=True)
            return read_json(out / RESULT)
        out.mkdir(parents=True, exist_ok=True)
        write_config(spec, out, command="continual", leave_out=NOT_USED)
        title = f"{spec.rule} + {spec.strategy} on {spec.scenario} {spec.data}"
        try:
            result = {**info, **run.run(resume=resume), "status": "finished"}
        except Diverged as exc:
            save_result({**info, **run.record(), "status": "diverged", "message": str(exc)}, out, title)
            raise
        except Interrupted:
            # The tasks finished so far, for a look while the run waits to be resumed (the checkpoint has all).
            save_result({**info, **run.record(), "status": "interrupted",
                         "interrupted_at": {"task": run.task + 1, "step": run.step}}, out, title)
            raise
        save_result(result, out, title, plot_run)
    return result
