"""Make tests/fixtures/official/: tiny stand-ins for the released MiniGPT-5 checkpoints and their bases, and the
outputs that MiniGPT-5's own code (eric-ai-lab/MiniGPT-5, a local checkout) computes from them.

Runs in a legacy environment with the libraries the original code was written for, never in ours:

    python3.11 -m venv /work/legacy-venv
    /work/legacy-venv/bin/pip install torch transformers==4.31.0 tokenizers==0.13.3 peft==0.10.0 timm==0.6.13 \\
        omegaconf==2.3.0 lightning==2.1.4 sentencepiece iopath pandas "numpy<2" safetensors
    /work/legacy-venv/bin/python tools/official_fixtures.py --upstream PATH/TO/MiniGPT-5 --out tests/fixtures/official

Everything runs through the checkout's own modules, imported unchanged; only what would download weights or needs
packages that play no part here is replaced: the `minigpt4` package `__init__`s (dataset builders), diffusers
(the generator: a stand-in records the conditioning it is handed), wandb and the plotting helpers, the BERT
tokenizer (unused by MiniGPT-4), the full-size widths (EVA ViT-g and BERT-base are built at tiny widths through
the original constructors), the SD text encoder (only its width is read), and the hub download of the EVA weights
(pointed at the local file). The three base files are written first in the layouts the original loaders read,
and the model is then built by `MiniGPT5.from_config`, which loads them. The stage-1 and stage-2 files are the
state dicts that the original `on_save_checkpoint` keeps, after every trained tensor is randomised (seeded). The
inputs come from the original VIST dataset class and input processor; the outputs from the original teacher-forced
`forward` and `generate` (argmax sampling: top-k 1 with the official top-p, temperature and repetition penalty).
All in fp32 on the CPU, one thread, deterministic.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
SEED = 0
LLM = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
VIT = {"embed_dim": 16, "depth": 2, "num_heads": 2}  # EVA ViT-g: 1408 wide, 39 deep, 16 heads
QFORMER = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
           "vocab_size": 30, "max_position_embeddings": 32}  # BERT-base: 768, 12, 12, 3072
IMAGE = 28  # two 14 px patches a side
QUERIES = 4  # MiniGPT-4: 32
COND_WIDTH = 16  # SD 2.1's text encoder: 1024; the mapper keeps its 8 heads
T5_WIDTH = 24  # the flan-t5-xxl projection the BLIP-2 file carries and MiniGPT-4 ignores
VOCAB = 400
MAX_NEW = 12
STORY = ["a family at the lake", "kids run to the boat", "they sail at sunset", "a fire at night"]


# ---------------------------------------------------------------- importing the original code


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


class _Frozen(torch.nn.Module):
    """A generator part that is only moved and frozen here."""

    def __init__(self, width: int = 0):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=width, scaling_factor=1.0)


class _Pipeline:
    """Records what the original code hands the Stable Diffusion pipeline."""

    calls: ClassVar[list[dict]] = []

    def __init__(self, **kwargs):
        self.scheduler = None

    @classmethod
    def from_pretrained(cls, name, **kwargs):
        return cls()

    def to(self, *args, **kwargs):
        return self

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return types.SimpleNamespace(images=[None])


def load_upstream(root: Path) -> types.SimpleNamespace:
    sys.path.insert(0, str(root))
    for pkg in ("minigpt4", "minigpt4.common", "minigpt4.models"):  # skip their __init__s (dataset builders)
        _module(pkg, __path__=[str(root.joinpath(*pkg.split(".")))])
    import constants
    from minigpt4.models import base_model
    sys.modules["minigpt4.models"].BaseModel = base_model.BaseModel
    import dataloader
    import lightning.pytorch  # noqa: F401  (before the stand-ins below: it probes for wandb)
    from minigpt4.models import Qformer, blip2, eva_vit, mini_gpt4, mini_gpt5
    diffusers = _module("diffusers", AutoencoderKL=types.SimpleNamespace(from_pretrained=lambda *a, **k: _Frozen()),
                        UNet2DConditionModel=types.SimpleNamespace(from_pretrained=lambda *a, **k: _Frozen()),
                        StableDiffusionPipeline=_Pipeline)
    diffusers.models = _module("diffusers.models")
    _module("diffusers.models.autoencoders")
    _module("diffusers.models.autoencoders.vae", DiagonalGaussianDistribution=None)
    _module("wandb", Image=None)
    _module("utils", plot_images_and_text=None)

    import model

    for mod in (constants, mini_gpt4, mini_gpt5, model, dataloader):
        mod.PRECISION = torch.float32  # the original runs bf16 / fp16; the fixtures compare in fp32
    tiny_vit = eva_vit.VisionTransformer

    def vit(**kwargs):
        return tiny_vit(**{**kwargs, **VIT})
    eva_vit.VisionTransformer = vit
    blip2.BertConfig = types.SimpleNamespace(from_pretrained=lambda name: Qformer.BertConfig(**QFORMER))
    blip2.Blip2Base.init_tokenizer = classmethod(lambda cls: None)  # MiniGPT-4 never uses the BERT tokenizer
    model.CLIPTextModel = types.SimpleNamespace(from_pretrained=lambda *a, **k: _Frozen(COND_WIDTH))
    model.CLIPTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: types.SimpleNamespace(
        model_max_length=77))
    model.MiniGPT5_Model.encode_caption = lambda self, caption, length, inference=False: torch.zeros(
        1, length, COND_WIDTH)  # the caption loss is not part of any compared output
    return types.SimpleNamespace(eva_vit=eva_vit, blip2=blip2, Qformer=Qformer, mini_gpt5=mini_gpt5, model=model,
                                 dataloader=dataloader, constants=constants)


# ---------------------------------------------------------------- random tensors


def randomise(named: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Fill every tensor in place, in name order: norm weights near 1, biases small, matrices ~ 1/sqrt(fan-in)."""
    for name in sorted(named):
        t = named[name]
        noise = torch.randn(t.shape, generator=gen)
        if t.dim() == 1 and re.search(r"norm|LayerNorm|ln_", name) and name.endswith("weight"):
            value = 1 + 0.1 * noise
        elif t.dim() == 1:
            value = 0.1 * noise
        else:
            value = noise / t.shape[-1] ** 0.5
        t.data.copy_(value.to(t.dtype))


def decay(named: dict[str, torch.Tensor], new: int, gen: torch.Generator, factor: float) -> None:
    """A trained embedding or LM-head matrix: every old row shrunk (AdamW's weight decay) plus a little noise,
    the new rows random."""
    for name in sorted(named):
        t = named[name]
        noise = torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5
        t.data[:-new] = t.data[:-new] * factor + 0.01 * noise[:-new]
        t.data[-new:] = noise[-new:]


# ---------------------------------------------------------------- the base files


def write_tokenizer(folder: Path, corpus: list[str]) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(  # LLaMA's settings: BPE, byte fallback, split digits, no normalisation
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=VOCAB, model_type="bpe", byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        allow_whitespace_only_pieces=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
         "tokenizer_class": "LlamaTokenizer"}, indent=2) + "\n")


def write_vicuna(folder: Path, corpus: list[str], gen: torch.Generator) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    write_tokenizer(folder, corpus)
    # Vicuna v0 7B's config: its bos/eos ids are 0/1 and pad -1, unlike its tokenizer's <s> = 1, </s> = 2
    config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
              **LLM, "initializer_range": 0.02, "max_position_embeddings": 2048, "max_sequence_length": 2048,
              "model_type": "llama", "pad_token_id": -1, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "torch_dtype": "float32", "use_cache": True, "vocab_size": VOCAB}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}, indent=2) + "\n")
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    state = llm.state_dict()
    randomise({k: v for k, v in state.items() if not k.endswith("inv_freq")}, gen)  # LLaMA-1 files keep it
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def write_lavis(up, out: Path, gen: torch.Generator) -> None:
    """eva_vit_g.pth (a bare fp16 state dict, as the original ViT loader reads it), blip2_pretrained_flant5xxl.pth
    ({"model": ...}: ln_vision, query_tokens, the Q-Former without its text-only parts, and the T5 projection)
    and prerained_minigpt4_7b.pth ({"model": llama_proj})."""
    vit = up.eva_vit.VisionTransformer(img_size=IMAGE, patch_size=14, use_mean_pooling=False, mlp_ratio=4.3637,
                                       qkv_bias=True, norm_layer=torch.nn.LayerNorm)
    state = vit.state_dict()
    randomise(state, gen)
    torch.save({k: v.half() for k, v in state.items()}, out / "eva_vit_g.pth")

    qformer, queries = up.blip2.Blip2Base.init_Qformer(QUERIES, VIT["embed_dim"])
    text_only = re.compile(r"^(cls\.|bert\.embeddings\.(word|position)_embeddings\.|"
                           r"bert\.encoder\.layer\.\d+\.(output|intermediate)\.)")
    state = {f"Qformer.{k}": v for k, v in qformer.state_dict().items() if not text_only.match(k)}
    state |= {"query_tokens": queries.data, "ln_vision.weight": torch.empty(VIT["embed_dim"]),
              "ln_vision.bias": torch.empty(VIT["embed_dim"]), "t5_proj.weight": torch.empty(T5_WIDTH, 16),
              "t5_proj.bias": torch.empty(T5_WIDTH)}
    randomise({k: v for k, v in state.items() if not k.endswith("position_ids")}, gen)
    torch.save({"model": state}, out / "blip2_pretrained_flant5xxl.pth")

    proj = {"llama_proj.weight": torch.empty(LLM["hidden_size"], QFORMER["hidden_size"]),
            "llama_proj.bias": torch.empty(LLM["hidden_size"])}
    randomise(proj, gen)
    torch.save({"model": proj}, out / "prerained_minigpt4_7b.pth")


# ---------------------------------------------------------------- the official module


def build(up, out: Path, stage2: bool):
    """The Lightning module as the original builds it, at tiny widths, its bases loaded by the original loaders."""
    from omegaconf import OmegaConf

    up.mini_gpt5.USE_LORA = stage2
    up.model.IS_STAGE2 = stage2
    up.eva_vit.download_cached_file = lambda url, **kwargs: str(out / "eva_vit_g.pth")
    cfg = OmegaConf.create({"arch": "minigpt5", "freeze_vit": True, "freeze_qformer": True, "image_size": IMAGE,
                            "num_query_token": QUERIES, "llama_model": str(out / "vicuna"), "vit_precision": "fp32",
                            "q_former_model": str(out / "blip2_pretrained_flant5xxl.pth"), "max_txt_len": 160,
                            "end_sym": "###", "ckpt": str(out / "prerained_minigpt4_7b.pth")})
    up.model.Config = lambda args: types.SimpleNamespace(model_cfg=cfg)
    module = up.model.MiniGPT5_Model(types.SimpleNamespace(model_type="multimodal_encoder", snr_loss=False))
    return module.eval()


def load_ckpt(module, path: Path) -> None:
    """As Lightning's load_from_checkpoint(strict=False) (stage 1) or playground's load_state_dict (stage 2)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=False)


def trainables(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def save_ckpt(module, path: Path) -> dict[str, torch.Tensor]:
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.1.4"}
    module.on_save_checkpoint(ckpt)
    ckpt["state_dict"] = {k: v.detach().clone() for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, path)
    return ckpt["state_dict"]


def check_bases(module, out: Path) -> None:
    """Every base tensor reached the module: the files are in the layouts the original loaders read."""
    m = module.model
    vit = torch.load(out / "eva_vit_g.pth", weights_only=True)
    for k, v in vit.items():
        assert torch.equal(m.visual_encoder.state_dict()[k], v.float()), k
    blip = torch.load(out / "blip2_pretrained_flant5xxl.pth", weights_only=True)["model"]
    mine = m.state_dict()
    for k, v in blip.items():
        assert k.startswith("t5_proj.") or torch.equal(mine[k], v), k
    for k, v in torch.load(out / "prerained_minigpt4_7b.pth", weights_only=True)["model"].items():
        assert torch.equal(mine[k], v), k


# ---------------------------------------------------------------- the cases


def vist_items(up, tokenizer, folder: Path):
    """Items of the original VIST dataset class for a four-step story: step 0's generation item (text only) and
    step 2's text-and-image item (two images in the prompt)."""
    from torchvision import transforms

    rng = np.random.default_rng(SEED)
    steps, mapping, raw = [], {}, []
    for i, text in enumerate(STORY):
        path = folder / f"{i}.png"
        raw.append(rng.integers(0, 256, (33 + 7 * i, 40 - 5 * i, 3), dtype=np.uint8))
        Image.fromarray(raw[-1]).save(path)
        steps.append({"caption": text, "image_id": str(i), "sequence_index": i})
        mapping[str(i)] = str(path)
    (folder / "story_cleaned.json").write_text(json.dumps({"story": steps}))
    (folder / "story_image_mapping.json").write_text(json.dumps(mapping))
    pixels = transforms.Compose([  # the original test transform, at the tiny image size
        transforms.Resize(IMAGE, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(IMAGE),
        transforms.ToTensor(), transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                   (0.26862954, 0.26130258, 0.27577711))])
    processor = up.model.MiniGPT5_InputProcessor(tokenizer=tokenizer, image_processor=pixels)
    random.seed(SEED)
    data = up.dataloader.VISTDataset(str(folder / "story_cleaned.json"), input_processor=processor,
                                     output_vis_processor=transforms.ToTensor())
    names = data.task_names
    return {"text": data[names.index("story_0-gen")], "vist": data[names.index("story_2-multimodal")]}, raw


class Recorder:
    """Hooks that read what the original code computes, without changing it."""

    def __init__(self, module):
        self.seen: dict[str, list] = {"embeds": [], "fc": [], "proj": [], "mapped": []}
        llm = module.model.llama_model
        inner = (llm.get_base_model() if hasattr(llm, "get_base_model") else llm).model
        inner.register_forward_pre_hook(lambda m, a, kw: self.seen["embeds"].append(kw.get("inputs_embeds")),
                                        with_kwargs=True)
        module.fc.register_forward_hook(lambda m, a, o: self.seen["fc"].append(a[0]))
        module.model.llama_proj.register_forward_hook(lambda m, a, o: self.seen["proj"].append(o))
        module.compute_image_loss = lambda mapped, *a, **k: self.seen["mapped"].append(mapped) or torch.zeros(())

    def clear(self):
        for v in self.seen.values():
            v.clear()


def run_case(up, module, rec: Recorder, item) -> dict[str, torch.Tensor]:
    out = {}
    ids, labels, mask = item["input_ids"], item["labels"], item["attention_mask"]
    images = item["input_images"]
    rec.clear()
    captured = {}
    hook = module.model.register_forward_hook(lambda m, a, o: captured.update(out=o))
    up.model.USE_CFG = False  # the 10% training-time drop to zeros is random; off for a teacher-forced forward
    module(ids, mask, [images], item["output_image"], labels, captions=[None])
    up.model.USE_CFG = True
    hook.remove()
    outputs, index = captured["out"]
    first = int((labels[0] != -100).nonzero()[0, 0]) + (outputs.logits.shape[1] - labels.shape[1])
    out["inputs_embeds"] = rec.seen["embeds"][0]
    out["hidden_last"] = outputs.hidden_states[-1]
    out["logits_tail"] = outputs.logits[:, first - 1:]  # from the position that predicts the first target token
    out["voken_index"] = index
    out["voken_states"] = rec.seen["fc"][0]
    out["conditioning"] = rec.seen["mapped"][0]
    if rec.seen["proj"]:
        out["query_embeds"] = rec.seen["proj"][0]

    rec.clear()
    _Pipeline.calls.clear()
    text, _ = module.generate(item["source"], images, max_new_tokens=MAX_NEW)
    force = not _Pipeline.calls
    if force:  # the argmax path never reached [IMG0]: the original's own forcing, once
        rec.clear()
        text, _ = module.generate(item["source"], images, max_new_tokens=MAX_NEW, force_generation=True)
    out["trace_tokens"] = module._last_sequences
    out["trace_voken_states"] = rec.seen["fc"][0]
    out["trace_conditioning"] = _Pipeline.calls[-1]["prompt_embeds"]
    out["null_conditioning"] = _Pipeline.calls[-1]["negative_prompt_embeds"]
    out["_text"], out["_forced"] = text, force
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, type=Path, help="a MiniGPT-5 checkout (eric-ai-lab/MiniGPT-5)")
    ap.add_argument("--out", required=True, type=Path, help="the fixture folder to (re)write")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    up = load_upstream(args.upstream.resolve())
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "vicuna", ignore_errors=True)
    gen = torch.Generator().manual_seed(SEED)
    # the tokenizer learns its pieces from the story and the original's prompt lines
    corpus = STORY + [line.strip() for line in (args.upstream / "dataloader.py").read_text().splitlines()
                      if re.search(r"###|<Img>|You will", line)]
    write_vicuna(out / "vicuna", corpus, gen)
    write_lavis(up, out, gen)

    # stage 1: train-time randomisation of its trainables, saved as the original's on_save_checkpoint keeps them
    m1 = build(up, out, stage2=False)
    check_bases(m1, out)
    t1 = trainables(m1)
    new = m1.model.num_new_tokens
    decay({k: v for k, v in t1.items() if "embed_tokens" in k or "lm_head" in k}, new, gen, 0.997)
    randomise({k: v for k, v in t1.items() if not ("embed_tokens" in k or "lm_head" in k)}, gen)
    s1 = save_ckpt(m1, out / "stage1.ckpt")
    # stage 2: built with LoRA, stage 1 loaded into it, then its own trainables randomised
    m2 = build(up, out, stage2=True)
    load_ckpt(m2, out / "stage1.ckpt")
    t2 = trainables(m2)
    decay({k: v for k, v in t2.items() if "modules_to_save" in k}, new, gen, 0.998)
    randomise({k: v for k, v in t2.items() if "modules_to_save" not in k}, gen)
    s2 = save_ckpt(m2, out / "stage2.ckpt")
    layers = LLM["num_hidden_layers"]
    # the released files: 131 = 2 matrices + 4 fc + 1 queries + 124 mapper; 254 = 2 + 4 LoRA x 32 layers + 124
    assert len(s1) == 2 + 4 + 1 + 124 == 131, len(s1)
    assert len(s2) == 2 + 4 * layers + 124, len(s2)

    tok = m1.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        items, raw = vist_items(up, tok, Path(tmp))
    tensors, meta = {}, {"cases": {}, "stages": {}}
    for name, item in items.items():
        tensors[f"{name}.input_ids"] = item["input_ids"]
        tensors[f"{name}.labels"] = item["labels"]
        meta["cases"][name] = {"source": item["source"], "target": item["target"],
                               "images": int(item["input_images"].shape[0]) if "<ImageHere>" in item["source"] else 0}
    tensors["vist.pixels"] = items["vist"]["input_images"]
    for i in range(tensors["vist.pixels"].shape[0]):  # the prompt's images: the story's first ones, as stored
        tensors[f"vist.image.{i}"] = torch.from_numpy(raw[i])

    for stage, files in (("stage1", ["stage1.ckpt"]), ("stage2", ["stage1.ckpt", "stage2.ckpt"])):
        module = build(up, out, stage2=stage == "stage2")
        for f in files:
            load_ckpt(module, out / f)
        wrap_generate(module)
        rec = Recorder(module)
        meta["stages"][stage] = {"files": files, "cases": {}}
        with torch.no_grad():
            for name, item in items.items():
                res = run_case(up, module, rec, item)
                meta["stages"][stage]["cases"][name] = {"generated_text": res.pop("_text"),
                                                        "forced": res.pop("_forced")}
                for k, v in res.items():
                    tensors[f"{stage}.{name}.{k}"] = v
    write_case(out, tensors, meta, tok, args.upstream)


def wrap_generate(module) -> None:
    """Keep the sequences the original generate returns (its text is decoded from them)."""
    llm = module.model.llama_model
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    base.generation_config.top_k = 1  # argmax: the official top-p/temperature/penalty still apply before it
    original = module.model.predict

    def predict(*args, **kwargs):
        result = original(*args, **kwargs)
        module._last_sequences = result["sequences"]
        return result
    module.model.predict = predict


def write_case(out: Path, tensors: dict, meta: dict, tok, upstream: Path) -> None:
    import peft
    import transformers
    from safetensors.torch import save_file

    commit = subprocess.run(["git", "-C", str(upstream), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    meta |= {"upstream_commit": commit, "seed": SEED, "llm": LLM, "vit": VIT, "qformer": QFORMER, "image": IMAGE,
             "queries": QUERIES, "cond_width": COND_WIDTH, "vocab": VOCAB, "max_new_tokens": MAX_NEW,
             "tokens": {t: tok.convert_tokens_to_ids(t) for t in tok.additional_special_tokens},
             "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
             "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__}}
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "case.safetensors"), metadata={"format": "pt"})
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in sorted(tensors.items())}
    (out / "case.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
