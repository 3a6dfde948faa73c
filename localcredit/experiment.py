"""What defines a run (rule, data, network, options) and how to build it: shared by every command."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from . import rules
from .architectures import NetSpec, parse_hidden
from .data import Dataset, load
from .errors import UserError
from .rules.base import OptimConfig, Rule, parse_options

__all__ = ["RunSpec", "FINGERPRINT_FIELDS", "parse_hidden", "validate", "build_rule", "prepare", "run_info",
           "default_out_dir"]


@dataclass(kw_only=True)
class RunSpec(NetSpec):
    """A run: the rule, the data, the network (the NetSpec fields it inherits) and the optimiser."""

    rule: str
    data: str
    data_root: str | None = None
    options: list[str] = field(default_factory=list)  # the --set key=value strings
    optimizer: str = "adam"
    lr: float | None = None
    seed: int = 0


#: What must match for a checkpoint to be resumed (the seed belongs to the training loop; the data's
#: folder may move).
FINGERPRINT_FIELDS = tuple(f.name for f in fields(RunSpec) if f.name not in ("data_root", "seed"))


def validate(spec: RunSpec) -> Any:
    """Check everything that needs no data; return the rule's parsed Config."""
    rule_cls = rules.get(spec.rule)
    config = parse_options(rule_cls.Config, spec.options)
    if spec.optimizer not in ("adam", "sgd"):
        raise UserError(f"unknown --optimizer {spec.optimizer!r}; choose adam or sgd")
    if spec.lr is not None and not spec.lr > 0:
        raise UserError(f"--lr must be positive, got {spec.lr}")
    return config


def build_rule(spec: RunSpec, data: Dataset) -> Rule:
    """Seed, then build the network and the rule for ``data`` (weights and fixed matrices depend on the seed)."""
    config = validate(spec)
    rule_cls = rules.get(spec.rule)
    torch.manual_seed(spec.seed)
    net = rule_cls.build_network(spec.net_spec(), data.input_shape, data.num_classes)
    return rule_cls(net, config, OptimConfig(optimizer=spec.optimizer, lr=spec.lr))


def prepare(spec: RunSpec) -> tuple[Dataset, Rule]:
    """Everything a run needs, validated before anything is written."""
    validate(spec)  # fail on a bad rule or option before spending time on the data
    data = load(spec.data, spec.data_root)
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
