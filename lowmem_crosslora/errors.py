"""Exceptions that map onto the command line's exit codes.

0 done; 1 anything unexpected; 2 bad input or usage; 3 the memory budget cannot be met.
"""

from __future__ import annotations


class CrossLoraError(Exception):
    """Base class: an error with a one-line message meant for the user."""

    exit_code = 1


class InputError(CrossLoraError):
    """Bad input or usage: a missing file, a corrupt tensor, an unsupported adapter."""

    exit_code = 2


class BudgetError(CrossLoraError):
    """The memory budget cannot be met (before a unit starts, or while it runs)."""

    exit_code = 3


class Interrupted(CrossLoraError):
    """The run was stopped by a signal at a clean point; the state on disk is resumable."""

    exit_code = 130
