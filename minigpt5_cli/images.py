"""Image decoding and the generator's pixel format: one place that every command uses."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minigpt5_cli.errors import UserError


def load(source: bytes | str | Path) -> Image.Image:
    """Open and fully decode an image file or encoded bytes, as stored (any mode). PIL's own errors
    propagate: callers decide whether a broken image is a reject or an error."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img.load()
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(source: bytes | str | Path, where: str) -> Image.Image:
    """The RGB image in `source`; an image that does not decode is a one-line error naming `where`."""
    try:
        return to_rgb(load(source))
    except Exception:  # PIL's plugins raise many kinds for broken files
        raise UserError(f"image does not decode: {where}") from None


def to_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop, scale to [-1, 1]: the generator's input."""
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
