"""Errors that reach the user as one clear line."""

from __future__ import annotations

from pathlib import Path


class MprError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""

    keeps_output = False  # the CLI leaves what the command wrote (a report the message points to)


class InputError(MprError):
    """Bad input data, located by file and (where known) line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class FailedItems(MprError):
    """A stage finished with more failed items than `--max-failure-rate` allows: the output is complete
    and a rerun retries them. The CLI exits with code 3 (EXIT_FAILED_ITEMS)."""
