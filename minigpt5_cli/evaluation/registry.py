"""The metric registry: every metric declared once, with its name, definition, direction, the model it
needs and the function that computes it over a scoring run's matched pairs.

A metric's function takes the run (`evaluate.Scoring`: pairs, settings, models, feature caches)
and records its `Result` there: with `run.mean` for a per-sample mean, else in `run.results`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from minigpt5_cli.errors import UserError
from minigpt5_cli.evaluation import maths as M
from minigpt5_cli.evaluation.result import Result

TOKENS = r"lower-cased, split with \w+|[^\w\s]"
INCEPTION_RESIZE = ("each image resized to 299x299 with torch bilinear interpolation (align_corners=False, no "
                    "antialias) as pytorch-fid does, inputs scaled to [-1, 1]")
COMPAT_TEXT = ("MiniGPT-5's MMDialog handling: both texts cleaned (### removed, the text before [IMG0] kept, "
               "stripped, punctuation alone made empty), pairs with an empty reference left out, 0 for an empty "
               "prediction, averaged per dialog (the id before its last '_') and then over dialogs")


@dataclass(frozen=True)
class Metric:
    name: str
    definition: str
    compute: Callable | None  # None: a result another metric's function records
    needs: str | None = None  # the model loaded for it: clip, sbert, wordnet or inception
    lower_is_better: bool = False
    in_all: bool = True  # part of the preset `all`
    selectable: bool = True  # may be asked for with --metrics


METRICS: dict[str, Metric] = {}


def metric(name: str, definition: str, **kw):
    def register(fn):
        METRICS[name] = Metric(name, definition, fn, **kw)
        return fn
    return register


def result(name: str, definition: str, **kw) -> None:
    """A result recorded by another metric's function (declared for its definition and direction)."""
    METRICS[name] = Metric(name, definition, None, selectable=False, in_all=False, **kw)


def story_of(sample_id: str) -> str:
    """The story (or dialog) a sample belongs to: its id before the last '_' (the original's story_step ids)."""
    return sample_id.rsplit("_", 1)[0]


# ---------------------------------------------------------------- text


def _text_pairs(run):
    """The pairs whose reference has text, and how many were left out."""
    pairs = [(p, r) for p, r in run.pairs if r.text.strip()]
    return pairs, {"empty reference text": len(run.pairs) - len(pairs)}


def _compat_text(run, name: str, score, definition: str, label: str, **fields) -> None:
    """A text metric as MiniGPT-5's MMDialog script computes it (COMPAT_TEXT)."""
    cleaned = [(p.id, M.minigpt5_clean(p.text), M.minigpt5_clean(r.text)) for p, r in run.pairs]
    kept = [c for c in cleaned if c[2]]
    scored = [i for i, (_, pred, _) in enumerate(kept) if pred]
    values = [0.0] * len(kept)
    for i, v in zip(scored, score([kept[i][1] for i in scored], [kept[i][2] for i in scored]) if scored else []):
        values[i] = float(v)
    ids = [c[0] for c in kept]
    dialogs = M.group_means([story_of(i) for i in ids], values)
    run.results[name] = Result(
        float(np.mean(dialogs)) if dialogs else None, f"{definition}; {COMPAT_TEXT}", n=len(values),
        interval=run.bootstrap(dialogs), per_item=dict(zip(ids, values)), counts={"dialogs": len(dialogs)},
        left_out={"empty reference text (after the clean-up)": len(cleaned) - len(kept)}, compat=label,
        details={"ci_over": "dialogs"}, **fields)


def _bleu(run, name: str, n: int) -> None:
    if run.s.compat == "minigpt5":
        return _compat_text(run, name, lambda p, r: M.char_bleu(p, r, n), METRICS["char_bleu"].definition,
                            "character-level BLEU on the cleaned raw strings, per dialog")
    pairs, left = _text_pairs(run)
    value = M.bleu([p.text for p, _ in pairs], [r.text for _, r in pairs], n) if pairs else None
    run.results[name] = Result(value, METRICS[name].definition, n=len(pairs), left_out=left)  # no interval: not a mean


@metric("bleu1", f"corpus BLEU over 1-grams, one reference per sample, no smoothing: NLTK corpus_bleu on tokens "
                 f"({TOKENS})")
def _bleu1(run) -> None:
    _bleu(run, "bleu1", 1)


@metric("bleu2", f"corpus BLEU, uniform weights over 1- and 2-grams, one reference per sample, no smoothing: NLTK "
                 f"corpus_bleu on tokens ({TOKENS})")
def _bleu2(run) -> None:
    _bleu(run, "bleu2", 2)


result("char_bleu", "MiniGPT-5 compatibility: NLTK sentence_bleu on the raw strings, which NLTK iterates character "
                    "by character (character n-grams), no smoothing")


@metric("rouge_l", f"mean over samples of rouge-score's rougeL F-measure (LCS, beta 1), no stemming, on tokens "
                   f"({TOKENS})")
def _rouge_l(run) -> None:
    if run.s.compat == "minigpt5":
        return _compat_text(run, "rouge_l", M.rouge_l_minigpt5, METRICS["rouge_l_rouge"].definition,
                            "the rouge package's ROUGE-L on the cleaned raw strings, per dialog")
    pairs, left = _text_pairs(run)
    values = M.rouge_l([p.text for p, _ in pairs], [r.text for _, r in pairs])
    run.mean("rouge_l", [p.id for p, _ in pairs], values, left_out=left)


result("rouge_l_rouge", "MiniGPT-5 compatibility: the `rouge` package's rouge-l F-measure on the raw strings (its "
                        "whitespace tokenisation, no lower-casing), as the original scripts call it")


@metric("meteor", f"mean over samples of NLTK meteor_score (exact, Porter stem and WordNet 3.0 synonym stages; alpha "
                  f"0.9, beta 3, gamma 0.5) on tokens ({TOKENS})", needs="wordnet")
def _meteor(run) -> None:
    pairs, left = _text_pairs(run)
    wordnet = run.models.wordnet
    values = M.meteor([p.text for p, _ in pairs], [r.text for _, r in pairs], wordnet)
    run.mean("meteor", [p.id for p, _ in pairs], values, model=f"WordNet {wordnet.get_version()}",
             details={"wordnet": str(wordnet.root)}, left_out=left)


@metric("sbert", "mean over samples of the cosine between sentence-transformers embeddings of the predicted and the "
                 "reference text", needs="sbert")
def _sbert(run) -> None:
    model = run.models.sbert
    if run.s.compat == "minigpt5":
        return _compat_text(run, "sbert", lambda p, r: M.sbert(p, r, model, run.s.batch_size),
                            METRICS["sbert"].definition, "S-BERT cosine on the cleaned strings, per dialog",
                            model=model.name)
    pairs, left = _text_pairs(run)
    values = M.sbert([p.text for p, _ in pairs], [r.text for _, r in pairs], model, run.s.batch_size) if pairs else []
    run.mean("sbert", [p.id for p, _ in pairs], values, model=model.name, left_out=left)


# ---------------------------------------------------------------- CLIP


def _clip_fields(run) -> dict:
    """The CLIP metrics' model, and under --compat minigpt5 the open_clip name it equals."""
    compat = ("open_clip-equivalent models: ViT-L-14 'openai' is openai/clip-vit-large-patch14, ViT-B-32 'openai' is "
              "openai/clip-vit-base-patch32 (the same weights, through transformers)")
    return {"model": run.models.clip.name, "compat": compat if run.s.compat == "minigpt5" else None}


def _clip_pairs(run, name: str, reference, missing: str) -> None:
    pairs = [(p, r) for p, r in run.pairs if p.images and reference(r)]
    left = {"no generated image": sum(not p.images for p, _ in run.pairs),
            missing: sum(bool(p.images) and not reference(r) for p, r in run.pairs)}
    gen = run.clip([p.images[0] for p, _ in pairs])
    ref = run.clip([reference(r) for _, r in pairs])
    run.mean(name, [p.id for p, _ in pairs], M.cosine(gen, ref) if pairs else [], left_out=left, **_clip_fields(run))


@metric("clip_i", "mean over samples of the plain cosine (no x100, no clamp) between transformers CLIP image "
                  "embeddings of the first generated image and the reference image", needs="clip")
def _clip_i(run) -> None:
    _clip_pairs(run, "clip_i", lambda r: r.images[0] if r.images else None, "no reference image")


@metric("clip_t", "mean over samples of the plain cosine (no x100, no clamp) between the transformers CLIP image "
                  "embedding of the first generated image and the CLIP text embedding of the reference text "
                  "(truncated to the model's context)", needs="clip")
def _clip_t(run) -> None:
    _clip_pairs(run, "clip_t", lambda r: r.text.strip() or None, "no reference text")


@metric("mm_relevance", "MMDialog's MM-Relevance: the elements (text, images, in order) of the response and of the "
                        "reference are aligned by position and scored by CLIP cosine; precision = sum / generated "
                        "elements, recall = sum / reference elements; F1 per sample, mean over samples", needs="clip")
def _mm_relevance(run) -> None:
    run.clip([x for p, r in run.pairs for x in p.elements + r.elements])  # in batches, before the pairs
    values = [M.mm_relevance(run.clip(p.elements), run.clip(r.elements)) for p, r in run.pairs]
    run.mean("mm_relevance", [p.id for p, _ in run.pairs], values, **_clip_fields(run))


@metric("mm_relevance_minigpt5", "MiniGPT-5's CLIP-F1 variant of MM-Relevance: per sample (one dialog turn), CLIP "
                                 "cosines text-text and image-image (first image); an element only the reference has "
                                 "is missing (-1), one only the prediction has is spurious (-2); precision = sum / "
                                 "elements not missing, recall = sum / elements not spurious; F1 per sample, mean "
                                 "over samples", needs="clip", in_all=False)
def _mm_relevance_minigpt5(run) -> None:
    run.clip([x for p, r in run.pairs for s in (p, r) for x in [s.text.strip(), *s.images[:1]] if x])
    values = []
    for p, r in run.pairs:
        scores = [M.element_score(run.clip.one(p.text.strip() or None), run.clip.one(r.text.strip() or None)),
                  M.element_score(run.clip.one(p.images[0] if p.images else None),
                                  run.clip.one(r.images[0] if r.images else None))]
        values.append(M.mm_relevance_minigpt5([x for x in scores if x is not None]))
    run.mean("mm_relevance_minigpt5", [p.id for p, _ in run.pairs], values, **_clip_fields(run))


# ---------------------------------------------------------------- Inception


def _inception_fields(run, **details) -> dict:
    """The Inception metrics' weights, and the resize and `details` to record beside them."""
    return {"weights": getattr(run.models.inception, "description", "?"),
            "details": {**details, "resize": INCEPTION_RESIZE}}


def _generated(run):
    """Every generated image with the id of its sample, and their Inception features and logits."""
    owners = [p.id for p, _ in run.pairs for _ in p.images]
    return owners, *run.inception([im for p, _ in run.pairs for im in p.images])


def _frechet(mu1, sigma1, mu2, sigma2) -> tuple[float | None, str | None]:
    """The distance, or None and why it cannot be computed (a large imaginary part of the root)."""
    try:
        return M.frechet_distance(mu1, sigma1, mu2, sigma2), None
    except ValueError as e:
        return None, f"the square root of the covariance product has an {e} (too few images?)"


@metric("fid", "Frechet distance between Gaussians (mean, n-1 covariance) fitted to Inception-v3 pool3 features "
               "(2048) of all generated images and of all reference images; pytorch-fid numerics (scipy sqrtm, "
               "1e-6 retry, imaginary-part check). Biased and noisy below a few thousand images",
        needs="inception", lower_is_better=True)
def _fid(run) -> None:
    s = run.s
    stats = Path(s.fid_real_stats) if s.fid_real_stats else None
    if s.compat == "minigpt5" and stats is not None and stats.is_file():
        raise UserError("--compat minigpt5 computes a per-story FID from the reference images; "
                        "it cannot come from --fid-real-stats")
    owners, gen, _ = _generated(run)
    real_ids = [r.id for _, r in run.pairs for _ in r.images]
    if stats is not None and stats.is_file():
        mu, sigma, n_real, real = *_read_stats(stats), None
        real_source = str(stats)
    else:
        real = run.inception([im for _, r in run.pairs for im in r.images])[0]
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
    value, why = _frechet(*M.feature_stats(gen), mu, sigma)
    run.results["fid"] = Result(value, METRICS["fid"].definition, not_computable=why,
                                counts={"n_generated": len(gen), "n_reference": n_real},
                                **_inception_fields(run, reference=real_source))
    if why:
        run.console.print(f"[yellow]warning:[/] FID not computable: {why}")
    if s.compat == "minigpt5":
        _fid_per_story(run, owners, gen, real_ids, real)


result("fid_per_story", "MiniGPT-5 compatibility: FID computed separately for each story, samples grouped by the id "
                        "before its last '_' (the original's story_step ids), over stories with at least 2 generated "
                        "and 2 reference images, then averaged. Covariances of a few 2048-d features are "
                        "rank-deficient: the number is not a meaningful FID", lower_is_better=True)


def _fid_per_story(run, gen_ids, gen, real_ids, real) -> None:
    values, failed, stories = [], [], sorted({story_of(i) for i in gen_ids})
    for name in stories:
        g = gen[[story_of(i) == name for i in gen_ids]]
        r = real[[story_of(i) == name for i in real_ids]]
        if len(g) < 2 or len(r) < 2:
            continue
        value, _ = _frechet(*M.feature_stats(g), *M.feature_stats(r))
        if value is None:
            failed.append(name)  # one story's FID is not computable: the others still are
        else:
            values.append(value)
    small = len(stories) - len(values) - len(failed)
    run.results["fid_per_story"] = Result(
        float(np.mean(values)) if values else None, METRICS["fid_per_story"].definition,
        counts={"stories": len(values)},
        left_out={"stories with fewer than 2 generated or reference images": small,
                  "stories whose FID is not computable (a large imaginary part of the root)": len(failed)},
        compat="per-story FID averaged over stories", **_inception_fields(run))
    if failed:
        run.console.print(f"[yellow]warning:[/] per-story FID not computable for {len(failed)} stories "
                          f"(e.g. {failed[0]!r}); averaged over the other {len(values)}")


def _read_stats(path: Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    try:
        with np.load(path) as f:
            return f["mu"], f["sigma"], int(f["n"]) if "n" in f else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not an FID statistics file with mu and sigma ({e})") from None


@metric("is", "Inception Score: exp(E_x KL(p(y|x) || p(y))) from Inception-v3 logits without the bias, over all "
              "generated images in consecutive splits of at least 2 images; mean and population std over splits",
        needs="inception")
def _is(run) -> None:
    _, _, logits = _generated(run)
    if len(logits) < 2:
        raise UserError(f"IS needs at least 2 generated images, found {len(logits)}")
    splits = min(run.s.is_splits, len(logits) // 2)  # a split of one image would score exactly 1
    if splits < run.s.is_splits:
        run.console.print(f"[yellow]warning:[/] IS over {splits} splits, not {run.s.is_splits}: "
                          f"{len(logits)} generated images make no more splits of at least 2")
    mean, std = M.inception_score(logits, splits)
    run.results["is"] = Result(mean, METRICS["is"].definition, std=std, counts={"n_generated": len(logits)},
                               **_inception_fields(run, splits=splits))


# ---------------------------------------------------------------- shapes world

TOY = ("colour", "shape", "position")


def _toy_attributes(run) -> None:
    """Colour, shape and position accuracy, all three in one pass over the images."""
    from minigpt5_cli.toyworld.world import read_attributes

    if run.memo.get("toy"):
        return
    run.memo["toy"] = True

    def attributes(image):
        return read_attributes(image) if image.width == image.height else None  # toy images are square

    pairs = [(p, r) for p, r in run.pairs if r.images]
    left = {"no reference image": len(run.pairs) - len(pairs)}
    found = []
    for p, r in pairs:
        want = attributes(r.images[0].open())
        if want is None:
            raise UserError(f"{r.images[0].where}: the shapes-world checker finds no shape in this reference "
                            "image; the toy metrics are for shapes-world data")
        got = attributes(p.images[0].open()) if p.images else None
        found.append([got is not None and got[k] == want[k] for k in range(3)])
    for k, attr in enumerate(TOY):
        if f"toy_{attr}" in run.s.metrics:
            run.mean(f"toy_{attr}", [p.id for p, _ in pairs], [float(f[k]) for f in found], left_out=left)


for _attr in TOY:
    metric(f"toy_{_attr}", f"shapes world: share of samples whose first generated image shows the reference image's "
                           f"{_attr}, both read from pixels by minigpt5_cli.toyworld.world.read_attributes (exact on "
                           f"the renders); a missing or unreadable generated image counts as wrong",
           in_all=False)(_toy_attributes)


@metric("toy_text", f"shapes world: share of samples whose generated text equals the reference text ({TOKENS})",
        in_all=False)
def _toy_text(run) -> None:
    pairs, left = _text_pairs(run)
    values = [float(M.tokens(p.text) == M.tokens(r.text)) for p, r in pairs]
    run.mean("toy_text", [p.id for p, _ in pairs], values, left_out=left)


PRESETS = {
    "vist": ["clip_i", "clip_t", "fid", "is", "rouge_l", "meteor", "sbert"],
    "mmdialog": ["bleu1", "bleu2", "rouge_l", "sbert", "mm_relevance", "is"],
    "cc3m": ["clip_i", "clip_t", "fid", "is"],
    "toy": [f"toy_{a}" for a in TOY] + ["toy_text"],
    "all": [m.name for m in METRICS.values() if m.in_all],
}
SELECTABLE = [m.name for m in METRICS.values() if m.selectable]
