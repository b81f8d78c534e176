"""Stories into `minigpt5 generate`.

A JSON file holding one story, a JSONL file holding one story per line, a dataset folder written by
`prepare-data` (its rows' steps; a continuation set's targets stay out), or plain text. A story is
`{"id": "s1", "steps": [{"text": "...", "image": "a.png"}, ...]}` (the training sequence form) or
just the list of steps; image paths are relative to the file and stay inside its folder (unless
`outside` allows any path). Plain text is one step; a value that looks like a path (one word with a
separator in it, or a .json / .jsonl name) is one, and must exist. Images are decoded only when a story's
batch is worked on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import json_lines, read_json
from minigpt5_cli.story import Step, Story, step_from_json


@dataclass
class Job:
    """A story being continued."""

    story: Story
    index: int  # position in the input: the story's seed offset, whatever the batching
    responses: list[list[dict]] = field(default_factory=list)  # per response: {"text": str} | {"image": PIL}


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


OUTSIDE_HINT = "keep images under the story file's folder, or pass --allow-outside-paths"


def read_stories(arg: str, outside: bool = False) -> list[Story]:
    """Parse `--story`: a .json file, a .jsonl file, a prepared dataset folder, or plain text. `outside`:
    image paths may lead out of the story file's folder."""
    if not arg.strip():  # before it is read as a path: Path("") is the current folder
        raise UserError("the story is empty: give some text, or a .json / .jsonl story file")
    path = _as_path(arg)
    if path is not None and path.is_dir():
        return _dataset_stories(path)
    if _looks_like_path(arg) or (path is not None and path.is_file()):
        if path is None or not path.exists():  # a mistyped path: never the story's text
            raise UserError(f"--story {arg}: no such file or folder; to use it as text, write it in a .json story "
                            'file: [{"text": ...}]')
        if not path.is_file():
            raise UserError(f"--story {arg} is neither a file nor a folder")
        if path.suffix.lower() == ".jsonl":
            stories = [_story(rec, where, path.parent, str(i), outside)
                       for i, (_, where, rec) in enumerate(json_lines(path))]
            if not stories:
                raise UserError(f"story file {path} holds no stories")
            _check_ids(stories, path)
            return stories
        return [_story(read_json(path), str(path), path.parent, path.stem, outside)]
    return [Story(id="story", steps=[Step(text=arg.strip())])]


def _looks_like_path(arg: str) -> bool:
    """A path rather than text: one word that names a .json / .jsonl file, starts as a path does (`./`,
    `../`, `/`, `~`), has two path separators (`data/toy/stories_tst`), or one and a parent folder that
    exists. Text such as "and/or" stays text."""
    word = arg.strip()
    if not word or any(c.isspace() for c in word):
        return False
    seps = tuple({"/", os.sep, os.altsep} - {None})
    if word.lower().endswith((".json", ".jsonl")) or word.startswith(("~", ".") + seps):
        return True
    n = sum(word.count(sep) for sep in seps)
    return n > 1 or (n == 1 and Path(word).parent.is_dir())


def _dataset_stories(folder: Path) -> list[Story]:
    from minigpt5_cli.data.sources import load_source, row_picture, step_field

    source = load_source(folder, stage="2")
    table = source.rows.ds.data.table
    ids = table.column("id").to_pylist()
    texts = step_field(source.rows.ds, "text")
    stories = []
    for i, (sid, row_texts) in enumerate(zip(ids, texts)):  # no image is read here
        steps = [Step(text=(t or "").strip(), image=row_picture(source, i, k) if has else None)
                 for k, (t, has) in enumerate(zip(row_texts, source.images[i]))]
        if not any(s.text or s.image for s in steps):
            raise UserError(f"{folder}: story {sid!r} is empty")
        stories.append(Story(id=str(sid), steps=steps))
    _check_ids(stories, folder)
    return stories


def _story(rec, where: str, root: Path, default_id: str, outside: bool = False) -> Story:
    steps = rec.get("steps") if isinstance(rec, dict) else rec
    if not isinstance(steps, list):
        raise UserError(f'{where}: a story is {{"id": ..., "steps": [...]}} or a list of steps')
    out = [step_from_json(step, root, where, k + 1, outside, OUTSIDE_HINT) for k, step in enumerate(steps)]
    for step in out:
        step.text = step.text.strip()
    if not any(s.text or s.image for s in out):
        raise UserError(f"{where}: the story is empty (no text, no image)")
    sid = rec.get("id") if isinstance(rec, dict) else None
    return Story(id=str(sid if sid is not None else default_id), steps=out)


def _check_ids(stories: list[Story], path: Path) -> None:
    seen = set()
    for s in stories:
        if s.id in seen:
            raise UserError(f"{path}: story id {s.id!r} appears twice")
        seen.add(s.id)


# -- words the model knows -----------------------------------------------------------------------------

# A tokenizer learnt from the shapes world's text alone is small; a real LLM's holds tens of thousands of tokens.
SMALL_VOCABULARY = 4096
# Requests the shipped model answers, the second one after the first (as in the demo).
EXAMPLES = ("Draw a red circle at the top left.", "Now make it a square.")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def _whole(tokenizer, word: str) -> bool:
    """Whether `word` is one token after a space (within a sentence) or alone (at its start); a single
    character alone is one token of any byte-level vocabulary, learnt or not."""
    def one(text: str) -> bool:
        return len(tokenizer.encode(text, add_special_tokens=False)) == 1

    return one(" " + word) or (len(word) > 1 and one(word))


def shapes_only(tokenizer) -> bool:
    """Whether `tokenizer` was learnt from the shapes world's text alone: small, and holding each of its
    words whole (the toy backbones' byte-level BPE learns every merge of that text, and nothing else)."""
    from minigpt5_cli.toyworld import world

    if len(tokenizer) > SMALL_VOCABULARY:
        return False
    return all(_whole(tokenizer, w) for w in sorted({w for line in world.corpus() for w in _words(line)}))


def unknown_words(tokenizer, texts) -> list[str]:
    """The words of `texts` (in order, each once) the LLM cannot read: those its tokenizer maps to its unknown
    token, and, for a shapes-world tokenizer, those it does not hold whole (it reads them as letters it never
    saw make a word). A real LLM's byte-level tokenizer never yields its unknown token: none then."""
    closed = shapes_only(tokenizer)
    unk = tokenizer.unk_token_id
    if unk is None and not closed:
        return []
    found: dict[str, None] = {}
    seen: set[str] = set()  # each word is looked up once
    for text in texts:
        for word in _words(text):
            if word in seen:
                continue
            seen.add(word)
            ids = tokenizer.encode(word, add_special_tokens=False)
            if (unk is not None and unk in ids) or (closed and not _whole(tokenizer, word)):
                found[word] = None
    return list(found)


def shapes_vocabulary() -> dict[str, list[str]]:
    """The shapes world's words, from the world itself: what its models understand."""
    from minigpt5_cli.toyworld import world

    return {"colours": list(world.PALETTE), "shapes": list(world.SHAPES), "places": list(world.PLACES.values())}
