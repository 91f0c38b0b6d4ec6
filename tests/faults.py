"""Faults the tests inject."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

#: What PostgreSQL says to a connection it ends as it shuts down.
TERMINATING = "terminating connection due to administrator command"


def restart_error(statement: str = "SELECT", message: str = TERMINATING) -> OperationalError:
    """What the database driver raises for a statement cut off by a server restart."""
    return OperationalError(statement, {}, Exception(message))
