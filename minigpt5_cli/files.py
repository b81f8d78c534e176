"""Files in and out: the small text files users hand in (JSON, JSON Lines), read with one-line
errors, and outputs written so that an interruption, a full disk or a second run never leaves a
half-written result in place of a whole one."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from minigpt5_cli.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no locks, so no run is refused and no partial folder is removed
    fcntl = None

# What a failed write looks like: a full disk or quota, a folder without write permission.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

# The most read of a user's file. A JSON document is parsed whole, at several times its size in memory:
# the largest read whole are dataset annotation files (VIST's, about 150 MB); a story, a rating export
# or a metrics report is kilobytes. A recipe is a page of settings. A JSON Lines file is read a line at
# a time, each of at most MAX_LINE characters (counted as read, decoded); a line is one record (a story,
# a pair: text, with images named by path).
MAX_DOCUMENT = 256 * 2**20
MAX_RECIPE = 2**20
MAX_LINE = 16 * 2**20


def _valid_text(value, where: str) -> None:
    """JSON may spell unpaired UTF-16 surrogates ("\\ud800"), which are not text: refuse them here,
    before a tokenizer, Arrow or a JSON writer fails on them."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: {e.object[e.start:e.end]!r} is an unpaired surrogate, not text") from None
    except RecursionError:  # parsed just under the stack's limit, a few frames deeper than here
        raise UserError(f"{where}: nested too deeply") from None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{round(n / scale, 1):g} {unit}"
    return f"{n} bytes"


def read_text(path: Path, limit: int | None = None) -> str:
    """The UTF-8 text of `path`, at most `limit` bytes (MAX_DOCUMENT unless told); a missing, unreadable,
    binary or larger file is a UserError."""
    limit = MAX_DOCUMENT if limit is None else limit
    try:
        size = path.stat().st_size
        if size > limit:  # checked before reading: a file read whole takes several times its size in memory
            raise UserError(f"{path} is too large ({_size(size)}; at most {_size(limit)} is read)")
        with path.open(encoding="utf-8") as f:
            text = f.read(limit + 1)  # a pipe or device reports no size
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if len(text) > limit:
        raise UserError(f"{path} is too large (at most {_size(limit)} is read)")
    return text


def loads(text: str):
    """json.loads, where every failure is a JSONDecodeError (a ValueError) saying where: json.loads raises
    RecursionError for nesting deeper than Python's stack, and a bare ValueError for an integer too long
    to convert."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:  # raised as the stack runs out, and unwound: the stack is whole again here
        raise json.JSONDecodeError("nested too deeply", text, len(text) - len(text.lstrip())) from None
    except ValueError:
        digits = sys.get_int_max_str_digits()
        number = re.search(rf"[0-9]{{{digits + 1}}}", text)
        raise json.JSONDecodeError(f"a number of more than {digits} digits", text, number.start() if number else 0) \
            from None


def parse_json(text: str, where: str, position: bool = True):
    """The JSON value in `text`; invalid JSON (nesting deeper than Python's stack too) is a UserError
    naming `where` (and, with `position`, the line and column)."""
    try:
        return loads(text)
    except json.JSONDecodeError as e:
        at = f" at line {e.lineno} column {e.colno}" if position else ""
        raise UserError(f"{where}: not valid JSON ({e.msg}{at})") from None


def read_json(path: Path, check_text: bool = True):
    """The JSON document in `path`; unreadable, binary, too large or invalid JSON is a UserError naming
    the place. `check_text`: refuse unpaired surrogates in it too (readers that reject records one by
    one check each record instead)."""
    value = parse_json(read_text(path), str(path))
    if check_text:
        _valid_text(value, str(path))
    return value


def json_lines(path: Path) -> Iterator[tuple[int, str, object]]:
    """(number, where, record) for each non-blank line of a JSON Lines file, read one line at a time;
    bad JSON, or a line longer than MAX_LINE, is a UserError."""
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), ""), start=1):
                where = f"{path} line {number}"
                if len(line.rstrip("\n")) > MAX_LINE:
                    raise UserError(f"{where} is too long (over {MAX_LINE:,} characters); a line holds one record")
                if not line.strip():
                    continue
                value = parse_json(line, where, position=False)
                _valid_text(value, where)
                yield number, where, value
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def json_records(path: Path, what: str) -> list[tuple[str, object]]:
    """(where, record) for each record of a JSON list, or of JSON Lines when the file is named .jsonl."""
    if not path.is_file():
        raise UserError(f"{path} not found" if not path.exists() else f"{path} is not a file")
    if path.suffix == ".jsonl":
        return [(where, r) for _, where, r in json_lines(path)]
    doc = read_json(path)
    if not isinstance(doc, list):
        raise UserError(f"{path} is not a list of {what} (nor JSON Lines named .jsonl)")
    return [(f"{path} record {i}", r) for i, r in enumerate(doc, start=1)]


def python_tree(path: Path, option: str):
    """The syntax tree of the Python file `path` (someone else's: a benchmark's or the original code's), to
    read its strings from; the file is parsed, never run. `option` names where it came from."""
    import ast

    if not path.is_file():
        raise UserError(f"{option}: {path} not found (give a checkout of the repository it belongs to)")
    try:
        tree = ast.parse(read_text(path).removeprefix("\ufeff"), str(path))  # a BOM is valid Python
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UserError(f"{option}: {path} is not Python this version can read ({e or type(e).__name__})") \
            from None
    for node in ast.walk(tree):  # its strings are written on: "\ud800" escapes make no text
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            _valid_text(node.value, f"{option}: {path} line {node.lineno}")
    return tree


def overlaps(a: Path, b: Path) -> bool:
    """Whether the folders `a` and `b` are one, or one holds the other, once both are resolved: writing the
    one would write into, or over, the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def inside(path: Path, root: Path) -> bool:
    """Whether `path` lies in the folder `root` (or is it) once both are resolved: `..` and symbolic
    links followed, so that neither leads out of it."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def writable_folder(path: Path, option: str) -> None:
    """Refuse, before any work, an output folder that is a file or lies where nothing can be written."""
    _utf8(path, option)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a folder")
    _writable(path)


def writable_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file that is a folder or lies where nothing can be written."""
    _utf8(path, option)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    _writable(path.parent)


def _utf8(path: Path, option: str) -> None:
    """Refuse a name that is not UTF-8 (the file system takes any bytes): the libraries that write models
    (tokenizers) take only UTF-8 paths, and no file written can name it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise UserError(f"{option} {shown} is not a UTF-8 name; pick one that is") from None


def _writable(path: Path) -> None:
    existing = path.absolute()
    while not existing.exists():  # the nearest folder that exists is where the new ones get made
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write under {existing}: it is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {existing}: permission denied")


def write_atomic(writers: dict[Path, object], private: tuple[Path, ...] = ()) -> None:
    """Each `write(f)` (a UTF-8 text file), or bytes, into a temporary file beside its path; once all are
    written, each is moved onto its path. A failure (a full disk) leaves every old file whole, and no
    temporary file. Files get the mode a plain write gives, those in `private` (a secret) 0600."""
    temps = {}
    try:
        for path, write in writers.items():
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
            if path not in private:  # mkstemp's 0600 would hide the file from other users
                _chmod(fd, _mode(path, 0o666))
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


def _umask() -> int:
    mask = os.umask(0o077)  # reading the umask means setting it
    os.umask(mask)
    return mask


def _mode(path: Path, plain: int) -> int:
    """The mode a plain write of `path` gives: the existing file's, or `plain` less the umask."""
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    return st.st_mode & 0o777 if st is not None and stat.S_ISREG(st.st_mode) else plain & ~_umask()


def _chmod(target: int | Path, mode: int) -> None:
    """Set the mode of `target`, an open file or a path, where the file system keeps modes (vfat and some
    network mounts do not: their own default stays)."""
    try:
        os.chmod(target, mode)
    except (OSError, NotImplementedError):  # NotImplementedError: no fchmod on this platform
        pass


@contextmanager
def staged(out: Path, replace: bool = False, *, keep: bool = False, into: bool = False, last: tuple[str, ...] = (),
           tmp: Path | None = None):
    """A new temporary folder beside `out`, moved into place when the block ends without error, and
    removed otherwise. An `out` that exists by then is, as told:
    - refused (another run put it there meanwhile), unless `replace` says so: then the old folder is
      moved aside before the new one takes its place, and removed after;
    - with `keep`, kept, and the new folder dropped: another process made the same, and may read it;
    - with `into`, a folder this run holds (`run_lock`, whose file stays in place, held): the new
      entries move into it one by one, those named in `last` (what a loader reads first) last, so a
      folder an interruption left half-filled does not load.

    The temporary folder's name is unique to this run, and it is locked while the run lives (the kernel
    drops the lock however the run ends, kill -9 included): at start, those of earlier runs into `out`
    that no live run holds are removed; those of runs still writing are left alone. `tmp`, instead: a
    fixed name, which the processes of one run all write into, in a folder the run holds; one an
    earlier run left is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    raced = tmp is None and not keep  # a failed move means another run got there first
    if tmp is None:
        _remove_stale(out)
        tmp, lock = _partial(out)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        lock = None
    old = old_lock = None
    try:
        yield tmp
        (tmp / LOCK_FILE).unlink(missing_ok=True)  # not part of the result; the open file keeps the lock until the end
        if into:
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name in last):
                entry.rename(out / entry.name)
            return
        if out.exists() and keep:
            return
        appeared = f"{out} appeared while this run was writing it (another run?); pass --overwrite to replace it"
        if out.exists() and not replace:
            raise UserError(appeared)
        if out.exists():
            old, old_lock = _partial(out)  # locked too: a kill while it is removed leaves a stale partial
            os.replace(out, old / "x")
        _chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the folder from other users
        try:
            os.rename(tmp, out)  # fails when another run put a folder there since the check
        except OSError:
            if keep and out.exists():
                return
            if old is not None and not out.exists():
                os.replace(old / "x", out)
            if not raced:
                raise
            raise UserError(appeared) from None
    finally:
        for folder, fd in ((tmp, lock), (old, old_lock)):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
                _release(fd)


LOCK_FILE = ".lock"
_HELD: set[int] = set()  # the lock files this process holds open


def _close_held() -> None:
    # A forked child (a pool or DataLoader worker) drops its copies: one left running after its parent
    # was killed would otherwise keep the parent's locks.
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held)


def _lock(fd: int) -> bool | None:
    """Lock the open file `fd` for this process without waiting: False when another process holds it,
    None where the file system keeps no locks (some network mounts)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _is(fd: int, path: Path) -> bool:
    """Whether `path` is still the file open as `fd` (not removed, nor replaced, meanwhile)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def _release(fd: int | None) -> None:
    if fd is not None:
        _HELD.discard(fd)
        os.close(fd)


def _partial(out: Path) -> tuple[Path, int]:
    """A new `.OUT.partial-*` folder beside `out`, and the open lock file in it that this process holds."""
    while True:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
        try:
            fd = os.open(tmp / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:  # another run starting took it for a stale one, in the instant before
            continue
        if _lock(fd) is not False and _is(fd, tmp / LOCK_FILE):
            _HELD.add(fd)
            return tmp, fd
        os.close(fd)  # the same race: that run is removing the folder


def _remove_stale(out: Path) -> None:
    """Remove the partial folders of earlier runs into `out` whose lock no process holds (killed
    runs). One without a lock file is left alone: a run in its first instant, or one that ended."""
    prefix = f".{out.name}.partial-"
    for entry in os.scandir(out.parent):
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))  # Windows has none
        except OSError:
            continue
        try:
            if _lock(fd) and _is(fd, path):
                shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


@contextmanager
def run_lock(folder: Path, message: str):
    """Hold `folder/.lock` for the block, or raise UserError(message) when another process holds it:
    two runs never write into one folder. The kernel drops the lock however the process ends. The file
    stays: were it removed, a third run could lock a new one while the second still held the old."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if e.errno in WRITE_ERRORS:
            raise
        raise UserError(f"cannot open {folder / LOCK_FILE}: {e.strerror or e}") from None
    _HELD.add(fd)
    try:
        if _lock(fd) is False:
            raise UserError(message)
        yield
    finally:
        _release(fd)
