"""The failures a user can cause, one exception type per kind, each with its exit code.

Exit codes follow the BIDS Apps execution draft and sysexits: the command-line entry point is the
only place that turns these exceptions into exit codes and one-line messages.
"""

from __future__ import annotations

import signal


class BidsAnomalyError(Exception):
    """Base class of errors whose message is meant for the user."""

    exit_code = 1


class UsageError(BidsAnomalyError):
    """The command line asks for something impossible (exit 2)."""

    exit_code = 2


class BIDSValidationError(BidsAnomalyError):
    """The input folder is not a BIDS dataset (exit 16)."""

    exit_code = 16


class EmptySelectionError(BidsAnomalyError):
    """Labels or filters selected no participant (exit 18)."""

    exit_code = 18


class BadDataError(BidsAnomalyError):
    """An input file is unreadable or not what it should be (exit 65)."""

    exit_code = 65


class MissingInputError(BidsAnomalyError):
    """A required input is absent (exit 66)."""

    exit_code = 66


class OutputError(BidsAnomalyError):
    """The output or work folder cannot be created or written (exit 73)."""

    exit_code = 73


class TemporaryFailure(BidsAnomalyError):
    """A resource is temporarily missing, such as CUDA when ``--device cuda`` (exit 75)."""

    exit_code = 75


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM, SIGINT): exit 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
