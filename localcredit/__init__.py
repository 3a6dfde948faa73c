"""localcredit: train deep networks without end-to-end backpropagation, and compare the rules honestly."""

__version__ = "0.1.0"
