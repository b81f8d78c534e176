"""Readers for the raw data sets as people have them on disk: CC3M, VIST and MMDialog.

Each reader yields, in a fixed order, either a `Story` (an id and its steps, each a text and a
`Picture` of the image file or bytes) or a `Reject` (an id, a reason, a detail). Images are not
decoded here; `prepare.py` decodes them in parallel and may still reject a story. An image file must
lie in its root (the image folder, or the folder of the file that names it), links and `..`
resolved: one elsewhere is rejected as `image_outside_root`, unless `outside` allows any path.
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import inside, loads, read_json
from minigpt5_cli.story import Step, Story, picture_of

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


@dataclass
class Reject:
    id: str
    reason: str  # one of the reasons the README lists (malformed_json, missing_image, ...)
    detail: str = ""


Item = Union[Story, Reject]


def _read_step(text: str, image: Path | bytes | None, where: str) -> Step:
    """A read story's step: its text, and its image file or bytes (`where` names the record in errors)."""
    return Step(text, picture_of(image, where))


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    return path


def _placed(image: Path, root: Path, outside: bool) -> bool:
    """Whether the image file may be read: it lies in `root`, or any place is allowed."""
    return outside or inside(image, root)


def _outside(rid: str, image: Path) -> Reject:
    return Reject(rid, "image_outside_root", str(image))


def images_by_stem(folder: Path) -> dict[str, Path]:
    """Image files under `folder` by file stem, whatever their extension (first in sorted order wins)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            found.setdefault(p.stem, p)
    return found


# -- CC3M ---------------------------------------------------------------------------------------

_CLEAN = re.compile(r'[.!"()*#:;~]')


def clean_caption(text: str) -> str:
    """The original's cleaning: lower-case, `.!"()*#:;~` to spaces, whitespace collapsed."""
    return " ".join(_CLEAN.sub(" ", text.lower()).split())


def read_cc3m(path: Path, images: Path | None = None, clean: bool = True,
              outside: bool = False) -> tuple[str, Iterator[Item]]:
    """Returns the layout found and the items. PATH is a TSV (official, MiniGPT-5 or GILL form) or an
    img2dataset output folder (webdataset shards, `files` layout, or parquet with image bytes)."""
    _need(path, "input")
    if path.is_file():
        layout, items = _cc3m_tsv(path, images, outside)
    elif sorted(path.glob("*.tar")):
        layout, items = "webdataset", _cc3m_tars(sorted(path.glob("*.tar")))
    elif _parquet_with_images(path):
        layout, items = "parquet", _cc3m_parquet(_parquet_with_images(path))
    elif any(p.suffix == ".txt" for p in path.rglob("*.txt")):
        layout, items = "files", _cc3m_files(path, outside)
    else:
        raise UserError(f"{path}: no CC3M layout found (expected a TSV file, or img2dataset output: "
                        ".tar shards, parquet with image bytes, or the files layout)")
    return layout, _captioned(items, clean)


def _captioned(items: Iterator[Item], clean: bool) -> Iterator[Item]:
    for item in items:
        if isinstance(item, Story):
            text = clean_caption(item.steps[0].text) if clean else item.steps[0].text.strip()
            if not text:
                yield Reject(item.id, "empty_caption")
                continue
            item.steps[0].text = text
        yield item


def _cc3m_tsv(path: Path, images: Path | None, outside: bool) -> tuple[str, Iterator[Item]]:
    with path.open(newline="", encoding="utf-8") as f:
        first = f.readline().rstrip("\r\n").split("\t")
    header = [c.strip().lower() for c in first]
    if header[:2] in (["caption", "image_path"], ["caption", "image"]):
        layout = "minigpt5-tsv" if header[1] == "image_path" else "gill-tsv"
        root = images or path.parent
        return layout, _cc3m_tsv_rows(path, True, lambda i, cols: root / cols[1], root, outside)
    if images is None:
        raise UserError(f"{path} looks like the official caption<TAB>url TSV: pass --images, the folder of "
                        "downloaded images named by their 0-based row number")
    by_row: dict[int, Path] = {}
    for stem, p in images_by_stem(_need(images, "images folder")).items():
        if stem.isdigit():
            by_row.setdefault(int(stem), p)
    return "official-tsv", _cc3m_tsv_rows(path, False, lambda i, cols: by_row.get(i), images, outside)


def _cc3m_tsv_rows(path: Path, skip_header: bool, resolve, root: Path, outside: bool) -> Iterator[Item]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if skip_header:
            next(rows, None)
        for i, cols in enumerate(rows):
            rid = f"row{i}"
            if len(cols) < 2:
                yield Reject(rid, "malformed_record", "expected 2 tab-separated columns")
                continue
            image = resolve(i, cols)
            if image is not None and not _placed(image, root, outside):
                yield _outside(rid, image)
                continue
            if image is None or not Path(image).is_file():
                yield Reject(rid, "missing_image", str(image or ""))
                continue
            yield Story(rid, [_read_step(cols[0], Path(image), rid)])


def _cc3m_tars(shards: list[Path]) -> Iterator[Item]:
    for shard in shards:
        groups: dict[str, dict[str, bytes]] = defaultdict(dict)
        order: list[str] = []
        broken = ""
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = Path(member.name).name.partition(".")
                    if key not in groups:
                        order.append(key)
                    groups[key][ext.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            broken = f"{shard.name}: {e}"
        # A truncated shard ends in a partial sample: the complete ones before it are kept.
        for key in order:
            sample = groups[key]
            image = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
            if broken and key == order[-1]:
                yield Reject(key, "truncated_tar", broken)
            elif "txt" not in sample:
                yield Reject(key, "malformed_record", "no .txt caption")
            elif image is None:
                yield Reject(key, "missing_image")
            else:
                yield Story(key, [_read_step(sample["txt"].decode("utf-8", "replace"), image, key)])
        if broken and not order:
            yield Reject(shard.name, "truncated_tar", broken)


def _parquet_with_images(folder: Path) -> list[Path]:
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    return [f for f in files if {"jpg", "txt"} <= set(pq.read_schema(f).names)] if files else []


def _cc3m_parquet(files: list[Path]) -> Iterator[Item]:
    import pyarrow.parquet as pq

    for f in files:
        table = pq.ParquetFile(f)
        names = table.schema_arrow.names
        for batch in table.iter_batches(columns=[c for c in ("key", "jpg", "txt") if c in names], batch_size=256):
            rows = batch.to_pydict()
            for i in range(batch.num_rows):
                key = str(rows["key"][i]) if "key" in rows else f"{f.stem}-{i}"
                if rows["jpg"][i] is None:
                    yield Reject(key, "missing_image")
                else:
                    yield Story(key, [_read_step(rows["txt"][i] or "", rows["jpg"][i], key)])


def _cc3m_files(folder: Path, outside: bool) -> Iterator[Item]:
    images = images_by_stem(folder)
    for txt in sorted(folder.rglob("*.txt")):
        key = txt.stem
        image = images.get(key)
        if image is None or image.parent != txt.parent:
            yield Reject(key, "missing_image")
        elif not _placed(image, folder, outside):
            yield _outside(key, image)
        else:
            yield Story(key, [_read_step(txt.read_text(encoding="utf-8", errors="replace"), image, key)])


# -- VIST ---------------------------------------------------------------------------------------

VIST_SIS = ".story-in-sequence.json"


def vist_split(root: Path) -> str:
    """The one split a VIST root holds annotations for (`sis/<split>.story-in-sequence.json`)."""
    found = sorted(p.name[:-len(VIST_SIS)] for p in (root / "sis").glob(f"*{VIST_SIS}"))
    if len(found) != 1:
        raise UserError(f"{root} holds the VIST splits {', '.join(found)}; pick one with --split" if found
                        else f"{root}: no sis/*{VIST_SIS} in this VIST root")
    return found[0]


def vist_paths(path: Path, images: Path | None, split: str) -> tuple[Path, Path | None]:
    """The annotation file and image folder, from a file (+ --images) or a VIST root + --split; an
    empty split names the root's only one."""
    _need(path, "input")
    if path.is_dir():
        split = split or vist_split(path)
        ann = path / "sis" / f"{split}{VIST_SIS}"
        return _need(ann, "VIST annotation file"), images or path / "images" / split
    return path, images


def read_vist(path: Path, images: Path | None, split: str = "", mapping: Path | None = None,
              steps: int = 5, outside: bool = False) -> tuple[str, Iterator[Item]]:
    ann, images = vist_paths(path, images, split)
    data = read_json(ann, check_text=False)  # a story with broken text is rejected on its own
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        if images is None:
            raise UserError("pass --images, the folder of VIST images (files named by photo id)")
        return "story-in-sequence", _vist_sis(data["annotations"], _need(images, "images folder"), steps, outside)
    derived = data.get("annotations") if isinstance(data, dict) and isinstance(data.get("annotations"), dict) else data
    if isinstance(derived, dict):
        return "derived", _vist_derived(derived, ann.parent, images, mapping, steps, outside)
    raise UserError(f"{ann}: not a VIST story-in-sequence file, nor a {{story_id: [steps]}} mapping")


def _vist_sis(annotations: list, images: Path, steps: int, outside: bool) -> Iterator[Item]:
    by_story: dict[str, list[dict]] = defaultdict(list)
    order: list[str] = []
    bad = 0
    for entry in annotations:
        rec = entry[0] if isinstance(entry, list) and entry else entry  # one-element lists
        if not isinstance(rec, dict) or "story_id" not in rec or "photo_flickr_id" not in rec:
            bad += 1
            yield Reject(f"annotation{bad}", "malformed_record", "no story_id / photo_flickr_id")
            continue
        sid = str(rec["story_id"])
        if sid not in by_story:
            order.append(sid)
        by_story[sid].append(rec)
    files = images_by_stem(images)
    for sid in order:
        try:
            recs = sorted(by_story[sid], key=lambda r: int(r.get("worker_arranged_photo_order", 0)))
        except (TypeError, ValueError):
            yield Reject(sid, "malformed_record", "worker_arranged_photo_order is not a number")
            continue
        if len(recs) != steps:
            yield Reject(sid, "missing_step", f"{len(recs)} of {steps} steps")
            continue
        out, away = [], None
        for r in recs:
            image = files.get(str(r["photo_flickr_id"]))
            if image is not None and not _placed(image, images, outside):  # a link out of the folder
                away = image
            if image is None or away is not None:
                break
            out.append(_read_step(str(r.get("original_text") or r.get("text") or ""), image, sid))
        if away is not None:
            yield _outside(sid, away)
        elif len(out) < steps:
            yield Reject(sid, "missing_image", f"photo {recs[len(out)]['photo_flickr_id']}")
        else:
            yield Story(sid, out)


def _vist_derived(stories: dict, root: Path, images: Path | None, mapping: Path | None, steps: int,
                  outside: bool) -> Iterator[Item]:
    table = read_json(mapping) if mapping else None
    if table is not None and not isinstance(table, dict):
        raise UserError(f"{mapping}: an image mapping is a JSON object {{image_id: path}}")
    table = {str(k): v for k, v in table.items()} if table else None
    base = mapping.parent if mapping else images or root
    files = images_by_stem(images) if images and not table else {}
    for sid, recs in stories.items():
        if not isinstance(recs, list) or not all(isinstance(r, dict) and "image_id" in r for r in recs):
            yield Reject(str(sid), "malformed_record", "expected a list of {caption, image_id, sequence_index}")
            continue
        try:
            recs = sorted(recs, key=lambda r: int(r.get("sequence_index", 0)))
        except (TypeError, ValueError):
            yield Reject(str(sid), "malformed_record", "sequence_index is not a number")
            continue
        if len(recs) != steps:
            yield Reject(str(sid), "missing_step", f"{len(recs)} of {steps} steps")
            continue
        out = []
        for r in recs:
            key = str(r["image_id"])
            mapped = bool(table) and key in table
            image = base / str(table[key]) if mapped else files.get(key)
            if image is not None and not _placed(image, base if mapped else images, outside):
                yield _outside(str(sid), image)
                break
            if image is None or not Path(image).is_file():
                yield Reject(str(sid), "missing_image", f"image {key}")
                break
            out.append(_read_step(str(r.get("caption", "")), Path(image), str(sid)))
        else:
            yield Story(str(sid), out)


# -- MMDialog -----------------------------------------------------------------------------------

def read_mmdialog(path: Path, images: Path | None = None, outside: bool = False) -> tuple[str, Iterator[Item]]:
    """One conversation per JSON line (or one JSON array); images are `<media_key>.jpg` beside the file."""
    _need(path, "input")
    if path.is_dir():
        found = sorted(path.glob("*conversations.json")) + sorted(path.glob("*conversations.txt"))
        if not found:
            raise UserError(f"{path}: no conversations.json or *_conversations.txt in it")
        path = found[0]
    folder = images or path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            records = [(f"item{i}", r, None) for i, r in enumerate(loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        return "json-array", _dialogs(records, folder, outside)
    return "jsonl", _dialogs(text_json_lines(text), folder, outside)


def text_json_lines(text: str):
    """(where, record, JSON error or None) for each non-blank line of JSON Lines text: a bad line is the
    caller's to reject, not the end of the file."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"line{number}", loads(line), None
            except json.JSONDecodeError as e:
                yield f"line{number}", None, e.msg


def _dialogs(records, folder: Path, outside: bool) -> Iterator[Item]:
    for where, rec, error in records:
        if error is not None:
            yield Reject(where, "malformed_json", error)
            continue
        turns = rec.get("conversation") if isinstance(rec, dict) else None
        cid = str(rec.get("conversation_id", where)) if isinstance(rec, dict) else where
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("turn"), list) for t in turns):
            yield Reject(cid, "malformed_record", 'expected "conversation": [{"turn": [...]}, ...]')
            continue
        steps, missing, away, extra = [], None, None, 0
        for t in turns:
            items = [i for i in t["turn"] if isinstance(i, dict)]
            text = " ".join(str(i["__TEXT__"]).strip() for i in items if "__TEXT__" in i).strip()
            media = [str(i["__MEDIA__"]) for i in items if "__MEDIA__" in i]
            image = folder / f"{media[0]}.jpg" if media else None  # one image per turn: the first
            extra += max(0, len(media) - 1)
            if image is not None and not _placed(image, folder, outside):  # a key such as ../secret/x
                away = image
                break
            if image is not None and not image.is_file():
                missing = media[0]
                break
            steps.append(_read_step(text, image, cid))
        if away is not None:
            yield _outside(cid, away)
        elif missing is not None:
            yield Reject(cid, "missing_image", f"media {missing}")
        elif len(steps) < 2:
            yield Reject(cid, "too_short", f"{len(steps)} turn(s)")
        else:
            yield Story(cid, steps, extra_media=extra)

