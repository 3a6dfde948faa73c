"""Continual-learning strategies, one file each. Importing this package registers every strategy.

A new strategy is one file in this folder holding a ``@register("name")`` subclass of
:class:`~localcredit.continual.strategies.base.Strategy` (docs/continual.md, "Adding a strategy").
"""

import importlib
import pkgutil

from .base import Batch, Strategy, available, get, register, strategy_config

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Batch", "Strategy", "available", "get", "register", "strategy_config"]
