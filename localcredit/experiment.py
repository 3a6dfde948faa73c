"""What defines a run, and running it: the one specification every command, file and suite derives from.

:class:`RunSpec` is the rule and its options, the data, and the network (:class:`NetSpec`), training
recipe (:class:`TrainSpec`) and optimiser (:class:`OptimConfig`) it inherits. Its fields are the
options of ``localcredit train`` (``localcredit.spec`` derives the flags), the keys of a config file
(``--config run.yaml``; every run writes ``OUT/config.yaml``), the bench's and the probe's command
lines, and the identity a checkpoint must match to be resumed. From Python::

    import localcredit as lc
    result = lc.fit(lc.RunSpec(rule="dfa", data="fashion-mnist", epochs=2), out="runs/dfa")
"""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from . import rules
from . import spec as options
from .data import Dataset, data_names, load
from .data.base import IMAGEFOLDER_PREFIX
from .data.imagefolder import load_imagefolder
from .data.streaming import StreamedDataset
from .data.svhn import load_svhn
from .errors import UserError
from .nets.architectures import NetSpec, parse_hidden
from .rules.base import OptimConfig, Rule, laid_out, parse_options
from .rules.local_loss import LocalLossRule
from .spec import at_least, option
from .training.checkpoint import atomic_write_bytes
from .training.config import TrainConfig, TrainSpec
from .training.runfiles import CONFIG, claim_out_dir
from .training.trainer import Parallelism, Trainer

__all__ = ["RunSpec", "parse_hidden", "validate", "build_rule", "prepare", "fit", "run_info", "default_out_dir",
           "spec_from", "write_config", "CONFIG"]



@dataclass(kw_only=True)
class RunSpec(NetSpec, TrainSpec, OptimConfig):
    """A run: the rule, the data, and the network, recipe and optimiser it inherits the options of."""

    TITLE: ClassVar[str] = "the run"

    rule: str = option(MISSING, "learning rule (see `localcredit rules`)")
    data: str = option(MISSING, " | ".join(data_names()))
    data_root: str | None = option(None, "folder holding the data set's files (default: $LOCALCREDIT_DATA/<name>)")
    image_size: int | None = option(None, "imagefolder: resize the shorter side and centre-crop to this size",
                                    parse=int, check=at_least(1))
    options: list[str] = option([], "rule option KEY=VALUE, repeatable (see `localcredit rules`)",
                                flag="--set", metavar="KEY=VALUE", repeated=True)

    def part(self, cls: type) -> Any:
        """The fields of one of the specifications it inherits, as that specification."""
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})


#: config.yaml lists these first
LEADING = ("rule", "data")


def validate(spec: RunSpec) -> Any:
    """Check everything that needs no data (ranges, the rule and its options); return the rule's Config."""
    options.check(spec)
    train_config(spec).validate()
    rule_cls = rules.get(spec.rule)
    if spec.modules is not None and not issubclass(rule_cls, LocalLossRule):
        with_losses = sorted(name for name in rules.available() if issubclass(rules.get(name), LocalLossRule))
        raise UserError(f"--modules cuts the network for a rule with local losses ({', '.join(with_losses)}); "
                        f"{spec.rule} has none to put on a module")
    return parse_options(rule_cls.Config, spec.options)


def train_config(spec: RunSpec, progress: bool = True, **loop: Any) -> TrainConfig:
    """The Trainer's configuration: the spec's recipe plus how the loop reports and saves (``loop``)."""
    return TrainConfig(**{f.name: getattr(spec, f.name) for f in fields(TrainSpec)}, progress=progress, **loop)


def build_rule(spec: RunSpec, data: Dataset | StreamedDataset) -> Rule:
    """Seed, then build the network and the rule for ``data`` (weights and fixed matrices depend on the seed)."""
    config = validate(spec)
    rule_cls = rules.get(spec.rule)
    torch.manual_seed(spec.seed)
    net = rule_cls.build_network(spec.net_spec(), data.input_shape, data.num_classes)
    return laid_out(rule_cls(net, config, spec.part(OptimConfig)))


def load_data(spec: RunSpec) -> Dataset | StreamedDataset:
    """The run's data: in-memory tensors for what fits, a streamed data set for image folders and SVHN."""
    if spec.data.startswith(IMAGEFOLDER_PREFIX):
        return load_imagefolder(spec.data[len(IMAGEFOLDER_PREFIX):], spec.image_size)
    if spec.image_size is not None:
        raise UserError(f"--image-size applies to imagefolder:PATH data, not to {spec.data}")
    if spec.data == "svhn":
        return load_svhn(spec.data_root)
    return load(spec.data, spec.data_root)


def samples(data: Dataset | StreamedDataset, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training samples ``index`` (inputs, labels), in memory or decoded."""
    if isinstance(data, StreamedDataset):
        return next(iter(data.loader("train", [index.tolist()], workers=0)))
    return data.x_train[index], data.y_train[index]


def prepare(spec: RunSpec) -> tuple[Dataset | StreamedDataset, Rule]:
    """Everything a run needs, validated before anything is written."""
    validate(spec)  # fail on a bad rule or option before spending time on the data
    data = load_data(spec)
    return data, build_rule(spec, data)


def run_info(spec: RunSpec, rule: Rule) -> dict[str, Any]:
    """The run's identity as written into result.json (the network's resolved defaults included)."""
    info = asdict(spec)
    info.update(arch=rule.net.arch, hidden=rule.net.hidden, options=asdict(rule.config),
                network=rule.net.description)
    return info


def default_out_dir(spec: RunSpec) -> str:
    data = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.data.replace("npz:", "npz-").rsplit("/", 1)[-1])
    return f"runs/{spec.rule}-{data}-seed{spec.seed}"


# ----- config files -----------------------------------------------------------------------------
def read_config(path: str | Path, spec_cls: type | None = None) -> dict[str, Any]:
    """The option values of a YAML config file for ``spec_cls`` (default RunSpec), checked key by key
    (one-line errors naming the key)."""
    path = Path(path)
    try:
        mapping = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{where}") from None
    return options.from_mapping(spec_cls or RunSpec, mapping if mapping is not None else {}, str(path))


def spec_from(config: str | Path | None, given: dict[str, Any]) -> RunSpec:
    """The run a config file describes, with the command line's options (``given``) overriding it."""
    values = read_config(config) if config is not None else {}
    values.update(given)
    missing = [f"--{name}" for name in LEADING if name not in values]
    if missing:
        raise UserError(f"{' and '.join(missing)} required (on the command line or in a --config file)")
    spec = RunSpec(**values)
    validate(spec)
    return spec


def write_config(spec: RunSpec, out_dir: Path, command: str = "train", leave_out: tuple[str, ...] = ()) -> None:
    """OUT/config.yaml: every option of the run (but ``leave_out``); ``localcredit COMMAND --config`` it to
    repeat the run."""
    header = (f"# localcredit run: `localcredit {command} --config {out_dir / CONFIG} --out NEW` repeats it "
              f"(same seed, same numbers)\n")
    mapping = {k: v for k, v in options.to_mapping(spec, first=LEADING).items() if k not in leave_out}
    text = header + yaml.safe_dump(mapping, sort_keys=False)
    atomic_write_bytes(out_dir / CONFIG, lambda handle: handle.write(text.encode()))


# ----- running ----------------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown --device {name!r}; use cpu, cuda or auto")
    return name


def fit(spec: RunSpec, out: str | Path | None = None, resume: bool = False, device: str = "auto",
        progress: bool = True, command: str | None = None,
        prepared: tuple[Dataset | StreamedDataset, Rule] | None = None,
        parallel: Parallelism | None = None, overwrite: bool = False, checkpoint_every: str = "10m",
        resume_hint: str = "", rule: Rule | None = None,
        data: Dataset | StreamedDataset | None = None) -> dict[str, Any]:
    """Train the run ``spec`` describes; with ``out``, write config.yaml, result.json and checkpoints there.

    ``rule`` (``lc.make_rule(...)``, on your own network) is trained instead of the one ``spec``
    would build, with ``spec``'s recipe (epochs, batch size, seed of the data order, ...), on ``data``
    (default: ``spec.data`` loaded); ``spec.rule`` must be its name. config.yaml then records the
    rule's own options and optimiser and ``arch: custom``.
    An ``out`` that holds a run is refused unless ``resume`` (continue it) or ``overwrite`` (replace
    it). Returns the result dict (what result.json holds); a signal raises
    :class:`~localcredit.training.runfiles.Interrupted` after the checkpoint is written.
    """
    if rule is not None:
        spec, prepared = own_rule(spec, rule, data)
    elif data is not None:
        raise UserError("fit: data= goes with rule= (your own rule); without it, spec.data names the data")
    data, rule = prepared if prepared is not None else prepare(spec)
    info = {**run_info(spec, rule), "command": command or "localcredit.fit"}
    parallel = parallel if parallel is not None else Parallelism()
    config = train_config(spec, progress, checkpoint_every=checkpoint_every, resume_hint=resume_hint)
    trainer = Trainer(rule, data, config, out_dir=out, run_info=info, device=resolve_device(device), parallel=parallel)
    if out is not None and parallel.writer:  # other processes: the launcher checked before they started
        claim_out_dir(out, resume, overwrite)
    return trainer.fit(resume=resume, on_start=lambda: write_config(spec, Path(out)) if out is not None else None)


def own_rule(spec: RunSpec, rule: Rule,
             data: Dataset | StreamedDataset | None) -> tuple[RunSpec, tuple[Dataset | StreamedDataset, Rule]]:
    """The run of a rule built from Python (``lc.make_rule``): ``spec`` with the rule's own options,
    optimiser and network, and the data (``spec.data`` loaded when not given)."""
    if not isinstance(rule, Rule):
        raise UserError(f"fit: rule= takes a rule (localcredit.make_rule(...)), got {type(rule).__name__}")
    if spec.rule != rule.name:
        raise UserError(f"fit: spec.rule is {spec.rule!r} but the rule given is {rule.name!r}")
    if data is not None and data.name != spec.data:
        raise UserError(f"fit: spec.data is {spec.data!r} but the data given is {data.name!r}")
    spec = replace(spec, arch=rule.net.arch, options=[f"{k}={v}" for k, v in asdict(rule.config).items()],
                   **asdict(rule.optim))
    validate(spec)
    return spec, (data if data is not None else load_data(spec), rule)
