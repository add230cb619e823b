"""gkdc: composition root (CLI) over gkdlang, planner and runtime."""

__version__ = "0.1.0"
