"""What `evaluate` scores: predictions and references as `Sample`s, matched by id.

Predictions are a `minigpt5 generate` output folder (one story, or one folder per story) or a JSONL
file of `{"id", "text", "images"}` lines. A story's prediction is its first generated response: its
text and image segments, in order. References are a prepared dataset split
(`datasets.save_to_disk`) or a JSONL file; a row's reference is its `target` when there is one,
else its last step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import inside, json_lines, read_json
from minigpt5_cli.generation.output import story_folders
from minigpt5_cli.story import STORY_FILE, Picture, Step, picture_of

PREDICTION = "a story's first generated response (its text, images and segments)"


@dataclass
class Sample:
    """One side of a scored pair: a response as steps in order (each a text, an image, or both)."""

    id: str
    parts: list[Step]

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.parts if p.text)

    @property
    def images(self) -> list[Picture]:
        return [p.image for p in self.parts if p.image is not None]

    @property
    def elements(self) -> list:
        """Texts (str) and images (Picture) in order: what MM-Relevance aligns."""
        return [x for p in self.parts for x in ([p.text] if p.text else []) + ([p.image] if p.image else [])]


# Images named in a predictions or references file lie in its folder, as those of a story file.
OUTSIDE_HINT = "keep the images under the file's folder, or pass --allow-outside-paths"


def read_predictions(path: str | Path, outside: bool = False) -> tuple[list[Sample], dict]:
    """Samples and the run's description (mode and model of a generate folder). `outside`: images named
    by a JSON Lines file may lie anywhere (by default, in its folder)."""
    p = Path(path)
    if p.is_dir():
        samples, run = _read_generate_folder(p)
    elif p.is_file():
        samples, run = _read_jsonl(p, stories=False, outside=outside), {"source": "jsonl"}
    else:
        raise UserError(f"predictions not found: {p}")
    if not samples:
        raise UserError(f"the prediction set is empty: {p} holds no predictions")
    return samples, run


def read_references(path: str | Path, outside: bool = False) -> list[Sample]:
    """`outside`: as for `read_predictions`."""
    p = Path(path)
    if p.is_dir():
        samples = _read_dataset(p)
    elif p.is_file():
        samples = _read_jsonl(p, stories=True, outside=outside)
    else:
        raise UserError(f"references not found: {p}")
    if not samples:
        raise UserError(f"the reference set is empty: {p}")
    return samples


def _read_generate_folder(folder: Path) -> tuple[list[Sample], dict]:
    import json

    folders = story_folders(folder)
    if not folders and not (folder / "index.html").is_file() and any(folder.iterdir()):
        raise UserError(f"{folder} is not a generate output folder (no {STORY_FILE}, no story folders)")
    samples, runs = [], []
    for d in folders:
        where = d / STORY_FILE
        doc = read_json(where)
        try:
            first = doc["generated"][0] if doc["generated"] else {"segments": []}
            parts = [Step(image=_generated_image(d, seg["image"], where)) if "image" in seg
                     else Step(text=seg["text"]) for seg in first["segments"]]
            samples.append(Sample(str(doc["id"]), parts))
        except (KeyError, TypeError, IndexError) as e:
            raise UserError(f"{where}: not a story.json written by generate ({type(e).__name__}: {e})") from None
        runs.append({"mode": doc.get("mode"), "model": doc.get("model")})
    _check_unique(samples, folder)
    distinct = [json.loads(r) for r in dict.fromkeys(json.dumps(r, sort_keys=True) for r in runs)]
    return samples, {"source": "generate", "stories": len(samples),
                     **(distinct[0] if len(distinct) == 1 else {"runs": distinct})}


def _generated_image(folder: Path, name, where: Path) -> Picture:
    """An image generate wrote beside `where`: a name inside its story folder, never a way out of it."""
    path = folder / name
    if not isinstance(name, str) or not inside(path, folder):
        raise UserError(f"{where}: its image {name!r} is not a file of the story folder {folder}")
    return Picture(str(path), path=path)


def _read_jsonl(path: Path, stories: bool, outside: bool = False) -> list[Sample]:
    """`{"id", "text", "images"}` lines; with `stories`, also story lines `{"id", "steps"[, "target"]}`,
    whose reference is the target, else the last step. Image paths are relative to the file's folder
    and stay in it unless `outside`."""
    samples = []
    for _, where, rec in json_lines(path):
        if not isinstance(rec, dict) or "id" not in rec:
            raise UserError(f'{where}: expected {{"id": ..., "text": ..., "images": [...]}}')
        if "target" in rec or "steps" in rec:
            if not stories:
                raise UserError(f'{where}: a story line; a prediction is {{"id": ..., "text": ..., "images": [...]}}')
            step = rec.get("target") or (rec.get("steps") or [{}])[-1]
            if not isinstance(step, dict):
                raise UserError(f'{where}: a step is {{"text": ..., "image": ...}}')
            rec = {"id": rec["id"], "text": step.get("text") or "",
                   "images": [step["image"]] if step.get("image") else []}
        text, names = rec.get("text") or "", rec.get("images") or []
        if not isinstance(text, str) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f'{where}: "text" must be a string and "images" a list of paths')
        parts = [Step(text=text)] if text else []
        for name in names:
            image = path.parent / name
            if not outside and not inside(image, path.parent):
                raise UserError(f"{where}: the image {name!r} is outside {path.parent}; {OUTSIDE_HINT}")
            if not image.is_file():
                raise UserError(f"{where}: image not found: {image}")
            parts.append(Step(image=Picture(str(image), path=image)))
        samples.append(Sample(str(rec["id"]), parts))
    _check_unique(samples, path)
    return samples


def _read_dataset(folder: Path) -> list[Sample]:
    import datasets

    if (folder / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in folder.iterdir() if d.is_dir())
        raise UserError(f"{folder} holds several splits ({', '.join(splits)}); give one, e.g. {folder / splits[0]}")
    try:
        ds = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{folder} is not a prepared dataset split ({first})") from None
    column = "target" if "target" in ds.column_names else "steps"
    if "id" not in ds.column_names or column not in ds.column_names:
        raise UserError(f"{folder}: a prepared split has an id column and a steps (or target) column")
    samples, row = [], 0
    # Arrow batches keep the images encoded: decoded only when a metric needs them.
    for batch in ds.select_columns(["id", column]).with_format("arrow").iter(batch_size=256):
        for sid, value in zip(batch.column("id").to_pylist(), batch.column(column).to_pylist()):
            step = (value if column == "target" else (value[-1] if value else {})) or {}
            picture = picture_of(step.get("image"), f"{folder} row {row} ({sid}) {column} image", folder)
            samples.append(Sample(str(sid), [Step(text=step.get("text") or "", image=picture)]))
            row += 1
    _check_unique(samples, folder)
    return samples


def _check_unique(samples: list[Sample], where) -> None:
    twice = [i for i, n in Counter(s.id for s in samples).items() if n > 1]
    if twice:
        raise UserError(f"{where}: id {twice[0]!r} appears more than once")


def match(predictions: list[Sample], references: list[Sample]) -> list[tuple[Sample, Sample]]:
    """Pairs by id, in prediction order; every id must be on both sides."""
    refs = {s.id: s for s in references}
    preds = {s.id for s in predictions}
    for side, ids in (("predictions", [s.id for s in predictions if s.id not in refs]),
                      ("references", [s.id for s in references if s.id not in preds])):
        if ids:
            other = "references" if side == "predictions" else "predictions"
            shown = ", ".join(repr(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
            raise UserError(f"{len(ids)} id(s) in the {side} are missing from the {other}: {shown}")
    return [(p, refs[p.id]) for p in predictions]
