"""Learning rules. Importing this package registers every rule.

A new rule is one file in this folder holding a ``@register("name")`` class; every module here is
imported below, so nothing else needs editing.
"""

import importlib
import pkgutil

from .base import OptimConfig, Rule, available, describe_options, get, make_rule, parse_options, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["OptimConfig", "Rule", "available", "describe_options", "get", "make_rule", "parse_options", "register"]
