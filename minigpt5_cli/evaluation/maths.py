"""The evaluation metrics' maths, each a function on plain inputs (strings, embeddings, arrays).

Text metrics share one tokenisation (`tokens`): lower-cased, split with `\\w+|[^\\w\\s]`.
Where a well-kept library computes a metric, it is called here (NLTK for BLEU and METEOR,
rouge-score for ROUGE-L, sentence-transformers for S-BERT, transformers for CLIP); what is ours is
the wiring, the Frechet distance (pytorch-fid's numerics), the Inception Score arithmetic, the
MM-Relevance F1 and the bootstrap. The models they need come from `loaders.py` and `wordnet.py`;
`minigpt5_cli.metrics` gathers all of it as the public Python API.

    >>> from minigpt5_cli.metrics import bleu, rouge_l, tokens
    >>> tokens("It's red.")
    ['it', "'", 's', 'red', '.']
    >>> rouge_l(["a red circle ."], ["a red square ."])
    [0.75]
    >>> round(bleu(["a red circle ."], ["a red square ."], max_n=2), 6)
    0.5
"""

from __future__ import annotations

import re
import string
import warnings

import numpy as np

TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks."""
    return TOKEN.findall(text.lower())


# ---------------------------------------------------------------- text


def bleu(predictions: list[str], references: list[str], max_n: int) -> float:
    """Corpus BLEU with uniform weights over 1..max_n-grams, one reference per prediction, no
    smoothing: NLTK's `corpus_bleu` on `tokens`."""
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():  # NLTK warns when a higher-order n-gram never matches: the score is 0
        warnings.simplefilter("ignore")
        return float(corpus_bleu([[tokens(r)] for r in references], [tokens(p) for p in predictions],
                                 weights=(1 / max_n,) * max_n))


def char_bleu(predictions: list[str], references: list[str], max_n: int) -> list[float]:
    """MiniGPT-5's MMDialog BLEU: NLTK `sentence_bleu` on the raw strings, which NLTK iterates
    character by character, so its n-grams are characters. One score per pair."""
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [float(sentence_bleu([r], p, weights=(1 / max_n,) * max_n)) if p else 0.0
                for p, r in zip(predictions, references)]


def minigpt5_clean(text: str) -> str:
    """MiniGPT-5's clean-up before its MMDialog text metrics: `###` removed, the text before the first
    `[IMG0]` kept, stripped; a string of punctuation alone becomes empty."""
    text = text.replace("###", "").split("[IMG0]")[0].strip()
    return "" if all(c in string.punctuation for c in text) else text


def rouge_l_minigpt5(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L as MiniGPT-5's scripts compute it: the `rouge` package's `rouge-l` F-measure on the raw
    strings (its own whitespace tokenisation, no lower-casing). One score per pair; 0 for an empty
    prediction, which that package refuses."""
    from rouge import Rouge

    scorer = Rouge(metrics=["rouge-l"])
    return [scorer.get_scores(p, r)[0]["rouge-l"]["f"] if p.strip() and r.strip() else 0.0
            for p, r in zip(predictions, references)]


def group_means(groups: list[str], values: list[float]) -> list[float]:
    """The mean of `values` within each group, groups in order of first appearance (MiniGPT-5 averages
    its MMDialog scores per dialog first, then over dialogs)."""
    sums: dict[str, list[float]] = {}
    for g, v in zip(groups, values):
        sums.setdefault(g, []).append(v)
    return [float(np.mean(v)) for v in sums.values()]


class _Tokenizer:
    """rouge-score's tokenizer interface over `tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """rouge-score's `rougeL` F-measure (LCS, beta 1), no stemming, on `tokens`. One score per pair."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_Tokenizer())
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def meteor(predictions: list[str], references: list[str], wordnet) -> list[float]:
    """NLTK's `meteor_score` on `tokens` (exact, Porter stem and WordNet synonym stages; alpha 0.9,
    beta 3, gamma 0.5). `wordnet` is a loaded WordNet reader (`load_wordnet`). One score per pair."""
    from nltk.translate.meteor_score import meteor_score

    pairs = [(tokens(p), tokens(r)) for p, r in zip(predictions, references)]
    return [float(meteor_score([r], p, wordnet=wordnet)) if p and r else 0.0 for p, r in pairs]


def sbert(predictions: list[str], references: list[str], model, batch_size: int = 64) -> list[float]:
    """Cosine between sentence-transformers embeddings of each prediction and its reference
    (`load_sbert`; all-MiniLM-L6-v2 by default). One score per pair."""
    a = model.encode(predictions, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    b = model.encode(references, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return cosine(a, b)


# ---------------------------------------------------------------- images


def cosine(a, b) -> list[float]:
    """Row-wise cosine similarity of two (n, d) arrays: plain cosine in [-1, 1], no scaling, no clamp."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return [float(x) for x in (a * b).sum(-1)]


def clip_i(generated_images: list, reference_images: list, clip) -> list[float]:
    """CLIP-I: cosine between the CLIP image embeddings of each generated image and its reference image."""
    return cosine(clip.images(generated_images), clip.images(reference_images))


def clip_t(generated_images: list, reference_texts: list[str], clip) -> list[float]:
    """CLIP-T: cosine between the CLIP embeddings of each generated image and its reference text."""
    return cosine(clip.images(generated_images), clip.texts(reference_texts))


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def mm_relevance(generated, reference) -> float:
    """MM-Relevance (MMDialog paper) of one response. `generated` and `reference` are the CLIP
    embeddings (rows, L2-normalised) of the responses' elements, text and images, in order.
    Elements are aligned by position; precision is the sum of the aligned cosines over the
    generated length, recall over the reference length; the result is their F1 (0 when either
    response is empty or the F1 is undefined)."""
    g, r = np.asarray(generated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if not len(g) or not len(r):
        return 0.0
    k = min(len(g), len(r))
    total = float((g[:k] * r[:k]).sum())
    return _f1(total / len(g), total / len(r))


MISSING, SPURIOUS = -1.0, -2.0  # MiniGPT-5's flags: an element only the reference has / only the prediction has


def element_score(generated, reference) -> float | None:
    """One element (the text, or the image) of a turn in MiniGPT-5's CLIP-F1: the cosine of the two
    CLIP embeddings, MISSING or SPURIOUS when one side lacks it, None when both do."""
    if generated is None and reference is None:
        return None
    if generated is None:
        return MISSING
    if reference is None:
        return SPURIOUS
    return cosine([generated], [reference])[0]


def mm_relevance_minigpt5(scores: list[float]) -> float:
    """MiniGPT-5's CLIP-F1 of one dialog from the element scores of all its turns (`element_score`, text-text
    and image-image): precision is the sum of the real scores over the elements not MISSING, recall over
    those not SPURIOUS, F1 as the script computes it, negative when the sum is; 0 when no element scored
    (or when precision + recall is 0, where the script divides by zero)."""
    real = [s for s in scores if s not in (MISSING, SPURIOUS)]
    if not real:
        return 0.0
    total = sum(real)
    precision, recall = total / sum(s != MISSING for s in scores), total / sum(s != SPURIOUS for s in scores)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# ---------------------------------------------------------------- FID and IS


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrt(sigma1 sigma2)), with pytorch-fid's
    numerics: `scipy.linalg.sqrtm`; when the root is not finite, `eps` is added to both diagonals;
    a ValueError when the imaginary part of the root's diagonal exceeds 1e-3, else it is dropped."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets of statistics have different dimensions")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # scipy warns on singular products: handled below, as pytorch-fid does
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():  # the product is nearly singular
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (n - 1) covariance of (n, d) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False)


def fid(generated_features, reference_features) -> float:
    """FID between two (n, 2048) sets of Inception pool3 features."""
    return frechet_distance(*feature_stats(generated_features), *feature_stats(reference_features))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over each of `splits` consecutive parts of the samples; the mean
    and population std over parts (torch-fidelity's; torchmetrics reports the n - 1 std). `logits`
    are Inception's without the bias, (n, classes)."""
    x = np.asarray(logits, dtype=np.float64)
    if splits < 1 or len(x) < 2 * splits:  # a split of one image scores exactly 1, whatever the image
        raise ValueError(f"{len(x)} samples cannot make {splits} splits of at least 2")
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for k in range(splits):
        part = p[k * len(p) // splits:(k + 1) * len(p) // splits]
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-30) - np.log(py + 1e-30))).sum(1)  # 0 log 0 = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_features(images: list, net, device: str = "cpu", batch_size: int = 32,
                       resize: str = "torch") -> tuple[np.ndarray, np.ndarray]:
    """Pool3 features (n, 2048) and logits without bias (n, 1008) of PIL images, each resized to
    299 x 299 and scaled to [-1, 1]: `resize` "torch" is pytorch-fid's bilinear, "tf1" torch-fidelity's
    TensorFlow 1 bilinear with its (x - 128) / 128 (`inception.to_input`)."""
    import torch

    from minigpt5_cli.evaluation.inception import to_input

    pools, logits = [], []
    for i in range(0, len(images), batch_size):
        x = torch.stack([to_input(im, resize) for im in images[i:i + batch_size]]).to(device)
        with torch.inference_mode():
            pool, logit = net(x)
        pools.append(pool.double().cpu().numpy())
        logits.append(logit.double().cpu().numpy())
    if not pools:
        return np.zeros((0, 2048)), np.zeros((0, 1008))
    return np.concatenate(pools), np.concatenate(logits)


# ---------------------------------------------------------------- confidence intervals


def bootstrap_ci(values, level: float = 0.95, resamples: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (None for no values)."""
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return None
    rng = np.random.default_rng(seed)
    means = np.concatenate([v[rng.integers(0, len(v), size=(min(100, resamples - i), len(v)))].mean(1)
                            for i in range(0, resamples, 100)])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
