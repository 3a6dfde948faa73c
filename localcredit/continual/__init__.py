"""Continual learning: task streams (scenarios) and the run over a stream with its metrics (runner)."""
