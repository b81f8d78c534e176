"""Image decoding and the generator's pixel format: one place that every command uses.

`decode` turns any file PIL reads into 8-bit RGB: 16-bit and 32-bit grey levels and float images
are scaled to 0-255 (PIL's own conversion clips them, so a 16-bit PNG came out white), and
transparency is composited onto white, and a photo's EXIF orientation is applied, so that every
command sees it the right way up. Images larger than `MAX_PIXELS`, or longer than
`MAX_ASPECT` times their width, are refused from their header, before any pixel is decoded: a
small file can hold a picture that needs gigabytes once decoded and resized.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from minigpt5_cli.errors import UserError

MAX_PIXELS = 40_000_000  # a 7,300 x 5,500 photograph; any camera image of the data sets fits
MAX_ASPECT = 20  # long side / short side; a panorama reaches about 10


class OversizedImage(ValueError):
    """An image whose size, read from its header, is over the bounds."""


def check_size(w: int, h: int) -> None:
    """Refuse (`OversizedImage`) a size, read from a header, past MAX_PIXELS or MAX_ASPECT."""
    if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        limit = (f"more than {MAX_PIXELS // 1_000_000} megapixels" if w * h > MAX_PIXELS
                 else f"more than {MAX_ASPECT} times longer than wide")
        raise OversizedImage(f"{w} x {h} pixels, {limit}")


def load(source: bytes | str | Path, size: int | None = None) -> Image.Image:
    """Open and fully decode an image file or encoded bytes, as stored (any mode), turned upright by its
    EXIF orientation. The size is checked before decoding (`OversizedImage`); with `size`, a JPEG much
    larger than `size` on its short side is decoded at a reduced scale (libjpeg's draft mode) that keeps
    the short side at least `size`. `info["stored_size"]` is the full size, upright. PIL's own errors
    propagate: callers decide whether a broken image is a reject or an error."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # PIL's own bomb check warns; ours refuses
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with img:
        w, h = img.size
        check_size(w, h)
        img.info["stored_size"] = (w, h)  # before a draft decode shrinks it
        if size and img.format == "JPEG":
            img.draft(None, (size, size))  # a no-op unless the image is at least twice `size`
        img.load()
        if _orientation(img) in _SIDEWAYS:
            img.info["stored_size"] = (h, w)
        ImageOps.exif_transpose(img, in_place=True)  # keeps the format; the orientation tag is removed
        return img


_SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by a quarter


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (TypeError, ValueError):
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, whatever the mode: high bit depths scaled rather than clipped, transparency on white."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or img.mode == "I" and a.max(initial=0) > 255:
            a = a / 257  # 16-bit levels (PNG's 16-bit grey opens as I;16 or I)
        elif img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255  # float images in [0, 1]
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def decode(source: bytes | str | Path, where: str, size: int | None = None) -> Image.Image:
    """The RGB image in `source`; one that does not decode, or is too large, is a one-line error
    naming `where`. `size`: the short side the caller needs (see `load`)."""
    try:
        return to_rgb(load(source, size))
    except OversizedImage as e:
        raise UserError(f"image too large: {where} is {e}") from None
    except Exception:  # PIL's plugins raise many kinds for broken files
        raise UserError(f"image does not decode: {where}") from None


def to_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """The centred square of the short side, resized to `size` x `size` in one step (the whole image
    is never resized first), scaled to [-1, 1]: the generator's input."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


# CLIP's per-channel mean and standard deviation, which MiniGPT-4's vision tower was trained with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def white_square(img: Image.Image) -> Image.Image:
    """`img` centred on a white square as wide as its long side."""
    side = max(img.size)
    if img.width == img.height:
        return img
    canvas = Image.new(img.mode, (side, side), (255, 255, 255))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def clip_pixels(img: Image.Image, size: int, square: bool = False) -> torch.Tensor:
    """A prompt image as the released MiniGPT-5 reads one: the short side resized to `size` (bilinear, the
    long side in proportion, rounded down), the centre `size` x `size` cropped, scaled to [0, 1] and
    normalised by CLIP's mean and std. `square`: padded to a white square first (its demo does)."""
    img = to_rgb(img)
    if square:
        img = white_square(img)
    w, h = img.size
    other = int(size * max(w, h) / min(w, h))
    if min(w, h) != size or max(w, h) != other:
        img = img.resize((size, other) if w <= h else (other, size), Image.BILINEAR)
    left, top = round((img.width - size) / 2), round((img.height - size) / 2)  # as torchvision's centre crop
    img = img.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
