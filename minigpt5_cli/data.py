"""A minimal on-disk format for training, and the collator that turns samples into LLM batches.

Two JSON Lines forms; image paths are relative to the JSONL file's folder:
- pairs (stage 1):      {"caption": "a red circle", "image": "images/0.png"}
- sequences (stage 2):  {"id": "s1", "steps": [{"text": "...", "image": "images/1.png"}, ...]}
  A step's image is optional. Each step k >= 1 becomes one sample: the earlier steps (text, and
  images when the LLM accepts them) are the prompt; step k's text, plus vokens when it has an
  image, is the target.
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


def read_jsonl(path: str | Path, stage: int) -> list[dict]:
    """Read and validate a training file; every referenced image must exist."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
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


def _sequence_steps(rec: dict, where: str) -> list[dict]:
    steps = rec.get("steps") if isinstance(rec, dict) else None
    if not isinstance(steps, list) or len(steps) < 2:
        raise UserError(f'{where}: a stage-2 sequence needs "steps", a list of at least 2')
    out = []
    for step in steps:
        if not isinstance(step, dict) or not isinstance(step.get("text", ""), str) or \
                not isinstance(step.get("image"), (str, type(None))):
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


class TrainSet(torch.utils.data.Dataset):
    """Stage 1: one sample per pair. Stage 2: one sample per step k >= 1 of each sequence."""

    def __init__(self, records: list[dict], stage: int, resolution: int, history: int, seed: int,
                 instruction_prob: float, images_in_prompt: bool):
        self.records, self.stage, self.resolution = records, stage, resolution
        self.history, self.seed, self.instruction_prob = history, seed, instruction_prob
        self.images_in_prompt = images_in_prompt
        self.index = [(r, 0) for r in range(len(records))] if stage == 1 else [
            (r, k) for r, rec in enumerate(records) for k in range(1, len(rec["steps"]))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        r, k = self.index[i]
        steps = self.records[r]["steps"]
        target = steps[k]
        pixels = to_pixels(load_image(target["image"]), self.resolution) if target["image"] else None
        if self.stage == 1:
            # Decided by the sample's index, not a shared RNG, so resuming replays it exactly.
            instruct = random.Random(f"{self.seed}-{i}").random() < self.instruction_prob
            return {"history": [], "prompt": INSTRUCTION.format(target["text"]) if instruct else target["text"],
                    "target": "", "image": pixels, "caption": target["text"]}
        history = [
            (s["text"], load_image(s["image"]) if s["image"] and self.images_in_prompt else None)
            for s in steps[max(0, k - self.history):k]
        ]
        return {"history": history, "prompt": None, "target": target["text"], "image": pixels, "caption": None}


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
        if sample["image"] is not None:
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
        images = [s["image"] for s in samples if s["image"] is not None]
        batch["target_pixels"] = torch.stack(images) if images else torch.zeros(0, 3, 1, 1)
        captions = [s["caption"] for s in samples if s["image"] is not None and s["caption"] is not None]
        if captions:
            batch["caption_ids"] = self.caption_tokenizer(
                captions, padding="max_length", truncation=True, return_tensors="pt",
                max_length=self.caption_tokenizer.model_max_length,
            ).input_ids
        return batch
