"""Write the fixture that `evaluate --compat minigpt5` is checked on against MiniGPT-5's `metric.py`
(tests/fixtures/minigpt5_metrics): a dialog set (MMDialog-like: turns with and without images, `###` and
`[IMG*]` in texts, punctuation alone, empty and non-ASCII strings, a 1,800-character pair, a reference
text naming `[IMG0]` without an image) and a story set (VIST-like: every step with a generated image,
stories of one to five steps, one reference image missing, generated images all of one size as a
diffusion model's are). Small images of odd sizes, so that the square padding and the resizes matter.

    python tools/metric_fixture.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minigpt5_metrics"
LONG = ("the harbour at dawn, boats rocking on a grey swell while gulls argue over the nets; " * 22)[:1800]


def picture(rng: random.Random, name: str, size: tuple[int, int] | None = None) -> str:
    w, h = size or rng.choice([(40, 30), (30, 44), (48, 48), (64, 36), (26, 52)])
    image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(w), rng.randrange(h)
        draw.ellipse([x - 8, y - 6, x + 8, y + 6], fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-12, 13, (h, w, 3))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=int) + noise, 0, 255).astype(np.uint8))
    image.save(OUT / "images" / f"{name}.png", optimize=True)
    return f"images/{name}.png"


def dialogs(rng: random.Random):
    # (id, predicted text, generated image?, reference text, reference image?)
    turns = [
        ("d1_1", "### a red kite over the dunes [IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7]", True,
         "a red kite above the dunes", True),
        ("d1_2", "", False, "hello there, how was the trip?", False),
        ("d1_3", "!!", True, "what is that?", True),
        ("d1_4", "it was long ###", False, "it was long but worth it", False),
        ("d2_1", "nice one", False, "", True),
        ("d2_2", "Ça va? 東京は晴れ", True, "très bien, merci", False),
        ("d2_3", LONG, False, LONG[::-1], False),
        ("d2_4", "look [IMG0]", True, "look at this one", True),
        ("d3_1", "[IMG0]", True, "### ###", True),
        ("d3_2", "…", False, "...", False),
        ("d3_3", "a quiet street", True, "a quiet street at night", True),
        ("d4_1", "see the picture", False, "see [IMG0] here", False),
        ("d4_2", "the same picture", True, "it shows [IMG0] the sea", False),
        ("d4_3", "", True, "", True),
        ("d5_1", "sunset over the bay", True, "sunset over the bay", True),
        ("d5_2", "and the moon", False, "and then the moon rose", True),
    ]
    for i, pred, gen, ref, has in turns:
        yield ({"id": i, "text": pred, "images": [picture(rng, f"{i}_gen")] if gen else []},
               {"id": i, "text": ref, "images": [picture(rng, f"{i}_ref")] if has else []})


def stories(rng: random.Random):
    words = "a boy a dog the park runs jumps under trees near water smiles rain later home".split()
    for s, steps in enumerate([5, 4, 5, 1, 3, 4, 3]):
        for k in range(steps):
            i = f"story{s}_{k}"
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
            missing = (s, k) == (2, 3)  # a reference step without its image: the loader's black stand-in
            # one size for every generated image, as a diffusion model's: the original stacks a story's images
            yield ({"id": i, "text": text if k % 2 else "", "images": [picture(rng, f"{i}_gen", (64, 48))]},
                   {"id": i, "text": text, "images": [] if missing else [picture(rng, f"{i}_ref")]})


def main() -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    for name, rows in (("dialog", list(dialogs(rng))), ("story", list(stories(rng)))):
        for side, k in (("pred", 0), ("ref", 1)):
            text = "".join(json.dumps(r[k], ensure_ascii=False) + "\n" for r in rows)
            (OUT / f"{name}_{side}.jsonl").write_text(text)


if __name__ == "__main__":
    main()
