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
from minigpt5_cli.evaluation import compat as C
from minigpt5_cli.evaluation import maths as M
from minigpt5_cli.evaluation.result import Result

TOKENS = r"lower-cased, split with \w+|[^\w\s]"
INCEPTION_RESIZE = ("each image resized to 299x299 with torch bilinear interpolation (align_corners=False, no "
                    "antialias) as pytorch-fid does, inputs scaled to [-1, 1]")
COMPAT_TEXT = ("MiniGPT-5's MMDialog handling: both texts cleaned (### removed, the text before [IMG0] kept, "
               "stripped, punctuation alone made empty), pairs with an empty reference left out, 0 for an empty "
               "prediction, averaged per dialog (the id, less a '-TASK' suffix, before its last '_') and then over "
               "dialogs")


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
    dialogs = M.group_means([C.dialog_step(i)[0] for i in ids], values)
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
    if run.s.compat == "minigpt5":
        return _clip_pairs_minigpt5(run, name)
    pairs = [(p, r) for p, r in run.pairs if p.images and reference(r)]
    left = {"no generated image": sum(not p.images for p, _ in run.pairs),
            missing: sum(bool(p.images) and not reference(r) for p, r in run.pairs)}
    gen = run.clip([p.images[0] for p, _ in pairs])
    ref = run.clip([reference(r) for _, r in pairs])
    run.mean(name, [p.id for p, _ in pairs], M.cosine(gen, ref) if pairs else [], left_out=left, **_clip_fields(run))


def _clip_pairs_minigpt5(run, name: str) -> None:
    """CLIP-I / CLIP-T as the original scores VIST: every sample with a generated image, against its
    reference image as the loader hands it over (C.reference_image; black when it has none) or against
    the loader's target text (image tokens and ### included)."""
    pairs = [(p, r) for p, r in run.pairs if p.images]
    if name == "clip_i":
        ref = run.clip([C.reference(r) for _, r in pairs])
        how = "the reference image padded to a white square and resized to 512 x 512 (black when missing)"
    else:
        ref = run.clip([C.target(r) for _, r in pairs])
        how = "the reference text as the loader's target: [IMG0]..[IMG7] after it when it has an image, then ###"
    gen = run.clip([p.images[0] for p, _ in pairs])
    fields = _clip_fields(run)
    run.mean(name, [p.id for p, _ in pairs], M.cosine(gen, ref) if pairs else [],
             left_out={"no generated image": len(run.pairs) - len(pairs)},
             **fields | {"compat": f"{fields['compat']}; {how}"})


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


@metric("mm_relevance_minigpt5", "MiniGPT-5's CLIP-F1 variant of MM-Relevance, as its MMDialog script computes "
                                 "it: per turn, CLIP cosines of the cleaned texts and of the first images; an "
                                 "element only the reference has is missing (-1), one only the prediction has is "
                                 "spurious (-2), an image expected when the loader's target holds [IMG0]; per "
                                 "dialog (the id, less a '-TASK' suffix, before its last '_'), over all its turns, "
                                 "precision = sum / elements not missing, recall = sum / elements not spurious, F1 "
                                 "(negative when the sum is); mean over dialogs", needs="clip", in_all=False)
def _mm_relevance_minigpt5(run) -> None:
    # (dialog, step, predicted text, reference text, generated image, reference image), as the script has them
    rows = []
    for p, r in run.pairs:
        target = C.target(r)
        wanted = "[IMG0]" in target  # the script expects an image from its target string
        rows.append((*C.dialog_step(p.id), M.minigpt5_clean(p.text) or None, M.minigpt5_clean(target) or None,
                     p.images[0] if p.images else None, C.reference(r) if wanted else None))
    run.clip([x for row in rows for x in row[2:] if x is not None])  # in batches, before the turns
    turns: dict[str, dict[str, dict[str, float]]] = {}  # dialog -> step -> "text"/"image" -> score; later ids win
    for dialog, step, *elements in rows:
        scores = turns.setdefault(dialog, {}).setdefault(step, {})
        for key, gen, ref in (("text", *elements[:2]), ("image", *elements[2:])):
            score = M.element_score(run.clip.one(gen), run.clip.one(ref))
            if score is not None:
                scores[key] = score
    values = [M.mm_relevance_minigpt5([s for step in steps.values() for s in step.values()])
              for steps in turns.values()]
    run.results["mm_relevance_minigpt5"] = Result(
        float(np.mean(values)) if values else None, METRICS["mm_relevance_minigpt5"].definition, n=len(run.pairs),
        interval=run.bootstrap(values), counts={"dialogs": len(values)}, details={"ci_over": "dialogs"},
        **_clip_fields(run))


# ---------------------------------------------------------------- Inception


def _inception_fields(run, **details) -> dict:
    """The Inception metrics' weights, and the resize and `details` to record beside them."""
    return {"weights": getattr(run.models.inception, "description", "?"),
            "details": {"resize": INCEPTION_RESIZE, **details}}


def _generated(run):
    """The Inception features and logits of every generated image."""
    return run.inception([im for p, _ in run.pairs for im in p.images])


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
    if s.compat == "minigpt5":  # (Settings.check refuses --fid-real-stats with it)
        return _fid_minigpt5(run)
    gen = _generated(run)[0]
    if stats is not None and stats.is_file():
        mu, sigma, n_real = _read_stats(stats)
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


result("fid_per_story", "MiniGPT-5 compatibility: FID computed separately for each story (the id, less a "
                        "'-TASK' suffix, before its last '_'), over stories with more than one step, then "
                        "averaged. Covariances of a few 2048-d features are rank-deficient: the number is not a "
                        "meaningful FID, and pytorch-fid's imaginary-part check, a test of rounding noise there, is "
                        "not run per story",
       lower_is_better=True)

COMPAT_FID = ("torchmetrics 1.2's FID as MiniGPT-5's VIST script calls it: the samples with a generated image, "
              "against their reference images as the loader hands them over (padded to a white square, 512 x 512; "
              "black when missing); both resized to a short side of 256 (bilinear, 8 bits), then to 299 x 299 by "
              "TensorFlow 1's bilinear rule, (x - 128) / 128; the root's trace as the sum of the real parts of the "
              "square roots of the eigenvalues of sigma_real sigma_gen, no check of an imaginary part")
COMPAT_RESIZE = "8-bit images resized to 299 x 299 by TensorFlow 1's bilinear rule (torch-fidelity), (x - 128) / 128"


def _compat_inception(run):
    """The Inception features as torchmetrics computes them (C: TensorFlow 1's resize), cached apart."""
    from minigpt5_cli.evaluation.features import InceptionFeatures

    if "inception_tf1" not in run.memo:
        run.memo["inception_tf1"] = InceptionFeatures(run.models.inception, run.s.device, run.s.batch_size,
                                                      resize="tf1")
    return run.memo["inception_tf1"]


def _fid_minigpt5(run) -> None:
    pairs = [(p, r) for p, r in run.pairs if p.images]
    features = _compat_inception(run)
    gen = features([C.Seen(p.images[0], C.fid_image) for p, _ in pairs])[0]
    real = features([C.reference(r, C.reference_for_fid) for _, r in pairs])[0]
    if len(gen) < 2:
        raise UserError(f"FID needs at least 2 generated images, found {len(gen)}")
    refused = C.pytorch_fid_refuses(real, gen)
    check = "would refuse it: the root has an imaginary part above 1e-3" if refused else "passes"
    run.results["fid"] = Result(C.frechet_distance(real, gen), METRICS["fid"].definition,
                                counts={"n_generated": len(gen), "n_reference": len(real)}, compat=COMPAT_FID,
                                **_inception_fields(run, pytorch_fid_check=check, resize=COMPAT_RESIZE))
    if refused:
        run.console.print("[yellow]warning:[/] pytorch-fid's check would refuse this FID (an imaginary part of "
                          "the root above 1e-3); --compat minigpt5 reports it as the original does")
    steps: dict[str, dict[str, int]] = {}  # story -> step -> row in gen/real; a later id of a step wins
    for k, (p, _) in enumerate(pairs):
        story, step = C.dialog_step(p.id)
        steps.setdefault(story, {})[step] = k
    values = [C.frechet_distance(real[rows], gen[rows])
              for rows in (list(v.values()) for v in steps.values()) if len(rows) > 1]
    run.results["fid_per_story"] = Result(
        float(np.mean(values)) if values else None, METRICS["fid_per_story"].definition,
        counts={"stories": len(values)},
        left_out={"stories with one step": len(steps) - len(values),
                  "samples without a generated image": len(run.pairs) - len(pairs)},
        compat="per-story FID averaged over stories, " + COMPAT_FID.split(": ", 1)[1],
        **_inception_fields(run, resize=COMPAT_RESIZE))


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
    if run.s.compat == "minigpt5":
        return _is_minigpt5(run)
    logits = _generated(run)[1]
    if len(logits) < 2:
        raise UserError(f"IS needs at least 2 generated images, found {len(logits)}")
    splits = min(run.s.is_splits, len(logits) // 2)  # a split of one image would score exactly 1
    if splits < run.s.is_splits:
        run.console.print(f"[yellow]warning:[/] IS over {splits} splits, not {run.s.is_splits}: "
                          f"{len(logits)} generated images make no more splits of at least 2")
    mean, std = M.inception_score(logits, splits)
    run.results["is"] = Result(mean, METRICS["is"].definition, std=std, counts={"n_generated": len(logits)},
                               **_inception_fields(run, splits=splits))


def _is_minigpt5(run) -> None:
    images = [p.images[0] for p, _ in run.pairs if p.images]
    if not images:
        raise UserError("IS needs at least 1 generated image, found 0")
    logits = _compat_inception(run)(images)[1]
    mean, std, parts = C.inception_score(logits, run.s.is_splits, run.s.seed)
    run.results["is"] = Result(
        mean, METRICS["is"].definition, std=std, counts={"n_generated": len(logits)},
        compat=f"torchmetrics 1.2's IS as MiniGPT-5's scripts call it: each sample's first generated image, "
               f"{COMPAT_RESIZE}; the logits shuffled (torch.randperm seeded with --seed {run.s.seed}), split by "
               f"torch.chunk into at most {run.s.is_splits} parts of ceil(n / {run.s.is_splits}); std with n - 1",
        **_inception_fields(run, splits=parts, resize=COMPAT_RESIZE))


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
