"""`minigpt5 rate build`: a study folder from two `generate` outputs over the same stories.

The folder holds `raters/`, what the raters get: `index.html` (one self-contained page that steps
through the pairs and works from `file://`) and `media/` (every image decoded and written anew as
PNG, named by its content, so that neither a name nor a file's format or metadata tells the models
apart). Beside it, `key.json`, which stays with the organiser: which model's continuation is the
page's first and which its second, per pair. That draw comes from the build's seed, which only the
key holds; the page has a seed of its own, derived one way from it, that orders the stories and
sides per rater, and the raters' exports record what each saw.

Only images are copied, and only from inside the two outputs: a generate output is someone else's
folder, and a link or a path in its story.json must not carry another file to the raters.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import random
import re
import secrets
from pathlib import Path

from minigpt5_cli import images
from minigpt5_cli.errors import UserError
from minigpt5_cli.files import inside, read_json, staged, writable_folder, write_atomic
from minigpt5_cli.generation.output import read_record, story_folders
from minigpt5_cli.recipe import in_range
from minigpt5_cli.story import STORY_FILE

KEY_FILE = "key.json"
OLD_KEY_FILE = "study.json"  # the key of the earlier layout, which lay beside the page
RATERS = "raters"  # the folder the raters get
PAGE = "index.html"
MEDIA = "media"
FORMAT = "minigpt5-study"
RESULTS, PLOT = "results.json", "preferences.png"  # what `rate results` writes beside the key
# What a study folder holds: `--overwrite` replaces a folder holding nothing else.
ENTRIES = {RATERS, KEY_FILE, RESULTS, PLOT}
OLD_ENTRIES = {PAGE, MEDIA, OLD_KEY_FILE, RESULTS, PLOT}  # a study folder of the earlier layout
MAX_SEED = 2**63 - 1  # too many seeds to try one by one against the page's
MAX_PAGE_SEED = 2**31 - 1  # the page's seed arithmetic is 32-bit
SIDE_WORDS = {"a", "b", "tie"}  # what the page calls the sides: never a model's name in the results

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
    found = story_folders(folder)
    if not found:
        raise UserError(f"{option} {folder} holds no {STORY_FILE}; give a folder written by minigpt5 generate")
    stories: dict[str, tuple[Path, dict]] = {}
    for sub in found:
        _inside(sub / STORY_FILE, folder, option)
        doc = read_record(sub)
        if not doc or not _well_formed(doc):
            raise UserError(f"{sub / STORY_FILE} is not a story written by minigpt5 generate")
        for name in _image_names(doc):
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                raise UserError(f"{sub / STORY_FILE} names the image {name!r}, not a file beside it; "
                                "rate build takes only the images in the outputs")
            _inside(sub / name, folder, option)
            if not (sub / name).is_file():
                raise UserError(f"{sub / name} not found; {sub / STORY_FILE} names it")
        if doc["id"] in stories:
            raise UserError(f"{option} {folder}: story {doc['id']!r} is in both {stories[doc['id']][0]} and {sub}")
        stories[doc["id"]] = (sub, doc)
    return stories


def _inside(path: Path, folder: Path, option: str) -> None:
    """Refuse a file that a link (of the file or of a folder above it) takes outside the output."""
    if not inside(path, folder):
        raise UserError(f"{path} leads outside {option} {folder} (a link?); rate build takes only the files "
                        "inside the outputs")


def _well_formed(doc: dict) -> bool:
    """Every step a text, and an image name or none; every segment a text or an image name."""
    steps = all(isinstance(s.get("text"), str) and (s.get("image") is None or isinstance(s["image"], str))
                for s in doc["input"])
    segments = all(isinstance(g.get("segments"), list) and all(
        isinstance(seg, dict) and isinstance(seg["image"] if "image" in seg else seg.get("text"), str)
        for seg in g["segments"]) for g in doc["generated"])
    return steps and segments


def _image_names(doc: dict) -> list[str]:
    """The images of a story that a study shows: its beginning's and its continuations'."""
    return [s["image"] for s in doc["input"] if s.get("image") is not None] + \
        [seg["image"] for g in doc["generated"] for seg in g["segments"] if "image" in seg]


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
    """Images under media/: each decoded (a file that is no image is refused) and written anew as PNG,
    named by its content: only pixels reach the raters, never a file's format or metadata."""

    def __init__(self, root: Path):
        self.root = root
        (root / MEDIA).mkdir()

    def add(self, path: Path) -> str:
        buf = io.BytesIO()
        images.decode(path, str(path)).save(buf, format="PNG")
        data = buf.getvalue()
        name = f"{MEDIA}/{hashlib.sha256(data).hexdigest()[:20]}.png"
        if not (self.root / name).exists():
            (self.root / name).write_bytes(data)
        return name


def _continuation(folder: Path, doc: dict, media: _Media) -> list[list[dict]]:
    return [[{"image": media.add(folder / seg["image"])} if "image" in seg else {"text": seg["text"]}
             for seg in g["segments"]] for g in doc["generated"]]


def _names(a: Path, b: Path) -> tuple[str, str]:
    """How results name the two models: their folder names, or as much of their paths as tells them apart;
    never A, B or tie, which the page calls its sides."""
    parts = a.absolute().parts, b.absolute().parts
    for n in range(1, max(map(len, parts)) + 1):
        names = tuple(str(Path(*p[-n:])) for p in parts)
        if names[0] != names[1] and not {name.lower() for name in names} & SIDE_WORDS:
            return names
    return f"{a.absolute()} (--a)", f"{b.absolute()} (--b)"  # the same folder twice


def _model(folder: Path, option: str, name: str, stories: dict[str, tuple[Path, dict]]) -> dict:
    """One side as results name it; its mode and model as generate recorded them."""
    doc = next(iter(stories.values()))[1]
    model = doc.get("model")
    found = {"mode": doc.get("mode"), "model": model.get("name") if isinstance(model, dict) else None}
    return {"name": name, "option": option, "path": str(folder.absolute()),
            **{k: v if isinstance(v, str) else None for k, v in found.items()}}  # texts, as the key is read


def _draw(seed: int, what: str) -> random.Random:
    """A generator for one use of the build's seed; none can be told from another's draws."""
    return random.Random(hashlib.sha256(f"{what}:{seed}".encode()).digest())


def check_output(out: Path, overwrite: bool) -> None:
    writable_folder(out, "--output")
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"--output {out} exists; pass --overwrite to replace it")
    names = {p.name for p in out.iterdir()}
    if (out / OLD_KEY_FILE).is_file() and names <= OLD_ENTRIES:
        return
    if not (out / KEY_FILE).is_file() or not names <= ENTRIES:
        raise UserError(f"{out} is not a study folder rate build wrote (it holds "
                        f"{', '.join(sorted(names - ENTRIES)[:3]) or 'no ' + KEY_FILE}); pick another --output")


def build(a: Path, b: Path, out: Path, seed: int | None = None, title: str = "", overwrite: bool = False) -> dict:
    """Write the study folder: the raters' folder, and the key beside it; return the key."""
    if seed is not None:
        in_range("--seed", seed, (0, MAX_SEED, True))
    check_output(out, overwrite)
    side_a, side_b = read_output(a, "--a"), read_output(b, "--b")
    ids = match(side_a, side_b)
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    sides_rng = _draw(seed, "sides")
    page_seed = _draw(seed, "page").randrange(MAX_PAGE_SEED + 1)  # the page's; it tells nothing of the sides
    names = _names(a, b)
    with staged(out, replace=overwrite) as tmp:
        raters = tmp / RATERS
        raters.mkdir()
        media = _Media(raters)
        pairs, slots = [], []
        for sid in ids:
            folder, doc = side_a[sid]
            context = [{"text": s["text"], "image": media.add(folder / s["image"]) if s.get("image") else None}
                       for s in doc["input"]]
            sides = {"a": _continuation(*side_a[sid], media), "b": _continuation(*side_b[sid], media)}
            order = ["a", "b"] if sides_rng.random() < 0.5 else ["b", "a"]  # which model is the page's first
            pairs.append({"id": sid, "context": context, "continuations": [sides[order[0]], sides[order[1]]]})
            slots.append({"id": sid, "slots": order})
        content = json.dumps({"seed": page_seed, "questions": QUESTIONS, "pairs": pairs}, sort_keys=True)
        study = hashlib.sha256(content.encode()).hexdigest()[:12]
        title = title or "Which continuation is better?"
        page = {"study": study, "seed": page_seed, "title": title, "questions": QUESTIONS, "pairs": pairs}
        key = {"format": FORMAT, "study": study, "seed": seed, "page_seed": page_seed, "title": title,
               "questions": QUESTIONS,
               "models": {"a": _model(a, "--a", names[0], side_a), "b": _model(b, "--b", names[1], side_b)},
               "pairs": slots}
        # The key unblinds the study: readable by its owner alone, whoever else can read the folder.
        write_atomic({raters / PAGE: lambda f: f.write(render(page)),
                      tmp / KEY_FILE: lambda f: f.write(json.dumps(key, indent=2, ensure_ascii=False))},
                     private=(tmp / KEY_FILE,))
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


def read_key(study: Path) -> tuple[dict, Path]:
    """A study's key, from the study folder rate build wrote or its key.json, and the folder it lies in;
    a study of the earlier layout (its key, study.json, beside the page) is read too. Anything else is refused."""
    if not study.exists():
        raise UserError(f"study {study} not found; give the study folder rate build wrote (or its {KEY_FILE})")
    path = study / KEY_FILE if study.is_dir() else study
    if study.is_dir() and not path.is_file() and (study / OLD_KEY_FILE).is_file():
        path = study / OLD_KEY_FILE
    if not path.is_file():
        if (study / PAGE).is_file():
            raise UserError(f"{study} is the raters' folder, which holds no key; give the study folder rate build "
                            f"wrote (the one with {KEY_FILE})")
        raise UserError(f"{study} is not a study folder (no {KEY_FILE}); give the folder rate build wrote")
    key = read_json(path)
    if not isinstance(key, dict) or key.get("format") != FORMAT:
        raise UserError(f"{path} is not a study key written by rate build")
    if path.name == OLD_KEY_FILE:
        key = _from_old_layout(key)
    problem = _key_problem(key)
    if problem:
        raise UserError(f"{path} is not a study key written by rate build: {problem}")
    return key, path.parent


def _from_old_layout(key: dict) -> dict:
    """An earlier layout's key as key.json holds it: there the page's seed was the study's, and the models
    were labelled rather than named; they are named by their paths, as a build names them now."""
    models = key.get("models")
    if not isinstance(models, dict) or not all(isinstance(models.get(m), dict) and
                                               isinstance(models[m].get("path"), str) for m in "ab"):
        return {**key, "page_seed": key.get("seed")}  # _key_problem says what is missing
    names = _names(Path(models["a"]["path"]), Path(models["b"]["path"]))
    return {**key, "page_seed": key.get("seed"), "models": {
        m: {"name": name, "option": f"--{m}", "path": models[m]["path"], "mode": models[m].get("mode"),
            "model": models[m].get("model")} for m, name in zip("ab", names)}}


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _key_problem(key: dict) -> str | None:
    """What keeps `key` from being one that rate results can read (every field it reads, of the type it
    reads it as), or None."""
    if not isinstance(key.get("study"), str) or not key["study"]:
        return "no study id"
    if not _int(key.get("seed")) or not _int(key.get("page_seed")):
        return "its seed or page_seed is not a whole number"
    questions = key.get("questions")
    if not isinstance(questions, list) or not questions or not all(
            isinstance(q, dict) and all(isinstance(q.get(f), str) for f in ("key", "label", "text"))
            for q in questions):
        return "its questions are not a list of key, label and text"
    if len({q["key"] for q in questions}) < len(questions):
        return "a question appears twice"
    models = key.get("models")
    if not isinstance(models, dict) or not all(isinstance(models.get(m), dict) for m in "ab"):
        return "no models a and b"
    for m in "ab":
        model = models[m]
        if not all(isinstance(model.get(f), str) and model[f].strip() for f in ("name", "option", "path")):
            return f"model {m} lacks a name, option or path"
        if not all(model.get(f) is None or isinstance(model[f], str) for f in ("mode", "model")):
            return f"model {m}'s mode or model is not a text"
    names = models["a"]["name"], models["b"]["name"]
    if names[0] == names[1]:
        return f"models a and b are both named {names[0]!r}"
    side = next((n for n in names if n.lower() in SIDE_WORDS), None)
    if side is not None:
        return f"a model is named {side!r}, as the page calls a side"
    pairs = key.get("pairs")
    if not isinstance(pairs, list) or not all(
            isinstance(p, dict) and isinstance(p.get("id"), str) and p.get("slots") in (["a", "b"], ["b", "a"])
            for p in pairs):
        return "its pairs are not a list of story ids and slots"
    if len({p["id"] for p in pairs}) < len(pairs):
        return "a story appears twice in its pairs"
    return None
