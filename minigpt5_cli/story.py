"""The records every stage shares: a `Story` is an id and its `Step`s; a step is a text and an
optional `Picture`.

Readers of the raw data sets yield stories, `prepare-data` writes them as dataset rows, training
reads them back as stories, `generate` continues them, and `evaluate` scores a story's target step
against a generated response (a list of steps, one per text or image segment).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minigpt5_cli.errors import UserError
from minigpt5_cli.files import inside

STORY_FILE = "story.json"  # one generated story's record: generate writes it, evaluate reads it


@dataclass(eq=False)
class Picture:
    """An image decoded only when needed: a file, encoded bytes, or a function that returns either
    (a dataset row read on demand)."""

    where: str  # for messages, and the key of cached features
    path: Path | None = None
    data: bytes | None = None
    fetch: Callable[[], bytes | Path] | None = None

    def raw(self) -> bytes | Path:
        """The encoded image as stored: bytes, or the file's path."""
        return self.fetch() if self.fetch is not None else self.data if self.data is not None else self.path

    def open(self, size: int | None = None):
        """The decoded RGB image (a one-line error when it does not decode or is too large); `size`, the
        short side the caller will resize to, lets a large JPEG decode at a reduced scale."""
        from minigpt5_cli import images  # loads torch: `generate --help` reads stories without it

        return images.decode(self.raw(), self.where, size)


@dataclass
class Step:
    text: str = ""
    image: Picture | None = None
    caption: str | None = None  # a caption of the image (the shapes world's): a caption-loss target, never prompted
    cache: dict | None = None  # prepare-data --cache-latents: latent_mean, latent_logvar, caption_embed(, _pooled)


@dataclass
class Story:
    id: str
    steps: list[Step]
    target: Step | None = None  # a continuation set's held-out last step
    extra_media: int = 0  # images a reader left out (MMDialog keeps a turn's first)

    def with_target(self) -> list[Step]:
        """Every step, the held-out target last."""
        return self.steps + ([self.target] if self.target is not None else [])


def picture_of(value, where: str, root: Path | None = None) -> Picture | None:
    """A Picture from a stored image: a dataset's {"bytes", "path"} cell, raw bytes, or a path. With
    `root` (the data set's folder), an image stored as a path must lie inside it."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return Picture(where, data=value["bytes"])
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, bytes):
        return Picture(where, data=value)
    if root is not None and not inside(Path(value), root):
        raise UserError(f"{where}: its image {value} is outside the data set's folder {root}")
    return Picture(where, path=Path(value))


def story_from_row(row: dict, where: str, root: Path | None = None) -> Story:
    """A prepared dataset row (Arrow format: images undecoded) as a Story. An image stored as a file path
    rather than bytes (prepare-data stores bytes) must lie inside `root`, the dataset's folder."""

    def step(s: dict, k) -> Step:
        cache = {key: s[key] for key in ("latent_mean", "latent_logvar", "caption_embed", "caption_pooled")
                 if s.get(key) is not None}
        return Step(text=s.get("text") or "", image=picture_of(s.get("image"), f"{where} step {k}", root),
                    caption=s.get("caption"), cache=cache or None)

    target = row.get("target")
    return Story(id=str(row["id"]), steps=[step(s, k + 1) for k, s in enumerate(row["steps"])],
                 target=step(target, "target") if target is not None else None)


def is_step(value) -> bool:
    """A step as JSON files write it: {"text": str, "image": path or null}, both optional."""
    return isinstance(value, dict) and isinstance(value.get("text", ""), str) and \
        isinstance(value.get("image"), (str, type(None)))



def step_from_json(value, root: Path, where: str, number: int, outside: bool = False,
                   hint: str = "keep its images in the file's folder") -> Step:
    """Step `number` of a JSON story or sequence; its image path is relative to `root`, must exist, and
    must lie inside `root` unless `outside` allows any path (`hint`: what the refusal advises)."""
    if not is_step(value):
        raise UserError(f'{where}: step {number} needs a "text" string and an optional "image" path')
    picture = None
    if value.get("image"):
        path = root / value["image"]
        if not outside and not inside(path, root):
            raise UserError(f"{where}: the image {value['image']!r} of step {number} is outside {root}; {hint}")
        if not path.is_file():
            raise UserError(f"{where}: image not found: {path}")
        picture = Picture(str(path), path=path)
    return Step(text=value.get("text", ""), image=picture)
