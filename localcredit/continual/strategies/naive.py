"""Naive fine-tuning: the lower bound every continual-learning table starts from."""

from .base import Strategy, register


@register("naive")
class Naive(Strategy):
    """Fine-tuning: each task trains the same network on its own data, nothing added (lower bound)."""
