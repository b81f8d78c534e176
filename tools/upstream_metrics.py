"""Run MiniGPT-5's own `metric.py` (eric-ai-lab/MiniGPT-5) on the committed fixture, to give the values that
`evaluate --compat minigpt5` must reproduce.

Runs in the upstream's own environment, never in ours (our package is read only for the stand-in
Inception weights' key layout):

    python3.11 -m venv /tmp/upstream-venv
    /tmp/upstream-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 torchmetrics==1.2.1 \\
        torch-fidelity==0.3.0 rouge nltk==3.10.4 lightning pandas scipy pillow
    /tmp/upstream-venv/bin/python tools/upstream_metrics.py --upstream PATH/TO/MiniGPT-5 \\
        --out tests/fixtures/minigpt5_metrics/expected.json

torchmetrics 1.2 is what was current when the upstream code was published; from 1.4 on, its Inception
resizes with antialiasing instead of TensorFlow 1's rule. `metric.py` is imported and its functions
called unchanged; around it: open_clip and sentence-transformers are stand-ins (`standins.py`, a fixed
vector per input; no weights can be downloaded here), Inception has random weights (`standins.py`) in
torch-fidelity's cache, `.cuda()` is the identity (no GPU needed), the prediction files are read with
torch's full unpickler (as torch 2.0 did), and torchmetrics' IS shuffle is seeded with 0 right before
it runs (upstream's depends on its global random state at that moment). The predictions are built as
the upstream loader builds them: targets `TEXT [IMG0]..[IMG7] ###` / `TEXT ###`, reference images
through its `expand2square` (white) and its test transform (Resize 512 bilinear, CenterCrop 512,
ToTensor), zeros when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURE = REPO / "tests" / "fixtures" / "minigpt5_metrics"
SETS = {"dialog": "mmdialog_calculate_metrics", "story": "vist_calculate_metrics"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stand_ins() -> None:
    """open_clip and sentence_transformers as `standins` vectors."""
    import torch

    sys.path.insert(0, str(HERE))
    import standins

    class Tokens:
        def __init__(self, text):
            self.text = text

        def to(self, device):
            return self

    class Model:
        def encode_text(self, tokens):
            return torch.tensor(standins.vector(standins.text_key(tokens.text)))[None].float()

        def encode_image(self, pixels):
            return torch.tensor(standins.vector(standins.image_key(pixels[0].numpy())))[None].float()

    def preprocess(image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy())

    open_clip = types.ModuleType("open_clip")
    open_clip.create_model_and_transforms = lambda name, pretrained=None, device=None: (Model(), None, preprocess)
    open_clip.get_tokenizer = lambda name: Tokens
    sys.modules["open_clip"] = open_clip

    class SentenceTransformer:
        def __init__(self, name, *a, **k):
            pass

        def encode(self, text, convert_to_tensor=True, **_):
            return torch.tensor(standins.vector(standins.text_key(text)))

    st = types.ModuleType("sentence_transformers")
    st.SentenceTransformer = SentenceTransformer
    st.util = types.SimpleNamespace(
        pytorch_cos_sim=lambda a, b: torch.nn.functional.cosine_similarity(a[None], b[None]))
    sys.modules["sentence_transformers"] = st

    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self


def _predictions(name: str, upstream, transform) -> list[tuple]:
    """The fixture's pairs as the upstream's predict_step returns them."""
    import torch
    from PIL import Image

    preds = {r["id"]: r for r in read_jsonl(FIXTURE / f"{name}_pred.jsonl")}
    out = []
    for ref in read_jsonl(FIXTURE / f"{name}_ref.jsonl"):
        pred = preds[ref["id"]]
        target = f"{ref['text']} {upstream.ALL_IMG_TOKENS_STR}" if ref.get("images") else ref["text"]
        if ref.get("images"):
            image = Image.open(FIXTURE / ref["images"][0]).convert("RGB")
            gt = transform(upstream.CC3MDataset.expand2square(image, (255, 255, 255)))
        else:
            gt = torch.zeros((3, 512, 512))
        generated = Image.open(FIXTURE / pred["images"][0]).convert("RGB") if pred.get("images") else None
        out.append((None, pred["text"], f"{target.strip()} ###", generated, None, gt, None, ref["id"]))
    return out


def run(upstream: Path, weights_home: Path) -> dict:
    os.environ["TORCH_HOME"] = str(weights_home)
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # the prediction files hold PIL images
    import torch
    import torchmetrics.image.inception as tm_inception
    from torchvision import transforms

    _stand_ins()
    sys.path.insert(0, str(upstream))
    sys.modules["transformers"] = types.SimpleNamespace(PreTrainedTokenizer=object)  # the loader's annotations
    import dataloader
    import metric

    del sys.modules["transformers"]

    compute = tm_inception.InceptionScore.compute

    def seeded(self):
        torch.manual_seed(0)
        return compute(self)

    tm_inception.InceptionScore.compute = seeded
    upstream_names = types.SimpleNamespace(ALL_IMG_TOKENS_STR=metric.ALL_IMG_TOKENS_STR,
                                           CC3MDataset=dataloader.CC3MDataset)
    transform = transforms.Compose([transforms.Resize(512, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(512), transforms.ToTensor()])
    results = {}
    for name, function in SETS.items():
        with tempfile.TemporaryDirectory() as folder:
            torch.save(_predictions(name, upstream_names, transform), Path(folder) / "predictions-0.pt")
            getattr(metric, function)(folder)
            results[name] = json.loads((Path(folder) / "results_dict.json").read_text())
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=Path, help="a checkout of eric-ai-lab/MiniGPT-5")
    ap.add_argument("--out", type=Path, help="write the values and their provenance here (else print them)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    import standins

    with tempfile.TemporaryDirectory() as home:
        checkpoints = Path(home) / "hub" / "checkpoints"
        checkpoints.mkdir(parents=True)
        standins.inception_weights(checkpoints / "weights-inception-2015-12-05-6726825d.pth")
        results = run(args.upstream, Path(home))
    from importlib.metadata import version

    commit = subprocess.run(["git", "-C", str(args.upstream), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    record = {"upstream": "eric-ai-lab/MiniGPT-5", "commit": commit, "script": "metric.py",
              "command": "python tools/upstream_metrics.py --upstream MiniGPT-5 --out " + str(FIXTURE.relative_to(REPO)
                                                                                         / "expected.json"),
              "versions": {p: version(p) for p in ("torch", "torchvision", "torchmetrics", "torch-fidelity",
                                                   "nltk", "rouge", "pillow")},
              "results": results}
    text = json.dumps(record, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
