"""One decoding function for every command: any mode to 8-bit RGB, sizes bounded before decoding."""

import io

import numpy as np
import pytest
from PIL import Image

from minigpt5_cli import images
from minigpt5_cli.errors import UserError


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def test_sixteen_bit_grey_is_scaled_not_clipped_to_white():
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    png = images.decode(encoded(Image.fromarray(levels)), "grey16")  # a 16-bit PNG, read back as PIL reads it
    as_int = images.to_rgb(Image.fromarray(levels.astype(np.int32), "I"))
    for rgb in (png, as_int):
        assert rgb.mode == "RGB"
        assert np.asarray(rgb)[0, :, 0].tolist() == [0, 64, 128, 255]  # PIL's own convert gives 0, 255, 255, 255


def test_float_images_in_zero_to_one_are_scaled():
    rgb = images.to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F"))
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (200, 30, 30, 255))
    img = rgba if mode == "RGBA" else rgba.convert("LA") if mode == "LA" else rgba.convert("P", palette=Image.ADAPTIVE)
    if mode == "P":  # a palette image with a transparent index
        img.info["transparency"] = img.getpixel((0, 0))
    rgb = np.asarray(images.decode(encoded(img), mode))
    assert rgb[0, 0].tolist() == [255, 255, 255]  # transparent: white, not black
    assert rgb[0, 1].tolist() == ([200, 30, 30] if mode != "LA" else [rgb[0, 1, 0]] * 3)


def test_sizes_are_bounded_from_the_header():
    with pytest.raises(UserError, match=r"image too large: x is 1 x 100000 pixels, more than 20 times"):
        images.decode(encoded(Image.new("RGB", (1, 100_000))), "x")
    assert images.decode(encoded(Image.new("RGB", (20, 400))), "x").size == (20, 400)  # 20:1 is allowed
    with pytest.raises(images.OversizedImage):
        images.load(encoded(Image.new("L", (8000, 6000))))


def test_a_large_jpeg_decodes_at_a_reduced_scale():
    data = encoded(Image.new("RGB", (2000, 1500), (10, 120, 200)), "JPEG")
    img = images.load(data, size=256)
    assert img.size == (500, 375) and img.info["stored_size"] == (2000, 1500)  # 1/4: the short side stays >= 256
    assert images.load(data).size == (2000, 1500)


def test_pixels_come_from_the_centre_square_without_resizing_the_whole_image(monkeypatch):
    img = Image.new("RGB", (40, 4000), (255, 255, 255))
    img.paste((0, 0, 0), (0, 1990, 40, 2010))  # a black band across the middle
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or resize(self, size, *a, **k))
    pixels = images.to_pixels(img, 512)
    assert pixels.shape == (3, 512, 512) and sizes == [(512, 512)]  # never 512 x 51,200 first
    assert pixels.min() == -1 and pixels.max() == 1  # the band and the white around it


def sideways_jpeg(size=(40, 20)) -> bytes:
    """A photo stored lying on its side, as cameras do: red left half, blue right, EXIF orientation 6
    (turn a quarter clockwise to show it)."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img, "JPEG", exif=exif, quality=95)


def upright(img: Image.Image) -> None:
    """The red half on top, the blue below: turned as the EXIF tag says."""
    a = np.asarray(img, dtype=np.int16)
    assert img.size == (20, 40), img.size
    assert a[2, 10, 0] > 200 > a[2, 10, 2] and a[-3, 10, 2] > 200 > a[-3, 10, 0]


def test_exif_orientation_is_applied_on_every_path(tmp_path):
    """generate, JSON Lines training, evaluate and prepare-data all see the photo the right way up."""
    import json

    from minigpt5_cli.data import prepare
    from minigpt5_cli.data.sources import load_source, read_jsonl
    from minigpt5_cli.evaluation.samples import read_references
    from minigpt5_cli.generation.stories import read_stories

    data = sideways_jpeg()
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "big.jpg").write_bytes(sideways_jpeg((400, 200)))
    expected = images.decode(data, "x")
    upright(expected)
    (tmp_path / "story.json").write_text(json.dumps({"id": "s", "steps": [{"text": "a", "image": "a.jpg"}]}))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"caption": "a", "image": "a.jpg"}) + "\n")
    (tmp_path / "refs.jsonl").write_text(json.dumps({"id": "s", "text": "a", "images": ["a.jpg"]}) + "\n")
    (tmp_path / "pairs.tsv").write_text("caption\timage\na\ta.jpg\nb\tbig.jpg\n")
    prepare.prepare("cc3m", tmp_path / "pairs.tsv", tmp_path / "data", prepare.Settings(image_size=20))
    prepared = load_source(tmp_path / "data", "1")
    decoded = {
        "generate": read_stories(str(tmp_path / "story.json"))[0].steps[0].image.open(),
        "training": read_jsonl(tmp_path / "pairs.jsonl", "1")[0].steps[0].image.open(),
        "evaluate": read_references(tmp_path / "refs.jsonl")[0].images[0].open(),
        "prepare-data": prepared[0].steps[0].image.open(),  # the original bytes, tag and all
    }
    for name, img in decoded.items():
        assert np.array_equal(np.asarray(img), np.asarray(expected)), name
    upright(prepared[1].steps[0].image.open())  # downscaled and re-encoded: turned before, no tag after
