"""The exceptions tuner raises for mistakes a user can fix.

Each carries a message that names the key or column, the bad value and the rule; the CLI prints it and exits
with code 2. Anything else escaping is a bug in tuner.
"""

from __future__ import annotations


class TunerError(Exception):
    """Base class of every user-facing tuner error."""

    exit_code = 2


class ConfigError(TunerError):
    """A study file (or equivalent arguments) is invalid; lists every problem found, one per line."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        if source:
            head = f"invalid study file {source}"
        elif all(p.startswith("--") for p in self.problems):
            head = "invalid command-line arguments"
        else:
            head = "invalid study specification"
        if len(self.problems) == 1:
            text = f"{head}: {self.problems[0]}"
        else:
            text = f"{head} ({len(self.problems)} problems):\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class DataError(TunerError):
    """The catalogue cannot be used: missing file or column, bad values, too few examples of a class."""


class StorageError(TunerError):
    """The study storage cannot be reached or holds a study that conflicts with the request."""


class TrackingError(TunerError):
    """The MLflow tracking store cannot be reached or refused a write."""


class ExportError(TunerError):
    """A trial cannot be exported, or an exported model cannot be used.

    For example: no such trial, an occupied output folder, weights that do not reproduce the recorded figures.
    """


#: What a driver says when no retry can help: the URL names a database, user or password the server refuses,
#: or is malformed (PostgreSQL's and MySQL's wording). Retried, each would only delay the one message.
PERMANENT_MARKERS = (
    "does not exist",
    "password authentication failed",
    "no password supplied",
    "invalid port number",
    "invalid connection option",
    "invalid dsn",
    "access denied for user",
    "unknown database",
)
