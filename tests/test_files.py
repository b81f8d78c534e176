import json
import os

import pytest

from minigpt5_cli import files
from minigpt5_cli.errors import UserError


def _error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    return str(e.value)


def test_json_nested_too_deeply_or_with_too_long_a_number(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("[" * 100_000)
    assert _error(files.read_json, path) == f"{path}: not valid JSON (nested too deeply at line 1 column 1)"
    path.write_text('{"a": [1, ' + "9" * 5000 + "]}")
    assert _error(files.read_json, path) == f"{path}: not valid JSON (a number of more than 4300 digits at line 1 " \
        "column 11)"
    lines = tmp_path / "s.jsonl"
    lines.write_text('{"a": 1}\n' + "[" * 100_000 + "\n")
    assert _error(list, files.json_lines(lines)) == f"{lines} line 2: not valid JSON (nested too deeply)"


def test_large_json_is_refused_unread(tmp_path):
    path = tmp_path / "s.json"
    with path.open("wb") as f:
        f.truncate(2 * files.MAX_DOCUMENT)  # sparse: no disk used
    assert _error(files.read_json, path) == f"{path} is too large (512 MiB; at most 256 MiB is read)"


def test_json_lines_reads_a_line_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b" " * 2**20 + b'\n\xff\n')
    lines = files.json_lines(path)
    assert next(lines) == (1, f"{path} line 1", {"a": 1})  # read before the rest of the file
    assert _error(next, lines) == f"{path} is not UTF-8 text"

    monkeypatch.setattr(files, "MAX_LINE", 16)
    path.write_text('{"a": 1}\n{"a": "0123456789"}\n')
    assert _error(list, files.json_lines(path)) == \
        f"{path} line 2 is too long (over 16 characters); a line holds one record"
    path.write_text('{"a": "01234"}\n')  # 14 characters, then the end of the line
    assert list(files.json_lines(path)) == [(1, f"{path} line 1", {"a": "01234"})]
    path.write_text('{"a": "\u00e9\u00e9\u00e9\u00e9\u00e9"}\n', encoding="utf-8")  # 14 characters, 19 bytes
    assert list(files.json_lines(path)) == [(1, f"{path} line 1", {"a": "\u00e9" * 5})]


def test_json_lines_end_only_at_line_breaks(tmp_path):
    """JSON strings may hold U+2028 and U+0085 as they are: they do not end a line; CRLF does."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False).encode() + b"\r\n\r\n{}\r\n")
    assert [(n, r) for n, _, r in files.json_lines(path)] == [(1, {"text": "a\u2028b\x85c"}), (3, {})]


def test_locks_open_without_o_nofollow(tmp_path, monkeypatch):
    """Windows has no O_NOFOLLOW: locking an output folder and clearing stale partial folders still work."""
    monkeypatch.delattr(files.os, "O_NOFOLLOW", raising=False)
    with files.run_lock(tmp_path / "run", "in use"):
        pass
    stale = tmp_path / ".out.partial-x"
    stale.mkdir()
    (stale / files.LOCK_FILE).touch()  # no process holds it: a killed run's
    with files.staged(tmp_path / "out", replace=False) as tmp:
        (tmp / "data").write_text("x")
    assert not stale.exists() and (tmp_path / "out" / "data").read_text() == "x"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_the_modes_of_a_plain_write(tmp_path, umask_022):
    """A study or story folder served by a web server must be readable by others, as plain writes are."""
    files.write_atomic({tmp_path / "index.html": lambda f: f.write("x"), tmp_path / "key.bin": b"k"})
    assert (tmp_path / "index.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "key.bin").stat().st_mode & 0o777 == 0o644
    (tmp_path / "index.html").chmod(0o640)  # a plain write keeps an existing file's mode
    files.write_atomic({tmp_path / "index.html": b"y"})
    assert (tmp_path / "index.html").stat().st_mode & 0o777 == 0o640
    with files.staged(tmp_path / "out", replace=False) as tmp:
        (tmp / "data").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_private_file_stays_its_owners(tmp_path, umask_022):
    files.write_atomic({tmp_path / "page": b"p", tmp_path / "secret": b"s"}, private=(tmp_path / "secret",))
    assert (tmp_path / "page").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_staged_keeps_the_folder_another_process_made_meanwhile(tmp_path):
    """Two processes building the same folder (a cache): the first one's stays, the other's goes."""
    out = tmp_path / "out"
    with files.staged(out, keep=True) as tmp:
        (tmp / "mine").write_text("x")
        out.mkdir()
        (out / "theirs").write_text("y")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_into_a_held_folder_moves_its_entries_in_the_configs_last(tmp_path, monkeypatch):
    """A run's own output folder: its lock file stays, held; what a loader reads first moves in last."""
    out, moved = tmp_path / "out", []
    rename = files.Path.rename
    monkeypatch.setattr(files.Path, "rename", lambda self, target: moved.append(self.name) or rename(self, target))
    with files.run_lock(out, "in use"):
        with files.staged(out, into=True, last=("config.json",)) as tmp:
            for name in ("config.json", "weights", "tokenizer.json"):
                (tmp / name).write_text(name)
        with pytest.raises(UserError, match="in use"), files.run_lock(out, "in use"):
            pass
    assert moved[-1] == "config.json" and sorted(moved) == ["config.json", "tokenizer.json", "weights"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "tokenizer.json", "weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
