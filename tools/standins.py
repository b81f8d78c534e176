"""Stand-in networks for checking `evaluate --compat minigpt5` against MiniGPT-5's own `metric.py`: each
gives the same output for the same input on both sides, so what is compared is everything around the
networks (which texts and pixels reach them, and the arithmetic after).

Imported by `upstream_metrics.py` (in the upstream's own environment) and by `tests/test_compat_upstream.py`;
it needs numpy, PIL and torch only.
"""

from __future__ import annotations

import hashlib

import numpy as np

WIDTH = 8  # embedding width: small, so that cosines spread over [-1, 1]


def vector(key: bytes) -> np.ndarray:
    """A fixed unit vector for `key`."""
    v = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little")).standard_normal(WIDTH)
    return v / np.linalg.norm(v)


def text_key(text: str) -> bytes:
    return b"text:" + text.encode()


def image_key(pixels: np.ndarray) -> bytes:
    """A decoded RGB image (H, W, 3) uint8: its shape and every byte."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return b"image:%dx%d:" % pixels.shape[:2] + pixels.tobytes()


class Clip:
    """Our side: the interface of `minigpt5_cli.evaluation.loaders.CLIP`."""

    name = "stand-in CLIP (a fixed vector per text and per image)"

    def texts(self, texts):
        return np.array([vector(text_key(t)) for t in texts]).reshape(len(texts), WIDTH)

    def images(self, images):
        return np.array([vector(image_key(np.asarray(im.convert("RGB")))) for im in images]).reshape(len(images), WIDTH)


class Sbert:
    """Our side: the part of a sentence-transformers model that `maths.sbert` uses."""

    name = "stand-in S-BERT (a fixed vector per text)"

    def encode(self, texts, **_):
        return np.array([vector(text_key(t)) for t in ([texts] if isinstance(texts, str) else texts)])


def inception_weights(path) -> None:
    """Random Inception-v3 FID weights, the same on every machine (numpy's seeded generator per tensor),
    in the key layout of pytorch-fid's and torch-fidelity's files: He-initialised convolutions, batch
    norms at identity, a classifier wide enough for peaked logits."""
    import torch

    from minigpt5_cli.evaluation.inception import FIDInceptionV3

    state = {}
    for k, (name, t) in enumerate(FIDInceptionV3().state_dict().items()):
        rng = np.random.RandomState(k)
        if name.endswith("conv.weight"):
            fan_in = int(np.prod(t.shape[1:]))
            value = rng.standard_normal(t.shape) * np.sqrt(2 / fan_in)
        elif name == "fc.weight":
            value = rng.standard_normal(t.shape) * 0.05
        elif name.endswith(("bn.weight", "running_var")):
            value = np.ones(t.shape)
        elif name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
            continue
        else:  # bn.bias, running_mean, fc.bias
            value = rng.standard_normal(t.shape) * 0.01
        state[name] = torch.from_numpy(value.astype(np.float32))
    torch.save(state, path)
