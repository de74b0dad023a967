"""Errors a user can fix, shared by modules that must not import each other."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""
