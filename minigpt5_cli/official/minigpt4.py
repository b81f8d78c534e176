"""MiniGPT-4 as a transformers `Blip2ForConditionalGeneration` folder, from the files the original code reads:
LAVIS's EVA ViT-g (`eva_vit_g.pth`), its BLIP-2 Q-Former file (`blip2_pretrained_flant5xxl.pth`, which also
holds `ln_vision` and the queries), MiniGPT-4's projection (`prerained_minigpt4_7b.pth`) and a Vicuna folder.

Every tensor of the three files goes to one place of the new model, renamed (and the attention's q and v
biases joined into one qkv bias); names the original code also ignores (the Q-Former's text parts, the
heads of other BLIP-2 models, the ViT blocks past the 39 it builds) are listed by pattern, anything else is
refused. The configuration is read from the tensors' shapes; only the attention heads and the ViT's depth
cannot be, and follow the original's rules unless given.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from minigpt5_cli import files
from minigpt5_cli.errors import UserError
from minigpt5_cli.official import sources

IMAGE_TOKEN = "<image>"  # where the prompt holds an image: one per query embedding

# (LAVIS name part, transformers name part), applied in order to a name with a leading dot.
VISION_RULES = [(".cls_token", ".embeddings.class_embedding"), (".pos_embed", ".embeddings.position_embedding"),
                (".patch_embed.proj.", ".embeddings.patch_embedding."), (".blocks.", ".encoder.layers."),
                (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.proj.", ".self_attn.projection."),
                (".attn.", ".self_attn.")]
QFORMER_RULES = [(".ln_vision.", ".vision_model.post_layernorm."),
                 (".Qformer.bert.embeddings.LayerNorm.", ".qformer.layernorm."), (".Qformer.bert.", ".qformer."),
                 (".attention.self.", ".attention.attention."), (".crossattention.self.", ".crossattention.attention.")]
PROJECTION_RULES = [(".llama_proj.", ".language_projection.")]
# What the original model has no module for, and so never reads: the EVA file's classifier parts, the
# Q-Former's text embeddings, text feed-forward and LM head (MiniGPT-4 drops them), other BLIP-2 heads.
VISION_IGNORED = (r"(norm|fc_norm|head)\.(weight|bias)", r"mask_token", r"rel_pos_bias\..*",
                  r"blocks\.\d+\.(gamma_[12]|attn\.relative_position_(bias_table|index))")
QFORMER_IGNORED = (r"Qformer\.cls\..*", r"Qformer\.bert\.embeddings\.(word_embeddings\..*|position_embeddings\..*|"
                   r"position_ids)", r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",
                   r"(t5_proj|t5_model|opt_proj|opt_model|vision_proj|text_proj|itm_head)\..*", r"temp")


def _rename(name: str, rules: list[tuple[str, str]], prefix: str = "") -> str:
    name = f".{name}"
    for a, b in rules:
        name = name.replace(a, b)
    return prefix + name[1:]


def _back(name: str, rules: list[tuple[str, str]], prefix: str = "") -> str:
    """The source name of the transformers name `name`: `_rename` undone (the longer parts first, as there)."""
    return _rename(name.removeprefix(prefix), [(b, a) for a, b in rules])


@dataclass
class Part:
    """One source file's share of the model: its tensors under the model's names, checked against `wanted`."""

    where: str
    state: dict  # the file's names -> tensors (a prefix of them dropped)
    rules: list
    prefix: str  # of the model's names
    wanted: dict  # the model's names -> shapes
    ignored: tuple = ()
    dropped: str = ""  # the prefix dropped from the file's names

    def check(self) -> dict:
        """The tensors under the model's names, after checking that each wanted one is there at its shape and
        nothing else is but what `ignored` lists."""
        names = {_rename(k, self.rules, self.prefix): k for k in self.state}
        found = {n: self.state[k] for n, k in names.items()}

        def shown(name: str) -> str:
            return self.dropped + (names.get(name) or _back(name, self.rules, self.prefix))

        sources.check(found, self.wanted, self.where, self.ignored, shown)
        return _join_biases({n: t for n, t in found.items() if n in self.wanted})


def _need(state: dict, name: str, where: str, dims: int):
    """The tensor `name`, refused unless it has `dims` dimensions (its shape is read next)."""
    if name not in state:
        raise UserError(f"{where} lacks {name}")
    if state[name].dim() != dims:
        raise UserError(f"{where}: {name} is {list(state[name].shape)}, expected {dims} dimensions")
    return state[name]


def _indices(state: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def vision_config(eva: dict, where: str, heads: int | None, layers: int) -> dict:
    """EVA ViT-g's settings, from its tensors: width, MLP width, patch and image size; the heads as the
    original builds them (width // 88) unless given; `layers` blocks, as the original builds (39 of the
    released file's 40)."""
    width = _need(eva, "cls_token", where, 3).shape[-1]
    patch = _need(eva, "patch_embed.proj.weight", where, 4).shape[-1]
    positions = _need(eva, "pos_embed", where, 3).shape[1] - 1
    grid = math.isqrt(max(positions, 0))
    if positions < 1 or grid * grid != positions:
        raise UserError(f"{where}: pos_embed {list(eva['pos_embed'].shape)} is not a square grid plus a class token")
    blocks = len(_indices(eva, r"blocks\.(\d+)\."))
    if layers > blocks:
        raise UserError(f"{where} holds {blocks} ViT blocks, fewer than the {layers} of --vision-layers")
    heads = heads or width // 88
    if not width or not heads or width % heads:
        raise UserError(f"{where}: width {width} does not split into {heads} attention heads; pass --vision-heads")
    return {"hidden_size": width, "num_hidden_layers": layers,
            "intermediate_size": _need(eva, "blocks.0.mlp.fc1.weight", where, 2).shape[0], "num_attention_heads": heads,
            "patch_size": patch, "image_size": grid * patch, "qkv_bias": True, "layer_norm_eps": 1e-6,
            "hidden_act": "gelu"}


def qformer_config(blip2: dict, where: str, heads: int | None) -> dict:
    """The Q-Former's settings (BERT base's, in the released file), from its tensors; the heads as BERT's
    (width // 64) unless given."""
    width = _need(blip2, "query_tokens", where, 3).shape[-1]
    layer = "Qformer.bert.encoder.layer"
    cross = _indices(blip2, rf"{re.escape(layer)}\.(\d+)\.crossattention\.")
    layers = _indices(blip2, rf"{re.escape(layer)}\.(\d+)\.")
    if not cross or cross[0] != 0:
        raise UserError(f"{where} lacks {layer}.0.crossattention.self.key.weight")
    heads = heads or width // 64
    if not width or not heads or width % heads:
        raise UserError(f"{where}: width {width} does not split into {heads} attention heads; pass --qformer-heads")
    return {"hidden_size": width, "num_hidden_layers": len(layers), "num_attention_heads": heads,
            "intermediate_size": _need(blip2, f"{layer}.0.intermediate_query.dense.weight", where, 2).shape[0],
            "encoder_hidden_size": _need(blip2, f"{layer}.0.crossattention.self.key.weight", where, 2).shape[1],
            "cross_attention_frequency": cross[1] - cross[0] if len(cross) > 1 else max(len(layers), 1),
            "layer_norm_eps": 1e-12, "hidden_act": "gelu", "use_qformer_text_input": False}


def _wanted(shapes: dict, prefixes: tuple[str, ...], joined_bias: bool = False) -> dict:
    """The shapes of the model's tensors under `prefixes`; with `joined_bias`, each qkv bias as the q and v
    biases it is made from."""
    wanted = {}
    for name, shape in shapes.items():
        if not name.startswith(prefixes):
            continue
        if joined_bias and name.endswith(".qkv.bias"):
            stem = name.removesuffix("qkv.bias")
            wanted[stem + "q_bias"] = wanted[stem + "v_bias"] = (shape[0] // 3,)
        else:
            wanted[name] = tuple(shape)
    return wanted


def _join_biases(state: dict) -> dict:
    """The EVA attention's q and v biases as transformers' one qkv bias (the k bias is zero, as there)."""
    import torch

    out = {}
    for name, tensor in state.items():
        if name.endswith(".q_bias"):
            stem = name.removesuffix("q_bias")
            v = state[stem + "v_bias"]
            out[stem + "qkv.bias"] = torch.cat([tensor, torch.zeros_like(v), v])
        elif not name.endswith(".v_bias"):
            out[name] = tensor
    return out


def _language_model(vicuna: Path):
    """The Vicuna folder's causal LM (in the dtype it is stored in) and its tokenizer with the image token
    added after its own tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not vicuna.is_dir():
        raise UserError(f"--vicuna {vicuna} is not a folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(vicuna, extra_special_tokens={"image_token": IMAGE_TOKEN})
        lm = AutoModelForCausalLM.from_pretrained(vicuna, dtype="auto")
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--vicuna {vicuna} does not load as a causal LM with its tokenizer ({e})") from None
    return lm, tokenizer


def _lm_state(lm, rows: int) -> dict:
    """The causal LM's tensors under the Blip2 model's names, its vocabulary grown to `rows` with the mean
    of the existing rows (as transformers grows one)."""
    import torch

    state = {}
    for name, tensor in lm.state_dict().items():
        if tensor.shape[0] == lm.config.vocab_size and name.endswith(("embed_tokens.weight", "lm_head.weight")):
            extra = rows - tensor.shape[0]
            tensor = torch.cat([tensor, tensor.float().mean(0, keepdim=True).to(tensor.dtype).expand(extra, -1)])
        state[f"language_model.{name}"] = tensor
    return state


def _image_processor(size: int):
    """The original preprocessing: the short side to `size` (bilinear), a centre crop, CLIP's mean and std."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    from minigpt5_cli.images import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=PILImageResampling.BILINEAR,
                              do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
                              do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def import_minigpt4(vicuna: Path, eva_vit: Path, qformer: Path, minigpt4: Path, output: Path, *,
                    vision_heads: int | None = None, qformer_heads: int | None = None, vision_layers: int = 39,
                    overwrite: bool = False) -> dict:
    """Write the Blip2 folder `output`; returns what `imported.json` records."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    sources.check_output(output, [vicuna, eva_vit, qformer, minigpt4], overwrite)
    eva_where, q_where, p_where = f"--eva-vit {eva_vit}", f"--qformer {qformer}", f"--minigpt4 {minigpt4}"
    eva = sources.tensors(sources.load(eva_vit, "--eva-vit"), None, eva_vit, "--eva-vit")
    blip2 = sources.tensors(sources.load(qformer, "--qformer"), "model", qformer, "--qformer")
    proj = sources.tensors(sources.load(minigpt4, "--minigpt4"), "model", minigpt4, "--minigpt4")
    vision = vision_config(eva, eva_where, vision_heads, vision_layers)
    q = qformer_config(blip2, q_where, qformer_heads)
    lm, tokenizer = _language_model(vicuna)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = max(lm.config.vocab_size, image_id + 1)
    text = lm.config.to_dict() | {"vocab_size": rows}
    if (text.get("pad_token_id") or 0) < 0:  # Vicuna v0's "no pad" (-1), which transformers now refuses
        text["pad_token_id"] = None
    config = Blip2Config(vision_config=vision, qformer_config=q, text_config=text,
                         num_query_tokens=blip2["query_tokens"].shape[1], image_token_index=image_id)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Blip2ForConditionalGeneration(config).state_dict().items()}

    vision_wanted = _wanted(shapes, ("vision_model.embeddings.", "vision_model.encoder."), joined_bias=True)
    # the blocks past those built, which the original's non-strict load drops
    unbuilt = VISION_IGNORED + (rf"blocks\.(?!(?:{'|'.join(map(str, range(vision_layers)))})\.)\d+\..*",)  # at most the file's
    tower = "visual_encoder."
    parts = [Part(eva_where, eva, VISION_RULES, "vision_model.", vision_wanted, unbuilt),
             Part(q_where, {k: v for k, v in blip2.items() if not k.startswith(tower)}, QFORMER_RULES, "",
                  _wanted(shapes, ("vision_model.post_layernorm.", "qformer.", "query_tokens")), QFORMER_IGNORED),
             Part(p_where, proj, PROJECTION_RULES, "", _wanted(shapes, ("language_projection.",)))]
    if any(k.startswith(tower) for k in blip2):
        # The original loads this file after the EVA file, so a vision tower in it is the one used.
        ignored = tuple(re.escape(tower) + pattern for pattern in unbuilt)
        parts.append(Part(q_where, {k.removeprefix(tower): v for k, v in blip2.items() if k.startswith(tower)},
                          VISION_RULES, "vision_model.", vision_wanted, ignored, dropped=tower))
    state = {}
    for part in parts:
        state.update(part.check())
    language = _lm_state(lm, rows)
    sources.check(language, {k: s for k, s in shapes.items() if k.startswith("language_model.")},
                  f"--vicuna {vicuna}", shown=lambda name: name.removeprefix("language_model."))
    state.update(language)

    record = {"kind": "minigpt4", "vicuna": str(vicuna), "eva_vit": str(eva_vit), "qformer": str(qformer),
              "minigpt4": str(minigpt4), "image_token_index": image_id}
    processor = Blip2Processor(image_processor=_image_processor(vision["image_size"]), tokenizer=tokenizer,
                               num_query_tokens=config.num_query_tokens)
    with files.staged(output, replace=overwrite) as tmp:
        config.save_pretrained(tmp)
        if lm.generation_config is not None:
            lm.generation_config.save_pretrained(tmp)
        save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, tmp, max_shard_size="5GB")
        processor.save_pretrained(tmp)
        sources.mark(tmp, record)
    return record
