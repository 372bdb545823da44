"""Errors that reach the user as one line and a non-zero exit code."""

from __future__ import annotations


class RaymemError(Exception):
    """Base class: the message is printed as one line, the process exits with `exit_code`."""

    exit_code = 1


class ConfigError(RaymemError):
    """The scan config (YAML) is missing, unreadable or invalid."""

    exit_code = 2


class InputError(RaymemError):
    """An input file (prompt set, training embeddings, ...) is malformed.

    The message always names the file and, where it applies, the row and the field.
    """

    exit_code = 2

    def __init__(self, source: str, problem: str, *, row: int | None = None, field: str | None = None):
        self.source, self.problem, self.row, self.field = source, problem, row, field
        where = source
        if row is not None:
            where += f": row {row}"
        if field is not None:
            where += f", field '{field}'" if row is not None else f": field '{field}'"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # raised inside Ray workers: must cross the process boundary intact
        return _rebuild_input_error, (self.source, self.problem, self.row, self.field)


def _rebuild_input_error(source, problem, row, field):
    return InputError(source, problem, row=row, field=field)


class ScanFailed(RaymemError):
    """The scan ran but could not complete; nothing was published as complete."""

    exit_code = 1


class OutputError(RaymemError):
    """The output root cannot be written (read-only, full, missing bucket, no permission)."""

    exit_code = 1


class ClusterError(RaymemError):
    """Ray cannot be reached at the configured address."""

    exit_code = 1


class ScanBusy(RaymemError):
    """Another live attempt holds the scan's lease: this one would only recompute the same thing."""

    exit_code = 4
