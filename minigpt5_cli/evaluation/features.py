"""Feature caches: every text or image goes through CLIP, Inception or S-BERT once per run, in batches,
whichever metrics ask for it. Under `accelerate launch` the caches are collective: each process runs
its share of the batches, and every process gets every feature (`processes.spread`), so each runs the
metrics alike. Their calls must come in the same order on every process, as the metrics make them."""

from __future__ import annotations

import numpy as np

from minigpt5_cli.evaluation.maths import inception_features
from minigpt5_cli.processes import spread
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
            self.cache.update(zip(batch_keys, spread(batch_keys, self.batch_size, fn)))
        return np.array([self.cache[k] for k in keys]) if keys else np.zeros((0, 1))

    def one(self, item) -> np.ndarray | None:
        return None if item is None else self([item])[0]


class InceptionFeatures:
    """Inception pool3 features and logits of images (Picture), each image decoded and run once.
    `options` go to `maths.inception_features`."""

    def __init__(self, net, device: str, batch_size: int, **options):
        self.net, self.device, self.batch_size, self.options = net, device, batch_size, options
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, images: list[Picture]) -> tuple[np.ndarray, np.ndarray]:
        todo = list({im.where: im for im in images if im.where not in self.cache}.values())

        def run(chunk):
            pool, logits = inception_features([im.open() for im in chunk], self.net, self.device, self.batch_size,
                                              **self.options)
            return zip(pool, logits)

        self.cache.update(zip([im.where for im in todo], spread(todo, self.batch_size, run)))
        if not images:
            return np.zeros((0, 0)), np.zeros((0, 0))
        return (np.stack([self.cache[im.where][0] for im in images]),
                np.stack([self.cache[im.where][1] for im in images]))


class SbertFeatures:
    """A sentence-transformers model whose `encode` (as `maths.sbert` calls it) encodes each text once,
    spread over the processes of a launched run; anything else is the model's."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, texts: list[str], batch_size: int = 32, **_) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        self.cache.update(zip(todo, spread(todo, batch_size, lambda chunk: self.model.encode(
            chunk, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False))))
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), dtype=np.float32)
        return np.stack([self.cache[t] for t in texts])
