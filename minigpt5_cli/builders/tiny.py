"""Tiny random-weight backbones, built from configs and saved with `save_pretrained`.

They exist so that tests and the debug recipes run offline in seconds. A recipe names them as
`tiny:llama` (text-only causal LM), `tiny:llava` (image-text-to-text), `tiny:blip2` (BLIP-2 with a
Llama language model and a sentencepiece-style tokenizer, as MiniGPT-4 is built), `tiny:sd` (Stable
Diffusion 1/2), `tiny:sdxl`, `tiny:sd3` or `tiny:flux`. `hub.resolve` builds the folder once into a
cache and returns its path; the production loaders (`backbones.py`, `generators.py`) then load it
like any local folder.

`toy:llava` and `toy:sd` are the untrained shapes-world backbones (`toyworld/world.py`): larger than
the tiny ones, with tokenizers that hold every toy word whole. `minigpt5 train` stages `llm` and
`generator` train them from scratch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minigpt5_cli.builders.common import clip_tokenizer

NAMES = ("tiny:llama", "tiny:llava", "tiny:blip2", "tiny:sd", "tiny:sdxl", "tiny:sd3", "tiny:flux", "toy:llava",
         "toy:sd")
WEIGHTS = True  # random weights, saved: loadable as any model folder
BUILD_SEED = 0  # the weights of every tiny and toy backbone

# A few lines of plain English so the byte-level BPE learns some merges; any text still encodes.
_CORPUS = [
    "a red circle at the top left", "a blue square in the middle", "a green triangle at the bottom",
    "the local parish holds a craft show each year", "it moves to the right", "it turns into a square",
    "there is a shape in the middle", "generate an image with the scene description",
    "tell me the next scene with image", "Human: Assistant: ###",
]


def build(name: str, out: str | Path) -> str:
    """Build tiny backbone `name` with fixed random weights into folder `out`. The weights come from
    a forked RNG, so building leaves the caller's random state as it was: a cold cache and a warm
    one give a run the same initial weights."""
    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        builder = {"tiny:sdxl": _build_sdxl, "tiny:sd3": _build_sd3, "tiny:flux": _build_flux,
                   "tiny:blip2": _build_blip2}.get(name) or \
            (_build_sd if name.endswith(":sd") else _build_llm)
        builder(out, SIZES[name])
    return str(out)


# Sizes per backbone. The tiny ones are for tests; the toy ones are trained on the shapes world.
SIZES = {
    "tiny:llama": {"vision": False, "width": 32, "layers": 2, "heads": 4, "kv_heads": 2},
    "tiny:llava": {"vision": True, "width": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vision_width": 32},
    "tiny:blip2": {"width": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vision_width": 16, "image": 28, "patch": 14,
                   "qformer_width": 16, "queries": 4},
    "toy:llava": {"vision": True, "width": 128, "layers": 4, "heads": 4, "kv_heads": 4, "vision_width": 64,
                  "toy": True},
    "tiny:sd": {"cond_len": 16, "width": 32, "vae": (8, 16, 16), "latent": 4, "unet": (16, 32), "head_dim": 4,
                "attention": ("CrossAttnDownBlock2D", "DownBlock2D")},
    "tiny:sdxl": {"cond_len": 16, "width": 32, "pooled": 16},
    "tiny:sd3": {"cond_len": 16, "width": 32, "pooled": 32},
    "tiny:flux": {"cond_len": 16, "width": 32},
    # 4x4 latents: a UNet this small learns where things are far sooner than at 8x8 (its attention
    # has no positional encoding, so position comes from the borders).
    "toy:sd": {"cond_len": 12, "width": 64, "vae": (16, 32, 32, 32), "latent": 4, "unet": (32, 64), "head_dim": 8,
               "attention": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), "toy": True},
}


def _toy_corpus() -> list[str]:
    from minigpt5_cli.data import prompts
    from minigpt5_cli.toyworld import world

    texts = [*prompts.TEMPLATES, "###Human: ###Assistant:"]
    return world.corpus() + [p.replace("{}", "") for p in texts]


def _llm_tokenizer(extra_special: list[str], toy: bool = False):
    """Byte-level BPE. The toy one learns every merge of the shapes world's text, so its words are whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", *extra_special]
    trainer = trainers.BpeTrainer(
        vocab_size=1000 if toy else 400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_toy_corpus() if toy else _CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        model_max_length=512,
    )


def _text_config(vocab_size: int, tok, size: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=size["width"], intermediate_size=2 * size["width"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )


def _build_llm(out: Path, size: dict) -> None:
    from transformers import LlamaForCausalLM

    if not size["vision"]:
        tok = _llm_tokenizer([])
        model = LlamaForCausalLM(_text_config(len(tok), tok, size))
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return

    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _llm_tokenizer(["<image>"], toy=size.get("toy", False))
    image_size, patch, vision = 32, 8, size["vision_width"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision, intermediate_size=2 * vision, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=patch, projection_dim=vision,
        ),
        text_config=_text_config(len(tok), tok, size),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)


def _sentencepiece_tokenizer(specials: list[str]):
    """LLaMA's tokenizer shape: BPE over Metaspace pieces, the "▁" written only at the text's start (as
    today's transformers loads LLaMA's), no normalisation, BOS before a text; `specials` added after the
    vocabulary, as MiniGPT-4 adds its own."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")  # pieces learnt per word
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]  # every ASCII character a piece of its own
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS + ["###Human: ###Assistant: <Img> </Img> Pictures come in turn"], trainer)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": specials[0]} if specials else {},
                                   model_max_length=512, add_prefix_space=None)


def _build_blip2(out: Path, size: dict) -> None:
    """BLIP-2 hosting a decoder-only Llama: a ViT, a Q-Former with `queries` query tokens and a projection
    into the LLM's width, as MiniGPT-4 is laid out; the processor with its image token and query count."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig)
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = _sentencepiece_tokenizer(["<image>"])
    vision, qformer = size["vision_width"], size["qformer_width"]
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=vision, intermediate_size=2 * vision, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=size["image"], patch_size=size["patch"]),
        qformer_config=Blip2QFormerConfig(hidden_size=qformer, intermediate_size=2 * qformer, num_hidden_layers=2,
                                          num_attention_heads=2, encoder_hidden_size=vision, vocab_size=8),
        text_config=_text_config(len(tok), tok, size), num_query_tokens=size["queries"],
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    Blip2ForConditionalGeneration(config).save_pretrained(out)
    images = BlipImageProcessorPil(size={"height": size["image"], "width": size["image"]})
    Blip2Processor(image_processor=images, tokenizer=tok, num_query_tokens=size["queries"]).save_pretrained(out)


def _clip_text(tokenizer, width: int, projection: int | None = None):
    """A CLIP text encoder over `tokenizer` (with a projection head, as SDXL's second and SD3's use)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **({"projection_dim": projection} if projection else {}),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(channels: tuple, latent: int, attention: bool = True, sample_size: int = 32, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=8, sample_size=sample_size, mid_block_add_attention=attention, **kw,
    )


def _build_sd(out: Path, size: dict) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from minigpt5_cli.toyworld import world

    # Neither is 77 x 1024 on purpose: nothing may assume SD's numbers.
    cond_len, width = size["cond_len"], size["width"]
    tokenizer = clip_tokenizer(cond_len, world.words() if size.get("toy") else ())
    text_encoder = _clip_text(tokenizer, width)
    vae_channels = size["vae"]
    vae = _vae(vae_channels, size["latent"], attention=not size.get("toy"))
    down = size["attention"]
    unet = UNet2DConditionModel(
        sample_size=32 // 2 ** (len(vae_channels) - 1), in_channels=size["latent"], out_channels=size["latent"],
        layers_per_block=1,
        block_out_channels=size["unet"], norm_num_groups=8, cross_attention_dim=width,
        attention_head_dim=size["head_dim"], down_block_types=down,
        up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
    )
    if size.get("toy"):  # trained from scratch: a cosine schedule and v-prediction suit tiny latents
        scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                  clip_sample=False, timestep_spacing="trailing", steps_offset=1)
    else:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)


def _build_sdxl(out: Path, size: dict) -> None:
    """SDXL's shape at tiny size: two CLIP encoders (the second with a projection), a UNet that takes
    their concatenated states, the pooled vector and six time ids."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    cond_len, width, pooled = size["cond_len"], size["width"], size["pooled"]
    tokenizer, tokenizer_2 = clip_tokenizer(cond_len), clip_tokenizer(cond_len)
    text_encoder, text_encoder_2 = _clip_text(tokenizer, width), _clip_text(tokenizer_2, width, pooled)
    time = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=2 * width, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=time,
        projection_class_embeddings_input_dim=pooled + 6 * time,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    StableDiffusionXLPipeline(vae=_vae((8, 16, 16), 4), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                              scheduler=scheduler).save_pretrained(out)


def _t5_tokenizer(max_length: int):
    """A T5-style (Unigram, sentencepiece-like) tokenizer over a few words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                                                             unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=max_length, extra_ids=0)


def _build_sd3(out: Path, size: dict) -> None:
    """SD3's shape at tiny size: CLIP-L and CLIP-G (with projections) and T5, an MM-DiT, 16-channel-style
    latents with a shift, a flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    cond_len, width, pooled = size["cond_len"], size["width"], size["pooled"]
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(cond_len), clip_tokenizer(cond_len), _t5_tokenizer(cond_len)
    text_encoder, text_encoder_2 = _clip_text(tokenizer, width, pooled // 2), _clip_text(tokenizer_2, width, pooled // 2)
    joint = 2 * width  # the CLIP pair's width: T5's width matches it, as 4096 does in SD3
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=joint, d_ff=2 * joint, d_kv=16,
                                             num_layers=1, num_heads=4, pad_token_id=tokenizer_3.pad_token_id,
                                             eos_token_id=tokenizer_3.eos_token_id))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=joint, caption_projection_dim=32,
                                        pooled_projection_dim=pooled, out_channels=4, pos_embed_max_size=16)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=_vae((8, 16, 16), 4, shift_factor=0.1, scaling_factor=1.5),
                             text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                             tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                             tokenizer_3=tokenizer_3).save_pretrained(out)


def _build_flux(out: Path, size: dict) -> None:
    """FLUX.1-dev's shape at tiny size: CLIP-L (pooled only) and T5, a transformer of one double-stream
    and one single-stream block over 2x2-packed latents, with a guidance embedding, and the pipeline's
    resolution-dependent flow-matching schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    cond_len, width = size["cond_len"], size["width"]
    tokenizer, tokenizer_2 = clip_tokenizer(cond_len), _t5_tokenizer(cond_len)
    t5 = 2 * width  # unlike the CLIP width, as 4096 is unlike 768
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=t5, d_ff=2 * t5, d_kv=16,
                                             num_layers=1, num_heads=4, pad_token_id=tokenizer_2.pad_token_id,
                                             eos_token_id=tokenizer_2.eos_token_id))
    latent = 4
    transformer = FluxTransformer2DModel(in_channels=4 * latent, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5,
                                         pooled_projection_dim=width, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    # FLUX's 8x VAE, at 64 px: 8x8 latents, 4x4 packed tokens; image sides are multiples of 16
    vae = _vae((8, 16, 16, 16), latent, sample_size=64, shift_factor=0.1, scaling_factor=1.5)
    FluxPipeline(scheduler=scheduler, vae=vae,
                 text_encoder=_clip_text(tokenizer, width), tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                 tokenizer_2=tokenizer_2, transformer=transformer).save_pretrained(out)
