"""The resumable rows file of a long benchmark: every finished job's rows are appended to a
JSON-lines file at once, so an interrupted run loses nothing and the next run with the same
output skips what is already there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows written so far (none when the file does not exist yet); creates its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
