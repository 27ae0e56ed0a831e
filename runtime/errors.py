"""Errors every dlpipe stage raises for problems a user can fix.

The CLI turns any :class:`DlpipeError` into one line on stderr and a non-zero exit code; anything
else is a bug and keeps its traceback. Exit codes: 0 success, 1 a runtime or data error (a bad image,
model file or dataset, a device that cannot run), 2 a usage error (a wrong option value, a model of the
wrong kind for the command).
"""

from __future__ import annotations


class DlpipeError(Exception):
    """Base class: a problem with the user's input, files, data or machine, with a readable message."""

    exit_code = 1


class InputError(DlpipeError, ValueError):
    """An input (image, array, data file) that cannot be used, e.g. wrong shape, dtype or file type."""


class UsageError(InputError):
    """A command used wrongly: an option value out of range, a model of the wrong kind for the command."""

    exit_code = 2


class ModelFileError(DlpipeError):
    """A model or checkpoint file that is missing, corrupt or not what the command expects."""


class DeviceUnavailableError(DlpipeError):
    """The execution device that was asked for cannot run here (never a silent fallback)."""


class DataNotFoundError(DlpipeError):
    """A dataset that is not on disk and cannot be downloaded."""

