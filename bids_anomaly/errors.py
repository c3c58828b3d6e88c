"""The failures a user can cause, one exception type per kind, each with its exit code.

Exit codes follow the BIDS Apps execution draft and sysexits: the command-line entry point is the
only place that turns these exceptions into exit codes and one-line messages.
"""

from __future__ import annotations

import errno
import os
import re
import signal


class BidsAnomalyError(Exception):
    """Base class of errors whose message is meant for the user."""

    exit_code = 1


class UsageError(BidsAnomalyError):
    """The command line asks for something impossible (exit 2)."""

    exit_code = 2


class TrainingError(BidsAnomalyError):
    """Fitting a model failed: its loss or parameters became NaN or infinite (exit 1)."""

    exit_code = 1


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


def file_problem(path: str | os.PathLike, error: OSError) -> str | None:
    """Why ``path`` could not be opened, in words for the user, or None for other failures.

    A missing file, a symbolic link to nothing or one that loops, a folder, or a file this user
    may not read: what the system reports, said in one line with the fix.

    >>> file_problem("/d/x.nii", PermissionError(errno.EACCES, "Permission denied"))[:28]
    '/d/x.nii: permission denied;'
    """
    if isinstance(error, PermissionError):
        return (f"{path}: permission denied; make it readable by this user (chmod a+r) or run "
                "as its owner")
    if error.errno == errno.ELOOP or _loops(path):
        return f"{path}: a symbolic link that loops back on itself; replace it with the file"
    if isinstance(error, FileNotFoundError):
        if os.path.islink(path):
            return (f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; "
                    "link it to the file, or replace it with the file")
        return f"{path}: no such file"
    if isinstance(error, IsADirectoryError):
        return f"{path}: a folder, not a file"
    return None


def _loops(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a symbolic link whose chain of links never ends."""
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    r"""``text`` with its control characters (a newline in a path) written as escapes.

    >>> one_line("/data/new\nline")
    '/data/new\\nline'
    """
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)
