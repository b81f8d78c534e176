"""Stories in and out of `minigpt5 generate`.

In: a JSON file holding one story, a JSONL file holding one story per line, a dataset folder
written by `prepare-data` (its rows' steps; a continuation set's targets stay out), or plain text.
A story is `{"id": "s1", "steps": [{"text": "...", "image": "a.png"}, ...]}` (the training
sequence form) or just the list of steps; image paths are relative to the file. Plain text is one
step.

Out, per story: `story.json` (input, generated segments, settings, seed, model ids), `story.md`,
a self-contained `story.html`, and the PNGs. Several stories get one folder each plus `index.html`.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from minigpt5_cli.data import is_step, json_lines, load_image
from minigpt5_cli.errors import UserError

STORY_FILE = "story.json"
_OURS = re.compile(r"(input|image)-\d+\.png")


@dataclass
class Story:
    id: str
    index: int  # position in the input: the story's seed offset, whatever the batching
    steps: list[dict]  # {"text": str, "image": PIL image or None, "source": path or None, "has_image": bool}
    generated: list[dict] = field(default_factory=list)  # {"segments": [{"text": str} | {"image": PIL}]}
    loader: Callable[[], list] | None = None  # the steps' images, decoded only while the story is worked on

    def open(self) -> None:
        if self.loader is not None:
            for step, image in zip(self.steps, self.loader()):
                step["image"] = image

    def close(self) -> None:
        """Drop the pictures once written, so a long run holds only its batch in memory."""
        if self.loader is not None:
            for step in self.steps:
                step["image"] = None
        self.generated = []


def _as_path(arg: str) -> Path | None:
    """`arg` as a path, unless it cannot be one (plain text longer than a file name, say)."""
    try:
        path = Path(arg)
        path.exists()
        return path
    except (OSError, ValueError):
        return None


def is_collection(arg: str) -> bool:
    """Whether `--story` names many stories (one output folder each)."""
    path = _as_path(arg)
    return arg.lower().endswith(".jsonl") or (path is not None and path.is_dir())


def read_stories(arg: str) -> list[Story]:
    """Parse `--story`: a .json file, a .jsonl file, a prepared dataset folder, or plain text."""
    path = _as_path(arg)
    if path is not None and path.is_dir():
        return _dataset_stories(path)
    if path is not None and (path.suffix.lower() in (".json", ".jsonl") or path.is_file()):
        if not path.is_file():
            raise UserError(f"story file not found: {path}")
        if path.suffix.lower() == ".jsonl":
            stories = [_story(rec, where, path.parent, i) for i, (_, where, rec) in enumerate(json_lines(path))]
            if not stories:
                raise UserError(f"story file {path} holds no stories")
            _check_ids(stories, path)
            return stories
        return [_story(_json(path.read_text(), str(path)), str(path), path.parent, 0, default_id=path.stem)]
    if not arg.strip():
        raise UserError("the story is empty: give some text, or a .json / .jsonl story file")
    return [Story(id="story", index=0, steps=[{"text": arg.strip(), "image": None, "source": None,
                                                "has_image": False}])]


def _dataset_stories(folder: Path) -> list[Story]:
    from minigpt5_cli.data import load_source, step_field

    source = load_source(folder, stage=2)
    rows = source.rows
    ids = rows.data.table.column("id").to_pylist()
    texts = step_field(rows, "text")
    stories = []
    for i, (sid, row_texts) in enumerate(zip(ids, texts)):  # no image is decoded here
        steps = [{"text": (t or "").strip(), "image": None, "source": None, "has_image": has}
                 for t, has in zip(row_texts, source.images[i])]
        if not any(s["text"] or s["has_image"] for s in steps):
            raise UserError(f"{folder}: story {sid!r} is empty")
        stories.append(Story(id=str(sid), index=i, steps=steps, loader=lambda i=i: [
            s["image"].convert("RGB") if s["image"] else None for s in rows[i]["steps"]]))
    _check_ids(stories, folder)
    return stories


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _story(rec, where: str, root: Path, index: int, default_id: str | None = None) -> Story:
    steps = rec.get("steps") if isinstance(rec, dict) else rec
    if not isinstance(steps, list):
        raise UserError(f'{where}: a story is {{"id": ..., "steps": [...]}} or a list of steps')
    out = []
    for k, step in enumerate(steps):
        if not is_step(step):
            raise UserError(f'{where}: step {k + 1} needs a "text" string and an optional "image" path')
        source = None
        if step.get("image"):
            source = root / step["image"]
            if not source.is_file():
                raise UserError(f"{where}: image not found: {source}")
        out.append({"text": step.get("text", "").strip(), "image": None, "source": str(source) if source else None,
                    "has_image": source is not None})
    if not any(s["text"] or s["has_image"] for s in out):
        raise UserError(f"{where}: the story is empty (no text, no image)")
    sid = rec.get("id") if isinstance(rec, dict) else None
    sources = [s["source"] for s in out]
    return Story(id=str(sid if sid is not None else default_id or index), index=index, steps=out,
                 loader=lambda: [load_image(x) if x else None for x in sources])


def _check_ids(stories: list[Story], path: Path) -> None:
    seen = set()
    for s in stories:
        if s.id in seen:
            raise UserError(f"{path}: story id {s.id!r} appears twice")
        seen.add(s.id)


def folder_name(story_id: str) -> str:
    """A safe folder name for a story id."""
    name = re.sub(r"[^\w.-]+", "_", story_id).strip("._") or "story"
    return name[:100]


def write_story(folder: Path, story: Story, record: dict) -> None:
    """Write one story's files; `story.json` goes in last, so its presence means the story is complete.
    Other files in `folder` are left alone."""
    tmp = folder / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    inputs = []
    for k, step in enumerate(story.steps):
        name = None
        if step["image"] is not None:
            name = f"input-{k + 1}.png"
            step["image"].save(tmp / name)
        inputs.append({"text": step["text"], "image": name, "source": step["source"]})
    generated = []
    count = 0
    for k, step in enumerate(story.generated):
        segments, images = [], []
        for seg in step["segments"]:
            if "image" in seg:
                count += 1
                name = f"image-{count}.png"
                seg["image"].save(tmp / name)
                segments.append({"image": name})
                images.append(name)
            elif seg["text"]:
                segments.append({"text": seg["text"]})
        text = " ".join(s["text"] for s in segments if "text" in s)
        generated.append({"text": text, "images": images, "segments": segments})
    doc = {"id": story.id, "input": inputs, "generated": generated, **record}
    (tmp / STORY_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    (tmp / "story.md").write_text(_markdown(doc))
    (tmp / "story.html").write_text(_html(doc))
    for old in _written(folder):  # an earlier run's files, story.json first
        old.unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == STORY_FILE):
        os.replace(f, folder / f.name)
    tmp.rmdir()


def _written(folder: Path) -> list[Path]:
    """The files an earlier run wrote into `folder`, as its story.json lists them, story.json first."""
    old = folder / STORY_FILE
    if not old.is_file():
        return []
    doc = json.loads(old.read_text())
    names = [s.get("image") for s in doc.get("input", [])] + [i for g in doc.get("generated", []) for i in g["images"]]
    return [old, folder / "story.md", folder / "story.html"] + [folder / n for n in names if n and _OURS.fullmatch(n)]


def clashes(folder: Path) -> list[str]:
    """Files in `folder` with the names a story is written under, that no earlier run wrote: a story
    is never written over someone else's `image-1.png`. Other files are never touched."""
    if not folder.is_dir():
        return []
    ours = {f.name for f in _written(folder)}
    return sorted(f.name for f in folder.iterdir() if f.name not in ours and
                  (f.name in (STORY_FILE, "story.md", "story.html") or _OURS.fullmatch(f.name)))


def _markdown(doc: dict) -> str:
    lines = [f"# {doc['id']}", ""]
    for step in doc["input"]:
        lines += [step["text"], ""] + ([f"![input]({step['image']})", ""] if step["image"] else [])
    for step in doc["generated"]:
        lines += ["---", ""]
        for seg in step["segments"]:
            lines += [f"![generated]({seg['image']})" if "image" in seg else seg["text"], ""]
    return "\n".join(lines)


_STYLE = """body{font-family:system-ui,sans-serif;max-width:40em;margin:0 auto;padding:1em;line-height:1.5}
img{max-width:100%;height:auto;border-radius:4px;image-rendering:pixelated;min-width:40%}
.input{color:#555}.generated{border-left:3px solid #36c;padding-left:.8em}
footer{color:#888;font-size:.8em;margin-top:2em}"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def _html(doc: dict) -> str:
    e = html.escape
    parts = [f"<h1>{e(doc['id'])}</h1>"]
    for step in doc["input"]:
        parts.append(f'<div class="input"><p>{e(step["text"])}</p>')
        if step["image"]:
            parts.append(f'<img src="{e(step["image"])}" alt="input image">')
        parts.append("</div>")
    for step in doc["generated"]:
        parts.append('<div class="generated">')
        for seg in step["segments"]:
            parts.append(f'<img src="{e(seg["image"])}" alt="generated image">' if "image" in seg
                         else f"<p>{e(seg['text'])}</p>")
        parts.append("</div>")
    model = doc.get("model", {})
    parts.append(f"<footer>{e(doc.get('mode', ''))} · {e(str(model.get('llm', '')))} + "
                 f"{e(str(model.get('generator', '')))} · seed {e(str(doc.get('seed', '')))}</footer>")
    return _page(str(doc["id"]), "\n".join(parts))


def write_index(out: Path, folders: list[Path]) -> None:
    """`index.html` linking every finished story folder under `out`."""
    e = html.escape
    items = []
    for folder in folders:
        doc = json.loads((folder / STORY_FILE).read_text())
        first = next((img for step in doc["generated"] for img in step["images"]), None)
        thumb = f'<img src="{e(folder.name)}/{e(first)}" alt="" style="width:6em">' if first else ""
        text = " ".join(step["text"] for step in doc["generated"])[:200]
        items.append(f'<li><a href="{e(folder.name)}/story.html">{e(doc["id"])}</a> {thumb}<br>{e(text)}</li>')
    (out / "index.html").write_text(_page("stories", "<h1>Stories</h1>\n<ul>\n" + "\n".join(items) + "\n</ul>"))
