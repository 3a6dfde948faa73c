"""What defines a run (rule, data, network, options) and how to build it: shared by every command."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from . import rules
from .data import Dataset, load
from .errors import UserError
from .rules.base import OptimConfig, Rule, parse_options


@dataclass
class RunSpec:
    rule: str
    data: str
    data_root: str | None = None
    arch: str | None = None  # None: the rule's default_arch
    hidden: list[int] | None = None  # None: the architecture's default
    activation: str | None = None  # None: the architecture's default (relu; leaky ReLU for invertible)
    options: list[str] = field(default_factory=list)  # the --set key=value strings
    optimizer: str = "adam"
    lr: float | None = None
    seed: int = 0


def parse_hidden(text: str) -> list[int]:
    """``"1000,500"`` -> [1000, 500]; ``""`` or ``"none"`` -> no hidden blocks."""
    text = text.strip()
    if text in ("", "none"):
        return []
    if not re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        raise UserError(f"--hidden expects comma-separated positive integers like 1000,1000, got {text!r}")
    sizes = [int(part) for part in text.split(",")]
    if any(size < 1 for size in sizes):
        raise UserError(f"--hidden sizes must be positive, got {text!r}")
    return sizes


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
    net = rule_cls.build_network(spec.arch or rule_cls.default_arch, data.input_shape, data.num_classes, spec.hidden, spec.activation)
    return rule_cls(net, config, OptimConfig(optimizer=spec.optimizer, lr=spec.lr))


def prepare(spec: RunSpec) -> tuple[Dataset, Rule]:
    """Everything a run needs, validated before anything is written."""
    validate(spec)  # fail on a bad rule or option before spending time on the data
    data = load(spec.data, spec.data_root)
    return data, build_rule(spec, data)


def run_info(spec: RunSpec, rule: Rule) -> dict[str, Any]:
    """The run's identity as written into result.json."""
    info = asdict(spec)
    info.update(arch=rule.net.arch, hidden=rule.net.hidden, options=asdict(rule.config))
    return info


def default_out_dir(spec: RunSpec) -> str:
    data = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.data.replace("npz:", "npz-").rsplit("/", 1)[-1])
    return f"runs/{spec.rule}-{data}-seed{spec.seed}"


