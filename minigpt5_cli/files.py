"""Reading the small text files users hand in: JSON and JSON Lines, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from minigpt5_cli.errors import UserError


def read_json(path: Path):
    """The JSON document in `path`; unreadable or invalid JSON is a UserError naming the place."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def json_lines(path: Path) -> Iterator[tuple[int, str, object]]:
    """(number, where, record) for each non-blank line of a JSON Lines file; bad JSON is a UserError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            yield number, where, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
