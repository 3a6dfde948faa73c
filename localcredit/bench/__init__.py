"""Measuring: bench suites (plan, runner, report) with published numbers, step-time and memory probes,
FLOPs, and alignment with backprop of a trained run."""
