"""Stories out of `minigpt5 generate`: per story `story.json` (input, generated segments, settings,
seed, model), `story.md`, a self-contained `story.html`, and the PNGs; several stories get one
folder each plus `index.html`.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

from minigpt5_cli.generation.stories import Job
from minigpt5_cli.story import STORY_FILE

_OURS = re.compile(r"(input|image)-\d+\.png")


def folder_name(story_id: str) -> str:
    """A safe folder name for a story id."""
    name = re.sub(r"[^\w.-]+", "_", story_id).strip("._") or "story"
    return name[:100]


def write_story(folder: Path, job: Job, record: dict) -> None:
    """Write one story's files; `story.json` goes in last, so its presence means the story is complete.
    Other files in `folder` are left alone."""
    tmp = folder / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    inputs = []
    for k, step in enumerate(job.story.steps):
        name = None
        if step.image is not None:
            name = f"input-{k + 1}.png"
            step.image.open().save(tmp / name)
        source = str(step.image.path) if step.image is not None and step.image.path is not None else None
        inputs.append({"text": step.text, "image": name, "source": source})
    generated = []
    count = 0
    for response in job.responses:
        segments, images = [], []
        for seg in response:
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
    doc = {"id": job.story.id, "input": inputs, "generated": generated, **record}
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
    model = doc.get("model", {})  # its paths stay in story.json; the page names the model only
    parts.append(f"<footer>{e(doc.get('mode', ''))} · {e(str(model.get('name', '')))} · "
                 f"seed {e(str(doc.get('seed', '')))}</footer>")
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
