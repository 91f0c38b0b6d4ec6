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
