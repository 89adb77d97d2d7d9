"""User-facing errors. The CLI prints them without a traceback and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a config, a file, a name. The message says what and where."""


class ConfigError(UserError):
    """One or more problems in a grid file. ``problems`` holds (key path, message) pairs."""

    def __init__(self, file: str, problems: list[tuple[str, str]]):
        self.file = file
        self.problems = problems
        lines = [f"{file}: {len(problems)} problem(s) in the grid config:"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class StageError(RuntimeError):
    """A stage failed at run time (NaN loss, bad checkpoint ...); the message names the stage."""
