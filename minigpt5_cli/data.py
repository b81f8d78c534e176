"""Training data: where samples come from, how each stage builds them, and the collator.

Sources (`load_source`):
- a folder written by `minigpt5 prepare-data`: a Hugging Face dataset of rows
  {"id", "steps": [{"text", "image"}]}, possibly with cached VAE latents and caption embeddings;
- JSON Lines, for small hand-made sets; image paths are relative to the file:
    pairs (stage 1):      {"caption": "a red circle", "image": "images/0.png"}
    sequences (stage 2):  {"id": "s1", "steps": [{"text": "...", "image": "images/1.png"}, ...]}

Samples (`TrainSet`):
- stage 1: every step with an image is a caption pair: prompt = its text (a share of them in
  instruction form), target = the vokens.
- stage 2: for step k of a row, one sample per task in `data.tasks`; the history is the earlier
  steps (text, and images when the LLM accepts them):
    turn           history -> "{text_k} [vokens]", for k >= 1 (MMDialog's turn targets)
    gen            history + "Generate an image with the scene description: {text_k}" -> "[vokens]",
                   every k with an image
    multimodal     history + "Tell me the next scene with image." -> "{text_k} [vokens]", k >= 1
    understanding  history + "Tell me the next scene description by this image: <image k>"
                   -> "{text_k}", k >= 1 with an image; image-text LLMs only
  The vokens are there when step k has an image. A step may also hold a "caption" of its image
  (the shapes world's do): never shown to the LLM, it is the target of the caption loss, used
  when every target image of a batch has one.
- stage llm (a backbone trained from scratch): the stage-2 samples without vokens, and for rows
  of one step with an image (caption pairs) "Describe this image: <image>" -> "{text}".
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minigpt5_cli.errors import UserError

INSTRUCTION = "###Human: Generate an image with caption: {} ###Assistant: "
TASKS = ("turn", "gen", "multimodal", "understanding")
GEN = "Generate an image with the scene description: {}"
NEXT = "Tell me the next scene with image."
DESCRIBE = "Tell me the next scene description by this image:"
CAPTION = "Describe this image:"


def json_lines(path: Path):
    """(number, where, record) for each non-blank line of a JSON Lines file; bad JSON is a UserError."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            yield number, where, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str | Path, stage: int) -> list[dict]:
    """Read and validate a training file; every referenced image must exist."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    records = []
    for number, where, rec in json_lines(path):
        steps = _pair_steps(rec, where) if stage == 1 else _sequence_steps(rec, where)
        for step in steps:
            if step["image"] is not None:
                step["image"] = str(path.parent / step["image"])
                if not Path(step["image"]).is_file():
                    raise UserError(f"{where}: image not found: {step['image']}")
        records.append({"id": rec.get("id", str(number)), "steps": steps})
    if not records:
        raise UserError(f"data file {path} holds no records")
    return records


def _pair_steps(rec: dict, where: str) -> list[dict]:
    if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str) or not isinstance(rec.get("image"), str):
        raise UserError(f'{where}: a stage-1 pair needs "caption" and "image" strings')
    return [{"text": rec["caption"], "image": rec["image"]}]


def is_step(step) -> bool:
    """A step of a sequence or story file: {"text": str, "image": path or null}, both optional."""
    return isinstance(step, dict) and isinstance(step.get("text", ""), str) and \
        isinstance(step.get("image"), (str, type(None)))


def _sequence_steps(rec: dict, where: str) -> list[dict]:
    steps = rec.get("steps") if isinstance(rec, dict) else None
    if not isinstance(steps, list) or len(steps) < 2:
        raise UserError(f'{where}: a stage-2 sequence needs "steps", a list of at least 2')
    out = []
    for step in steps:
        if not is_step(step):
            raise UserError(f'{where}: each step needs a "text" string and an optional "image" path')
        out.append({"text": step.get("text", ""), "image": step.get("image")})
    return out


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception:
        raise UserError(f"image does not decode: {path}") from None


def to_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop, scale to [-1, 1]: the generator's input."""
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


class Source:
    """Rows {"id", "steps"} by index, with each row's has-image flags known without decoding images."""

    def __init__(self, rows, images: list[list[bool]], summary: dict | None = None):
        self.rows, self.images, self.summary = rows, images, summary

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        if row.get("target") is not None:  # a continuation set: the target is the last step
            row = {**row, "steps": row["steps"] + [row["target"]]}
        return row

    @property
    def cache(self) -> dict | None:
        return (self.summary or {}).get("cache")


class _Chain:
    """Rows of several sources, one after the other."""

    def __init__(self, parts: list[Source]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __getitem__(self, i: int) -> dict:
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


def load_sources(paths: list[str], stage) -> Source:
    """One source over several; their latents must be cached for one generator, or none."""
    parts = [load_source(p, stage) for p in paths]
    if len(parts) == 1:
        return parts[0]
    caches = [p.cache for p in parts]
    if any(c != caches[0] for c in caches):
        raise UserError("the training sources differ in cached latents; prepare them alike")
    return Source(_Chain(parts), [flags for p in parts for flags in p.images], parts[0].summary)


def load_source(path: str | Path, stage) -> Source:
    """A prepared dataset folder, or a JSONL file."""
    path = Path(path)
    if path.is_dir():
        return _prepared(path)
    records = read_jsonl(path, stage)
    return Source(records, [[s["image"] is not None for s in r["steps"]] for r in records])


def _prepared(folder: Path) -> Source:
    import datasets
    import pyarrow.compute as pc

    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        raise UserError(f"{folder} is not a dataset written by prepare-data (no summary.json)")
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
    return Source(ds, images, json.loads(summary_file.read_text()))


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


class TrainSet(torch.utils.data.Dataset):
    """Stage 1: one sample per step with an image. Stage 2: per step, one sample per task. Stage llm:
    stage 2 without vokens, plus captions of one-step rows."""

    def __init__(self, source: Source | list[dict], stage, resolution: int, history: int, seed: int,
                 instruction_prob: float, images_in_prompt: bool, tasks: tuple[str, ...] | list[str] = ("turn",)):
        if isinstance(source, list):
            source = Source(source, [[s["image"] is not None for s in r["steps"]] for r in source])
        self.source, self.stage, self.resolution = source, stage, resolution
        self.history, self.seed, self.instruction_prob = history, seed, instruction_prob
        self.images_in_prompt = images_in_prompt
        self.index = []
        for r, flags in enumerate(source.images):
            for k, has_image in enumerate(flags):
                if stage == 1:
                    if has_image:
                        self.index.append((r, k, "pair"))
                    continue
                if stage == "llm" and len(flags) == 1:
                    if has_image and images_in_prompt:
                        self.index.append((r, k, "caption"))
                    continue
                for task in tasks:
                    if task == "gen" and has_image or task in ("turn", "multimodal") and k >= 1 or \
                            task == "understanding" and k >= 1 and has_image and images_in_prompt:
                        self.index.append((r, k, task))
        if not self.index:
            raise UserError("the training data yields no samples" + (" (stage 1 needs steps with images)"
                                                                      if stage == 1 else ""))

    def __len__(self) -> int:
        return len(self.index)

    def _target(self, step: dict) -> dict:
        """The target image as pixels, or as its cached VAE posterior."""
        if step.get("latent_mean") is not None:
            return {"image": None, "latent": (_tensor(step["latent_mean"]), _tensor(step["latent_logvar"]))}
        return {"image": to_pixels(as_rgb(step["image"]), self.resolution), "latent": None}

    def __getitem__(self, i: int) -> dict:
        r, k, task = self.index[i]
        steps = self.source[r]["steps"]
        step = steps[k]
        if task == "pair":
            # Decided by the sample's index, not a shared RNG, so resuming replays it exactly.
            instruct = random.Random(f"{self.seed}-{i}").random() < self.instruction_prob
            embed = step.get("caption_embed")
            return {"history": [], "prompt": INSTRUCTION.format(step["text"]) if instruct else step["text"],
                    "target": "", "vokens": True, "caption": step["text"],
                    "caption_embed": _tensor(embed) if embed is not None else None, **self._target(step)}
        history = [
            (s["text"], as_rgb(s["image"]) if s["image"] is not None and self.images_in_prompt else None)
            for s in steps[max(0, k - self.history):k]
        ]
        has_image = step["image"] is not None and self.stage != "llm"
        sample = {"history": history, "prompt": None, "target": step["text"], "vokens": has_image,
                  "caption": None, "caption_embed": None, "image": None, "latent": None}
        if task == "gen":
            history.append((GEN.format(step["text"]), None))
            sample["target"] = ""
        elif task == "multimodal":
            history.append((NEXT, None))
        elif task == "understanding":
            history.append((DESCRIBE, as_rgb(step["image"])))
            sample["vokens"] = False
        elif task == "caption":
            history[:] = [(CAPTION, as_rgb(step["image"]))]
        if sample["vokens"]:
            sample.update(self._target(step), caption=step.get("caption"))
        return sample


def as_rgb(image) -> Image.Image:
    return load_image(image) if isinstance(image, str) else image.convert("RGB")


def _tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value, dtype=np.float32))


@dataclass
class Collator:
    """Tokenises samples into one right-padded batch; only target tokens carry labels."""

    tokenizer: object
    processor: object | None
    caption_tokenizer: object
    first_voken: int
    n_vokens: int
    max_length: int

    def _prompt(self, sample: dict, history: list) -> tuple[str, list]:
        if sample["prompt"] is not None:
            return sample["prompt"], []
        image_token = getattr(self.processor, "image_token", None)
        lines, images = [], []
        for text, img in history:
            if img is not None and image_token:
                lines.append(f"{text} {image_token}".strip())
                images.append(img)
            else:
                lines.append(text)
        return "###Human: " + "\n".join(lines) + " ###Assistant: ", images

    def _encode_prompt(self, text: str, images: list) -> tuple[list[int], torch.Tensor | None]:
        if images:
            enc = self.processor(text=[text], images=images, return_tensors="pt")
            return enc["input_ids"][0].tolist(), enc["pixel_values"]
        return self.tokenizer(text)["input_ids"], None

    def _target_ids(self, sample: dict) -> list[int]:
        vokens = self.tokenizer.convert_ids_to_tokens(list(range(self.first_voken, self.first_voken + self.n_vokens)))
        text = sample["target"]
        if sample["vokens"]:
            text = (text + " " if text else "") + "".join(vokens)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def prompt(self, sample: dict, room: int) -> tuple[list[int], torch.Tensor | None]:
        """Token ids (and pixel values) of the prompt, dropping the oldest steps to fit `room` tokens."""
        history = list(sample["history"])
        while True:
            prompt_ids, pixel_values = self._encode_prompt(*self._prompt(sample, history))
            if len(prompt_ids) <= room or not history:
                break
            history.pop(0)  # the oldest step goes first
        if len(prompt_ids) > room:
            if pixel_values is not None or room < 1:
                raise UserError(f"a sample does not fit data.max_length={self.max_length}; raise it")
            prompt_ids = prompt_ids[:room]
        return prompt_ids, pixel_values

    def encode(self, sample: dict) -> tuple[list[int], list[int], torch.Tensor | None]:
        target = self._target_ids(sample)
        prompt_ids, pixel_values = self.prompt(sample, self.max_length - len(target))
        labels = [-100] * len(prompt_ids) + [
            -100 if self.first_voken < t < self.first_voken + self.n_vokens else t for t in target
        ]  # [IMG0] is supervised; the rest of the group is forced at inference
        return prompt_ids + target, labels, pixel_values

    def __call__(self, samples: list[dict]) -> dict:
        encoded = [self.encode(s) for s in samples]
        width = max(len(ids) for ids, _, _ in encoded)
        pad = self.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in encoded]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in encoded]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab, _ in encoded]),
        }
        pixels = [pv for _, _, pv in encoded if pv is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        targets = [s for s in samples if s["vokens"]]  # in order: one per voken group
        cached = [s for s in targets if s["latent"] is not None]
        if cached and len(cached) < len(targets):
            raise UserError("some target images have cached latents and some do not; prepare the data again")
        if cached:
            batch["latent_mean"] = torch.stack([s["latent"][0] for s in cached])
            batch["latent_logvar"] = torch.stack([s["latent"][1] for s in cached])
        else:
            batch["target_pixels"] = torch.stack([s["image"] for s in targets]) if targets else torch.zeros(0, 3, 1, 1)
        # The caption loss needs a caption for every target image of the batch.
        captions = [s["caption"] for s in targets if s["caption"] is not None]
        if len(captions) < len(targets):
            captions = []
        if captions and all(s["caption_embed"] is not None for s in targets):
            batch["caption_embeds"] = torch.stack([s["caption_embed"] for s in targets])
        elif captions:
            batch["caption_ids"] = self.caption_tokenizer(
                captions, padding="max_length", truncation=True, return_tensors="pt",
                max_length=self.caption_tokenizer.model_max_length,
            ).input_ids
        return batch
