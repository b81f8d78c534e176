"""Where training stories come from, as `Story` records by index.

- a folder written by `minigpt5 prepare-data`: a Hugging Face dataset of rows
  {"id", "steps": [{"text", "image"}]}, possibly with cached VAE latents and caption embeddings;
- JSON Lines, for small hand-made sets; image paths are relative to the file, inside its folder:
    pairs (stage 1):      {"caption": "a red circle", "image": "images/0.png"}
    sequences (stage 2):  {"id": "s1", "steps": [{"text": "...", "image": "images/1.png"}, ...]}

Each row's has-image flags are known without decoding an image (`Source.images`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import json_lines, read_json
from minigpt5_cli.story import Picture, Step, Story, step_from_json, story_from_row

SUMMARY_FILE = "summary.json"  # written by prepare-data beside every dataset
REJECTS_FILE = "rejects.jsonl"  # and the records it skipped, with why


# A training file's images lie in its folder, unless the recipe says otherwise.
OUTSIDE_HINT = "keep its images under the file's folder, or set data.allow_outside_paths=true"


def read_jsonl(path: str | Path, stage: str, outside: bool = False) -> list[Story]:
    """Read and validate a training file; every referenced image must exist, in the file's folder
    unless `outside`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    stories = []
    for number, where, rec in json_lines(path):
        steps = _pair(rec, where, path.parent, outside) if stage == "1" else \
            _sequence(rec, where, path.parent, outside)
        stories.append(Story(id=str(rec.get("id", number)), steps=steps))
    if not stories:
        raise UserError(f"data file {path} holds no records")
    return stories


def _pair(rec, where: str, root: Path, outside: bool) -> list[Step]:
    if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str) or not isinstance(rec.get("image"), str):
        raise UserError(f'{where}: a stage-1 pair needs "caption" and "image" strings')
    return [step_from_json({"text": rec["caption"], "image": rec["image"]}, root, where, 1, outside, OUTSIDE_HINT)]


def _sequence(rec, where: str, root: Path, outside: bool) -> list[Step]:
    steps = rec.get("steps") if isinstance(rec, dict) else None
    if not isinstance(steps, list) or len(steps) < 2:
        raise UserError(f'{where}: a stage-2 sequence needs "steps", a list of at least 2')
    return [step_from_json(step, root, where, k + 1, outside, OUTSIDE_HINT) for k, step in enumerate(steps)]


class Source:
    """Stories by index, with each row's has-image flags known without decoding images."""

    def __init__(self, rows, images: list[list[bool]], summary: dict | None = None, where: str = ""):
        self.rows, self.images, self.summary, self.where = rows, images, summary, where

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Story:
        """Story `i`; a continuation set's target is its last step, as training reads it."""
        story = self.story(i)
        return Story(id=story.id, steps=story.with_target())

    def story(self, i: int) -> Story:
        """Story `i` as stored: a continuation set's target apart."""
        row = self.rows[i]
        if isinstance(row, Story):
            return row
        return story_from_row(row.to_pylist()[0], f"{self.where} row {i}", root=Path(self.where))

    @property
    def cache(self) -> dict | None:
        return (self.summary or {}).get("cache")


class _Chain:
    """Rows of several sources, one after the other."""

    def __init__(self, parts: list[Source]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __getitem__(self, i: int) -> Story:
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part].story(i - int(self.starts[part]))


def load_sources(paths: list[str], stage: str, outside: bool = False) -> Source:
    """One source over several; their latents must be cached for one generator, or none. `outside`: the
    images JSONL files name may lie outside their folders."""
    parts = [load_source(p, stage, outside) for p in paths]
    if len(parts) == 1:
        return parts[0]
    caches = [p.cache for p in parts]
    if any(c != caches[0] for c in caches):
        raise UserError("the training sources differ in cached latents; prepare them alike")
    return Source(_Chain(parts), [flags for p in parts for flags in p.images], parts[0].summary)


def load_source(path: str | Path, stage: str, outside: bool = False) -> Source:
    """A prepared dataset folder, or a JSONL file."""
    path = Path(path)
    if path.is_dir():
        return _prepared(path)
    stories = read_jsonl(path, stage, outside)
    return Source(stories, [[s.image is not None for s in st.steps] for st in stories], where=str(path))


class _ArrowRows:
    """A dataset's rows, each as a one-row Arrow table: images stay encoded until a Picture opens them."""

    def __init__(self, ds):
        self.ds = ds.with_format("arrow")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def _prepared(folder: Path) -> Source:
    import datasets
    import pyarrow.compute as pc

    summary_file = folder / SUMMARY_FILE
    if not summary_file.is_file():
        raise UserError(f"{folder} is not a dataset written by prepare-data (no {SUMMARY_FILE})")
    try:
        ds = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot load the dataset in {folder}: {e}") from None
    if len(ds) == 0:
        raise UserError(f"the dataset in {folder} holds no rows")
    images = step_field(ds, "image", pc.is_valid)
    if "target" in ds.column_names:
        target = [t for chunk in ds.data.table.column("target").chunks
                  for t in pc.is_valid(pc.struct_field(chunk, "image")).to_pylist()]
        images = [row + [t] for row, t in zip(images, target)]
    return Source(_ArrowRows(ds), images, read_json(summary_file, check_text=False), where=str(folder))


def step_field(ds, name: str, fn=None) -> list[list]:
    """One field of every row's steps (`fn` applied to its Arrow array first), as a list per row. Read
    chunk by chunk on Arrow's views: no image bytes are copied or decoded."""
    import pyarrow.compute as pc

    out = []
    for chunk in ds.data.table.column("steps").chunks:
        values = pc.struct_field(chunk.flatten(), name)
        values = (fn(values) if fn else values).to_pylist()
        start = 0
        for n in chunk.value_lengths().to_pylist():
            out.append(values[start:start + n])
            start += n
    return out


def row_picture(source: Source, row: int, step: int) -> Picture:
    """A Picture of step `step` of row `row`, read from the source only when opened."""
    return Picture(f"{source.where} row {row} step {step + 1}",
                   fetch=lambda: source.story(row).steps[step].image.raw())
