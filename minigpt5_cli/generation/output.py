"""Stories out of `minigpt5 generate`: per story `story.json` (input, generated segments, settings,
seed, model), `story.md`, a self-contained `story.html`, and the PNGs; several stories get one
folder each plus `index.html`.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from minigpt5_cli import files
from minigpt5_cli.errors import UserError

from minigpt5_cli.generation.stories import Job
from minigpt5_cli.story import STORY_FILE

_OURS = re.compile(r"(input|image)-\d+\.png")


def folder_name(story_id: str) -> str:
    """A safe folder name for a story id."""
    name = re.sub(r"[^\w.-]+", "_", story_id).strip("._") or "story"
    return name[:100]


# story.json while the files it lists move in or out: a run killed meanwhile leaves the story unfinished,
# and the list tells the next run which files in the folder are its own.
PENDING = f".{STORY_FILE}.partial"


def write_story(folder: Path, job: Job, record: dict, before: int | None) -> dict:
    """Write one story's files; `story.json` appears last, so its presence means the story is complete,
    and a run killed while writing leaves it to be done again. The files are written in a temporary
    folder inside `folder` first (`files.staged` beside its story.json: never outside the output; a name
    unique to the run, as runs may share an output folder; one a killed run left is removed by the next). Other files in `folder` are left alone. `before`: the story.json this
    run planned to replace (its `stamp`); if another run wrote one meanwhile, nothing is replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    with files.staged(folder / STORY_FILE, into=True) as tmp:
        doc = _write_files(tmp, job, record)
        if stamp(folder) != before:
            raise UserError(f"{folder / STORY_FILE} was written by another run meanwhile; nothing of this story "
                            "replaced it (run again to keep it, or --overwrite to redo it)")
        old = _written(folder)
        if old:  # an earlier run's files: its list set aside first, removed last
            old[0].replace(folder / PENDING)
            for path in old[1:]:
                path.unlink(missing_ok=True)
        # Moved here rather than by `staged`: a run killed meanwhile leaves its partial folder locked as
        # while writing, so the next one takes it for stale.
        for name in [PENDING] + sorted(f.name for f in tmp.iterdir() if f.name not in (PENDING, files.LOCK_FILE)):
            (tmp / name).replace(folder / name)  # the new list first, then the files it names
    (folder / PENDING).replace(folder / STORY_FILE)
    return doc


def _write_files(tmp: Path, job: Job, record: dict) -> dict:
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
    (tmp / PENDING).write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    (tmp / "story.md").write_text(_markdown(doc))
    (tmp / "story.html").write_text(_html(doc))
    return doc


def stamp(folder: Path) -> int | None:
    """The state of `folder`'s story.json (its modification time), or None when there is none."""
    try:
        return (folder / STORY_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        return None


def read_record(folder: Path, name: str = STORY_FILE) -> dict | None:
    """`folder`'s story.json (or another `name`) when it is one generate wrote (it parses, with an id, the
    input steps and the generated responses and their images); None when there is none. A story.json of
    another shape is not ours: `clashes` lists it."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        doc = files.loads(files.read_text(path))
        ok = isinstance(doc, dict) and isinstance(doc.get("id"), str) and isinstance(doc.get("input"), list) and \
            isinstance(doc.get("generated"), list) and all(isinstance(s, dict) for s in doc["input"]) and \
            all(isinstance(g, dict) and isinstance(g.get("images"), list) for g in doc["generated"])
    except (OSError, ValueError, UserError):  # unreadable, too large, not JSON: not ours
        ok = False
    return doc if ok else {}


def story_folders(out: Path) -> list[Path]:
    """The story folders of generate's output `out`: itself when it holds one story, else its folders that
    hold a story.json."""
    if (out / STORY_FILE).is_file():
        return [out]
    return sorted(p for p in out.iterdir() if (p / STORY_FILE).is_file())


def finished(folder: Path, job: Job) -> bool:
    """Whether `folder` holds this very story, generated: same id and the same input texts."""
    doc = read_record(folder)
    return bool(doc) and doc["id"] == job.story.id and \
        [s.get("text") for s in doc["input"]] == [s.text for s in job.story.steps]


def _written(folder: Path) -> list[Path]:
    """The files an earlier run wrote into `folder`, as its story.json lists them, or the list of a run
    killed while writing the story (`PENDING`): the list first."""
    for name in (STORY_FILE, PENDING):
        doc = read_record(folder, name)
        if doc:
            names = [s.get("image") for s in doc["input"]] + [i for g in doc["generated"] for i in g["images"]]
            return [folder / name, folder / "story.md", folder / "story.html"] + \
                [folder / n for n in names if isinstance(n, str) and _OURS.fullmatch(n)]
    return []


def clashes(folder: Path) -> list[str]:
    """Files in `folder` with the names a story is written under, that no earlier run wrote: a story
    is never written over someone else's `image-1.png`, or a story.json that is not one of ours.
    Other files are never touched."""
    if not folder.is_dir():
        return []
    ours = {f.name for f in _written(folder)}
    return sorted(f.name for f in folder.iterdir() if f.name not in ours and
                  (f.name in (STORY_FILE, "story.md", "story.html") or _OURS.fullmatch(f.name)))


def _markdown(doc: dict) -> str:
    e = _md_text
    lines = [f"# {e(doc['id'])}", ""]
    for step in doc["input"]:
        lines += [e(step["text"]), ""] + ([_md_image("input", step["image"]), ""] if step["image"] else [])
    for step in doc["generated"]:
        lines += ["---", ""]
        for seg in step["segments"]:
            lines += [_md_image("generated", seg["image"]) if "image" in seg else e(seg["text"]), ""]
    return "\n".join(lines)


# Markdown's punctuation (links, images, emphasis, code, headings, lists, tables), and the dots and the
# colon of "://" that GitHub's Markdown turns into links when they spell a bare URL.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~]|:(?=//))")


def _md_text(text: str) -> str:
    """Text as Markdown shows it, never as markup: raw HTML is escaped as in story.html, and every
    character with a meaning in Markdown is backslash-escaped, so that no link, image or autolink
    in a story's text (the model's or the input's) becomes live."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def _md_image(alt: str, name: str) -> str:
    """An image of the story: only a file this run wrote beside story.md."""
    if not _OURS.fullmatch(name):
        raise ValueError(f"not an image of the story: {name!r}")
    return f"![{alt}]({name})"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:40em;margin:0 auto;padding:1em;line-height:1.5}
img{max-width:100%;height:auto;border-radius:4px;image-rendering:pixelated;min-width:40%}
.input{color:#555}.generated{border-left:3px solid #36c;padding-left:.8em}
img.thumb{width:6em;min-width:0;vertical-align:middle}.id{color:#888;font-size:.8em}
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


INDEX = "index.html"
_INDEX_TITLE = "<h1>Stories</h1>"  # how an index.html generate wrote is told from someone else's


def index_clash(out: Path) -> bool:
    """Whether `out` holds an index.html that generate did not write."""
    page = out / INDEX
    return page.exists() and (not page.is_file() or _INDEX_TITLE not in page.read_text(errors="replace"))


def write_index(out: Path, folders: list[Path]) -> None:
    """`index.html` linking every finished story folder under `out`."""
    e = html.escape
    items = []
    for folder in folders:
        doc = read_record(folder)
        first = next((img for step in doc["generated"] for img in step["images"]), None)
        thumb = f'<img class="thumb" src="{e(folder.name)}/{e(first)}" alt="">' if first else ""
        text = " ".join(step["text"] for step in doc["generated"])[:200]
        prompt = _first_words(" ".join(str(step.get("text") or "") for step in doc["input"])) or doc["id"]
        items.append(f'<li><a href="{e(folder.name)}/story.html">{e(prompt)}</a> <span class="id">{e(doc["id"])}'
                     f'</span> {thumb}<br>{e(text)}</li>')
    page = _page("stories", f"{_INDEX_TITLE}\n<ul>\n" + "\n".join(items) + "\n</ul>")
    files.write_atomic({out / INDEX: lambda f: f.write(page)})


def _first_words(text: str, n: int = 12) -> str:
    """The start of a story's input text, as the index lists it."""
    words = text.split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")

