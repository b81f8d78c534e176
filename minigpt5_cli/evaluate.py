"""`minigpt5 evaluate`: score predictions against references, write metrics.json, a per-sample CSV
and a table; `compare` puts two metrics.json side by side.

Predictions are a `minigpt5 generate` output folder (one story, or one folder per story) or a JSONL
file of `{"id", "text", "images"}` lines. A story's prediction is its first generated response:
its text, its images, and its segments in order. References are a prepared dataset split
(`datasets.save_to_disk`) or a JSONL file; a row's reference is its `target` when there is one,
else its last step. Both sides are matched by id. The metric functions live in `metrics.py`.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from minigpt5_cli import metrics as M
from minigpt5_cli.errors import UserError

METRICS = ("clip_i", "clip_t", "fid", "is", "bleu1", "bleu2", "rouge_l", "meteor", "sbert", "mm_relevance",
           "mm_relevance_minigpt5", "toy_colour", "toy_shape", "toy_position", "toy_text")
TOY = ("toy_colour", "toy_shape", "toy_position")  # attribute accuracies, read by the shapes-world checker
PRESETS = {
    "vist": ["clip_i", "clip_t", "fid", "is", "rouge_l", "meteor", "sbert"],
    "mmdialog": ["bleu1", "bleu2", "rouge_l", "sbert", "mm_relevance", "is"],
    "cc3m": ["clip_i", "clip_t", "fid", "is"],
    "toy": [*TOY, "toy_text"],
    "all": [m for m in METRICS if m != "mm_relevance_minigpt5" and not m.startswith("toy_")],
}
COMPAT = ("minigpt5",)
LOWER_IS_BETTER = {"fid", "fid_per_story"}
_CLIP_METRICS = {"clip_i", "clip_t", "mm_relevance", "mm_relevance_minigpt5"}

TOKENS = r"lower-cased, split with \w+|[^\w\s]"
DEFINITIONS = {
    "bleu1": f"corpus BLEU over 1-grams, one reference per sample, no smoothing: NLTK corpus_bleu on tokens "
             f"({TOKENS})",
    "bleu2": f"corpus BLEU, uniform weights over 1- and 2-grams, one reference per sample, no smoothing: NLTK "
             f"corpus_bleu on tokens ({TOKENS})",
    "char_bleu": "MiniGPT-5 compatibility: NLTK sentence_bleu on the raw strings, which NLTK iterates character by "
                 "character (character n-grams), no smoothing; mean over samples, 0 for an empty prediction",
    "rouge_l": f"mean over samples of rouge-score's rougeL F-measure (LCS, beta 1), no stemming, on tokens ({TOKENS})",
    "meteor": f"mean over samples of NLTK meteor_score (exact, Porter stem and WordNet 3.0 synonym stages; alpha "
              f"0.9, beta 3, gamma 0.5) on tokens ({TOKENS})",
    "sbert": "mean over samples of the cosine between sentence-transformers embeddings of the predicted and the "
             "reference text",
    "clip_i": "mean over samples of the plain cosine (no x100, no clamp) between transformers CLIP image "
              "embeddings of the first generated image and the reference image",
    "clip_t": "mean over samples of the plain cosine (no x100, no clamp) between the transformers CLIP image "
              "embedding of the first generated image and the CLIP text embedding of the reference text "
              "(truncated to the model's context)",
    "fid": "Frechet distance between Gaussians (mean, n-1 covariance) fitted to Inception-v3 pool3 features "
           "(2048) of all generated images and of all reference images; pytorch-fid numerics (scipy sqrtm, "
           "1e-6 retry, imaginary-part check). Biased and noisy below a few thousand images",
    "fid_per_story": "MiniGPT-5 compatibility: FID computed separately for each story, samples grouped by the id "
                     "before its last '_' (the original's story_step ids), over stories with at least 2 "
                     "generated and 2 reference images, then averaged. Covariances of a few 2048-d features "
                     "are rank-deficient: the number is not a meaningful FID",
    "is": "Inception Score: exp(E_x KL(p(y|x) || p(y))) from Inception-v3 logits without the bias, over all "
          "generated images in consecutive splits; mean and population std over splits",
    "mm_relevance": "MMDialog's MM-Relevance: the elements (text, images, in order) of the response and of the "
                    "reference are aligned by position and scored by CLIP cosine; precision = sum / generated "
                    "elements, recall = sum / reference elements; F1 per sample, mean over samples",
    "mm_relevance_minigpt5": "MiniGPT-5's CLIP-F1 variant of MM-Relevance: per sample (one dialog turn), CLIP "
                             "cosines text-text and image-image (first image); an element only the reference has "
                             "is missing (-1), one only the prediction has is spurious (-2); precision = sum / "
                             "elements not missing, recall = sum / elements not spurious; F1 per sample, mean "
                             "over samples",
}
DEFINITIONS.update({
    f"toy_{attr}": f"shapes world: share of samples whose first generated image shows the reference image's "
                   f"{attr}, both read from pixels by minigpt5_cli.toy.read_attributes (exact on the renders); a "
                   f"missing or unreadable generated image counts as wrong"
    for attr in ("colour", "shape", "position")
})
DEFINITIONS["toy_text"] = f"shapes world: share of samples whose generated text equals the reference text ({TOKENS})"
PREDICTION = "a story's first generated response (its text, images and segments)"
INCEPTION_RESIZE = ("each image resized to 299x299 with torch bilinear interpolation (align_corners=False, no "
                    "antialias) as pytorch-fid does, inputs scaled to [-1, 1]")


# ---------------------------------------------------------------- reading


@dataclass(eq=False)
class Image:
    """An image to decode when needed: a file, or encoded bytes from a dataset."""

    where: str  # for messages, and the key of cached embeddings
    path: Path | None = None
    data: bytes | None = None

    def open(self):
        from PIL import Image as PIL

        try:
            with PIL.open(self.path if self.data is None else io.BytesIO(self.data)) as img:
                return img.convert("RGB")
        except Exception:
            raise UserError(f"image does not decode: {self.where}") from None


@dataclass
class Sample:
    id: str
    text: str
    images: list[Image]
    elements: list = field(default_factory=list)  # str or Image, in order


def read_predictions(path: str | Path) -> tuple[list[Sample], dict]:
    """Samples and the run's description (mode and model of a generate folder)."""
    p = Path(path)
    if p.is_dir():
        samples, run = _read_generate_folder(p)
    elif p.is_file():
        samples, run = _read_jsonl(p, stories=False), {"source": "jsonl"}
    else:
        raise UserError(f"predictions not found: {p}")
    if not samples:
        raise UserError(f"the prediction set is empty: {p} holds no predictions")
    return samples, run


def read_references(path: str | Path) -> list[Sample]:
    p = Path(path)
    if p.is_dir():
        samples = _read_dataset(p)
    elif p.is_file():
        samples = _read_jsonl(p, stories=True)
    else:
        raise UserError(f"references not found: {p}")
    if not samples:
        raise UserError(f"the reference set is empty: {p}")
    return samples


def _read_generate_folder(folder: Path) -> tuple[list[Sample], dict]:
    from minigpt5_cli.stories import STORY_FILE

    single = (folder / STORY_FILE).is_file()
    folders = [folder] if single else sorted(d for d in folder.iterdir() if (d / STORY_FILE).is_file())
    if not folders and not (folder / "index.html").is_file() and any(folder.iterdir()):
        raise UserError(f"{folder} is not a generate output folder (no {STORY_FILE}, no story folders)")
    samples, runs = [], []
    for d in folders:
        where = d / STORY_FILE
        try:
            doc = json.loads(where.read_text())
            first = doc["generated"][0] if doc["generated"] else {"text": "", "images": [], "segments": []}
            images = {name: Image(str(d / name), path=d / name) for name in first["images"]}
            elements = [seg["text"] if "text" in seg else images[seg["image"]] for seg in first["segments"]]
            samples.append(Sample(str(doc["id"]), first["text"], list(images.values()), elements))
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            raise UserError(f"{where}: not a story.json written by generate ({type(e).__name__}: {e})") from None
        runs.append({"mode": doc.get("mode"), "model": doc.get("model")})
    _check_unique(samples, folder)
    distinct = [json.loads(r) for r in dict.fromkeys(json.dumps(r, sort_keys=True) for r in runs)]
    return samples, {"source": "generate", "stories": len(samples),
                     **(distinct[0] if len(distinct) == 1 else {"runs": distinct})}


def _read_jsonl(path: Path, stories: bool) -> list[Sample]:
    """`{"id", "text", "images"}` lines; with `stories`, also story lines `{"id", "steps"[, "target"]}`,
    whose reference is the target, else the last step."""
    from minigpt5_cli.data import json_lines

    samples = []
    for _, where, rec in json_lines(path):
        if not isinstance(rec, dict) or "id" not in rec:
            raise UserError(f'{where}: expected {{"id": ..., "text": ..., "images": [...]}}')
        if "target" in rec or "steps" in rec:
            if not stories:
                raise UserError(f'{where}: a story line; a prediction is {{"id": ..., "text": ..., "images": [...]}}')
            step = rec.get("target") or (rec.get("steps") or [{}])[-1]
            if not isinstance(step, dict):
                raise UserError(f'{where}: a step is {{"text": ..., "image": ...}}')
            rec = {"id": rec["id"], "text": step.get("text") or "",
                   "images": [step["image"]] if step.get("image") else []}
        text, names = rec.get("text") or "", rec.get("images") or []
        if not isinstance(text, str) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f'{where}: "text" must be a string and "images" a list of paths')
        images = [Image(str(path.parent / n), path=path.parent / n) for n in names]
        for image in images:
            if not image.path.is_file():
                raise UserError(f"{where}: image not found: {image.path}")
        samples.append(Sample(str(rec["id"]), text, images, ([text] if text else []) + images))
    _check_unique(samples, path)
    return samples


def _read_dataset(folder: Path) -> list[Sample]:
    import datasets

    if (folder / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in folder.iterdir() if d.is_dir())
        raise UserError(f"{folder} holds several splits ({', '.join(splits)}); give one, e.g. {folder / splits[0]}")
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{folder} is not a prepared dataset split ({first})") from None
    column = "target" if "target" in ds.column_names else "steps"
    if "id" not in ds.column_names or column not in ds.column_names:
        raise UserError(f"{folder}: a prepared split has an id column and a steps (or target) column")
    samples, row = [], 0
    # Arrow batches keep the images encoded: decoded only when a metric needs them.
    for batch in ds.select_columns(["id", column]).with_format("arrow").iter(batch_size=256):
        for sid, value in zip(batch.column("id").to_pylist(), batch.column(column).to_pylist()):
            step = value if column == "target" else (value[-1] if value else {})
            text, raw = (step or {}).get("text") or "", (step or {}).get("image")
            images = []
            if raw and (raw.get("bytes") or raw.get("path")):
                images = [Image(f"{folder} row {row} ({sid}) {column} image",
                                path=Path(raw["path"]) if raw.get("path") else None, data=raw.get("bytes"))]
            samples.append(Sample(str(sid), text, images, ([text] if text else []) + images))
            row += 1
    _check_unique(samples, folder)
    return samples


def _check_unique(samples: list[Sample], where) -> None:
    twice = [i for i, n in Counter(s.id for s in samples).items() if n > 1]
    if twice:
        raise UserError(f"{where}: id {twice[0]!r} appears more than once")


def match(predictions: list[Sample], references: list[Sample]) -> list[tuple[Sample, Sample]]:
    """Pairs by id, in prediction order; every id must be on both sides."""
    refs = {s.id: s for s in references}
    preds = {s.id for s in predictions}
    for side, ids in (("predictions", [s.id for s in predictions if s.id not in refs]),
                      ("references", [s.id for s in references if s.id not in preds])):
        if ids:
            other = "references" if side == "predictions" else "predictions"
            shown = ", ".join(repr(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
            raise UserError(f"{len(ids)} id(s) in the {side} are missing from the {other}: {shown}")
    return [(p, refs[p.id]) for p in predictions]


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    metrics: list[str]
    compat: str | None = None
    clip_model: str | None = None  # default: `default_clip_model`
    sbert_model: str | None = None
    inception_weights: str | None = None
    wordnet: str | None = None
    fid_real_stats: str | None = None
    is_splits: int = 10
    device: str = "cpu"
    batch_size: int = 32
    resamples: int = 1000
    seed: int = 0
    skip_unavailable: bool = False


def default_clip_model(spec: str) -> str:
    """ViT-L/14, or ViT-B/32 when the mmdialog preset is asked for (as the MMDialog evaluation uses)."""
    return M.CLIP_MMDIALOG if "mmdialog" in [n.strip().lower() for n in spec.split(",")] else M.CLIP_DEFAULT


def resolve_metrics(spec: str, compat: str | None = None) -> list[str]:
    """Metric names and presets, comma-separated, to the metric list (in order, no repeats)."""
    if compat not in (None, *COMPAT):
        raise UserError(f"unknown --compat {compat!r}; choose {', '.join(COMPAT)}")
    names = []
    for name in (n.strip().lower() for n in spec.split(",")):
        if name in PRESETS:
            names += PRESETS[name]
        elif name in METRICS:
            names.append(name)
        elif name:
            raise UserError(f"unknown metric {name!r}; choose from {', '.join(METRICS)} or a preset "
                            f"({', '.join(PRESETS)})")
    if compat == "minigpt5":
        names = ["mm_relevance_minigpt5" if n == "mm_relevance" else n for n in names]
    names = list(dict.fromkeys(names))
    if not names:
        raise UserError("no metrics asked for: give --metrics, e.g. --metrics vist")
    return names


# ---------------------------------------------------------------- models


class Models:
    """The networks the asked metrics need, each loaded once; a metric whose model fails to load is
    either an error or, with `skip_unavailable`, skipped with its reason."""

    def __init__(self, s: Settings, metrics: list[str]):
        self.clip = self.sbert = self.wordnet = self.inception = None
        self.skipped: dict[str, str] = {}
        loaders = [
            (_CLIP_METRICS, "clip", lambda: M.load_clip(s.clip_model or M.CLIP_DEFAULT, s.device, s.batch_size)),
            ({"sbert"}, "sbert", lambda: M.load_sbert(s.sbert_model, s.device)),
            ({"meteor"}, "wordnet", lambda: M.load_wordnet(s.wordnet)),
            ({"fid", "is"}, "inception", lambda: M.load_inception(s.inception_weights, s.device)),
        ]
        for needs, attr, load in loaders:
            wanted = [m for m in metrics if m in needs]
            if not wanted:
                continue
            try:
                setattr(self, attr, load())
            except UserError as e:
                if not s.skip_unavailable:
                    raise
                self.skipped.update({m: str(e) for m in wanted})


# ---------------------------------------------------------------- computing


class Evaluation:
    """Runs the metrics over matched pairs; fills `results` (metric -> record) and `per_sample`
    (metric -> {id: value})."""

    def __init__(self, pairs: list[tuple[Sample, Sample]], s: Settings, models: Models, console: Console):
        self.pairs, self.s, self.models, self.console = pairs, s, models, console
        self.results: dict[str, dict] = {}
        self.per_sample: dict[str, dict[str, float]] = {}
        self._embeddings: dict[tuple[str, str], np.ndarray] = {}

    def _mean(self, name: str, ids: list[str], values: list[float], **record) -> None:
        """A per-sample metric: its mean, bootstrap interval, count and per-sample values."""
        self.per_sample[name] = dict(zip(ids, values))
        ci = M.bootstrap_ci(values, 0.95, self.s.resamples, self.s.seed)
        self.results[name] = {"value": float(np.mean(values)) if values else None, "ci95": ci, "n": len(values),
                              **record}

    def run(self) -> None:
        for name in self.s.metrics:
            if name in self.models.skipped:
                continue
            with self.console.status(f"{name}..."):
                getattr(self, "_" + name)()

    # text

    def _text_pairs(self):
        pairs = [(p, r) for p, r in self.pairs if r.text.strip()]
        return pairs, {"left_out": {"empty reference text": len(self.pairs) - len(pairs)}}

    def _bleu(self, name: str, n: int) -> None:
        pairs, extra = self._text_pairs()
        preds, refs = [p.text for p, _ in pairs], [r.text for _, r in pairs]
        if self.s.compat == "minigpt5":
            self._mean(name, [p.id for p, _ in pairs], M.char_bleu(preds, refs, n),
                       definition=DEFINITIONS["char_bleu"], compat="character-level BLEU on raw strings", **extra)
        else:
            value = M.bleu(preds, refs, n) if pairs else None
            self.results[name] = {"value": value, "ci95": None, "n": len(pairs),
                                  "definition": DEFINITIONS[name], **extra}

    def _bleu1(self) -> None:
        self._bleu("bleu1", 1)

    def _bleu2(self) -> None:
        self._bleu("bleu2", 2)

    def _rouge_l(self) -> None:
        pairs, extra = self._text_pairs()
        values = M.rouge_l([p.text for p, _ in pairs], [r.text for _, r in pairs])
        self._mean("rouge_l", [p.id for p, _ in pairs], values, definition=DEFINITIONS["rouge_l"], **extra)

    def _meteor(self) -> None:
        pairs, extra = self._text_pairs()
        values = M.meteor([p.text for p, _ in pairs], [r.text for _, r in pairs], self.models.wordnet)
        self._mean("meteor", [p.id for p, _ in pairs], values, definition=DEFINITIONS["meteor"],
                   model=f"WordNet {self.models.wordnet.get_version()}", wordnet=str(self.models.wordnet.root), **extra)

    def _sbert(self) -> None:
        pairs, extra = self._text_pairs()
        values = M.sbert([p.text for p, _ in pairs], [r.text for _, r in pairs], self.models.sbert, self.s.batch_size)
        self._mean("sbert", [p.id for p, _ in pairs], values, definition=DEFINITIONS["sbert"],
                   model=self.models.sbert.name, **extra)

    # shapes world

    def _toy_attributes(self) -> None:
        """Colour, shape and position accuracy in one pass over the images."""
        from minigpt5_cli.toy import read_attributes

        def _attributes(image):
            return read_attributes(image) if image.width == image.height else None  # toy images are square

        pairs = [(p, r) for p, r in self.pairs if r.images]
        left_out = {"left_out": {"no reference image": len(self.pairs) - len(pairs)}}
        found = []
        for p, r in pairs:
            want = _attributes(r.images[0].open())
            if want is None:
                raise UserError(f"{r.images[0].where}: the shapes-world checker finds no shape in this reference "
                                "image; the toy metrics are for shapes-world data")
            got = _attributes(p.images[0].open()) if p.images else None
            found.append([got is not None and got[k] == want[k] for k in range(3)])
        for k, name in enumerate(TOY):
            if name in self.s.metrics:
                self._mean(name, [p.id for p, _ in pairs], [float(f[k]) for f in found],
                           definition=DEFINITIONS[name], **left_out)

    def _toy_colour(self) -> None:
        if not getattr(self, "_toy_done", False):
            self._toy_attributes()
            self._toy_done = True

    _toy_shape = _toy_position = _toy_colour

    def _toy_text(self) -> None:
        pairs, extra = self._text_pairs()
        values = [float(M.tokens(p.text) == M.tokens(r.text)) for p, r in pairs]
        self._mean("toy_text", [p.id for p, _ in pairs], values, definition=DEFINITIONS["toy_text"], **extra)

    # CLIP

    def _embed(self, items: list) -> np.ndarray:
        """CLIP embeddings of texts and images, each computed once, in batches."""
        keys = [("text", x) if isinstance(x, str) else ("image", x.where) for x in items]
        todo = {k: x for k, x in zip(keys, items) if k not in self._embeddings}
        texts = [k for k in todo if k[0] == "text"]
        images = [k for k in todo if k[0] == "image"]
        clip = self.models.clip
        for batch_keys, fn in ((texts, lambda ks: clip.texts([k[1] for k in ks])),
                               (images, lambda ks: clip.images([todo[k].open() for k in ks]))):
            for i in range(0, len(batch_keys), self.s.batch_size):
                chunk = batch_keys[i:i + self.s.batch_size]
                self._embeddings.update(zip(chunk, fn(chunk)))
        return np.array([self._embeddings[k] for k in keys]) if keys else np.zeros((0, 1))

    def _clip_record(self) -> dict:
        rec = {"model": self.models.clip.name}
        if self.s.compat == "minigpt5":
            rec["compat"] = ("open_clip-equivalent models: ViT-L-14 'openai' is openai/clip-vit-large-patch14, "
                             "ViT-B-32 'openai' is openai/clip-vit-base-patch32 (the same weights, through "
                             "transformers)")
        return rec

    def _clip_pairs(self, name: str, reference, missing: str) -> None:
        pairs = [(p, r) for p, r in self.pairs if p.images and reference(r)]
        left = {"no generated image": sum(not p.images for p, _ in self.pairs),
                missing: sum(bool(p.images) and not reference(r) for p, r in self.pairs)}
        gen = self._embed([p.images[0] for p, _ in pairs])
        ref = self._embed([reference(r) for _, r in pairs])
        self._mean(name, [p.id for p, _ in pairs], M.cosine(gen, ref) if pairs else [],
                   definition=DEFINITIONS[name], left_out=left, **self._clip_record())

    def _clip_i(self) -> None:
        self._clip_pairs("clip_i", lambda r: r.images[0] if r.images else None, "no reference image")

    def _clip_t(self) -> None:
        self._clip_pairs("clip_t", lambda r: r.text.strip() or None, "no reference text")

    def _mm_relevance(self) -> None:
        self._embed([x for p, r in self.pairs for x in p.elements + r.elements])  # in batches, before the pairs
        values = [M.mm_relevance(self._embed(p.elements), self._embed(r.elements)) for p, r in self.pairs]
        self._mean("mm_relevance", [p.id for p, _ in self.pairs], values, definition=DEFINITIONS["mm_relevance"],
                   **self._clip_record())

    def _mm_relevance_minigpt5(self) -> None:
        def one(x):
            return None if x is None else self._embed([x])[0]

        self._embed([x for p, r in self.pairs for s in (p, r) for x in [s.text.strip(), *s.images[:1]] if x])
        values = []
        for p, r in self.pairs:
            scores = [M.element_score(one(p.text.strip() or None), one(r.text.strip() or None)),
                      M.element_score(one(p.images[0] if p.images else None), one(r.images[0] if r.images else None))]
            values.append(M.mm_relevance_minigpt5([x for x in scores if x is not None]))
        self._mean("mm_relevance_minigpt5", [p.id for p, _ in self.pairs], values,
                   definition=DEFINITIONS["mm_relevance_minigpt5"], **self._clip_record())

    # Inception

    def _inception(self, images: list[Image]) -> tuple[np.ndarray, np.ndarray]:
        out = [M.inception_features([im.open() for im in images[i:i + self.s.batch_size]], self.models.inception,
                                    self.s.device, self.s.batch_size) for i in range(0, len(images), self.s.batch_size)]
        if not out:
            return np.zeros((0, 0)), np.zeros((0, 0))
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def _generated(self):
        """Every generated image, with the id of its sample; features computed once for FID and IS."""
        if not hasattr(self, "_gen"):
            owners = [p.id for p, _ in self.pairs for _ in p.images]
            self._gen = owners, *self._inception([im for p, _ in self.pairs for im in p.images])
        return self._gen

    def _inception_record(self) -> dict:
        return {"weights": getattr(self.models.inception, "description", "?"), "resize": INCEPTION_RESIZE}

    def _fid(self) -> None:
        stats = Path(self.s.fid_real_stats) if self.s.fid_real_stats else None
        if self.s.compat == "minigpt5" and stats is not None and stats.is_file():
            raise UserError("--compat minigpt5 computes a per-story FID from the reference images; "
                            "it cannot come from --fid-real-stats")
        owners, gen, _ = self._generated()
        real_ids = [r.id for _, r in self.pairs for _ in r.images]
        if stats is not None and stats.is_file():
            mu, sigma, n_real, real = *_read_stats(stats), None
            real_source = str(stats)
        else:
            real = self._inception([im for _, r in self.pairs for im in r.images])[0]
            if len(real) < 2:
                raise UserError(f"FID needs at least 2 reference images, found {len(real)}")
            mu, sigma = M.feature_stats(real)
            n_real, real_source = len(real), "reference images"
            if stats is not None:
                stats.parent.mkdir(parents=True, exist_ok=True)
                with stats.open("wb") as f:  # numpy would append ".npz" to a path without it
                    np.savez_compressed(f, mu=mu, sigma=sigma, n=len(real))
                real_source += f" (statistics written to {stats})"
        if len(gen) < 2:
            raise UserError(f"FID needs at least 2 generated images, found {len(gen)}")
        value = _frechet(*M.feature_stats(gen), mu, sigma, "FID")
        self.results["fid"] = {"value": value, "n_generated": len(gen), "n_reference": n_real,
                               "reference": real_source, "definition": DEFINITIONS["fid"], **self._inception_record()}
        if self.s.compat == "minigpt5":
            self._fid_per_story(owners, gen, real_ids, real)

    def _fid_per_story(self, gen_ids, gen, real_ids, real) -> None:
        def story(sid: str) -> str:
            return sid.rsplit("_", 1)[0]

        values, stories = [], sorted({story(i) for i in gen_ids})
        for name in stories:
            g = gen[[story(i) == name for i in gen_ids]]
            r = real[[story(i) == name for i in real_ids]]
            if len(g) >= 2 and len(r) >= 2:
                values.append(_frechet(*M.feature_stats(g), *M.feature_stats(r), f"per-story FID of {name!r}"))
        self.results["fid_per_story"] = {
            "value": float(np.mean(values)) if values else None, "stories": len(values),
            "left_out": {"stories with fewer than 2 generated or reference images": len(stories) - len(values)},
            "definition": DEFINITIONS["fid_per_story"], "compat": "per-story FID averaged over stories",
            **self._inception_record()}

    def _is(self) -> None:
        _, _, logits = self._generated()
        splits = min(self.s.is_splits, len(logits))
        if splits < 1:
            raise UserError("IS needs at least 1 generated image, found none")
        mean, std = M.inception_score(logits, splits)
        self.results["is"] = {"value": mean, "std": std, "splits": splits, "n_generated": len(logits),
                              "definition": DEFINITIONS["is"], **self._inception_record()}


def _frechet(mu1, sigma1, mu2, sigma2, what: str) -> float:
    try:
        return M.frechet_distance(mu1, sigma1, mu2, sigma2)
    except ValueError as e:
        raise UserError(f"{what}: the square root of the covariance product has an {e} (too few images?)") from None


def _read_stats(path: Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    try:
        with np.load(path) as f:
            return f["mu"], f["sigma"], int(f["n"]) if "n" in f else None
    except Exception as e:
        raise UserError(f"{path}: not an FID statistics file with mu and sigma ({e})") from None


# ---------------------------------------------------------------- the stage


def evaluate(predictions: str | Path, references: str | Path, s: Settings, output: str | Path,
             console: Console | None = None) -> dict:
    """Read, match, score, and write OUTPUT (metrics.json) and OUTPUT's .samples.csv beside it."""
    console = console or Console(stderr=True)
    preds, run = read_predictions(predictions)
    pairs = match(preds, read_references(references))
    models = Models(s, s.metrics)
    ev = Evaluation(pairs, s, models, console)
    ev.run()
    report = {
        "predictions": str(predictions), "references": str(references), "prediction": PREDICTION, "run": run,
        "samples": len(pairs), "compat": s.compat,
        "bootstrap": {"level": 0.95, "resamples": s.resamples, "seed": s.seed, "method": "percentile, of the mean"},
        "metrics": ev.results, "skipped": models.skipped,
    }
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    write_samples(out.with_suffix(".samples.csv"), pairs, ev.per_sample)
    return report


def write_samples(path: Path, pairs, per_sample: dict[str, dict[str, float]]) -> None:
    names = list(per_sample)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *names])
        for p, _ in pairs:
            w.writerow([p.id, *(_fmt_csv(per_sample[n].get(p.id)) for n in names)])


def _fmt_csv(v) -> str:
    return "" if v is None else repr(float(v))


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(report: dict) -> Table:
    t = Table(title=f"{report['predictions']} vs {report['references']} ({report['samples']} samples)")
    for col in ("metric", "value", "95% CI", "n", "model / weights"):
        t.add_column(col, justify="right" if col in ("value", "n") else "left")
    for name, r in report["metrics"].items():
        ci = f"[{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]" if r.get("ci95") else ""
        value = _fmt(r["value"]) + (f" ± {r['std']:.3f}" if "std" in r else "")
        n = r.get("n", r.get("stories"))
        if "n_reference" in r:
            n = f"{r['n_generated']} gen / {r['n_reference'] if r['n_reference'] is not None else '?'} ref"
        elif n is None:
            n = f"{r['n_generated']} gen"
        t.add_row(name + (" (compat)" if "compat" in r else ""), value, ci, str(n),
                  str(r.get("model") or r.get("weights") or ""))
    if report["skipped"]:
        t.caption = ("skipped, their model or data not loadable (reasons in metrics.json): "
                     + ", ".join(report["skipped"]))
    return t


# ---------------------------------------------------------------- compare


def _load_report(path: str | Path) -> dict:
    p = Path(path)
    p = p / "metrics.json" if p.is_dir() else p
    try:
        report = json.loads(p.read_text())
        report["metrics"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{p} is not a metrics.json written by evaluate") from None
    return report


def _describe(report: dict) -> str:
    run = report.get("run", {})
    model = run.get("model") or {}
    parts = [run.get("mode") or run.get("source") or "?", model.get("checkpoint") or model.get("llm") or ""]
    return " ".join(p for p in parts if p)


def compare(run_a: str | Path, run_b: str | Path) -> Table:
    """Two metrics.json side by side, with B - A for each metric both hold."""
    a, b = _load_report(run_a), _load_report(run_b)
    t = Table(title=f"A: {run_a} ({_describe(a)})\nB: {run_b} ({_describe(b)})")
    for col in ("metric", "A", "B", "B - A", "better"):
        t.add_column(col, justify="left" if col in ("metric", "better") else "right")
    notes = []
    for name in dict.fromkeys([*a["metrics"], *b["metrics"]]):
        ra, rb = a["metrics"].get(name, {}), b["metrics"].get(name, {})
        va, vb = ra.get("value"), rb.get("value")
        delta = vb - va if va is not None and vb is not None else None
        better = "" if delta is None or delta == 0 else ("B" if (delta < 0) == (name in LOWER_IS_BETTER) else "A")
        t.add_row(name, _cell(ra), _cell(rb), "-" if delta is None else f"{delta:+.4f}",
                  better + (" (lower is better)" if name in LOWER_IS_BETTER and better else ""))
        for key in ("definition", "model", "weights", "compat"):
            if ra and rb and ra.get(key) != rb.get(key):
                notes.append(f"{name}: the two runs differ in {key}")
    for label, report in (("A", a), ("B", b)):
        if report.get("skipped"):
            notes.append(f"skipped in {label}: {', '.join(report['skipped'])}")
    if a.get("samples") != b.get("samples"):
        notes.append(f"sample counts differ: {a.get('samples')} vs {b.get('samples')}")
    t.caption = "\n".join(notes) or None
    return t


def _cell(r: dict) -> str:
    if not r:
        return "-"
    ci = r.get("ci95")
    return _fmt(r.get("value")) + (f" [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]" if ci else "")
