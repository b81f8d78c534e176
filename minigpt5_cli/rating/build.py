"""`minigpt5 rate build`: a study folder from two `generate` outputs over the same stories.

The folder holds `index.html` (one self-contained page that steps through the pairs and works from
`file://`), `media/` (every image, named by its content so that no name tells the models apart) and
`study.json`, the key: which model's continuation is the page's first and which its second, per
pair. The page shows them as A and B in an order of its own per rater, drawn from the study seed
and the rater id, and the raters' exports record what each saw.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import random
import re
import secrets
from pathlib import Path

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import read_json, staged, writable_folder, write_atomic
from minigpt5_cli.generation.output import read_record
from minigpt5_cli.recipe import in_range
from minigpt5_cli.story import STORY_FILE

STUDY_FILE = "study.json"
PAGE = "index.html"
MEDIA = "media"
FORMAT = "minigpt5-study"
RESULTS, PLOT = "results.json", "preferences.png"  # what `rate results` writes beside them
# What a study folder holds: `--overwrite` replaces a folder holding nothing else.
ENTRIES = {PAGE, STUDY_FILE, MEDIA, RESULTS, PLOT}
MAX_SEED = 2**31 - 1  # the page's seed arithmetic is 32-bit

# The paper's three questions.
QUESTIONS = [
    {"key": "language", "label": "Language",
     "text": "Which continuation is more coherent as language, following the story?"},
    {"key": "image", "label": "Image quality", "text": "Which continuation has better image quality?"},
    {"key": "together", "label": "Multimodal coherence",
     "text": "Which continuation is more coherent as text and image together, and with the story?"},
]


def read_output(folder: Path, option: str) -> dict[str, tuple[Path, dict]]:
    """{story id: (its folder, its story.json)} of a generate output: one story, or a folder per story."""
    if not folder.exists():
        raise UserError(f"{option} {folder} not found; give a folder written by minigpt5 generate")
    if not folder.is_dir():
        raise UserError(f"{option} {folder} is a file; give a folder written by minigpt5 generate")
    found = [folder] if (folder / STORY_FILE).exists() else \
        sorted(p for p in folder.iterdir() if p.is_dir() and (p / STORY_FILE).exists())
    if not found:
        raise UserError(f"{option} {folder} holds no {STORY_FILE}; give a folder written by minigpt5 generate")
    stories: dict[str, tuple[Path, dict]] = {}
    for sub in found:
        doc = read_record(sub)
        if not doc or not _well_formed(doc, sub):
            raise UserError(f"{sub / STORY_FILE} is not a story written by minigpt5 generate")
        if doc["id"] in stories:
            raise UserError(f"{option} {folder}: story {doc['id']!r} is in both {stories[doc['id']][0]} and {sub}")
        stories[doc["id"]] = (sub, doc)
    return stories


def _well_formed(doc: dict, folder: Path) -> bool:
    """Every text a string and every image a file beside story.json."""
    def image(name) -> bool:
        return isinstance(name, str) and Path(name).name == name and (folder / name).is_file()

    steps = all(isinstance(s.get("text"), str) and (s.get("image") is None or image(s["image"]))
                for s in doc["input"])
    segments = all(isinstance(g.get("segments"), list) and all(
        isinstance(seg, dict) and (isinstance(seg.get("text"), str) or image(seg.get("image")))
        for seg in g["segments"]) for g in doc["generated"])
    return steps and segments


def _ids(ids) -> str:
    shown = ", ".join(repr(i) for i in sorted(ids)[:3])
    return shown + (", ..." if len(ids) > 3 else "")


def match(a: dict, b: dict) -> list[str]:
    """The story ids of both outputs, in A's order; other sets of stories, or other inputs, are refused."""
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if only_a or only_b:
        parts = [f"{len(only_a)} only in --a ({_ids(only_a)})" if only_a else "",
                 f"{len(only_b)} only in --b ({_ids(only_b)})" if only_b else ""]
        raise UserError("--a and --b hold different stories: " + ", ".join(p for p in parts if p) +
                        "; build from two generate runs over the same stories")
    for sid in a:
        inputs = [[(s["text"], bool(s.get("image"))) for s in out[sid][1]["input"]] for out in (a, b)]
        if inputs[0] != inputs[1]:
            raise UserError(f"story {sid!r} begins differently in --a and --b; build from two generate runs "
                            "over the same stories")
    return list(a)


class _Media:
    """Images copied under media/, named by their content."""

    def __init__(self, root: Path):
        self.root = root
        (root / MEDIA).mkdir()

    def add(self, path: Path) -> str:
        data = path.read_bytes()
        name = f"{MEDIA}/{hashlib.sha256(data).hexdigest()[:20]}{path.suffix.lower()}"
        if not (self.root / name).exists():
            (self.root / name).write_bytes(data)
        return name


def _continuation(folder: Path, doc: dict, media: _Media) -> list[list[dict]]:
    return [[{"image": media.add(folder / seg["image"])} if "image" in seg else {"text": seg["text"]}
             for seg in g["segments"]] for g in doc["generated"]]


def _label(a: Path, b: Path) -> tuple[str, str]:
    """Names for the two sides in results: their folder names, or the paths when those are the same."""
    return (a.name, b.name) if a.name != b.name else (str(a), str(b))


def _model(folder: Path, label: str, stories: dict[str, tuple[Path, dict]]) -> dict:
    """One side as results name it; its mode and model as generate recorded them."""
    doc = next(iter(stories.values()))[1]
    return {"label": label, "path": str(folder.absolute()), "mode": doc.get("mode"),
            "model": (doc.get("model") or {}).get("name")}


def check_output(out: Path, overwrite: bool) -> None:
    writable_folder(out, "--output")
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"--output {out} exists; pass --overwrite to replace it")
    names = {p.name for p in out.iterdir()}
    if not (out / STUDY_FILE).is_file() or not names <= ENTRIES:
        raise UserError(f"{out} is not a study folder rate build wrote (it holds "
                        f"{', '.join(sorted(names - ENTRIES)[:3]) or 'no ' + STUDY_FILE}); pick another --output")


def build(a: Path, b: Path, out: Path, seed: int | None = None, title: str = "", overwrite: bool = False) -> dict:
    """Write the study folder; return its key (study.json)."""
    if seed is not None:
        in_range("--seed", seed, (0, MAX_SEED, True))
    check_output(out, overwrite)
    side_a, side_b = read_output(a, "--a"), read_output(b, "--b")
    ids = match(side_a, side_b)
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    rng = random.Random(seed)
    labels = _label(a, b)
    with staged(out, replace=overwrite) as tmp:
        media = _Media(tmp)
        pairs, slots = [], []
        for sid in ids:
            folder, doc = side_a[sid]
            context = [{"text": s["text"], "image": media.add(folder / s["image"]) if s.get("image") else None}
                       for s in doc["input"]]
            sides = {"a": _continuation(*side_a[sid], media), "b": _continuation(*side_b[sid], media)}
            order = ["a", "b"] if rng.random() < 0.5 else ["b", "a"]  # which model is the page's first
            pairs.append({"id": sid, "context": context, "continuations": [sides[order[0]], sides[order[1]]]})
            slots.append({"id": sid, "slots": order})
        content = json.dumps({"seed": seed, "questions": QUESTIONS, "pairs": pairs}, sort_keys=True)
        study = hashlib.sha256(content.encode()).hexdigest()[:12]
        title = title or "Which continuation is better?"
        page = {"study": study, "seed": seed, "title": title, "questions": QUESTIONS, "pairs": pairs}
        key = {"format": FORMAT, "study": study, "seed": seed, "title": title, "questions": QUESTIONS,
               "models": {"a": _model(a, labels[0], side_a), "b": _model(b, labels[1], side_b)},
               "pairs": slots}
        write_atomic({tmp / PAGE: lambda f: f.write(render(page)),
                      tmp / STUDY_FILE: lambda f: f.write(json.dumps(key, indent=2, ensure_ascii=False))})
    return key


def _asset(name: str) -> str:
    return (Path(__file__).parent / name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render(page: dict) -> str:
    """The rating page: data as JSON that no text can break out of, and a policy that lets only its
    own script and style run, so markup in a story could not act even if it reached the page."""
    data = json.dumps(page, ensure_ascii=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        data = data.replace(char, escaped)
    script, style = _asset("page.js"), _asset("page.css")
    csp = (f"default-src 'none'; script-src {_csp_hash(script)}; style-src {_csp_hash(style)}; "
           "img-src 'self' data: blob:; form-action 'none'; base-uri 'none'")
    values = {"CSP": csp, "TITLE": html.escape(page["title"]), "STYLE": style, "DATA": data, "SCRIPT": script}
    # One pass: a title or a story that spells a placeholder stays as it is.
    return re.sub(r"__(CSP|TITLE|STYLE|DATA|SCRIPT)__", lambda m: values[m.group(1)], _asset("page.html"))


def read_study(folder: Path) -> dict:
    """A study folder's key (study.json); anything else is refused."""
    if not folder.is_dir():
        raise UserError(f"study folder {folder} not found" if not folder.exists() else
                        f"{folder} is a file; give the study folder rate build wrote")
    path = folder / STUDY_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a study folder (no {STUDY_FILE}); give the folder rate build wrote")
    key = read_json(path)
    ok = isinstance(key, dict) and key.get("format") == FORMAT and isinstance(key.get("study"), str) and \
        isinstance(key.get("seed"), int) and isinstance(key.get("pairs"), list) and \
        isinstance(key.get("models"), dict) and all(isinstance(key["models"].get(m), dict) for m in "ab") and all(
            isinstance(p, dict) and isinstance(p.get("id"), str) and sorted(p.get("slots") or []) == ["a", "b"]
            for p in key["pairs"])
    if not ok:
        raise UserError(f"{path} is not a study key written by rate build")
    return key
