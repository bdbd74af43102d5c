"""Errors a user can cause, each tied to its BIDS-Apps exit code.

The CLI catches :class:`AppError` and prints its one-line message without a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_FILES = 18
EXIT_USAGE = 64
EXIT_BAD_DATA = 65
EXIT_MISSING_INPUT = 66
EXIT_CANT_CREATE = 73


class AppError(Exception):
    """Base of user-facing errors; ``exit_code`` is what the process returns."""

    exit_code = EXIT_FAILURE


class UsageError(AppError):
    """Options that do not make sense together or are out of range."""

    exit_code = EXIT_USAGE


class UnknownLevelError(AppError):
    exit_code = EXIT_UNKNOWN_LEVEL


class ValidationFailed(AppError):
    """The input dataset failed BIDS validation."""

    exit_code = EXIT_VALIDATION


class NoDataSelected(AppError):
    """Participant/session/task labels or a filter file selected no BOLD run."""

    exit_code = EXIT_NO_FILES


class BadDataError(AppError):
    """A file exists but cannot be used (empty, truncated, wrong space, NaN, too short)."""

    exit_code = EXIT_BAD_DATA


class MissingInputError(AppError):
    """A required input (dataset, derivatives, template, atlas, model) is absent."""

    exit_code = EXIT_MISSING_INPUT


class OutputError(AppError):
    """The output or work folder cannot be created or written."""

    exit_code = EXIT_CANT_CREATE


class Terminated(BaseException):
    """SIGTERM arrived (``docker stop``, a SLURM preemption); 128 + 15 by convention.

    A ``BaseException`` like ``KeyboardInterrupt``, not an :class:`AppError`: the many
    ``except Exception`` that turn a reader's failure into "bad data" must never swallow a
    stop, so that a stop is never mistaken for a bad run and work does not go on.
    """

    exit_code = 143


def one_line(exc) -> str:
    """An exception's text on one line (library messages may span several).

    Parameters
    ----------
    exc : BaseException or str
        The exception.

    Returns
    -------
    str
        Its message with runs of whitespace (newlines included) collapsed to one space.
    """
    return " ".join(str(exc).split())
