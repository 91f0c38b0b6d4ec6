"""Where tuner writes: whether a file or folder can be made there, asked before any work is done."""

from __future__ import annotations

import os
from pathlib import Path


def cannot_create(path: Path) -> str | None:
    """Why ``path`` cannot be made (under a file, or in a folder without write access); None when it can."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"no permission to write in {ancestor}"
    return None


#: The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def not_an_sqlite_file(path: Path) -> str | None:
    """Why ``path`` cannot hold an SQLite database (a folder, another kind of file, a place that cannot be
    written); None when it is one, an empty file, or can be made."""
    if path.is_dir():
        return f"{path} is a folder, not an SQLite file"
    if path.exists():
        try:
            with open(path, "rb") as handle:
                head = handle.read(len(SQLITE_HEADER))
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror or exc}"
        if head and head != SQLITE_HEADER:
            return f"{path} is not an SQLite database"
        return None
    return cannot_create(path)


def overwrite_problem(out: Path, inputs: dict[str, Path | None]) -> str | None:
    """Why writing ``out`` would destroy something tuner reads, or None.

    ``inputs`` names files the command reads (the study file, the catalogue, a ``--data`` file) by what they
    are. An existing SQLite database (a study's storage, an MLflow store) is never replaced either: a report or
    a table written over it loses the study for good.
    """
    target = out.expanduser().resolve()
    for what, path in inputs.items():
        if path is not None and path.expanduser().resolve() == target:
            return f"{out} is {what}; writing there would replace it: give another path"
    if target.is_file():
        try:
            with open(target, "rb") as handle:
                if handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER:
                    return f"{out} is an SQLite database (a study's storage or an MLflow store?); give another path"
        except OSError:
            return None  # unreadable: the write itself says why it fails
    return None


def sqlite_tables(path: Path) -> set[str]:
    """The tables of an existing SQLite file, read without writing (none for a missing or unreadable file)."""
    import sqlite3
    from contextlib import closing

    if not path.is_file():
        return set()
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return set()


#: Tables that tell an MLflow store and an Optuna study storage apart.
MLFLOW_TABLES = {"experiments", "runs"}
OPTUNA_TABLES = {"studies", "version_info"}
