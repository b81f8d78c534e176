"""Feature caches: every text or image goes through CLIP or Inception once per run, in batches,
whichever metrics ask for it."""

from __future__ import annotations

import numpy as np

from minigpt5_cli.evaluation.maths import inception_features
from minigpt5_cli.story import Picture


class ClipFeatures:
    """CLIP embeddings of texts (str) and images (Picture), keyed by the text or the image's place."""

    def __init__(self, clip, batch_size: int):
        self.clip, self.batch_size = clip, batch_size
        self.cache: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, items: list) -> np.ndarray:
        keys = [("text", x) if isinstance(x, str) else ("image", x.where) for x in items]
        todo = {k: x for k, x in zip(keys, items) if k not in self.cache}
        texts = [k for k in todo if k[0] == "text"]
        images = [k for k in todo if k[0] == "image"]
        for batch_keys, fn in ((texts, lambda ks: self.clip.texts([k[1] for k in ks])),
                               (images, lambda ks: self.clip.images([todo[k].open() for k in ks]))):
            for i in range(0, len(batch_keys), self.batch_size):
                chunk = batch_keys[i:i + self.batch_size]
                self.cache.update(zip(chunk, fn(chunk)))
        return np.array([self.cache[k] for k in keys]) if keys else np.zeros((0, 1))

    def one(self, item) -> np.ndarray | None:
        return None if item is None else self([item])[0]


class InceptionFeatures:
    """Inception pool3 features and logits of images (Picture), each image decoded and run once."""

    def __init__(self, net, device: str, batch_size: int):
        self.net, self.device, self.batch_size = net, device, batch_size
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, images: list[Picture]) -> tuple[np.ndarray, np.ndarray]:
        todo = list({im.where: im for im in images if im.where not in self.cache}.values())
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            pool, logits = inception_features([im.open() for im in chunk], self.net, self.device, self.batch_size)
            self.cache.update((im.where, (p, q)) for im, p, q in zip(chunk, pool, logits))
        if not images:
            return np.zeros((0, 0)), np.zeros((0, 0))
        return (np.stack([self.cache[im.where][0] for im in images]),
                np.stack([self.cache[im.where][1] for im in images]))
