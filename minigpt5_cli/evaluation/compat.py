"""`--compat minigpt5`: what MiniGPT-5's evaluation script (`metric.py`) and the data loader behind it
do differently from our definitions, reproduced on our samples.

- The text it scores is the loader's target: the response, `[IMG0]`..`[IMG7]` after it when the turn
  has an image, and ` ###` (`target_text`).
- A reference image is padded to a white square and resized to 512 x 512 before any network sees it
  (`reference_image`); a missing one is a black 512 x 512 image.
- Inception sees 8-bit images resized by TensorFlow 1's bilinear rule, (x - 128) / 128 (torchmetrics
  1.2 over torch-fidelity); FID's reference and generated images are first resized to a short side
  of 256 (`fid_image`), and its square root is torchmetrics' eigenvalue sum, with no check of an
  imaginary part (`frechet_distance`; `pytorch_fid_refuses` says what that check would have said).
  IS shuffles before its splits, torch's `chunk` sizes them, and its std has n - 1 (`inception_score`).
- MM-Relevance is one F1 per dialog over all its turns' text and image scores
  (`maths.mm_relevance_minigpt5`), on the cleaned texts.
"""

from __future__ import annotations

import re

import numpy as np

from minigpt5_cli.evaluation import maths as M

IMG_TOKENS = "".join(f"[IMG{i}]" for i in range(8))
REFERENCE_SIDE, FID_SIDE = 512, 256


def target_text(text: str, has_image: bool) -> str:
    """The loader's target string for a response: its text, the image tokens when it has an image, ` ###`."""
    return " ".join(x for x in (text.strip(), IMG_TOKENS if has_image else "") if x) + " ###"


def target(sample) -> str:
    """The loader's target string for a reference sample (`target_text`)."""
    return target_text(sample.text, bool(sample.images))


def dialog_step(sample_id: str) -> tuple[str, str]:
    """The script's (dialog, step) of an id `DIALOG_STEP[-TASK]` (its `123_4-mm`, `story_3-gen`): the id
    without a `-TASK` suffix, split at its last '_'. An id without '_' (ours: one sample per dialog,
    MMDialog's ids negative numbers, which the script's own split would lose) is its own dialog."""
    head = re.sub(r"-[A-Za-z]+$", "", sample_id)
    dialog, _, step = head.rpartition("_")
    return (dialog, step) if dialog else (head, "")


class Seen:
    """A picture as the script hands it to a network: `chain` (a function of the decoded image) applied
    to `picture` (None: the loader's black stand-in for a missing image). Keyed apart from the picture
    itself, so the feature caches hold both."""

    def __init__(self, picture, chain):
        self.picture, self.chain = picture, chain
        self.where = f"{picture.where if picture else 'no image'} (as MiniGPT-5 sees it: {chain.__name__})"

    def open(self, size: int | None = None):
        from PIL import Image

        image = self.picture.open() if self.picture else Image.new("RGB", (REFERENCE_SIDE, REFERENCE_SIDE))
        return self.chain(image)


def reference(sample, chain=None) -> Seen:
    """A reference sample's first image as the script hands it over (`reference_image`, or `chain`);
    the loader's black stand-in when it has none."""
    return Seen(sample.images[0] if sample.images else None, chain or reference_image)


def reference_image(image):
    """The loader's reference image: padded to a square with white (centred), resized to 512 x 512
    (bilinear); its trip through a float tensor and back to 8 bits loses nothing."""
    from PIL import Image

    w, h = image.size
    if w != h:
        square = Image.new(image.mode, (max(w, h),) * 2, (255, 255, 255))
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        image = square
    return image.resize((REFERENCE_SIDE, REFERENCE_SIDE), Image.BILINEAR)


def fid_image(image):
    """FID's resize before Inception: the short side to 256, the long side scaled and truncated (bilinear)."""
    from PIL import Image

    w, h = image.size
    size = (FID_SIDE, int(FID_SIDE * h / w)) if w <= h else (int(FID_SIDE * w / h), FID_SIDE)
    return image.resize(size, Image.BILINEAR)


def reference_for_fid(image):
    """A reference image as FID sees it: the loader's chain, then FID's resize."""
    return fid_image(reference_image(image))


def frechet_distance(real, generated) -> float:
    """torchmetrics' FID of two (n, d) feature sets: ||mu_r - mu_g||^2 + Tr(S_r) + Tr(S_g) - 2 * (the sum of
    the real parts of the square roots of the eigenvalues of S_r S_g), n - 1 covariances. With fewer
    samples than dimensions (a story's few images), the product is taken in the span of the centred
    features, where its nonzero eigenvalues all lie: the same value without a d x d eigensolve, less the
    rounding noise the script's d - n zero eigenvalues add to its sum."""
    real, generated = np.asarray(real, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    diff = real.mean(0) - generated.mean(0)
    a = (real - real.mean(0)) / np.sqrt(len(real) - 1)
    b = (generated - generated.mean(0)) / np.sqrt(len(generated) - 1)
    if len(a) + len(b) < a.shape[1]:
        basis = np.linalg.qr(np.concatenate([a, b]).T)[0]  # (d, k), orthonormal
        a, b = a @ basis, b @ basis
    s1, s2 = a.T @ a, b.T @ b
    root = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * root)


def pytorch_fid_refuses(real, generated) -> bool:
    """Whether pytorch-fid's check (an imaginary part above 1e-3 on the diagonal of the root) refuses this
    FID, which the script never checks. A d x d matrix square root."""
    try:
        M.frechet_distance(*M.feature_stats(real), *M.feature_stats(generated))
    except ValueError:
        return True
    return False


def inception_score(logits, splits: int, seed: int) -> tuple[float, float | None, int]:
    """torchmetrics' IS: the samples shuffled (torch.randperm with a generator seeded `seed`), cut by
    torch's `chunk` into at most `splits` parts of ceil(n / splits), exp(mean KL) per part; the mean and
    the n - 1 std over parts (None for one part), and the number of parts."""
    import torch

    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
    scores = []
    for part in x.chunk(splits, dim=0):
        p, log_p = part.softmax(1), part.log_softmax(1)
        scores.append(float((p * (log_p - p.mean(0, keepdim=True).log())).sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if len(scores) > 1 else None, len(scores)
