"""MWM: an event-driven workload manager for medical-imaging AI applications."""

__version__ = "0.1.0"
