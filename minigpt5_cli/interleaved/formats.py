"""OpenING, ISG-Bench and MMIE as they are distributed, read into stories that `generate` continues.

`prepare-data opening|isg|mmie --input PATH --output DIR` writes DIR/stories.jsonl, one benchmark instance a line:

    {"id", "benchmark", "split", "task", "category",
     "steps": [{"text", "image"}],           the input as generate reads it: each step a text, then at most one
                                             image (an image with no text before it gets an empty text)
     "blocks": [{"type": "text", "text"} | {"type": "image", "image"}],   the input, typed, in order
     "reference": [typed blocks] or null,    the benchmark's own answer
     "source": {...}}                        the record as read, for a lossless export

beside summary.json and rejects.jsonl as for the other formats. The images are hard-linked (copied where the
file system cannot link) into DIR at their path relative to the benchmark's folder (the one holding its data
file), so that every image path, in `source` too, resolves relative to DIR. With --allow-outside-paths, an
image named outside that folder goes to DIR/external/ and its path is rewritten, in `source` too.

- OpenING: test_data.jsonl or dev_data.jsonl; a step's `<image>` marks where its image goes, `<BEGIN>` where
  the task's content starts: both are removed from the texts (the source keeps them).
- ISG-Bench: ISG-Bench.jsonl; Query and Golden are typed blocks already; predict must hold the questions in the
  shape ISG's judge reads.
- MMIE: one JSON list; question and gt_answer are lists of {"text", "image"}; the task (SA, PBL or MSR) is
  the first of them found in the id, as MMIE's scripts pick it.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from minigpt5_cli import display, files, images
from minigpt5_cli.data.readers import Reject, text_json_lines
from minigpt5_cli.data.sources import REJECTS_FILE, SUMMARY_FILE
from minigpt5_cli.errors import UserError
from minigpt5_cli.interleaved.isg import well_formed

STORIES = "stories.jsonl"
OPENING_FILES = {"test": "test_data.jsonl", "dev": "dev_data.jsonl"}
ISG_FILE = "ISG-Bench.jsonl"
MMIE_EXAMPLE = "overview.json"  # MMIE's format example, shipped beside its data
MMIE_TASKS = {"SA": "Situational Analysis", "PBL": "Project-Based Learning", "MSR": "Multi-Step Reasoning"}
EXTERNAL = "external"  # where images named outside the benchmark's folder go (--allow-outside-paths)
_BEGIN = re.compile(r"\s*<BEGIN>\s*")
_MARK = re.compile(r"\s*<image>\s*")
_PLAIN = re.compile(r"[\w+-][\w.+-]*")


class _Bad(Exception):
    """A record that cannot be read: a reject's reason and detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def plain_name(name: str) -> bool:
    """Whether `name` can be a file name as it is: letters, digits and . _ + - only, not starting with a dot."""
    return bool(_PLAIN.fullmatch(name))


def steps_of(blocks: list[dict]) -> list[dict]:
    """Typed blocks as steps, each a text then at most one image: an image with no text before it gets an empty
    text, and a text followed by another text stands alone. Empty texts are left out."""
    steps, text = [], None
    for block in blocks:
        if block["type"] == "image":
            steps.append({"text": text or "", "image": block["image"]})
            text = None
        elif block["text"]:
            if text is not None:
                steps.append({"text": text, "image": None})
            text = block["text"]
    if text is not None:
        steps.append({"text": text, "image": None})
    return steps


# ---- where the data file is


def locate(fmt: str, path: Path, split: str) -> tuple[Path, str]:
    """The benchmark's data file and its split, from --input (the file or the folder holding it) and --split."""
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if fmt == "opening":
        if split and split not in OPENING_FILES:
            raise UserError(f"--split {split!r}: OpenING's splits are test and dev")
        if path.is_dir():
            found = [s for s, name in OPENING_FILES.items() if (path / name).is_file() and split in ("", s)]
            if len(found) != 1:
                raise UserError(f"{path} holds both test_data.jsonl and dev_data.jsonl; pick one with --split" if found
                                else f"{path} holds no {OPENING_FILES.get(split, 'test_data.jsonl or dev_data.jsonl')}")
            return path / OPENING_FILES[found[0]], found[0]
        named = next((s for s, name in OPENING_FILES.items() if path.name == name), "")
        if split and named and split != named:
            raise UserError(f"--split {split} names another file than {path}; give one of the two")
        return path, split or named or "test"
    if split:
        raise UserError(f"--split applies to OpenING (test or dev); {fmt} has one set")
    if fmt == "isg":
        found = path / ISG_FILE if path.is_dir() else path
        if not found.is_file():
            raise UserError(f"{path} holds no {ISG_FILE}")
        return found, "test"
    if path.is_dir():
        found = sorted(p for p in path.glob("*.json") if p.name != MMIE_EXAMPLE)
        if len(found) != 1:
            raise UserError(f"{path} holds {len(found) or 'no'} JSON files beside {MMIE_EXAMPLE}; give the data file")
        path = found[0]
    return path, "test"


def _records(fmt: str, path: Path):
    """(where, record, JSON error or None) for each record of the data file."""
    if fmt != "mmie":
        yield from text_json_lines(files.read_text(path))
        return
    data = files.read_json(path, check_text=False)  # a record with broken text is rejected on its own
    if not isinstance(data, list):
        raise UserError(f"{path} is not MMIE's data: a JSON list of questions")
    for i, record in enumerate(data):
        yield f"item{i}", record, None


# ---- each benchmark's record


def _string(record: dict, key: str, where: str = "") -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise _Bad("malformed_record", f"{where}{key} is not a non-empty string")
    return value


def _image(value, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Bad("malformed_record", f"{where}: image is not a path or null")
    return value


def _text(text: str) -> list[dict]:
    text = text.strip()
    return [{"type": "text", "text": text}] if text else []


def _opening_blocks(steps, part: str) -> list[dict]:
    """OpenING steps as typed blocks: a step's image where its `<image>` is (after its text when none is)."""
    if not isinstance(steps, list):
        raise _Bad("malformed_record", f'conversations: "{part}" is not a list of steps')
    blocks = []
    for k, step in enumerate(steps):
        where = f"{part} step {k + 1}"
        if not isinstance(step, dict) or not isinstance(step.get("text"), str):
            raise _Bad("malformed_record", f'{where} needs a "text" string')
        image = _image(step.get("image"), where)
        text = _BEGIN.sub(" ", step["text"])
        if image is None:
            blocks += _text(_MARK.sub(" ", text))
            continue
        before, _, after = text.partition("<image>")
        blocks += _text(before) + [{"type": "image", "image": image}] + _text(_MARK.sub(" ", after))
    return blocks


def _opening(record: dict) -> dict:
    conv = record.get("conversations")
    if not (isinstance(conv, list) and conv and isinstance(conv[0], dict) and "input" in conv[0]):
        raise _Bad("malformed_record", 'expected "conversations": [{"input": [...]}, {"output": [...]}]')
    output = conv[1].get("output") if len(conv) > 1 and isinstance(conv[1], dict) else None
    return {"id": _string(record, "total_uid"), "task": _string(record, "subtask_name"),
            "category": _string(record, "meta_task_name"), "blocks": _opening_blocks(conv[0]["input"], "input"),
            "reference": None if output is None else _opening_blocks(output, "output")}


def _typed(blocks, key: str) -> list[dict]:
    """ISG's typed blocks ({"type": "text"|"image", "content"}) as ours; empty texts are kept (a structure counts
    them)."""
    if not isinstance(blocks, list):
        raise _Bad("malformed_record", f"{key} is not a list of blocks")
    out = []
    for k, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in ("text", "image") or not isinstance(block.get("content"), str) or \
                kind == "image" and not block["content"]:
            raise _Bad("malformed_record", f'{key} block {k + 1} needs a "type" (text or image) and a "content" string')
        out.append({"type": kind, kind: block["content"]})
    return out


def _isg(record: dict) -> dict:
    category = _string(record, "Category")
    predict = record.get("predict")
    if not (isinstance(predict, dict) and well_formed(predict)):  # ISG's judge reads its questions from it
        raise _Bad("malformed_record", "predict is not an object of block_qa and image_qa questions")
    return {"id": _string(record, "id"), "task": category, "category": category,
            "blocks": _typed(record.get("Query"), "Query"), "reference": _typed(record.get("Golden"), "Golden")}


def _pairs(items, key: str) -> list[dict]:
    """MMIE's [{"text", "image"}] as typed blocks, each text before its image."""
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise _Bad("malformed_record", f'{key} is not a list of {{"text", "image"}}')
    blocks = []
    for k, item in enumerate(items):
        text, image = item.get("text"), _image(item.get("image"), f"{key} item {k + 1}")
        if text is not None and not isinstance(text, str):
            raise _Bad("malformed_record", f"{key} item {k + 1}: text is not a string or null")
        blocks += _text(text or "") + ([{"type": "image", "image": image}] if image else [])
    return blocks


def _mmie(record: dict) -> dict:
    sid = _string(record, "id")
    gold = record.get("gt_answer")
    if not (isinstance(gold, list) and gold and isinstance(gold[0], dict) and "text" in gold[0]):
        raise _Bad("malformed_record", 'gt_answer needs a first item with a "text" (MMIE reads it)')
    task = next((t for t in MMIE_TASKS if t in sid), "")
    return {"id": sid, "task": task, "category": MMIE_TASKS.get(task, ""),
            "blocks": _pairs(record.get("question"), "question"), "reference": _pairs(gold, "gt_answer")}


READERS = {"opening": _opening, "isg": _isg, "mmie": _mmie}
READ_ID = {"opening": "total_uid", "isg": "id", "mmie": "id"}  # the key naming a record, in rejects


# ---- images


def _check_image(path: Path) -> None:
    """The file's header is an image's, of a size generate decodes."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as e:  # PIL raises many kinds for files it cannot read
        raise _Bad("corrupt_image", f"{path.name}: {type(e).__name__}") from None
    try:
        images.check_size(width, height)
    except images.OversizedImage as e:
        raise _Bad("oversized_image", f"{path.name}: {e}") from None


def _placed(raw: str, root: Path, outside: bool) -> tuple[Path, str]:
    """The image file `raw` names (relative to `root`) and its path in the prepared folder."""
    path = root / raw
    if not outside and not files.inside(path, root):
        raise _Bad("image_outside_root", raw)
    if not path.is_file():
        raise _Bad("missing_image", raw)
    _check_image(path)
    rel = posixpath.normpath(raw)
    if posixpath.isabs(rel) or rel == ".." or rel.startswith("../") or rel in (STORIES, SUMMARY_FILE, REJECTS_FILE):
        rel = f"{EXTERNAL}/{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}/{path.name}"
    return path, rel


def _map_images(value, change):
    """`value` with each image path (a block's "image", or an image block's "content") replaced by change(path)."""
    if isinstance(value, list):
        return [_map_images(v, change) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _map_images(v, change) for k, v in value.items()}
    for key in ("image", "content"):
        if isinstance(out.get(key), str) and (key == "image" or out.get("type") == "image"):
            out[key] = change(out[key])
    return out


def link(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src`, or a copy where the file system cannot link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def story(fmt: str, record, split: str, root: Path, outside: bool) -> tuple[dict, list[tuple[Path, str]]]:
    """A data file's record as a stories.jsonl line, and its image files with their paths in the prepared folder."""
    if not isinstance(record, dict):
        raise _Bad("malformed_record", "not a JSON object")
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # JSON may spell unpaired surrogates, which are not text
        raise _Bad("malformed_record", "its text holds an unpaired surrogate") from None
    read = READERS[fmt](record)
    if fmt == "opening" and not plain_name(read["id"]):  # the id names its output file
        raise _Bad("malformed_record", "total_uid is not a plain file name")
    steps = steps_of(read["blocks"])
    if not steps:
        raise _Bad("empty_input", "no text and no image")
    places = {}
    for block in read["blocks"] + (read["reference"] or []):
        if block["type"] == "image" and block["image"] not in places:
            places[block["image"]] = _placed(block["image"], root, outside)
    rel = {raw: r for raw, (_, r) in places.items()}
    moved = {raw: r for raw, r in rel.items() if r != posixpath.normpath(raw)}  # to external/

    def renamed(blocks):
        return [{**b, "image": rel[b["image"]]} if b["type"] == "image" else b for b in blocks]

    blocks = renamed(read["blocks"])
    line = {"id": read["id"], "benchmark": fmt, "split": split, "task": read["task"], "category": read["category"],
            "steps": steps_of(blocks), "blocks": blocks,
            "reference": None if read["reference"] is None else renamed(read["reference"]),
            "source": _map_images(record, lambda p: moved.get(p, p)) if moved else record}
    return line, list(places.values())


# ---- prepare-data


def prepare(fmt: str, path: Path, out: Path, s, overwrite: bool, console: Console) -> dict:
    """Read the benchmark at `path` into `out` (checked by the caller): stories.jsonl, its images, summary.json
    and rejects.jsonl. Returns the summary. `s`: prepare-data's Settings (not imported: prepare.py imports this)."""
    for option, given in (("--continuation", s.continuation), ("--cache-latents", s.cache_latents),
                          ("--images", s.images), ("--image-mapping", s.image_mapping)):
        if given:
            raise UserError(f"{option} does not apply to {fmt}: its images lie under the folder of its data file")
    data, split = locate(fmt, path, s.split)
    root = data.parent
    counts, kept, ids = Counter(), 0, set()
    with files.staged(out, replace=overwrite) as tmp:
        with (tmp / STORIES).open("w", encoding="utf-8") as lines, \
                (tmp / REJECTS_FILE).open("w", encoding="utf-8") as rejects, display.progress(console) as progress:
            task = progress.add_task(f"{fmt} ({data.name})", total=None)
            for where, record, error in _records(fmt, data):
                progress.advance(task)
                sid = record.get(READ_ID[fmt]) if isinstance(record, dict) else None
                sid = sid if isinstance(sid, str) and sid else where
                try:
                    if error is not None:
                        raise _Bad("malformed_json", error)
                    line, images_ = story(fmt, record, split, root, s.allow_outside_paths)
                    if line["id"] in ids:
                        raise _Bad("duplicate_id", f"{where}: an earlier record has it")
                except _Bad as bad:
                    if s.strict:
                        detail = f" ({bad.detail})" if bad.detail else ""
                        raise UserError(f"{sid}: {bad.reason.replace('_', ' ')}{detail}; --strict stops here") from None
                    counts[bad.reason] += 1
                    rejects.write(json.dumps(asdict(Reject(sid, bad.reason, bad.detail)), ensure_ascii=False) + "\n")
                    continue
                for src, rel in images_:
                    if not (tmp / rel).exists():
                        link(src, tmp / rel)
                ids.add(line["id"])
                lines.write(json.dumps(line, ensure_ascii=False) + "\n")
                kept += 1
        summary = {"format": fmt, "layout": "json" if fmt == "mmie" else "jsonl", "input": str(data.resolve()),
                   "split": split, "kept": kept, "rejected": dict(sorted(counts.items())), "settings": asdict(s),
                   "cache": None}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if not kept:
        console.print(f"[yellow]warning:[/] no record was kept; the reasons are in {out / REJECTS_FILE}")
    return summary


def _check_paths(story: dict, where: str) -> None:
    """Refuse a story naming an image outside its folder: prepare-data writes the paths of steps, blocks and
    reference normalized and relative, and leaves the source's relative and inside (OpenING's start with ./)."""
    def bad(path, strict: bool) -> bool:
        norm = posixpath.normpath(path)
        return "\x00" in path or posixpath.isabs(path) or norm == ".." or norm.startswith("../") or \
            strict and (".." in path.split("/") or path != norm)

    named = [(s.get("image"), True) for s in story["steps"] if isinstance(s, dict)] + \
        [(b["image"], True) for b in story["blocks"] + (story["reference"] or []) if b["type"] == "image"]
    _map_images(story["source"], lambda p: named.append((p, False)) or p)
    path = next((p for p, strict in named if isinstance(p, str) and bad(p, strict)), None)
    if path is not None:
        raise UserError(f"{where}: story {story['id']!r} names image {path!r}: the folder was not written by "
                        "prepare-data or was edited since")


def read_prepared(data: Path) -> list[dict]:
    """The stories of a folder `prepare-data opening|isg|mmie` wrote, in order."""
    path = data / STORIES
    if not path.is_file():
        raise UserError(f"--data {data} holds no {STORIES}: make it with minigpt5 prepare-data opening|isg|mmie")
    stories = []
    for _, where, line in files.json_lines(path):
        ok = isinstance(line, dict) and isinstance(line.get("id"), str) and line.get("benchmark") in READERS and \
            isinstance(line.get("source"), dict) and isinstance(line.get("steps"), list) and \
            all(isinstance(b, list) and all(isinstance(x, dict) and x.get("type") in ("text", "image") and
                                              isinstance(x.get(x["type"]), str) for x in b)
                for b in (line.get("blocks"), line.get("reference") or []))
        if not ok:
            raise UserError(f"{where} is not a story prepare-data wrote for a benchmark")
        _check_paths(line, where)
        stories.append(line)
    if not stories:
        raise UserError(f"{path} holds no stories")
    return stories
