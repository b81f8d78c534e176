"""Files in and out: the small text files users hand in (JSON, JSON Lines), read with one-line
errors, and outputs written so that an interruption, a full disk or a second run never leaves a
half-written result in place of a whole one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from minigpt5_cli.errors import UserError

# What a failed write looks like: a full disk or quota, a folder without write permission.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _valid_text(value, where: str) -> None:
    """JSON may spell unpaired UTF-16 surrogates ("\\ud800"), which are not text: refuse them here,
    before a tokenizer, Arrow or a JSON writer fails on them."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: {e.object[e.start:e.end]!r} is an unpaired surrogate, not text") from None


def read_text(path: Path) -> str:
    """The UTF-8 text of `path`; a missing, unreadable or binary file is a UserError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def read_json(path: Path, check_text: bool = True):
    """The JSON document in `path`; unreadable, binary or invalid JSON is a UserError naming the place.
    `check_text`: refuse unpaired surrogates in it too (readers that reject records one by one
    check each record instead)."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if check_text:
        _valid_text(value, str(path))
    return value


def json_lines(path: Path) -> Iterator[tuple[int, str, object]]:
    """(number, where, record) for each non-blank line of a JSON Lines file; bad JSON is a UserError."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        _valid_text(value, where)
        yield number, where, value


def writable_folder(path: Path, option: str) -> None:
    """Refuse, before any work, an output folder that is a file or lies where nothing can be written."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a folder")
    _writable(path)


def writable_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file that is a folder or lies where nothing can be written."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    _writable(path.parent)


def _writable(path: Path) -> None:
    existing = path.absolute()
    while not existing.exists():  # the nearest folder that exists is where the new ones get made
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write under {existing}: it is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {existing}: permission denied")


def write_atomic(writers: dict[Path, object]) -> None:
    """Each `write(f)` (a UTF-8 text file), or bytes, into a temporary file beside its path; once all are
    written, each is moved onto its path. A failure (a full disk) leaves every old file whole, and no
    temporary file."""
    temps = {}
    try:
        for path, write in writers.items():
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
            if isinstance(write, bytes):
                with os.fdopen(fd, "wb") as f:
                    f.write(write)
            else:
                with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                    write(f)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def staged(out: Path, replace: bool):
    """A new temporary folder beside `out` (its name unique to this run), moved into place when the
    block ends without error, and removed otherwise. An existing `out` is replaced only when `replace`
    says so, checked again at the move: a folder that appeared meanwhile (another run) is refused, not
    replaced. The old folder is moved aside before the new one takes its place, and removed after."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        if out.exists() and not replace:
            raise UserError(f"{out} appeared while this run was writing it (another run?); "
                            "pass --overwrite to replace it")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
        try:
            os.rename(tmp, out)  # fails when another run put a folder there since the check
        except OSError:
            if old is not None and not out.exists():
                os.replace(old / "x", out)
            raise UserError(f"{out} appeared while this run was writing it (another run?); "
                            "pass --overwrite to replace it") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
