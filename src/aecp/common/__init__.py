"""Shared building blocks: errors, logging, clocks, guarded tasks, subprocesses."""
