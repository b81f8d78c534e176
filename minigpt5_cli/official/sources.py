"""Reading the released torch files without running code from them, checking them name by name, and the
output folders the import writes."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

from minigpt5_cli import files
from minigpt5_cli.errors import UserError

MARK = "imported.json"  # in every folder import-official writes: what it came from; --overwrite looks for it
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def load(path: Path, option: str):
    """What the torch file `path` (given as `option`) holds: tensors (memory-mapped) in plain containers.
    A pickle holding anything else is refused unread: loading it could run code."""
    import torch

    if not path.is_file():
        raise UserError(f"{option} {path} not found")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # torch's format before 1.6 does not map
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        what = found.group(1) if found else _first_line(e)
        raise UserError(f"{option} {path} holds more than tensors ({what}); it is not read, as loading it "
                        "could run code") from None
    except Exception as e:  # torch's unpickler fails on other bytes in many ways (IndexError, KeyError, ...)
        raise UserError(f"{option} {path} is not a torch weight file ({_first_line(e)})") from None


def tensors(doc, key: str | None, path: Path, option: str) -> dict:
    """The name -> tensor mapping in `doc` (under `key`, when given), refusing anything else."""
    import torch

    state = doc.get(key) if key and isinstance(doc, dict) else doc
    if not isinstance(state, dict):
        raise UserError(f"{option} {path} holds no " + (f"{key!r} mapping" if key else "mapping of tensors"))
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{option} {path}: {name} is a {type(value).__name__}, not a tensor")
    return state


def check(found: dict, wanted: dict, where: str, ignored: tuple[str, ...] = (), shown=lambda name: name) -> None:
    """Refuse `found` (name -> tensor) unless it holds exactly the names of `wanted` (name -> shape) at those
    shapes, besides names matching a pattern of `ignored`, naming the first difference in `where`. `shown`:
    how a name is written in the message (the source file's own name for it)."""
    for name, shape in wanted.items():
        if name not in found:
            raise UserError(f"{where} lacks {shown(name)}")
        if tuple(found[name].shape) != tuple(shape):
            raise UserError(f"{where}: {shown(name)} is {list(found[name].shape)}, expected {list(shape)}")
    extra = [name for name in found if name not in wanted and not any(re.fullmatch(p, shown(name)) for p in ignored)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"{where} holds {shown(extra[0])}, which this layout has no place for{more}")


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output that overlaps an input, or exists and is not a folder this command wrote (which
    --overwrite alone replaces)."""
    files.writable_folder(out, "--output")
    for source in inputs:
        if files.overlaps(out, source):
            raise UserError(f"--output {out} overlaps {source.resolve()}, an input; write it elsewhere")
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} exists; pass --overwrite to replace it")
        if not (out / MARK).is_file():
            raise UserError(f"{out} is not a folder import-official wrote; --overwrite replaces only such a folder")


def mark(folder: Path, doc: dict) -> None:
    (folder / MARK).write_text(json.dumps(doc, indent=2) + "\n")
